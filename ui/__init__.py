"""Gradio front end. Holds a reference to an Engine; all generation happens in engine/."""
from .app_ui import build_ui

__all__ = ["build_ui"]
