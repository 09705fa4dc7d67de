"""What to warm: the shapes the chosen tasks will really run, at the sizes a user picked.

A shape differs by more than its size: without guidance (guidance <= 1, the `fastest` preset) the UNet
runs at batch 1, not 2; VAE slicing decodes one image at a time; img2img, inpaint, hires fix and tiles also
run the VAE encoder (and every task, with an inpainting model); hires fix's second pass and tiled upscale's tiles run at sizes of their own.
"""
from __future__ import annotations

from engine.errors import UserError
from engine.requests import HiresFixRequest, TiledUpscaleRequest, Txt2ImgRequest, snap_size
from engine.runtimes.base import WarmupShape
from engine.tasks.tiled_upscale import tile_batch_size, tile_layout

TASKS = ("txt2img", "img2img", "inpaint", "hires_fix", "tiled_upscale")
HIRES_FACTOR = HiresFixRequest.model_fields["factor"].default
UPSCALE_FACTOR = 2.0  # tiled upscale: the size given is the input's, upscaled by this
TILE_SIZE, TILE_OVERLAP = (TiledUpscaleRequest.model_fields[n].default for n in ("tile_size", "tile_overlap"))


def warmup_shapes(model, sizes: list[tuple[int, int]], batch: int = 1, guidance: float = 7.0,
                  tasks: tuple[str, ...] = ("txt2img",)) -> list[WarmupShape]:
    """The distinct shapes `tasks` run for each (width, height), snapped like requests are."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise UserError(f"Unknown task(s) to warm up: {', '.join(sorted(unknown))}; choose from {', '.join(TASKS)}.")
    f, cfg = model.vae_scale_factor, guidance > 1.0
    shapes: list[WarmupShape] = []

    def add(width: int, height: int, shape_batch: int, encode: bool) -> None:
        decode = 1 if model.options.vae_slicing else shape_batch  # VAE slicing decodes one image at a time
        shape = WarmupShape(width, height, shape_batch, cfg, decode, encode, truncated=model.options.cfg_truncated)
        if shape not in shapes:
            shapes.append(shape)

    for w, h in sizes:
        req, _ = Txt2ImgRequest(width=w, height=h, batch_size=batch).snapped(f)
        if "txt2img" in tasks or "hires_fix" in tasks:  # an inpainting UNet's grey conditioning is encoded
            add(req.width, req.height, batch, model.is_inpainting)
        if "img2img" in tasks or "inpaint" in tasks:
            add(req.width, req.height, batch, True)
        if "hires_fix" in tasks:
            tw, th = snap_size(round(req.width * HIRES_FACTOR), f), snap_size(round(req.height * HIRES_FACTOR), f)
            add(tw, th, batch, True)
        if "tiled_upscale" in tasks:
            ow, oh = snap_size(round(req.width * UPSCALE_FACTOR), f), snap_size(round(req.height * UPSCALE_FACTOR), f)
            tiles, _, _ = tile_layout(ow, oh, TILE_SIZE, TILE_OVERLAP, f)
            add(tiles[0].width, tiles[0].height, tile_batch_size(len(tiles)), True)
    return shapes
