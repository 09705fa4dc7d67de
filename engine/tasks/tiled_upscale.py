"""Tiled upscale: Lanczos to the output size, then refine tile by tile through img2img, feather-blended.

All tiles have one size (one compiled shape on static-shape runtimes); tiles run in batches
so memory does not grow with the output size beyond the image buffers. Batch size N makes N
variants of the whole picture, variant i from seed + i.
"""
from __future__ import annotations

import time

import numpy as np
from PIL import Image

from engine.requests import TiledUpscaleRequest
from engine.tasks.base import Task, TaskOutput
from engine.tasks.common import (decode_latents, denoise, derived_pipeline, encode_images, encode_request_prompt,
                                 generators, steps_for_strength)
from engine.tasks.context import DenoiseContext
from engine.tasks.tiling import Blender, Tile, grid

MAX_TILE_BATCH = 4


def tile_batch_size(count: int) -> int:
    """Largest divisor of `count` up to MAX_TILE_BATCH: equal batches, so no extra compiled shape."""
    return max(b for b in range(1, min(MAX_TILE_BATCH, count) + 1) if count % b == 0)


def tile_layout(out_w: int, out_h: int, tile_size: int, tile_overlap: int, f: int) -> tuple[list[Tile], int, int]:
    """(tiles, tile side, overlap), both snapped to the model's multiple `f`."""
    tile = max(f, min(tile_size, out_w, out_h) // f * f)
    overlap = min(tile_overlap, tile // 2) // f * f
    return grid(out_w, out_h, tile, overlap), tile, overlap


class TiledUpscale(Task):
    name = "tiled_upscale"
    request_type = TiledUpscaleRequest
    takes_image = True

    def normalise(self, request):
        out_w, out_h, notices = request.output_size(self.image.size, self.model.vae_scale_factor)
        self.out_size = (out_w, out_h)
        return request, notices

    def run(self, runtime, ctx: DenoiseContext) -> TaskOutput:
        r = self.request
        with ctx.timer.stage("upscale"):  # 1. plain Lanczos to the output size
            upscaled = self.image.resize(self.out_size, Image.LANCZOS)
        tiles, tile, overlap = tile_layout(*self.out_size, r.tile_size, r.tile_overlap, self.model.vae_scale_factor)
        per_tile = steps_for_strength(r.steps, r.strength)
        batch = tile_batch_size(len(tiles))
        total = per_tile * (len(tiles) // batch) * r.batch_size  # a batch of tiles denoises in one pass
        details = {"tiles": len(tiles), "tile_size": tile, "tile_overlap": overlap, "steps_per_tile": per_tile,
                   "tile_batch": batch, "steps_planned": total}
        if per_tile == 0:
            return TaskOutput([upscaled.copy() for _ in range(r.batch_size)], 0, 0, details, self._says(details))
        images, seconds = [], []
        with runtime.inference_context():
            embeds = encode_request_prompt(self.model, runtime, r, ctx.timer, batch_size=batch)  # 2. the prompt
            for variant in range(r.batch_size):  # 3. each variant refines every tile, then blends them
                images.append(self._refine(runtime, ctx, embeds, upscaled, tiles, overlap, batch, total,
                                           r.seed + variant, seconds))
        details.update(steps_run=ctx.steps_done, seconds_per_tile=float(np.mean(seconds)) if seconds else 0.0)
        return TaskOutput(images, ctx.steps_done, total, details, self._says(details))

    def _refine(self, runtime, ctx, embeds, upscaled, tiles, overlap, batch, total, seed, seconds) -> Image.Image:
        r, model = self.request, self.model
        blender = Blender(*self.out_size, 3, overlap)
        done = 0
        for start in range(0, len(tiles), batch):
            if ctx.stopped:
                break
            group, began = tiles[start:start + batch], time.perf_counter()
            crops = [upscaled.crop((t.x, t.y, t.x + t.width, t.y + t.height)) for t in group]
            gens = generators(seed * 7919 + start, len(group), runtime.device)
            with ctx.timer.stage("vae_encode"):
                latents = encode_images(model, crops, gens)
            with ctx.timer.stage("denoising"):
                latents = denoise(model, derived_pipeline(model, "img2img"), runtime, embeds, ctx, r,
                                  steps=r.steps, gens=gens, width=group[0].width,
                                  height=group[0].height, total=total, image_latents=latents, strength=r.strength)
            with ctx.timer.stage("vae_decode"):
                refined = decode_latents(model, latents)
            with ctx.timer.stage("blend"):
                for t, im in zip(group, refined):
                    blender.add(t, np.asarray(im, dtype=np.float32))
            seconds.append((time.perf_counter() - began) / len(group))
            done = start + len(group)
        for t in tiles[done:]:  # stopped early: the rest keep the plain upscale
            blender.add(t, np.asarray(upscaled.crop((t.x, t.y, t.x + t.width, t.y + t.height)), dtype=np.float32))
        return Image.fromarray(np.clip(blender.result() + 0.5, 0, 255).astype(np.uint8))

    @staticmethod
    def _says(details: dict) -> list[str]:
        per_tile = details.get("seconds_per_tile")
        return [f"{details['tiles']} tiles of {details['tile_size']} px, overlap {details['tile_overlap']}"
                + (f", {per_tile:.2f} s per tile" if per_tile else "") + "."]
