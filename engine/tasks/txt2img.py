"""txt2img: encode the prompt once, then per batch: denoise from noise and decode. Each stage timed."""
from __future__ import annotations

from engine.requests import Txt2ImgRequest
from engine.tasks.base import Task, TaskOutput
from engine.tasks.common import decode_latents, denoise, encode_request_prompt, generators
from engine.tasks.context import DenoiseContext


class Txt2Img(Task):
    name = "txt2img"
    request_type = Txt2ImgRequest

    def normalise(self, request):
        return request.snapped(self.model.vae_scale_factor)

    def memory_need(self):
        return self.request.width, self.request.height, self.request.batch_size

    def run(self, runtime, ctx: DenoiseContext) -> TaskOutput:
        r, model = self.request, self.model
        total = r.steps * r.batch_count
        images = []
        with runtime.inference_context():
            # 1. the prompt pair, once for every batch
            embeds = encode_request_prompt(model, runtime, r, ctx.timer)
            for k in range(r.batch_count):  # 2. batches one after another; image i has seed + i
                if ctx.stopped:
                    break
                gens = generators(r.seed + k * r.batch_size, r.batch_size, runtime.device)
                with ctx.timer.stage("denoising"):
                    latents = denoise(model, model.pipe, runtime, embeds, ctx, r, steps=r.steps, gens=gens,
                                      width=r.width, height=r.height, total=total)
                with ctx.timer.stage("vae_decode"):  # 3. latents to pixels
                    images += decode_latents(model, latents)
        details = {"batches": r.batch_count} if r.batch_count > 1 else {}
        return TaskOutput(images, ctx.steps_done, total, details)
