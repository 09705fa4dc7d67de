"""What keeps a web page the user visits from driving this local server through the user's own browser.

Every request to the UI and the API passes `HostGuard` (an ASGI middleware):
- its Host header must name this server (DNS rebinding points a foreign name at 127.0.0.1; the browser then
  sends that foreign name as Host, so refusing unknown names stops it);
- a request from a page of another origin is refused, reads included (the browser says where it came from in
  Origin / Sec-Fetch-Site; scripts and API clients send neither; a link followed from another site is a
  navigation and still opens the page). Refusing reads matters because Gradio's CORS middleware, which
  sits outside ours, echoes any Origin for non-loopback hosts;
- every response carries frame protection, nosniff and a Referrer-Policy.

`guard_outermost` wraps the app's built middleware stack once more after launch, so the guard also answers
what Gradio's outer middlewares would answer first (CORS preflights, its error pages).
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterable
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = (
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"content-security-policy", b"frame-ancestors 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def host_name(value: str) -> str:
    """'Example.com:7860' -> 'example.com'; '[::1]:7860' -> '::1'."""
    value = (value or "").strip().lower()
    if value.startswith("["):
        inside, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return ""  # '[::1]evil.com' is no host name
        return inside
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class AllowedHosts:
    """The names this server answers to. `.example.com` allows the name and every subdomain; `*` turns the
    check off (behind a proxy that checks Host itself). Names can be added after start (a share link)."""

    def __init__(self, names: Iterable[str] = ()):
        # Sets are replaced, never changed in place: the event loop reads them while the launcher adds the share link.
        self.names: frozenset[str] = frozenset()
        self.origins: frozenset[str] = frozenset()  # other origins whose pages may use this server (a share link's)
        self.chosen: frozenset[str] = frozenset()  # names given with --allowed-host: their pages may use it too
        self.any = False
        for name in names:
            self.add(name)

    def add(self, name: str, chosen: bool = False) -> None:
        name = (name or "").strip().lower()
        if name.startswith("*."):
            name = name[1:]  # '*.example.com' means what '.example.com' does
        if name == "*":
            self.any = True
            return
        if not name.startswith("."):
            name = host_name(urlsplit(name).netloc if "://" in name else name)
        if name:
            self.names = self.names | {name}
            if chosen:
                self.chosen = self.chosen | {name}

    def add_origin(self, url: str) -> None:
        """A public URL that reaches this server (a share link): its name is served, its pages may write."""
        parts = urlsplit(url)
        if parts.scheme and parts.netloc:
            self.origins = self.origins | {f"{parts.scheme}://{parts.netloc}".lower()}
            self.add(parts.netloc)

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        return _matches(host_name(host), self.names)

    def __repr__(self) -> str:
        return "any host" if self.any else ", ".join(sorted(self.names))

    def origin_allowed(self, origin: str) -> bool:
        """A page of another origin this server was told to serve: the share link, or an --allowed-host name
        (behind a proxy that rewrites Host, the page's origin is the proxy's)."""
        return origin in self.origins or _matches(host_name(urlsplit(origin).netloc), self.chosen)

    @classmethod
    def for_server(cls, host: str, extra: Iterable[str] = ()) -> "AllowedHosts":
        """Loopback names always; the listening address; for 0.0.0.0 / :: this machine's names and addresses."""
        hosts = cls([*LOOPBACK_NAMES, *(_machine_names() if host in ANY_ADDRESS else [host])])
        for name in extra:
            hosts.add(name, chosen=True)
        return hosts


def _matches(name: str, names: frozenset[str]) -> bool:
    if not name:
        return False
    return name in names or any(n.startswith(".") and (name == n[1:] or name.endswith(n)) for n in names)


def _machine_names() -> list[str]:
    names = []
    try:
        names += [socket.gethostname(), socket.getfqdn()]
    except OSError:
        pass
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            for a in addresses:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    try:
                        names.append(str(ipaddress.ip_address(a.address.split("%", 1)[0])))
                    except ValueError:
                        continue
    except Exception:  # a machine whose interfaces cannot be listed still has its names and --allowed-host
        pass
    return names


def _foreign(scope, headers: dict[bytes, bytes], hosts: AllowedHosts) -> str | None:
    """Why this request comes from a page of another origin, or None."""
    method = scope.get("method", "GET")
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
    navigation = headers.get(b"sec-fetch-mode", b"").decode("latin-1").lower() == "navigate"
    if site == "cross-site" and not (navigation and method in ("GET", "HEAD")):
        return "a page of another site"
    origin = headers.get(b"origin")
    if origin is None:
        return None  # not sent by a browser page's script (scripts, API clients, plain navigations)
    origin = origin.decode("latin-1").strip().lower().rstrip("/")
    if origin == "null":
        return "a sandboxed or local-file page (Origin: null)"
    own = headers.get(b"host", b"").decode("latin-1").strip().lower()
    # Same origin means same host AND port: another local server's page (localhost:3000) is another origin.
    if urlsplit(origin).netloc == own or hosts.origin_allowed(origin):
        return None
    return f"the page at {origin}"


def _headers(scope) -> dict[bytes, bytes] | None:
    """Lower-case name -> first value; None when Host or Origin comes twice with different values."""
    out: dict[bytes, bytes] = {}
    for key, value in scope.get("headers") or []:
        key = key.lower()
        if key in out:
            if key in (b"host", b"origin") and out[key] != value:
                return None
            continue
        out[key] = value
    return out


class HostGuard:
    """ASGI middleware; `hosts` is shared with the launcher, which adds the share link's name once it is known."""

    def __init__(self, app, hosts: AllowedHosts):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if headers is None:
            return await _refuse(scope, receive, send, 400, "Two different Host or Origin headers; refused.")
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.hosts.allows(host):
            why = (f"Host {host_name(host)!r} is not one this server answers to. If you reach it by that name on "
                   f"purpose, start it with --allowed-host {host_name(host) or 'NAME'}.")
            return await _refuse(scope, receive, send, 403, why)
        if why := _foreign(scope, headers, self.hosts):
            return await _refuse(scope, receive, send, 403,
                                 f"Refused a request from {why}: this server answers its own pages and clients "
                                 f"that are not web pages (add a name you serve it under with --allowed-host).")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k, v) for k, v in SECURITY_HEADERS if k not in present)]
            await send(message)

        return await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


async def _refuse(scope, receive, send, status: int, text: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


def guard_outermost(app, hosts: AllowedHosts) -> bool:
    """Put the guard around the app's built middleware stack too (Starlette builds it at the first request,
    which Gradio's launch makes), so nothing Gradio's own middlewares answer escapes it. False if the stack is
    not built yet; the guard inside the stack still runs."""
    stack = getattr(app, "middleware_stack", None)
    if stack is None or isinstance(stack, HostGuard):
        return False
    app.middleware_stack = HostGuard(stack, hosts)
    return True
