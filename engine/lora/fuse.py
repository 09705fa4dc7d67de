"""Fusing LoRAs into a pipeline's weights as W + weight * (alpha / rank) * up @ down. The weights a LoRA touched
are kept and written back exactly when the set changes, so no rounding accumulates. One code path for every
runtime: PyTorch runs the fused weights, OpenVINO converts them (its IR cache is keyed by the LoRA set)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from engine.lora.files import LoraLayer, is_stale
from engine.lora.plan import LoraPlan, plan
from engine.lora.tags import LoraUse
from engine.system.tensors import full_precision


class FusedLoras:
    """The LoRAs fused into one pipeline's weights, and the original weights they replaced."""

    def __init__(self):
        self.plans: list[LoraPlan] = []
        self._saved: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def uses(self) -> tuple[LoraUse, ...]:
        return tuple(LoraUse(p.lora.name, p.weight) for p in self.plans)

    def key(self, component: str | None = None) -> str:
        """What the fused set is, for caches: all of it, or only what touches `component`."""
        plans = [p for p in self.plans if component is None or component in p.components]
        return ";".join(f"{p.lora.name}@{p.lora.digest}:{p.weight!r}" for p in plans)

    def restore(self, pipe) -> None:
        with torch.no_grad():
            for (component, name), weight in self._saved.items():
                module = getattr(pipe, component).get_submodule(name)
                module.weight.copy_(weight.to(module.weight.device))
        self._saved.clear()
        self.plans = []

    def fuse(self, pipe, plans: list[LoraPlan], keep_originals: bool = True) -> float:
        """Replace what is fused with `plans`; seconds taken. Weights on the meta device (a runtime holds
        them compiled) are skipped: the runtime's cache entry for this set is used instead. Without
        `keep_originals` (a runtime that converts the weights and reloads on change) nothing is kept, and
        restore() cannot undo it. A failure part-way puts the original weights back."""
        start = time.perf_counter()
        self.restore(pipe)
        try:
            with torch.no_grad():
                for p in plans:
                    for component, name, layer in p.pairs:
                        weight = getattr(pipe, component).get_submodule(name).weight
                        if weight.is_meta:
                            continue
                        if keep_originals:
                            self._saved.setdefault((component, name), weight.detach().to("cpu", copy=True))
                        weight.add_(delta(layer, p.weight, weight.shape).to(weight.device, weight.dtype))
        except BaseException:
            self.restore(pipe)
            raise
        self.plans = list(plans)
        return time.perf_counter() - start

    def fuse_uses(self, pipe, family: str | None, uses, models_dir: Path | None) -> float:
        """Fuse what a prompt's tags ask for (LoraUse each), keeping the originals; seconds taken."""
        return self.fuse(pipe, [plan(pipe, family, u, models_dir) for u in uses])

    def stale(self, models_dir: Path | None) -> bool:
        return any(is_stale(p.lora, models_dir) for p in self.plans)


def delta(layer: LoraLayer, weight: float, shape: torch.Size) -> torch.Tensor:
    """weight * (alpha/rank) * up @ down, shaped as the layer's weight (Linear, or Conv2d of any kernel)."""
    up = layer.up.float().reshape(layer.up.shape[0], -1)
    down = layer.down.float().reshape(layer.down.shape[0], -1)
    with full_precision():  # fused into fp32 weights: a bf16 product under autocast would round the delta
        return ((up @ down) * (weight * layer.scale)).reshape(shape)
