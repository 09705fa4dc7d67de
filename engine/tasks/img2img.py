"""img2img: fit the init image to the size, encode it, denoise round(steps x strength) steps, decode."""
from __future__ import annotations

from engine.requests import Img2ImgRequest
from engine.tasks.base import Task, TaskOutput
from engine.tasks.common import (decode_latents, denoise, derived_pipeline, encode_images, encode_request_prompt,
                                 fit_image, generators, steps_for_strength)
from engine.tasks.context import DenoiseContext


class Img2Img(Task):
    name = "img2img"
    request_type = Img2ImgRequest
    takes_image = True

    def normalise(self, request):
        request, notices = request.sized_for(self.image.size, self.model.vae_scale_factor)
        # Fitted now: a job waiting for the device holds the output-size image, not the upload (up to 96 MiB).
        self.image = fit_image(self.image, request.width, request.height, request.resize_mode)
        return request, notices

    def memory_need(self):
        return self.request.width, self.request.height, self.request.batch_size

    def run(self, runtime, ctx: DenoiseContext) -> TaskOutput:
        r, model = self.request, self.model
        with ctx.timer.stage("resize"):  # 1. the input at the output size (fitted when the job was made)
            fitted = fit_image(self.image, r.width, r.height, r.resize_mode)
        planned = steps_for_strength(r.steps, r.strength)
        if planned == 0:
            return TaskOutput([fitted.copy() for _ in range(r.batch_size)], 0, 0, {"steps_planned": 0},
                              ["Strength 0: the input is returned (resized) and no denoising step ran."])
        gens = generators(r.seed, r.batch_size, runtime.device)
        with runtime.inference_context():
            embeds = encode_request_prompt(model, runtime, r, ctx.timer)  # 2. the prompt pair
            with ctx.timer.stage("vae_encode"):  # 3. the input to latents, one sample per image
                latents = encode_images(model, [fitted] * r.batch_size, gens, tiled=r.vae_tiling)
            with ctx.timer.stage("denoising"):  # 4. denoise from the noised input
                latents = denoise(model, derived_pipeline(model, "img2img"), runtime, embeds, ctx, r, steps=r.steps,
                                  gens=gens, width=r.width, height=r.height, total=planned, image_latents=latents,
                                  strength=r.strength)
            with ctx.timer.stage("vae_decode"):  # 5. back to pixels
                images = decode_latents(model, latents, tiled=r.vae_tiling)
        return TaskOutput(images, ctx.steps_done, planned, {"steps_planned": planned},
                          [f"Ran {planned} of {r.steps} steps (steps x strength {r.strength:g})."])
