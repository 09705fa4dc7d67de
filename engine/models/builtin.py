"""The built-in models: the shipped, trained ones under assets/models, and architecture-sized ones built here
from a fixed seed (tests and benchmarks); the built-in tiny autoencoders' names."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _text_config(vocab_size: int, hidden: int, layers: int, heads: int, inter: int, eos_id: int, bos_id: int,
                 act: str = "quick_gelu", projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=77, hidden_act=act,
        projection_dim=projection_dim or hidden, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def _vae(block_out: tuple[int, ...], layers: int, groups: int, sample_size: int, scaling: float):
    from diffusers import AutoencoderKL

    n = len(block_out)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out, layers_per_block=layers, norm_num_groups=groups,
        sample_size=sample_size, scaling_factor=scaling,
    )


class _Maker:
    """Builds each component from its own seed, on the meta device when it is in `skeleton`.

    Own seeds keep a component's weights the same whether or not the others are built,
    so a runtime's cache made from a full build matches a skeleton build.
    """

    def __init__(self, skeleton: frozenset[str]):
        self.skeleton = skeleton

    def __call__(self, name: str, build: Callable[[], Any]):
        torch.manual_seed(BUILTIN_SEED + sum(map(ord, name)))
        if name in self.skeleton:
            with torch.device("meta"):
                return build()
        return build()


def _build_sd(size: str, skeleton: frozenset[str] = frozenset()):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from engine.text.vocab import load_tokenizer

    make = _Maker(skeleton)
    tokenizer = load_tokenizer()
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if size in ("tiny", "tiny-inpaint"):
        text_config = _text_config(len(tokenizer), 32, 2, 4, 64, eos, bos)
        unet = make("unet", lambda: UNet2DConditionModel(
            sample_size=32, in_channels=9 if size == "tiny-inpaint" else 4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ))
        vae = make("vae", lambda: _vae((16, 32, 32, 32), 1, 16, 256, 0.18215))
    else:  # the SD 1.5 architecture
        text_config = _text_config(49408, 768, 12, 12, 3072, eos, bos)
        unet = make("unet", lambda: UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8))
        vae = make("vae", lambda: _vae((128, 256, 512, 512), 2, 32, 512, 0.18215))
    text_encoder = make("text_encoder", lambda: CLIPTextModel(text_config))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_sdxl(size: str, skeleton: frozenset[str] = frozenset()):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from engine.text.vocab import load_tokenizer

    make = _Maker(skeleton)
    tokenizer = load_tokenizer()
    tokenizer_2 = load_tokenizer()
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if size == "tiny":
        te1 = _text_config(len(tokenizer), 32, 2, 4, 64, eos, bos)
        te2 = _text_config(len(tokenizer), 32, 2, 4, 64, eos, bos, act="gelu", projection_dim=32)
        unet = make("unet", lambda: UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=32,
        ))
        vae = make("vae", lambda: _vae((16, 32, 32, 32), 1, 16, 256, 0.13025))
    else:  # the SDXL base architecture
        te1 = _text_config(49408, 768, 12, 12, 3072, eos, bos)
        te2 = _text_config(49408, 1280, 32, 20, 5120, eos, bos, act="gelu", projection_dim=1280)
        unet = make("unet", lambda: UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ))
        vae = make("vae", lambda: _vae((128, 256, 512, 512), 2, 32, 1024, 0.13025))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=make("text_encoder", lambda: CLIPTextModel(te1)),
        text_encoder_2=make("text_encoder_2", lambda: CLIPTextModelWithProjection(te2)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


# name -> (family, builder(skeleton), description)
BUILTINS: dict[str, tuple[str, Callable[[frozenset[str]], Any], str]] = {
    "tiny": ("sd1", lambda sk: _build_sd("tiny", sk), "SD 1.x architecture, tiny widths, random weights (tests, demos)"),
    "tiny-inpaint": ("sd1", lambda sk: _build_sd("tiny-inpaint", sk),
                     "SD 1.x inpainting architecture (9-channel UNet), tiny widths, random weights (tests)"),
    "tiny-sdxl": ("sdxl", lambda sk: _build_sdxl("tiny", sk), "SDXL architecture, tiny widths, random weights (tests)"),
    "sd15": ("sd1", lambda sk: _build_sd("sd15", sk), "SD 1.5 architecture, full size, random weights (benchmarks)"),
    "sdxl": ("sdxl", lambda sk: _build_sdxl("sdxl", sk), "SDXL base architecture, full size, random weights (benchmarks)"),
}


BUILTIN_SEED = 0


# Trained models shipped in assets/ (diffusers folders), addressed as builtin:NAME.
ASSETS_MODELS = Path(__file__).resolve().parents[2] / "assets" / "models"


SHIPPED = {
    "shapes": "SD 1.x pipeline trained here on drawn shapes: draws what the prompt says, 128x128 native (demo)",
}


HEAVY_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def build_builtin(name: str, skeleton: frozenset[str] = frozenset()):
    """Build a built-in pipeline; components named in `skeleton` get no weights (meta device)."""
    family, builder, _ = BUILTINS[name]
    # Fixed seeds without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        pipe = builder(frozenset(skeleton))
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


TINY_AUTOENCODERS = {
    "taesd": "TAESD architecture (SD 1.x/2.x latents), random weights (benchmarks)",
    "taesdxl": "TAESDXL architecture (SDXL latents), random weights (benchmarks)",
}
