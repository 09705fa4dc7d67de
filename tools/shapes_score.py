"""The colour test for `builtin:shapes`: does a picture show the named shape colour on the named background?

Read by simple colour analysis, not by eye. Used by tests/test_shapes_model.py, the LCM-LoRA
distillation (tools/distil_lcm_lora.py) and the few-step benchmark.
"""
from __future__ import annotations

import numpy as np

from engine.compare.run import psnr  # noqa: F401  (re-exported: one PSNR for the app, the tests and the benchmarks)
from tools.train_shapes import COLOURS

NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in NAMES], dtype=np.float32)
PROMPTS = [  # (shape colour, shape, background)
    ("red", "circle", "blue"), ("yellow", "square", "black"), ("green", "triangle", "white"),
    ("blue", "star", "yellow"), ("white", "circle", "purple"), ("orange", "square", "green"),
]
SEEDS = 8  # pictures per prompt: 6 x 8 = 48
BORDER = 6  # px of the image edge read as "border"


def prompt_text(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def nearest_colours(image) -> np.ndarray:
    """Index into NAMES of the nearest named colour, per pixel."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    d = ((px[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def dominant(labels: np.ndarray) -> str | None:
    if labels.size == 0:
        return None
    return NAMES[int(np.bincount(labels.ravel(), minlength=len(NAMES)).argmax())]


def analyse(image) -> tuple[str | None, str | None]:
    """(colour dominating the border, colour dominating the foreground = pixels not of the border colour)."""
    labels = nearest_colours(image)
    ring = np.ones(labels.shape, bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    background = dominant(labels[ring])
    inside = labels[~ring]
    foreground = inside[inside != NAMES.index(background)] if background else inside
    return background, dominant(foreground)


def colours_right(image, colour: str, background: str) -> bool:
    return analyse(image) == (background, colour)
