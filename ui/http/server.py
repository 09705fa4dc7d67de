"""The HTTP server around the page: the Host/Origin guard on every response, the login guard (failed logins
throttled, the API schema behind the login), and the A1111 API beside the UI."""
from __future__ import annotations

from typing import Any, Iterable

from starlette.middleware import Middleware

from engine import Engine
from ui.http.a1111.routes import SdApi
from ui.http.auth import LoginGuard
from ui.http.guard import AllowedHosts, HostGuard, guard_outermost


def server_kwargs(engine: Engine, host: str, allowed: Iterable[str] = (), *, api: bool = True,
                  queue_size: int = 16) -> tuple[dict[str, Any], AllowedHosts]:
    """`app_kwargs` for demo.launch() (Gradio passes them to its FastAPI app: our routes come before its own),
    and the allowed hosts, which the launcher extends with the share link once it exists."""
    hosts = AllowedHosts.for_server(host, allowed)
    kwargs: dict[str, Any] = {"middleware": [Middleware(HostGuard, hosts=hosts), Middleware(LoginGuard)]}
    if api:
        kwargs["routes"] = list(SdApi(engine, max_waiting=queue_size).router().routes)
    return kwargs, hosts


def after_launch(demo, hosts: AllowedHosts) -> None:
    """Once the server runs: the share link's name joins the allowed hosts, and the guard wraps the whole stack."""
    if getattr(demo, "share_url", None):
        hosts.add_origin(demo.share_url)
    guard_outermost(demo.app, hosts)
