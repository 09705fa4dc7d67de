"""Optimizations (one field per UI checkbox) and presets from presets/*.toml."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError
from .requests import describe_validation_error

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class Optimizations(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # auto: fp16 on CUDA, bf16 on CPUs with hardware bf16 (AVX512-BF16/AMX), fp32 elsewhere.
    precision: Precision = "auto"
    # Weights stored as int8 (nncf weight compression); OpenVINO runtime only.
    int8_weights: bool = False
    # OpenVINO CACHE_DIR for compiled blobs. Off by default: measured on SD 1.5 (fp32 UNet), importing
    # a blob saves ~2 s of compile but peaks at 9.8 GiB RSS against 6.6 GiB compiling from the IR.
    compiled_blob_cache: bool = False


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


def load_preset(name: str, directory: Path = PRESETS_DIR) -> Preset:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"Invalid preset name {name!r}.")
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
