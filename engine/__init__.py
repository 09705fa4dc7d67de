"""Generation backend: no Gradio imports anywhere under engine/.

Engine and the request types import torch and diffusers; they load on first use, so that light
users (the command line's --help, the option schema) start fast.
"""
from engine.errors import ModelLoadError, RuntimeUnavailable, UserError

__all__ = ["Engine", "GenerationResult", "ModelLoadError", "RuntimeUnavailable", "Txt2ImgRequest", "UserError"]


def __getattr__(name: str):
    if name in ("Engine", "GenerationResult"):
        from engine import engine

        return getattr(engine, name)
    if name == "Txt2ImgRequest":
        from engine.requests import Txt2ImgRequest

        return Txt2ImgRequest
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
