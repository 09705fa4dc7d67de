"""The web front end: the Gradio page (one module per tab, assembled in blocks.py) and, beside it on the same
server, the A1111-compatible API and the Host/Origin guard (server.py). Holds a reference to an Engine; all
generation happens in engine/, which knows nothing of this package."""
from ui.blocks import build_ui, launch_kwargs
from ui.http.server import after_launch, server_kwargs

__all__ = ["after_launch", "build_ui", "launch_kwargs", "server_kwargs"]
