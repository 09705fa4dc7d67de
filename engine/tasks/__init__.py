"""One module per task; each validates its request, runs its own loop and returns a TaskOutput."""
from .base import Task, TaskOutput
from .hires_fix import HiresFix
from .img2img import Img2Img
from .tiled_upscale import TiledUpscale
from .txt2img import Txt2Img

TASKS = {cls.name: cls for cls in (Txt2Img, Img2Img, HiresFix, TiledUpscale)}  # by name (a replica's job)

__all__ = ["TASKS", "HiresFix", "Img2Img", "Task", "TaskOutput", "TiledUpscale", "Txt2Img"]
