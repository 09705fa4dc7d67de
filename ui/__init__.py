"""The web front end: the Gradio page (ui/tabs/, one module per tab, assembled in blocks.py) and, beside it on the
same server, the HTTP side (ui/http/: the Host/Origin guard, the login, the A1111-compatible API). Holds a reference
to an Engine; all generation happens in engine/, which knows nothing of this package."""
from ui.blocks import build_ui, launch_kwargs
from ui.http.server import after_launch, server_kwargs

__all__ = ["after_launch", "build_ui", "launch_kwargs", "server_kwargs"]
