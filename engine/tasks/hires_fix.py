"""Hires fix: txt2img at the base size, upscale (latent or Lanczos), then an img2img pass at the target size."""
from __future__ import annotations

import torch.nn.functional as F
from PIL import Image

from engine.requests import HiresFixRequest
from engine.tasks.base import Task, TaskOutput
from engine.tasks.common import (decode_latents, denoise, derived_pipeline, encode_images, encode_request_prompt,
                                 generators, steps_for_strength)
from engine.tasks.context import DenoiseContext


class HiresFix(Task):
    name = "hires_fix"
    request_type = HiresFixRequest

    def normalise(self, request):
        request, notices = request.snapped(self.model.vae_scale_factor)
        self.target = request.target_size(self.model.vae_scale_factor)
        return request, notices

    def memory_need(self):
        return self.target[0], self.target[1], self.request.batch_size

    def run(self, runtime, ctx: DenoiseContext) -> TaskOutput:
        r, model = self.request, self.model
        (width2, height2), f = self.target, model.vae_scale_factor
        hires_steps = r.hires_steps or r.steps
        planned = r.steps + steps_for_strength(hires_steps, r.hires_strength)
        gens = generators(r.seed, r.batch_size, runtime.device)
        details = {"base_size": f"{r.width}x{r.height}", "final_size": f"{width2}x{height2}"}
        notices = [f"Base {r.width}x{r.height}, final {width2}x{height2} ({r.upscaler})."]
        with runtime.inference_context():
            embeds = encode_request_prompt(model, runtime, r, ctx.timer)  # 1. the prompt pair
            with ctx.timer.stage("base_denoising"):  # 2. the base picture
                latents = denoise(model, model.pipe, runtime, embeds, ctx, r, steps=r.steps, gens=gens, width=r.width,
                                  height=r.height, total=planned)
            with ctx.timer.stage("base_vae_decode"):
                base = decode_latents(model, latents)
            if ctx.stopped or planned == r.steps:
                finals = [im.resize((width2, height2), Image.LANCZOS) for im in base]
                return TaskOutput(finals, ctx.steps_done, planned, details, notices, {"base": base})
            with ctx.timer.stage("upscale"):  # 3. to the target size, in latent space or in pixels
                if r.upscaler.startswith("latent"):
                    mode = "bicubic" if "bicubic" in r.upscaler else "nearest-exact"
                    up = F.interpolate(latents.float(), size=(height2 // f, width2 // f), mode=mode)
                else:
                    upscaled = [im.resize((width2, height2), Image.LANCZOS) for im in base]
            if not r.upscaler.startswith("latent"):
                with ctx.timer.stage("hires_vae_encode"):
                    up = encode_images(model, upscaled, generators(r.seed, r.batch_size, runtime.device),
                                       tiled=r.vae_tiling)
            with ctx.timer.stage("hires_denoising"):  # 4. the second pass adds detail at the target size
                latents = denoise(model, derived_pipeline(model, "img2img"), runtime, embeds, ctx, r, steps=hires_steps,
                                  gens=gens, width=width2, height=height2,
                                  total=planned, image_latents=up, strength=r.hires_strength)
            with ctx.timer.stage("hires_vae_decode"):
                finals = decode_latents(model, latents, tiled=r.vae_tiling)
        return TaskOutput(finals, ctx.steps_done, planned, details, notices, {"base": base})
