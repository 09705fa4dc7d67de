"""PyTorch components -> dynamic-shape ov.Model, and the input shapes each part sees in a job."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from engine.runtimes.base import WarmupShape
from engine.runtimes.deepcache import deep_channels, full_forward, shallow_forward

CONVERSION_VERSION = 2  # bump when what convert_part produces changes (2: DeepCache's smallest branch)
TEXT_LENGTH = 77
PARTS_OF = {  # pipeline component -> IR parts made from it
    "unet": ("unet",),
    "vae": ("vae_decoder", "vae_encoder"),
    "text_encoder": ("text_encoder",),
    "text_encoder_2": ("text_encoder_2",),
}
TEXT_PARTS = ("text_encoder", "text_encoder_2")
DEEPCACHE_PARTS = ("unet_deep", "unet_shallow")  # with DeepCache the UNet is these two graphs, not "unet"
UNET_PARTS = ("unet", *DEEPCACHE_PARTS)


def parts_of(deepcache: bool) -> dict[str, tuple[str, ...]]:
    """Pipeline component -> the IR parts a runtime with (or without) DeepCache makes from it."""
    return {**PARTS_OF, "unet": DEEPCACHE_PARTS} if deepcache else dict(PARTS_OF)


class _UNetWrap(torch.nn.Module):
    def __init__(self, unet, sdxl: bool, has_cond: bool):
        super().__init__()
        self.unet, self.sdxl, self.has_cond = unet, sdxl, has_cond

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs=added, return_dict=False)[0]


class _DeepWrap(_UNetWrap):
    """The whole UNet, also returning the deep features DeepCache keeps."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return full_forward(self.unet, sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                            added_cond_kwargs=added)


class _ShallowWrap(_UNetWrap):
    """conv_in, the first down block and the last up block around the kept deep features."""

    def forward(self, sample, timestep, encoder_hidden_states, deep, text_embeds=None, time_ids=None,
                timestep_cond=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return shallow_forward(self.unet, sample, timestep, encoder_hidden_states, deep, timestep_cond=timestep_cond,
                               added_cond_kwargs=added)


class _DecoderWrap(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class _EncoderWrap(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae._encode(image)  # moments: mean and log-variance


class _TextWrap(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


def _unet_inputs(config, batch: int, latent_h: int, latent_w: int, part: str = "unet"
                 ) -> dict[str, tuple[list[int], torch.dtype]]:
    inputs = {
        "sample": ([batch, config.in_channels, latent_h, latent_w], torch.float32),
        "timestep": ([1], torch.float32),
        "encoder_hidden_states": ([batch, TEXT_LENGTH, config.cross_attention_dim], torch.float32),
    }
    if part == "unet_shallow":
        inputs["deep"] = ([batch, deep_channels(config), latent_h, latent_w], torch.float32)
    if config.addition_embed_type == "text_time":
        time_dim = config.addition_time_embed_dim
        inputs["text_embeds"] = ([batch, config.projection_class_embeddings_input_dim - 6 * time_dim], torch.float32)
        inputs["time_ids"] = ([batch, 6], torch.float32)
    if config.time_cond_proj_dim:
        inputs["timestep_cond"] = ([batch, config.time_cond_proj_dim], torch.float32)
    return inputs


def job_shapes(model, shape: WarmupShape, parts) -> list[tuple[str, dict[str, list[int]]]]:
    """(part, input shapes) for every graph a job of `shape` runs: each UNet graph in `parts` (plain, or
    DeepCache's two) at each UNet batch (with guidance, and batch 1 after a CFG truncation), the decoder
    at `decode_batch` latents, the encoder at one image (img2img encodes one image at a time), each text
    encoder at one prompt."""
    pipe, f = model.pipe, model.vae_scale_factor
    lh, lw = shape.height // f, shape.width // f
    latent_channels = pipe.vae.config.latent_channels
    shapes = [(part, {k: s for k, (s, _) in _unet_inputs(pipe.unet.config, batch, lh, lw, part).items()})
              for part in UNET_PARTS if part in parts for batch in shape.unet_batches]
    shapes.append(("vae_decoder", {"latent": [shape.decode_batch, latent_channels, lh, lw]}))
    if shape.encode:
        shapes.append(("vae_encoder", {"image": [1, 3, shape.height, shape.width]}))
    shapes += [(part, {"input_ids": [1, TEXT_LENGTH]}) for part in TEXT_PARTS if part in parts]
    return shapes


def _convert(module: torch.nn.Module, example: dict[str, torch.Tensor]):
    import openvino as ov

    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing notes every Python-level shape check; the ones in diffusers are for fixed
        # channel counts and batch < 64, which hold for every shape we reshape to.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return ov.convert_model(module, example_input=example)


def convert_part(part: str, component) -> Any:
    """PyTorch component -> dynamic-shape ov.Model for one IR part."""
    if part in UNET_PARTS:
        cfg = component.config
        # An odd latent size makes the trace keep diffusers' explicit upsample sizes, so the
        # graph is right for latent sizes that are not a multiple of the UNet's down factor.
        shapes = _unet_inputs(cfg, 2, 9, 9, part)
        example = {k: torch.randn(s, dtype=d) for k, (s, d) in shapes.items()}
        example["timestep"] = torch.tensor([999.0])
        wrap = {"unet": _UNetWrap, "unet_deep": _DeepWrap, "unet_shallow": _ShallowWrap}[part]
        return _convert(wrap(component, cfg.addition_embed_type == "text_time", bool(cfg.time_cond_proj_dim)),
                        example)
    if part == "vae_decoder":
        return _convert(_DecoderWrap(component), {"latent": torch.randn(1, component.config.latent_channels, 9, 9)})
    if part == "vae_encoder":
        return _convert(_EncoderWrap(component), {"image": torch.randn(1, 3, 72, 72)})
    if part in TEXT_PARTS:
        return _convert(_TextWrap(component), {"input_ids": torch.ones(1, TEXT_LENGTH, dtype=torch.int64)})
    raise ValueError(part)


def is_meta(module) -> bool:
    """Whether the module's weights were never built (its IR came from the cache)."""
    try:
        return next(module.parameters()).is_meta
    except (StopIteration, AttributeError):
        return False
