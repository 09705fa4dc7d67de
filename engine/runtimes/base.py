"""The small interface every runtime implements."""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..hardware import HardwareReport
from ..options import Optimizations


# Options that act inside one runtime's own preparation of the model.
PYTORCH_ONLY = ("channels_last", "attention", "attention_slicing", "torch_compile", "token_merging_ratio",
                "deepcache_interval")
OPENVINO_ONLY = ("int8_weights", "int8_convolutions", "compiled_blob_cache")


@dataclass
class WarmupResult:
    width: int
    height: int
    batch_size: int
    seconds: float
    compiled: bool  # False: the shape was already warm, or the runtime has nothing to compile
    state: str = "nothing to compile (eager)"  # what to tell the user


class Runtime(ABC):
    """Prepares a loaded pipeline's heavy components for the hardware; tasks then run the pipeline.

    Runtimes swap or compile components (unet, vae, text encoders) in place, the way OneDiff
    does; the pipeline stays a diffusers pipeline.
    """

    name: str = "base"

    def __init__(self, hardware: HardwareReport, optimizations: Optimizations, cache_dir: Path | None = None):
        self.hardware = hardware
        self.optimizations = optimizations
        self.cache_dir = cache_dir
        self.compile_events: list = []  # one entry per compile this runtime did (per-shape runtimes)

    @classmethod
    @abstractmethod
    def available(cls, hardware: HardwareReport) -> str | None:
        """None when this runtime can run here, else one line saying why not."""

    @property
    @abstractmethod
    def device(self) -> str:
        """torch device string the pipeline's inputs live on."""

    @property
    @abstractmethod
    def precision(self) -> str:
        """What the heavy maths runs in: fp32, bf16, fp16, int8 weights..."""

    @abstractmethod
    def prepare(self, model) -> None:
        """Make `model.pipe` ready for this runtime (device, dtype, attention, compile)."""

    @classmethod
    def option_reasons(cls, hardware: HardwareReport) -> dict[str, str]:
        """Optimizations this runtime cannot apply here -> one line saying why (the UI greys them out)."""
        reasons = {name: "needs the PyTorch runtime" for name in PYTORCH_ONLY}
        reasons.update({name: "needs the OpenVINO runtime" for name in OPENVINO_ONLY})
        return reasons

    def cached_components(self, identity: str) -> set[str]:
        """Pipeline components this runtime can supply from its own cache (their weights need not load)."""
        return set()

    def inference_context(self):
        """Context every task runs inside (autocast and no_grad where needed)."""
        return contextlib.nullcontext()

    def warmup(self, model, shapes: list[tuple[int, int, int]]) -> list[WarmupResult]:
        """Compile ahead for (width, height, batch) shapes; eager runtimes have nothing to do."""
        return [WarmupResult(w, h, b, 0.0, False) for w, h, b in shapes]

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({self.precision})"
