"""Reading a LoRA file in the two formats people have.

kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`/`lora_te2_*` for SDXL, `.lora_down`, `.lora_up`,
`.alpha`) and diffusers / PEFT (`unet.<module>.lora_A/lora_B`, `.lora.down/.lora.up`, `.lora_linear_layer.*`,
`<attn>.processor.to_q_lora.*`)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError
from engine.lora.tags import MAX_LORAS, resolve

_cache: dict[str, LoraFile] = {}  # by path, size and time: a file read once is not read again


COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
              "lora_te2_": "text_encoder_2"}


UNSUPPORTED = ("hada_", "lokr_", "lora_mid", "dora_scale", "lora_magnitude_vector", ".diff")


@dataclass
class LoraLayer:
    component: str  # unet | text_encoder | text_encoder_2
    key: str  # module name: dotted (diffusers), or underscored (kohya) until matched
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha / self.rank) if self.alpha else 1.0


@dataclass
class LoraFile:
    name: str
    path: Path
    digest: str  # sha256 of the file's bytes: a changed file is a new LoRA, a copy is the same one
    layers: list[LoraLayer]
    kind: str  # kohya | diffusers

    @property
    def components(self) -> set[str]:
        return {layer.component for layer in self.layers}

    @property
    def family(self) -> str | None:
        """sd1 / sd2 / sdxl from what the layers show (a second text encoder, the cross-attention width)."""
        if any(layer.component == "text_encoder_2" for layer in self.layers):
            return "sdxl"
        for layer in self.layers:
            if layer.component == "unet" and re.search(r"attn2[._]to_k$", layer.key):
                return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(int(layer.down.shape[1]))
        return None


def _stat_key(name: str, path: Path) -> str:
    st = path.stat()
    return f"{name}:{path}:{st.st_size}:{st.st_mtime_ns}"


def read(name: str, path: Path) -> LoraFile:
    """Parse a LoRA file (kept while its size and mtime stay); a damaged or foreign file is one clear error."""
    key = _stat_key(name, path)
    if key in _cache:
        return _cache[key]
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    try:
        data = path.read_bytes()
        state = load_bytes(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"LoRA {name!r}: the file cannot be read as safetensors ({str(e)[:120]}).") from e
    digest = hashlib.sha256(data).hexdigest()[:16]
    del data
    odd = sorted({u for u in UNSUPPORTED for k in state if u in k})
    if odd:
        raise UserError(f"LoRA {name!r} is a LyCORIS/DoRA variant ({', '.join(odd)} keys); only plain LoRA "
                        f"(down/up matrices) is supported.")
    if any(k.startswith(tuple(COMPONENTS)) for k in state):
        layers, kind = _kohya_layers(state), "kohya"
    else:
        layers, kind = _diffusers_layers(state, _peft_alpha(metadata)), "diffusers"
    if not layers:
        raise UserError(f"LoRA {name!r}: none of its {len(state)} tensors is a LoRA layer (expected kohya "
                        f"lora_unet_*/lora_te_* or diffusers unet.*/text_encoder.* down/up pairs).")
    lora = LoraFile(name, path, digest, layers, kind)
    if len(_cache) >= MAX_LORAS:  # a prompt's worth of files in memory; the fused weights are what runs
        _cache.pop(next(iter(_cache)))
    _cache[key] = lora
    return lora


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The header's __metadata__ (safetensors: 8-byte little-endian length, then a JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return header.get("__metadata__") or {}


def is_stale(lora: LoraFile, models_dir: Path | None) -> bool:
    """Whether the file behind a fused LoRA has changed (or gone) since it was read."""
    try:
        return read(lora.name, resolve(lora.name, models_dir)).digest != lora.digest
    except UserError:
        return True


def _kohya_layers(state: dict[str, torch.Tensor]) -> list[LoraLayer]:
    layers = []
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        prefix = next((p for p in COMPONENTS if stem.startswith(p)), None)
        up = state.get(f"{stem}.lora_up.weight")
        if prefix is None or up is None:
            continue
        alpha = state.get(f"{stem}.alpha")
        layers.append(LoraLayer(COMPONENTS[prefix], stem[len(prefix):], state[key], up,
                                float(alpha) if alpha is not None else None))
    return layers


_DIFFUSERS_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
                    ("_lora.down.weight", "_lora.up.weight"))


def _diffusers_layers(state: dict[str, torch.Tensor], alpha_of: Any) -> list[LoraLayer]:
    layers = []
    for key in state:
        pair = next((p for p in _DIFFUSERS_PAIRS if key.endswith(p[0])), None)
        if pair is None or key.replace(pair[0], pair[1]) not in state:
            continue
        stem = key[: -len(pair[0])]
        component, _, module = stem.partition(".")
        if component not in ("unet", "text_encoder", "text_encoder_2"):
            component, module = "unet", stem.removeprefix("base_model.model.")
        # attention processors' names: attn1.processor.to_q_lora -> attn1.to_q, to_out_lora -> to_out.0
        module = re.sub(r"\.(?:processor\.)?(to_[qkv])$", r".\1", module)
        module = re.sub(r"\.(?:processor\.)?to_out$", ".to_out.0", module)
        if component.startswith("text_encoder"):  # the same processor names on CLIP's attention
            module = re.sub(r"\.to_([qkv])$", r".\1_proj", module)
            module = re.sub(r"\.to_out(\.0)?$", ".out_proj", module)
        alpha = state.get(f"{stem}.alpha")
        alpha = float(alpha) if alpha is not None else alpha_of(component, int(state[key].shape[0]))
        layers.append(LoraLayer(component, module, state[key], state[key.replace(pair[0], pair[1])], alpha))
    return layers


def _peft_alpha(metadata: dict[str, str]):
    """PEFT keeps lora_alpha in the safetensors metadata (diffusers' `lora_adapter_metadata`); without it the
    scale is 1, as diffusers assumes."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        config = {}

    def alpha_of(component: str, rank: int) -> float | None:
        if not isinstance(config, dict):
            return None
        nested = config.get(component)
        entry = nested if isinstance(nested, dict) else {k.partition(".")[2]: v for k, v in config.items()
                                                          if k.startswith(component + ".")} or config
        alpha = entry.get("lora_alpha")  # diffusers writes {"unet.lora_alpha": ..., "unet.r": ...}
        if not isinstance(alpha, (int, float)):
            return None
        # rsLoRA scales by alpha / sqrt(rank): the alpha that gives that scale as alpha / rank
        return float(alpha) * rank ** 0.5 if entry.get("use_rslora") else float(alpha)
    return alpha_of
