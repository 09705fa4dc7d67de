"""What keeps a web page the user visits from driving this local server through the user's own browser.

Every request to the UI and the API passes `HostGuard` (an ASGI middleware):
- its Host header must name this server (DNS rebinding points a foreign name at 127.0.0.1; the browser then
  sends that foreign name as Host, so refusing unknown names stops it);
- a write (POST, PUT, DELETE, ...) from a page of another origin is refused (a cross-site form or fetch: the
  browser says where it came from in Origin / Sec-Fetch-Site; scripts and API clients send neither);
- every response carries frame protection, nosniff and a Referrer-Policy.
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
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class AllowedHosts:
    """The names this server answers to. `.example.com` allows the name and every subdomain; `*` turns the
    check off (behind a proxy that checks Host itself). Names can be added after start (a share link)."""

    def __init__(self, names: Iterable[str] = ()):
        self.names: set[str] = set()
        self.origins: set[str] = set()  # other origins whose pages may write here (a share link's)
        self.any = False
        for name in names:
            self.add(name)

    def add(self, name: str) -> None:
        name = (name or "").strip().lower()
        if name == "*":
            self.any = True
        elif name.startswith("."):
            self.names.add(name)
        elif name:
            self.names.add(host_name(name) if "://" not in name else host_name(urlsplit(name).netloc))

    def add_origin(self, url: str) -> None:
        """A public URL that reaches this server (a share link): its name is served, its pages may write."""
        parts = urlsplit(url)
        if parts.scheme and parts.netloc:
            self.origins.add(f"{parts.scheme}://{parts.netloc}".lower())
            self.add(parts.netloc)

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        name = host_name(host)
        if not name:
            return False
        return name in self.names or any(n.startswith(".") and (name == n[1:] or name.endswith(n))
                                         for n in self.names)

    def __repr__(self) -> str:
        return "any host" if self.any else ", ".join(sorted(self.names))

    @classmethod
    def for_server(cls, host: str, extra: Iterable[str] = ()) -> "AllowedHosts":
        """Loopback names always; the listening address; for 0.0.0.0 / :: this machine's names and addresses."""
        names = [*LOOPBACK_NAMES, *extra]
        if host in ANY_ADDRESS:
            names += _machine_names()
        else:
            names.append(host)
        return cls(names)


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


def _cross_origin_write(method: str, headers: dict[bytes, bytes], hosts: AllowedHosts) -> str | None:
    """Why this write comes from a page of another origin, or None."""
    if method in SAFE_METHODS:
        return None
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
    if site == "cross-site":
        return "a page of another site"
    origin = headers.get(b"origin")
    if origin is None:
        return None  # not sent by a browser page (scripts, API clients, same-origin GET-style forms)
    origin = origin.decode("latin-1").strip().lower()
    if origin == "null":
        return "a sandboxed or local-file page (Origin: null)"
    own = headers.get(b"host", b"").decode("latin-1").strip().lower()
    # Same origin means same host AND port: another local server's page (localhost:3000) is another origin.
    if urlsplit(origin).netloc == own or origin.rstrip("/") in hosts.origins:
        return None
    return f"the page at {origin}"


class HostGuard:
    """ASGI middleware; `hosts` is shared with the launcher, which adds the share link's name once it is known."""

    def __init__(self, app, hosts: AllowedHosts):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.hosts.allows(host):
            why = (f"Host {host_name(host)!r} is not one this server answers to. If you reach it by that name on "
                   f"purpose, start it with --allowed-host {host_name(host) or 'NAME'}.")
            return await _refuse(scope, receive, send, 403, why)
        if scope["type"] == "http" and (why := _cross_origin_write(scope["method"], headers, self.hosts)):
            return await _refuse(scope, receive, send, 403,
                                 f"Refused a cross-origin {scope['method']} from {why}: this server only takes "
                                 f"writes from its own pages and from clients that are not web pages.")

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
