"""One module per task; each validates its request, runs its own loop and returns a TaskOutput."""
from engine.tasks.base import Task, TaskOutput
from engine.tasks.hires_fix import HiresFix
from engine.tasks.img2img import Img2Img
from engine.tasks.inpaint import Inpaint, InpaintInput
from engine.tasks.tiled_upscale import TiledUpscale
from engine.tasks.txt2img import Txt2Img

TASKS = {cls.name: cls for cls in (Txt2Img, Img2Img, Inpaint, HiresFix, TiledUpscale)}  # by name (a replica's job)

__all__ = ["TASKS", "HiresFix", "Img2Img", "Inpaint", "InpaintInput", "Task", "TaskOutput", "TiledUpscale", "Txt2Img"]
