"""txt2img: encode the prompt, denoise from noise, decode. Each stage timed on its own."""
from __future__ import annotations

from ..requests import Txt2ImgRequest
from ..schedulers import make_scheduler
from ..telemetry import StageTimer
from .common import ProgressFn, StopFlag, decode_latents, encode_prompt, generators, step_callback


def run_txt2img(model, runtime, request: Txt2ImgRequest, timer: StageTimer, progress: ProgressFn | None,
                stop: StopFlag) -> tuple[list, int]:
    """Returns (images, steps actually run). `request` is already snapped and seeded."""
    pipe = model.pipe
    pipe.scheduler = make_scheduler(request.sampler, model.scheduler_config)
    with runtime.inference_context():
        with timer.stage("text_encoding"):
            embeds = encode_prompt(model, request.prompt, request.negative_prompt, request.batch_size,
                                   request.guidance, runtime.device)
        done = [0]
        with timer.stage("denoising"):
            latents = pipe(
                **embeds.kwargs,
                height=request.height,
                width=request.width,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                generator=generators(request.seed, request.batch_size, runtime.device),
                output_type="latent",
                callback_on_step_end=step_callback(request.steps, progress, stop, done),
            ).images
        with timer.stage("vae_decode"):
            images = decode_latents(model, latents)
    return images, done[0]
