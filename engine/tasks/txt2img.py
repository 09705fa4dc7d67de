"""txt2img: encode the prompt, denoise from noise, decode. Each stage timed on its own."""
from __future__ import annotations

from ..requests import Txt2ImgRequest
from ..telemetry import StageTimer
from .common import (ProgressFn, StopFlag, decode_latents, denoise, encode_request_prompt, generators)


def run_txt2img(model, runtime, request: Txt2ImgRequest, timer: StageTimer, progress: ProgressFn | None,
                stop: StopFlag) -> tuple[list, int]:
    """Returns (images, steps actually run). `request` is already snapped and seeded."""
    with runtime.inference_context():
        embeds = encode_request_prompt(model, runtime, request, timer)
        with timer.stage("denoising"):
            latents, done = denoise(model, model.pipe, runtime, embeds, sampler=request.sampler, steps=request.steps,
                                    guidance=request.guidance,
                                    gens=generators(request.seed, request.batch_size, runtime.device),
                                    width=request.width, height=request.height, progress=progress, stop=stop)
        with timer.stage("vae_decode"):
            images = decode_latents(model, latents)
    return images, done
