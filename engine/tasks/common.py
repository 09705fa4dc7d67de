"""Pieces every task shares: prompt encoding, denoising with progress, VAE encode/decode, resizing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.lora.tags import strip_tags
from engine.samplers import make_scheduler
from engine.store.caches import PromptCache
from engine.system.tensors import to_numpy
from engine.tasks.context import DenoiseContext
from engine.tasks.tiling import Blender, Tile, grid
from engine.text.prompts import chunk_count, encode_chunks

VAE_TILE_LATENT = 64  # latent tile side for tiled VAE decode (512 px at the usual 8x)
VAE_TILE_OVERLAP = 8


@dataclass
class PromptEmbeddings:
    kwargs: dict[str, Any] = field(default_factory=dict)  # prompt_embeds, negative_prompt_embeds, pooled...


def encode_prompt(model, prompt: str, negative_prompt: str, batch_size: int, guidance: float,
                  device: str) -> PromptEmbeddings:
    """The prompt pair with A1111's emphasis, 75-token chunks and textual-inversion embeddings (engine/text/), on
    every runtime: the text encoder is called once per chunk at 77 tokens. The negative prompt is padded with empty
    chunks to the prompt's length (or the other way round), since CFG runs both in one UNet batch."""
    pipe, sdxl = model.pipe, model.is_sdxl
    cfg = guidance > 1.0
    # SDXL models that ask for it get zeros for an empty negative prompt, as diffusers gives them.
    zeros = sdxl and not negative_prompt and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    words = model.embeddings.words  # textual-inversion names, by text encoder
    chunks = chunk_count(pipe, sdxl, prompt, words)
    if cfg and not zeros:
        chunks = max(chunks, chunk_count(pipe, sdxl, negative_prompt, words))
    encoder = pipe.text_encoder_2 if sdxl and pipe.text_encoder_2 is not None else pipe.text_encoder
    with torch.no_grad():
        pe, pooled = encode_chunks(pipe, sdxl, prompt, device, chunks, words)
        kwargs = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
        if cfg:
            if zeros:
                kwargs.update(negative_prompt_embeds=torch.zeros_like(pe),
                              negative_pooled_prompt_embeds=torch.zeros_like(pooled))
            else:
                npe, npooled = encode_chunks(pipe, sdxl, negative_prompt, device, chunks, words)
                kwargs.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled)
    kwargs = {k: v.to(dtype=encoder.dtype, device=device) for k, v in kwargs.items() if v is not None}
    return PromptEmbeddings(PromptCache.expand(kwargs, batch_size))


def encode_request_prompt(model, runtime, request, timer, batch_size: int | None = None) -> PromptEmbeddings:
    """The request's prompt pair (without <lora:...> tags), encoded under the "text_encoding" stage (through the
    prompt cache when on)."""
    batch = batch_size or request.batch_size
    prompt = strip_tags(request.prompt)
    with timer.stage("text_encoding"):
        cache = model.prompt_cache if model.options.prompt_cache else None
        if cache is None:
            return encode_prompt(model, prompt, request.negative_prompt, batch, request.guidance, runtime.device)
        loras = f"{model.loras.key('text_encoder')}|{model.loras.key('text_encoder_2')}"  # LoRAs in the encoders
        emb = f"|emb:{model.embeddings.key}" if model.embeddings.key else ""  # the embeddings in their tables
        key = cache.key(f"{model.identity or model.name}|{loras}{emb}", prompt, request.negative_prompt, None,
                        request.guidance > 1.0)
        kwargs = cache.get(key)
        if kwargs is None:
            kwargs = encode_prompt(model, prompt, request.negative_prompt, 1, request.guidance,
                                   runtime.device).kwargs
            cache.put(key, kwargs)
        return PromptEmbeddings(cache.expand(kwargs, batch))


def generators(seed: int, count: int, device: str) -> list[torch.Generator]:
    """Image i gets seed+i, so any image of a batch can be made again alone."""
    gen_device = "cpu" if device == "mps" else device
    return [torch.Generator(gen_device).manual_seed(seed + i) for i in range(count)]


def derived_pipeline(model, task: str):
    """The img2img or inpaint pipeline sharing the loaded components (diffusers from_pipe): no second copy of
    weights."""
    cache = model.derived
    if task not in cache:
        import diffusers

        sd, sdxl = {"img2img": ("StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"),
                    "inpaint": ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline")}[task]
        pipe = getattr(diffusers, sdxl if model.is_sdxl else sd).from_pipe(model.pipe)
        pipe.set_progress_bar_config(disable=True)
        cache[task] = pipe
    return cache[task]


def denoise(model, pipe, runtime, embeds: PromptEmbeddings, ctx: DenoiseContext, request, *, steps: int,
            gens: list[torch.Generator], width: int, height: int, total: int,
            image_latents: torch.Tensor | None = None, strength: float = 1.0,
            extra: dict[str, Any] | None = None) -> torch.Tensor:
    """One diffusers denoising pass to latents (img2img from image_latents) with the request's sampler, schedule
    type, eta and guidance; `total` is the job's step count; `extra`: the inpaint pipeline's mask inputs. An
    inpainting model (9-channel UNet) runs every task through its inpaint pipeline with the whole picture masked,
    as A1111 conditions it."""
    if model.is_inpainting and extra is None:
        pipe, image_latents, extra = _whole_picture_masked(model, gens, width, height, image_latents)
    pipe.scheduler = make_scheduler(request.sampler, model.scheduler_config, request.schedule, sdxl=model.is_sdxl,
                                    seed=gens[0].initial_seed() if gens else None)
    expected = steps if image_latents is None else steps_for_strength(steps, strength)
    runtime.begin_denoise(pipe, expected)
    kwargs = dict(**embeds.kwargs, num_inference_steps=steps, guidance_scale=request.guidance, generator=gens,
                  output_type="latent", callback_on_step_end=ctx.callback(expected, total),
                  callback_on_step_end_tensor_inputs=ctx.tensor_inputs(pipe))
    if request.eta is not None:  # DDIM's (requests.py allows it with DDIM only)
        kwargs["eta"] = request.eta
    if image_latents is None:
        kwargs.update(height=height, width=width)
    else:
        # diffusers runs int(steps * strength) steps; nudge so it runs round(steps * strength).
        kwargs.update(image=image_latents, strength=min(1.0, (expected + 1e-4) / steps))
    return pipe(**kwargs, **(extra or {})).images


def _whole_picture_masked(model, gens, width: int, height: int, image_latents: torch.Tensor | None):
    """An inpainting UNet's inputs for a task without a mask: everything masked, the masked picture all grey
    (A1111's txt2img_image_conditioning); txt2img starts from zero latents at strength 1."""
    f = model.vae_scale_factor
    batch = len(gens)
    if image_latents is None:
        image_latents = torch.zeros(batch, model.pipe.vae.config.latent_channels, height // f, width // f)
    else:
        height, width = image_latents.shape[-2] * f, image_latents.shape[-1] * f
    gray = encode_images(model, [Image.new("RGB", (width, height), (128, 128, 128))], gens[:1])
    extra = dict(mask_image=Image.new("L", (width, height), 255), masked_image_latents=gray.expand(batch, -1, -1, -1),
                 height=height, width=width)
    return derived_pipeline(model, "inpaint"), image_latents, extra


def steps_for_strength(steps: int, strength: float) -> int:
    """Steps an img2img pass actually runs: round(steps x strength)."""
    return min(steps, int(round(steps * strength)))


def _vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    scaled = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    return vae.decode(scaled, return_dict=False)[0].float()


def tiny_decode(taesd, latents: torch.Tensor) -> torch.Tensor:
    """Decode with a tiny autoencoder (TAESD): it reads the UNet's latents directly; output in [-1, 1]."""
    latents = latents.to(device=taesd.device, dtype=taesd.dtype)
    with torch.no_grad():  # runtimes other than PyTorch do not run tasks under inference_mode
        return taesd.decode(latents / taesd.config.scaling_factor, return_dict=False)[0].float()


def decode_latents(model, latents: torch.Tensor, tiled: bool = False) -> list[Image.Image]:
    """Latents -> PIL images with the model's VAE (or its tiny autoencoder when that option is on).

    Tiled (asked by the request or the vae_tiling option) decodes 512 px tiles and feather-blends them;
    VAE slicing decodes one image at a time, since the decoder's activations dwarf the latents.
    """
    pipe = model.pipe
    vae = pipe.vae
    options = model.options
    if options.tiny_vae and model.taesd is not None:
        return pipe.image_processor.postprocess(tiny_decode(model.taesd, latents), output_type="pil")
    tiled = tiled or options.vae_tiling
    lat_h, lat_w = latents.shape[-2:]
    if not tiled or (lat_h <= VAE_TILE_LATENT and lat_w <= VAE_TILE_LATENT):
        if not options.vae_slicing:
            return pipe.image_processor.postprocess(_vae_decode(vae, latents), output_type="pil")
        return [pipe.image_processor.postprocess(_vae_decode(vae, one[None]), output_type="pil")[0]
                for one in latents]
    f = model.vae_scale_factor
    images = []
    for one in latents:
        blender = Blender(lat_w * f, lat_h * f, 3, VAE_TILE_OVERLAP * f)
        for t in grid(lat_w, lat_h, VAE_TILE_LATENT, VAE_TILE_OVERLAP):
            part = one[None, :, t.y:t.y + t.height, t.x:t.x + t.width]
            pixels = to_numpy(_vae_decode(vae, part)[0].permute(1, 2, 0))
            blender.add(Tile(t.x * f, t.y * f, t.width * f, t.height * f), pixels)
        decoded = torch.from_numpy(blender.result()).permute(2, 0, 1)[None]
        images += pipe.image_processor.postprocess(decoded, output_type="pil")
    return images


def image_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB -> (N, 3, H, W) in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _encode_tiled(vae, x: torch.Tensor, f: int, generator: torch.Generator) -> torch.Tensor:
    """One (1, 3, H, W) image -> a latent sample, encoded in 512 px tiles.

    Each tile's mean and std are feather-blended in latent space, then one noise tensor for the
    whole latent is drawn, as the plain encode does (blending per-tile samples would average
    their noise away in the overlaps).
    """
    from diffusers.utils.torch_utils import randn_tensor

    _, _, h, w = x.shape
    channels = vae.config.latent_channels
    means = Blender(w // f, h // f, channels, VAE_TILE_OVERLAP)
    stds = Blender(w // f, h // f, channels, VAE_TILE_OVERLAP)
    for t in grid(w, h, VAE_TILE_LATENT * f, VAE_TILE_OVERLAP * f):
        dist = vae.encode(x[:, :, t.y:t.y + t.height, t.x:t.x + t.width]).latent_dist
        lt = Tile(t.x // f, t.y // f, t.width // f, t.height // f)
        means.add(lt, to_numpy(dist.mean[0].permute(1, 2, 0)))
        stds.add(lt, to_numpy(dist.std[0].permute(1, 2, 0)))
    mean = torch.from_numpy(means.result()).permute(2, 0, 1)[None]
    std = torch.from_numpy(stds.result()).permute(2, 0, 1)[None]
    return mean + std * randn_tensor(mean.shape, generator=generator, dtype=mean.dtype)


def encode_images(model, images: list[Image.Image], gens: list[torch.Generator], tiled: bool = False) -> torch.Tensor:
    """PIL images -> scaled latents (one sample per image from its own generator; tiled: latent means)."""
    vae = model.pipe.vae
    x = image_to_tensor(images).to(device=vae.device, dtype=vae.dtype)
    f = model.vae_scale_factor
    big = tiled and max(x.shape[-2:]) > VAE_TILE_LATENT * f
    out = []
    for i in range(x.shape[0]):
        if big:
            out.append(_encode_tiled(vae, x[i:i + 1], f, gens[i]))
        else:
            out.append(vae.encode(x[i:i + 1]).latent_dist.sample(gens[i]))
    latents = torch.cat(out).float()
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def fit_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Resize to width x height: stretch, crop to fill, or fit inside and fill the rest from the edges."""
    if image.size == (width, height):
        return image.copy()
    if mode == "resize":
        return image.resize((width, height), Image.LANCZOS)
    iw, ih = image.size
    if mode == "crop and resize":
        scale = max(width / iw, height / ih)
        rw, rh = max(width, round(iw * scale)), max(height, round(ih * scale))
        resized = image.resize((rw, rh), Image.LANCZOS)
        left, top = (rw - width) // 2, (rh - height) // 2
        return resized.crop((left, top, left + width, top + height))
    # resize and fill: fit inside, then stretch the edge pixels outwards to fill the gaps
    scale = min(width / iw, height / ih)
    rw, rh = max(1, round(iw * scale)), max(1, round(ih * scale))
    resized = image.resize((rw, rh), Image.LANCZOS)
    canvas = resized.resize((width, height), Image.BILINEAR)  # smeared version of the same picture
    canvas.paste(resized, ((width - rw) // 2, (height - rh) // 2))
    return canvas
