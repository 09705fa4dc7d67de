"""Inpainting and outpainting: img2img inside a mask, with an inpainting checkpoint (its 9-channel UNet reads the
mask and the masked picture) or an ordinary one (the known region re-noised and blended back at every step, by
diffusers' inpaint pipeline); then the result pasted over the original through the blurred mask, so every pixel
outside it is the original's."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from engine.errors import UserError
from engine.requests import InpaintRequest, load_image
from engine.tasks.base import Task, TaskOutput
from engine.tasks.common import (decode_latents, denoise, derived_pipeline, encode_images, encode_request_prompt,
                                 fit_image, generators, steps_for_strength)
from engine.tasks.context import DenoiseContext
from engine.tasks.masking import blurred, crop_region, fill_masked, grown_canvas, load_mask, paste_back


@dataclass
class InpaintInput:
    """The picture and its mask (L, white = repaint; None with outpainting only)."""

    image: Any
    mask: Any = None

    @classmethod
    def of(cls, value: Any) -> "InpaintInput":
        """What callers send: an InpaintInput, {"image", "mask"}, (image, mask), or an image alone."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(value.get("image"), value.get("mask"))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(*value)
        return cls(value, None)


class Inpaint(Task):
    name = "inpaint"
    request_type = InpaintRequest
    takes_image = True

    def read_inputs(self, value: Any) -> None:
        given = InpaintInput.of(value)
        image = load_image(given.image)
        self.image = InpaintInput(image, None if given.mask is None else load_mask(given.mask, image.size))

    def normalise(self, request):
        image, mask = self.image.image, self.image.mask
        notices = []
        if any(request.outpaint):
            w, h = image.size
            image, mask = grown_canvas(image, mask, *request.outpaint)
            notices.append(f"Outpainting: the {w}x{h} canvas grew to {image.size[0]}x{image.size[1]}; the new "
                           f"area is masked.")
            # consumed: the grown canvas is the input from here on (a replica reading this request again)
            request = request.model_copy(update=dict(outpaint_left=0, outpaint_right=0, outpaint_up=0,
                                                     outpaint_down=0))
        if mask is None:
            raise UserError("No mask: paint over what to repaint (white), upload a mask, or outpaint.")
        if (ImageOps.invert(mask) if request.invert_mask else mask).getbbox() is None:
            raise UserError("The mask is empty: nothing would be repainted. Paint over the area to change"
                            + (" (Invert mask is on: the unpainted area is repainted)." if request.invert_mask
                               else "."))
        request, sized = request.sized_for(image.size, self.model.vae_scale_factor)
        fitted = fit_image(image, request.width, request.height, request.resize_mode)
        fitted_mask = fit_image(mask, request.width, request.height, request.resize_mode)
        self.image = InpaintInput(fitted, fitted_mask.point(lambda v: 255 if v > 128 else 0))
        return request, notices + sized

    @property
    def inputs_key(self) -> str:
        digest = hashlib.sha256(self.image.image.tobytes())
        digest.update(self.image.mask.tobytes())
        return f"{self.image.image.size}:{digest.hexdigest()}"

    def memory_need(self):
        return self.request.width, self.request.height, self.request.batch_size

    def run(self, runtime, ctx: DenoiseContext) -> TaskOutput:
        r, model = self.request, self.model
        image, mask = self.image.image, self.image.mask
        with ctx.timer.stage("resize"):  # 1. the mask's soft edge, and the region that is repainted
            mask = ImageOps.invert(mask) if r.invert_mask else mask
            overlay = blurred(mask, r.mask_blur)
            box = crop_region(mask, r.only_masked_padding, r.width, r.height) if r.inpaint_area == "only masked" \
                else None
            work, work_mask = image, overlay
            if box is not None:  # the region at the full output size
                work = image.crop(box).resize((r.width, r.height), Image.LANCZOS)
                work_mask = overlay.crop(box).resize((r.width, r.height), Image.LANCZOS)
            binary = work_mask.point(lambda v: 255 if v > 127 else 0)
            start = fill_masked(work, binary) if r.masked_content == "fill" else work
        planned = steps_for_strength(r.steps, r.strength)
        if planned == 0:
            return TaskOutput([image.copy() for _ in range(r.batch_size)], 0, 0, self._details(box, 0),
                              ["Strength 0: the input is returned and no denoising step ran."])
        gens = generators(r.seed, r.batch_size, runtime.device)
        with runtime.inference_context():
            embeds = encode_request_prompt(model, runtime, r, ctx.timer)  # 2. the prompt pair
            with ctx.timer.stage("vae_encode"):  # 3. the start and, for an inpainting UNet, the masked picture
                latents = encode_images(model, [start] * r.batch_size, gens, tiled=r.vae_tiling)
                latents, conditioning = self._latents(latents, binary, work, gens)
            with ctx.timer.stage("denoising"):  # 4. denoise inside the mask
                latents = denoise(model, derived_pipeline(model, "inpaint"), runtime, embeds, ctx, r, steps=r.steps,
                                  gens=gens, width=r.width, height=r.height, total=planned, image_latents=latents,
                                  strength=r.strength, extra=dict(mask_image=binary, masked_image_latents=conditioning,
                                                                  height=r.height, width=r.width))
            with ctx.timer.stage("vae_decode"):  # 5. back to pixels
                results = decode_latents(model, latents, tiled=r.vae_tiling)
        with ctx.timer.stage("paste_back"):  # 6. over the original through the blurred mask
            images = [paste_back(image, out, overlay, box) for out in results]
        return TaskOutput(images, ctx.steps_done, planned, self._details(box, planned),
                          [f"Ran {planned} of {r.steps} steps (steps x strength {r.strength:g})."])

    def _latents(self, latents: torch.Tensor, binary: Image.Image, work: Image.Image,
                 gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked content A1111 starts from, and the masked picture's latents (what a 9-channel UNet reads)."""
        r, model = self.request, self.model
        small = binary.resize((latents.shape[-1], latents.shape[-2]), Image.BILINEAR)
        inside = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).round()[None, None]
        if r.masked_content == "latent noise":
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g, device=g.device) for g in gens])
            latents = latents * (1 - inside) + noise.to(latents) * inside
        elif r.masked_content == "latent nothing":
            latents = latents * (1 - inside)
        if not model.is_inpainting:  # the pipeline blends the known latents itself; this input goes unread
            return latents, latents * (1 - inside)
        gray = Image.new("RGB", work.size, (128, 128, 128))  # 0 in the VAE's [-1, 1]: what A1111 conditions on
        masked = Image.composite(gray, work, binary)
        return latents, encode_images(model, [masked] * r.batch_size, gens, tiled=r.vae_tiling)

    def _details(self, box, planned: int) -> dict:
        r = self.request
        details = {"steps_planned": planned, "mask_blur": r.mask_blur, "masked_content": r.masked_content,
                   "inpainting_unet": "yes (9 channels)" if self.model.is_inpainting else "no (blended each step)"}
        if box is not None:
            details["inpaint_region"] = f"{box[2] - box[0]}x{box[3] - box[1]} at ({box[0]}, {box[1]})"
        return details
