"""img2img: fit the init image to the size, encode it, denoise round(steps x strength) steps, decode."""
from __future__ import annotations

from ..requests import Img2ImgRequest
from ..telemetry import StageTimer
from .common import (ProgressFn, StopFlag, decode_latents, denoise, derived_pipeline, encode_images,
                     encode_request_prompt, fit_image, generators, steps_for_strength)


def run_img2img(model, runtime, request: Img2ImgRequest, image, timer: StageTimer, progress: ProgressFn | None,
                stop: StopFlag) -> tuple[list, int, int]:
    """Returns (images, steps run, steps planned). Strength 0 returns the fitted input untouched."""
    with timer.stage("resize"):
        fitted = fit_image(image, request.width, request.height, request.resize_mode)
    planned = steps_for_strength(request.steps, request.strength)
    if planned == 0:
        return [fitted.copy() for _ in range(request.batch_size)], 0, 0
    pipe = derived_pipeline(model, "img2img")
    gens = generators(request.seed, request.batch_size, runtime.device)
    with runtime.inference_context():
        embeds = encode_request_prompt(model, runtime, request, timer)
        with timer.stage("vae_encode"):
            latents = encode_images(model, [fitted] * request.batch_size, gens, tiled=request.vae_tiling)
        with timer.stage("denoising"):
            latents, done = denoise(model, pipe, runtime, embeds, sampler=request.sampler, steps=request.steps,
                                    guidance=request.guidance, gens=gens, width=request.width,
                                    height=request.height, progress=progress, stop=stop, image_latents=latents,
                                    strength=request.strength)
        with timer.stage("vae_decode"):
            images = decode_latents(model, latents, tiled=request.vae_tiling)
    return images, done, planned
