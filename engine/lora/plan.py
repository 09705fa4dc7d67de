"""Matching a LoRA's layers by name to the Linear and Conv2d modules of a pipeline (SDXL files name the UNet's
blocks the sgm way, `input_blocks_4_1_...`, mapped here), and the cache identity of weights with LoRAs fused."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import UserError
from engine.lora.files import LoraFile, LoraLayer, read
from engine.lora.tags import LoraUse, resolve


def _targets(module: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """Linear/Conv2d layers by dotted and by underscored name (kohya writes names with '_' for '.'). Also under
    `text_model.` (CLIP's layers sat there before transformers 5, and LoRA files name them so) and without
    torch.compile's `_orig_mod.`."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            plain = name.removeprefix("_orig_mod.")
            for alias in (plain, "text_model." + plain):
                out.setdefault(alias, (name, m))
                out.setdefault(alias.replace(".", "_"), (name, m))
    return out


def _sgm_names(unet) -> dict[str, str]:
    """kohya's SDXL block names (the sgm UNet's) -> diffusers' block names, underscored, from the UNet's layout."""
    names = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
             "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
             "label_emb_0_2": "add_embedding_linear_2", "middle_block_0": "mid_block_resnets_0",
             "middle_block_1": "mid_block_attentions_0", "middle_block_2": "mid_block_resnets_1"}
    i = 1
    for b, block in enumerate(unet.down_blocks):
        for k in range(len(block.resnets)):
            names[f"input_blocks_{i}_0"] = f"down_blocks_{b}_resnets_{k}"
            names[f"input_blocks_{i}_1"] = f"down_blocks_{b}_attentions_{k}"
            i += 1
        if block.downsamplers:
            names[f"input_blocks_{i}_0_op"] = f"down_blocks_{b}_downsamplers_0_conv"
            i += 1
    i = 0
    for b, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for k in range(len(block.resnets)):
            names[f"output_blocks_{i}_0"] = f"up_blocks_{b}_resnets_{k}"
            if has_attention:
                names[f"output_blocks_{i}_1"] = f"up_blocks_{b}_attentions_{k}"
            if k == len(block.resnets) - 1 and block.upsamplers:
                names[f"output_blocks_{i}_{2 if has_attention else 1}_conv"] = f"up_blocks_{b}_upsamplers_0_conv"
            i += 1
    return names


_RESNET_PARTS = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
                 ("skip_connection", "conv_shortcut"))


def _from_sgm(key: str, sgm: dict[str, str]) -> str | None:
    for old in sorted(sgm, key=len, reverse=True):
        if key == old or key.startswith(old + "_"):
            key = sgm[old] + key[len(old):]
            for a, b in _RESNET_PARTS:
                key = key.replace(a, b)
            return key
    return None


@dataclass
class LoraPlan:
    """One LoRA matched to one pipeline: which layer goes where, and what did not match."""

    lora: LoraFile
    weight: float
    pairs: list[tuple[str, str, LoraLayer]] = field(default_factory=list)  # (component, module name, layer)
    unmatched: int = 0

    @property
    def components(self) -> set[str]:
        return {c for c, _, _ in self.pairs}

    @property
    def summary(self) -> str:
        total = len(self.pairs) + self.unmatched
        return f"{self.lora.name} x{self.weight:g} ({len(self.pairs)} of {total} layers)"


def plan(pipe, family: str | None, use: LoraUse, models_dir: Path | None) -> LoraPlan:
    """Read `use`'s file and match its layers to `pipe`; UserError for a LoRA that cannot apply here."""
    lora = read(use.name, resolve(use.name, models_dir))
    got = lora.family
    if got and family in ("sd1", "sd2", "sdxl") and got != family:
        label = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
        raise UserError(f"LoRA {use.name!r} is for {label[got]} models; the loaded model is {label[family]}. "
                        f"Choose a LoRA made for it.")
    result = LoraPlan(lora, use.weight)
    targets: dict[str, dict] = {}
    sgm = None
    for layer in lora.layers:
        component = getattr(pipe, layer.component, None)
        if component is None or not isinstance(component, torch.nn.Module):
            result.unmatched += 1
            continue
        table = targets.setdefault(layer.component, _targets(component))
        hit = table.get(layer.key)
        if hit is None and layer.component == "unet" and lora.kind == "kohya":
            sgm = sgm if sgm is not None else _sgm_names(component)
            mapped = _from_sgm(layer.key, sgm)
            hit = table.get(mapped) if mapped else None
        if hit is None:
            result.unmatched += 1
            continue
        name, module = hit
        w = module.weight
        if layer.up.shape[0] != w.shape[0] or layer.down[0].numel() != w[0].numel() \
                or layer.up[0].numel() != layer.down.shape[0]:
            raise UserError(f"LoRA {use.name!r}: layer {name} of the {layer.component} is "
                            f"{layer.up.shape[0]}x{layer.down[0].numel()} in the LoRA but {w.shape[0]}x"
                            f"{w[0].numel()} in the model: the LoRA was made for another model.")
        result.pairs.append((layer.component, name, layer))
    if not result.pairs:
        raise UserError(f"LoRA {use.name!r}: none of its {len(lora.layers)} layers matches a layer of this "
                        f"model (0 matched); it was made for another kind of model.")
    return result


def component_identity(identity: str | None, loras: list[tuple[LoraFile, float]], component: str) -> str | None:
    """The cache identity of a component with these (LoRA, weight)s fused: the model's own where none touches it."""
    touching = [(f, w) for f, w in loras if component in f.components]
    if identity is None or not touching:
        return identity
    text = ";".join(f"{f.digest}:{w!r}" for f, w in touching)
    return f"{identity}-lora-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
