"""Hires fix: txt2img at the base size, upscale (latent or Lanczos), then an img2img pass at the target size."""
from __future__ import annotations

import torch.nn.functional as F
from PIL import Image

from ..requests import HiresFixRequest
from ..telemetry import StageTimer
from .common import (ProgressFn, StopFlag, decode_latents, denoise, derived_pipeline, encode_images,
                     encode_request_prompt, generators, steps_for_strength)


def run_hires_fix(model, runtime, request: HiresFixRequest, timer: StageTimer, progress: ProgressFn | None,
                  stop: StopFlag) -> tuple[list, list, int, int]:
    """Returns (base images, final images, steps run, steps planned) over both passes."""
    width2, height2 = request.target_size(model.vae_scale_factor)
    hires_steps = request.hires_steps or request.steps
    second = steps_for_strength(hires_steps, request.hires_strength)
    planned = request.steps + second
    gens = generators(request.seed, request.batch_size, runtime.device)
    with runtime.inference_context():
        embeds = encode_request_prompt(model, runtime, request, timer)
        with timer.stage("base_denoising"):
            latents, done1 = denoise(model, model.pipe, runtime, embeds, sampler=request.sampler, steps=request.steps,
                                     guidance=request.guidance, gens=gens, width=request.width,
                                     height=request.height, progress=progress, stop=stop, grand_total=planned)
        with timer.stage("base_vae_decode"):
            base_images = decode_latents(model, latents)
        if stop.requested or second == 0:
            finals = [im.resize((width2, height2), Image.LANCZOS) for im in base_images]
            return base_images, finals, done1, planned
        with timer.stage("upscale"):
            f = model.vae_scale_factor
            if request.upscaler.startswith("latent"):
                mode = "bicubic" if "bicubic" in request.upscaler else "nearest-exact"
                up_latents = F.interpolate(latents.float(), size=(height2 // f, width2 // f), mode=mode)
            else:
                upscaled = [im.resize((width2, height2), Image.LANCZOS) for im in base_images]
        if not request.upscaler.startswith("latent"):
            with timer.stage("hires_vae_encode"):
                up_latents = encode_images(model, upscaled, generators(request.seed, request.batch_size,
                                                                       runtime.device), tiled=request.vae_tiling)
        with timer.stage("hires_denoising"):
            pipe = derived_pipeline(model, "img2img")
            latents2, done2 = denoise(model, pipe, runtime, embeds, sampler=request.sampler, steps=hires_steps,
                                      guidance=request.guidance, gens=gens, width=width2, height=height2,
                                      progress=progress, stop=stop, image_latents=up_latents,
                                      strength=request.hires_strength, offset=done1, grand_total=planned)
        with timer.stage("hires_vae_decode"):
            finals = decode_latents(model, latents2, tiled=request.vae_tiling)
    return base_images, finals, done1 + done2, planned
