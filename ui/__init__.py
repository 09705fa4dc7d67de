"""Gradio front end: one module per tab, assembled in blocks.py. Holds a reference to an Engine; all
generation happens in engine/, which knows nothing of this package."""
from .blocks import build_ui, launch_kwargs

__all__ = ["build_ui", "launch_kwargs"]
