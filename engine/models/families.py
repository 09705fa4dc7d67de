"""Which family (sd1, sd2, sdxl) a folder or a single-file checkpoint is, read from its files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from engine.errors import ModelLoadError, one_line

FAMILIES = ("sd1", "sd2", "sdxl")


def family_of_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (it has no model_index.json).")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{index} is damaged: {e}") from e
    if "XL" in class_name or (folder / "text_encoder_2").is_dir():
        return "sdxl"
    te_config = folder / "text_encoder" / "config.json"
    try:
        hidden = json.loads(te_config.read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError):
        hidden = None
    return "sd2" if hidden == 1024 else "sd1"


def family_of_keys(keys: set[str] | list[str]) -> str:
    """SD family from the key names of an original-format (LDM) checkpoint."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys) or "model.diffusion_model.label_emb.0.0.weight" in keys:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd1"
    raise ModelLoadError("This file is not a Stable Diffusion checkpoint (no model.diffusion_model weights found).")


def checkpoint_keys(path: Path) -> list[str]:
    """Key names of a single-file checkpoint; pickles only through weights_only=True."""
    if path.suffix.lower() == ".safetensors":
        return list(_safetensors_header(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses code; truncated zips fail here too
        raise ModelLoadError(f"Could not read {path.name} as a weights-only checkpoint: {one_line(e)}") from e
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path.name} does not hold a state dict.")
    return list(state)


def _safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path.name} is truncated or not a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 1024 * 1024):
            raise ModelLoadError(f"{path.name} is truncated or not a safetensors file.")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ModelLoadError(f"{path.name} has a damaged safetensors header.") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{path.name} is truncated: it is {size} bytes but its header needs {8 + n + end}.")
    return header
