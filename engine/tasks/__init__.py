"""One module per task; each validates its request, runs its own loop and returns a TaskOutput."""
from .base import Task, TaskOutput
from .hires_fix import HiresFix
from .img2img import Img2Img
from .tiled_upscale import TiledUpscale
from .txt2img import Txt2Img

__all__ = ["HiresFix", "Img2Img", "Task", "TaskOutput", "TiledUpscale", "Txt2Img"]
