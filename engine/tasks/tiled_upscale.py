"""Tiled upscale: Lanczos to the output size, then refine tile by tile through img2img, feather-blended.

All tiles have one size (one compiled shape on static-shape runtimes); tiles run in batches
so memory does not grow with the output size beyond the image buffers.
"""
from __future__ import annotations

import time

import numpy as np
from PIL import Image

from ..requests import TiledUpscaleRequest
from ..telemetry import StageTimer
from ..tiling import Blender, grid
from .common import (ProgressFn, StopFlag, decode_latents, denoise, derived_pipeline, encode_images,
                     encode_request_prompt, generators, steps_for_strength)

MAX_TILE_BATCH = 4


def tile_batch_size(count: int) -> int:
    """Largest divisor of `count` up to MAX_TILE_BATCH: equal batches, so no extra compiled shape."""
    return max(b for b in range(1, min(MAX_TILE_BATCH, count) + 1) if count % b == 0)


def run_tiled_upscale(model, runtime, request: TiledUpscaleRequest, image: Image.Image, out_w: int, out_h: int,
                      timer: StageTimer, progress: ProgressFn | None, stop: StopFlag) -> tuple[Image.Image, dict]:
    f = model.vae_scale_factor
    tile = max(f, min(request.tile_size, out_w, out_h) // f * f)
    overlap = min(request.tile_overlap, tile // 2) // f * f
    with timer.stage("upscale"):
        upscaled = image.resize((out_w, out_h), Image.LANCZOS)
    tiles = grid(out_w, out_h, tile, overlap)
    per_tile = steps_for_strength(request.steps, request.strength)
    details = {"tiles": len(tiles), "tile_size": tile, "tile_overlap": overlap, "steps_per_tile": per_tile}
    if per_tile == 0:
        return upscaled, details
    batch = tile_batch_size(len(tiles))
    pipe = derived_pipeline(model, "img2img")
    blender = Blender(out_w, out_h, 3, overlap)
    total_steps = per_tile * (len(tiles) // batch)  # a batch of tiles denoises in one loop
    done_steps = 0
    tile_seconds = []
    with runtime.inference_context():
        embeds = encode_request_prompt(model, runtime, request, timer, batch_size=batch)
        for start in range(0, len(tiles), batch):
            if stop.requested:
                break
            group = tiles[start:start + batch]
            began = time.perf_counter()
            crops = [upscaled.crop((t.x, t.y, t.x + t.width, t.y + t.height)) for t in group]
            gens = generators(request.seed + start, len(group), runtime.device)
            with timer.stage("vae_encode"):
                latents = encode_images(model, crops, gens)
            with timer.stage("denoising"):
                latents, done = denoise(model, pipe, runtime, embeds, sampler=request.sampler, steps=request.steps,
                                        guidance=request.guidance, gens=gens, width=tile, height=tile,
                                        progress=progress, stop=stop, image_latents=latents,
                                        strength=request.strength, offset=done_steps, grand_total=total_steps)
            done_steps += done
            with timer.stage("vae_decode"):
                refined = decode_latents(model, latents)
            with timer.stage("blend"):
                for t, im in zip(group, refined):
                    blender.add(t, np.asarray(im, dtype=np.float32))
            tile_seconds.append((time.perf_counter() - began) / len(group))
    refined_count = len(tile_seconds) * batch
    for t in tiles[refined_count:]:  # stopped early: the rest keep the plain upscale
        blender.add(t, np.asarray(upscaled.crop((t.x, t.y, t.x + t.width, t.y + t.height)), dtype=np.float32))
    details["steps_planned"] = total_steps
    result = Image.fromarray(np.clip(blender.result() + 0.5, 0, 255).astype(np.uint8))
    details.update(steps_run=done_steps, seconds_per_tile=float(np.mean(tile_seconds)) if tile_seconds else 0.0,
                   tile_batch=batch)
    return result, details
