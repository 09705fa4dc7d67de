"""The login, where the page and the API share it: who is logged in, failed logins slowed per client, and the
API's schema and docs behind the login.

`authorized(request)` answers for the API (HTTP Basic, what A1111 clients send, or the page's login cookie).
`LoginGuard` (an ASGI middleware) counts failed logins per client address, on the page's /login and on API
requests that carry an Authorization header: after `burst` failures within `window_s` that client gets a 429
with Retry-After for its login attempts until the oldest failure leaves the window (other clients are not
affected). With a login set, /openapi.json and the docs pages need it too.
"""
from __future__ import annotations

import base64
import binascii
import inspect
import threading
import time
from collections import OrderedDict, deque

from starlette.requests import Request

DOCS_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
LOGIN_PATHS = ("/login", "/login/")
CHECKED_PREFIX = "/sdapi/"  # where an Authorization header is checked (the A1111 API)


def login_required(app) -> bool:
    return bool(getattr(app, "auth", None)) or getattr(app, "auth_dependency", None) is not None


async def authorized(request: Request) -> bool:
    """No login set: open. Otherwise HTTP Basic or the UI's login cookie."""
    app = request.app
    if getattr(app, "auth_dependency", None) is not None:
        return False  # a login we cannot check here: closed rather than open
    accounts = getattr(app, "auth", None)
    if not accounts:
        return True
    header = request.headers.get("authorization", "")
    if header[:6].lower() == "basic ":
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        if not sep:
            return False
        from gradio.route_utils import compare_passwords_securely

        if callable(accounts):
            ok = accounts(user, password)
            return bool(await ok if inspect.isawaitable(ok) else ok)
        return user in accounts and compare_passwords_securely(password, accounts[user])
    cookie_id = getattr(app, "cookie_id", "")
    token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{cookie_id}")
    return token is not None and token in getattr(app, "tokens", {})


class LoginThrottle:
    """Failed logins per client address in a sliding window; bounded in memory (the oldest clients go first)."""

    def __init__(self, burst: int = 10, window_s: float = 60.0, max_clients: int = 10_000, clock=time.monotonic):
        self.burst, self.window_s, self.max_clients, self.clock = burst, window_s, max_clients, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str) -> deque[float]:
        times = self._failures.get(client)
        if times is None:
            return deque()
        cutoff = self.clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[client]
        return times

    def retry_after(self, client: str) -> float:
        """Seconds this client must wait before its next login attempt (0: it may try now)."""
        with self._lock:
            times = self._recent(client)
            if len(times) < self.burst:
                return 0.0
            return max(0.0, times[0] + self.window_s - self.clock())

    def failed(self, client: str) -> None:
        with self._lock:
            times = self._failures.setdefault(client, deque(maxlen=self.burst))
            times.append(self.clock())
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


class LoginGuard:
    """ASGI middleware: throttles failed logins, and keeps the API schema behind the login."""

    def __init__(self, app, throttle: LoginThrottle | None = None):
        self.app, self.throttle = app, throttle or LoginThrottle()

    async def __call__(self, scope, receive, send):
        app = scope.get("app")
        if scope["type"] != "http" or not login_required(app):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        client = (scope.get("client") or ("unknown",))[0]
        headers = {k.lower() for k, _ in scope.get("headers") or []}
        # a login attempt: the page's login form, or credentials sent where they are checked (Gradio's own routes
        # ignore an Authorization header)
        attempt = (path in LOGIN_PATHS and scope.get("method") == "POST") or (
            b"authorization" in headers and (path.startswith(CHECKED_PREFIX) or path in DOCS_PATHS))
        if attempt and (wait := self.throttle.retry_after(client)) > 0:
            return await _answer(send, 429, f"Too many failed logins from {client}; try again in {wait:.0f} s.",
                                 [(b"retry-after", str(max(1, round(wait))).encode())])
        if path in DOCS_PATHS and not await authorized(Request(scope)):
            return await _answer(send, 401, "Not authenticated", [(b"www-authenticate", b'Basic realm="fast-sd"')])
        if not attempt:
            return await self.app(scope, receive, send)

        async def watch(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 401 or (status == 400 and path in LOGIN_PATHS):
                    self.throttle.failed(client)
                elif status < 400 and path in LOGIN_PATHS:
                    self.throttle.succeeded(client)
            await send(message)

        return await self.app(scope, receive, watch)


async def _answer(send, status: int, text: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})
