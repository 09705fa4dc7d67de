"""Pieces every task shares: prompt encoding, denoising with progress, VAE decode."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

ProgressFn = Callable[[int, int], None]  # (step done, total steps)


@dataclass
class StopFlag:
    """Set by Engine.stop(); the step callback tells diffusers to end the loop."""

    requested: bool = False


@dataclass
class PromptEmbeddings:
    kwargs: dict[str, Any] = field(default_factory=dict)  # prompt_embeds, negative_prompt_embeds, pooled...


def encode_prompt(model, prompt: str, negative_prompt: str, batch_size: int, guidance: float,
                  device: str) -> PromptEmbeddings:
    pipe = model.pipe
    cfg = guidance > 1.0
    if model.is_sdxl:
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=batch_size,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt or None,
        )
        kwargs = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if cfg:
            kwargs.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
    else:
        pe, npe = pipe.encode_prompt(
            prompt, device, batch_size, cfg, negative_prompt=negative_prompt or None,
        )
        kwargs = {"prompt_embeds": pe}
        if cfg:
            kwargs["negative_prompt_embeds"] = npe
    return PromptEmbeddings(kwargs)


def step_callback(total: int, progress: ProgressFn | None, stop: StopFlag, counter: list[int]):
    """diffusers callback_on_step_end: report step i of N, honour a stop request."""

    def callback(pipe, step_index, timestep, callback_kwargs):
        counter[0] = step_index + 1
        if progress is not None:
            progress(step_index + 1, total)
        if stop.requested:
            pipe._interrupt = True
        return callback_kwargs

    return callback


def generators(seed: int, count: int, device: str) -> list[torch.Generator]:
    """Image i gets seed+i, so any image of a batch can be made again alone."""
    gen_device = "cpu" if device == "mps" else device
    return [torch.Generator(gen_device).manual_seed(seed + i) for i in range(count)]


def decode_latents(model, latents: torch.Tensor):
    """Latents -> PIL images with the model's VAE."""
    pipe = model.pipe
    vae = pipe.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    images = vae.decode(scaled, return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="pil")
