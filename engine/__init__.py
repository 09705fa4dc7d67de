"""Generation backend: no Gradio imports anywhere under engine/."""
from .engine import Engine, GenerationResult
from .errors import ModelLoadError, RuntimeUnavailable, UserError
from .requests import Txt2ImgRequest

__all__ = ["Engine", "GenerationResult", "ModelLoadError", "RuntimeUnavailable", "Txt2ImgRequest", "UserError"]
