"""OneDiff runtime (NVIDIA): PyTorch on CUDA, with the UNet and VAE compiled by onediffx.

Needs `onediff` + `onediffx` and one of their backends (nexfort, or oneflow); see
requirements-cuda.txt. Anything missing makes `available()` say what, and the picker moves
on to PyTorch with fp16 + SDPA.
"""
from __future__ import annotations

from engine.runtimes.base import ShapeLog
from engine.runtimes.pytorch import PyTorchRuntime, _imports
from engine.system.hardware import HardwareReport

BACKENDS = ("nexfort", "oneflow")  # preferred first


def onediff_backend() -> str | None:
    """The first OneDiff backend whose packages are installed, or None."""
    if not (_imports("onediff") and _imports("onediffx")):
        return None
    return next((b for b in BACKENDS if _imports(b)), None)


class OneDiffRuntime(PyTorchRuntime):
    fuses_in_place = False  # the compiled graph may hold its own copy of the weights: a LoRA change reloads
    name = "onediff"

    @classmethod
    def available(cls, hardware: HardwareReport) -> str | None:
        if not hardware.has_cuda:
            return "OneDiff needs an NVIDIA GPU (CUDA); none found"
        if not (_imports("onediff") and _imports("onediffx")):
            return "onediff/onediffx are not installed (pip install -r requirements-cuda.txt)"
        if onediff_backend() is None:
            return "no OneDiff backend imports (install nexfort or oneflow)"
        return None

    @classmethod
    def option_reasons(cls, hardware: HardwareReport) -> dict[str, str]:
        reasons = super().option_reasons(hardware)
        reasons["torch_compile"] = "OneDiff compiles the UNet and VAE already"
        reasons["deepcache_interval"] = "not combined with OneDiff's compiled UNet here; use the PyTorch runtime"
        reasons["token_merging_ratio"] = "not combined with OneDiff's compiled UNet here; use the PyTorch runtime"
        return reasons

    def __init__(self, hardware, optimizations, cache_dir=None):
        # The options OneDiff replaces are switched off, so the PyTorch prepare does not apply them first.
        optimizations = optimizations.model_copy(update={"torch_compile": False, "deepcache_interval": 0,
                                                         "token_merging_ratio": 0.0})
        super().__init__(hardware, optimizations, cache_dir)
        self.backend = onediff_backend()

    def prepare(self, model) -> None:
        super().prepare(model)  # device, fp16, attention backend
        from onediffx import compile_pipe

        if self.backend == "nexfort":
            compile_pipe(model.pipe, backend="nexfort", options={"mode": "max-autotune:cudagraphs"})
        else:
            compile_pipe(model.pipe)
        ShapeLog(model.pipe.unet, "unet", self.compile_events)  # OneDiff compiles at a shape's first call
        self.applied.append(f"OneDiff compile ({self.backend})")

    @property
    def compiles(self) -> bool:
        return True

    @property
    def fallible(self) -> str | None:
        return self.name

    def describe(self) -> str:
        return f"onediff ({self.backend}) on {self.device} ({self.precision})"
