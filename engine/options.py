"""Optimizations (one field per UI checkbox) and presets from presets/*.toml."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError
from .requests import describe_validation_error

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Attention = Literal["sdpa", "xformers"]


class Optimizations(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # auto: fp16 on CUDA, bf16 on CPUs with hardware bf16 (AVX512-BF16/AMX), fp32 elsewhere.
    precision: Precision = "auto"
    # Weights stored as int8 (nncf weight compression); OpenVINO runtime only.
    int8_weights: bool = False
    # Hybrid INT8 (implies int8 weights): convolutions quantized int8 x int8, calibrated once at
    # conversion on a few synthetic denoising inputs. Weight-only int8 convolutions are unpacked to
    # f32 when OpenVINO compiles them; quantized ones stay int8, so the compiled UNet is smaller.
    int8_convolutions: bool = False
    # OpenVINO CACHE_DIR for compiled blobs. Off by default: measured on SD 1.5 (fp32 UNet), importing
    # a blob saves ~2 s of compile but peaks at 9.8 GiB RSS against 6.6 GiB compiling from the IR.
    compiled_blob_cache: bool = False

    # PyTorch runtime: memory layout, attention kernels and graph compile.
    channels_last: bool = False
    attention: Attention = "sdpa"
    attention_slicing: bool = False
    torch_compile: bool = False
    # Token merging (tomesd): merge this fraction of similar tokens in self-attention; 0 = off.
    token_merging_ratio: float = Field(0.0, ge=0.0, le=0.75)
    # DeepCache-style reuse of the UNet's deep features: a full UNet call every N steps, shallow ones between.
    deepcache_interval: int = Field(0, ge=0, le=10)  # 0 or 1 = off

    # Every runtime: decoding and caches.
    vae_slicing: bool = True  # decode a batch one image at a time (lower peak memory)
    vae_tiling: bool = False  # decode large images in tiles
    tiny_vae: bool = False  # decode (and preview) with TAESD/TAESDXL; needs --taesd
    prompt_cache: bool = True
    result_cache: bool = False
    # End denoising when the latent changes by less than this (relative) per step; 0 = off.
    early_stop_threshold: float = Field(0.0, ge=0.0, le=0.5)

    @property
    def deepcache(self) -> bool:
        return self.deepcache_interval > 1


# Options a runtime applies when it prepares the model; changing them re-prepares it.
RUNTIME_FIELDS = frozenset({"precision", "int8_weights", "int8_convolutions", "compiled_blob_cache", "channels_last",
                            "attention", "attention_slicing", "torch_compile", "token_merging_ratio",
                            "deepcache_interval"})
# What each option is called in the UI.
LABELS = {
    "precision": "Precision",
    "int8_weights": "INT8 weights",
    "int8_convolutions": "INT8 convolutions (hybrid quantization)",
    "compiled_blob_cache": "Compiled-blob cache",
    "channels_last": "channels_last memory format",
    "attention": "Attention backend",
    "attention_slicing": "Attention slicing",
    "torch_compile": "torch.compile",
    "token_merging_ratio": "Token merging ratio (tomesd)",
    "deepcache_interval": "DeepCache interval (full UNet every N steps)",
    "vae_slicing": "VAE slicing",
    "vae_tiling": "VAE tiling",
    "tiny_vae": "Tiny autoencoder (TAESD)",
    "prompt_cache": "Prompt-embedding cache",
    "result_cache": "Result cache",
    "early_stop_threshold": "Early stop threshold",
}
DEFAULTS = Optimizations()


def is_on(opts: Optimizations, name: str) -> bool:
    """Whether the option asks for something beyond the default (what an unavailable box would drop)."""
    return getattr(opts, name) != getattr(DEFAULTS, name)


class GenerationDefaults(BaseModel):
    """What a preset pre-fills in the UI; a request still states its own values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    optimizations: Optimizations = Optimizations()
    defaults: GenerationDefaults = GenerationDefaults()


def preset_names(directory: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def _check_name(name: str) -> str:
    name = (name or "").strip()
    if not PRESET_NAME.match(name):
        raise UserError(f"Invalid preset name {name!r}: use 1-40 lower-case letters, digits, '-' or '_'.")
    return name


def load_preset(name: str, directory: Path = PRESETS_DIR) -> Preset:
    name = _check_name(name)
    path = directory / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"Unknown preset {name!r}; presets are: {', '.join(preset_names(directory)) or 'none'}.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return Preset.model_validate({"name": name, **data})
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"Preset {name!r} is not valid TOML: {e}") from None
    except ValidationError as e:
        raise UserError(f"Preset {name!r}: {describe_validation_error(e)}") from None


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def preset_toml(preset: Preset) -> str:
    lines = [f"description = {_toml_value(preset.description)}", "", "[optimizations]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in preset.optimizations.model_dump().items()]
    defaults = preset.defaults.model_dump(exclude_none=True)
    if defaults:
        lines += ["", "[defaults]"] + [f"{k} = {_toml_value(v)}" for k, v in defaults.items()]
    return "\n".join(lines) + "\n"


def save_preset(preset: Preset, directory: Path = PRESETS_DIR, overwrite: bool = False) -> Path:
    """Write presets/NAME.toml (name validated: no paths); refuses to replace a preset unless asked."""
    name = _check_name(preset.name)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    if path.exists() and not overwrite:
        raise UserError(f"A preset named {name!r} exists already; pick another name.")
    tmp = directory / f".{name}.toml.tmp"
    tmp.write_text(preset_toml(preset.model_copy(update={"name": name})), encoding="utf-8")
    tmp.replace(path)
    return path
