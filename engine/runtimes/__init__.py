"""Runtime registry and the picker. Device decisions live here and in hardware.py only."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from engine.errors import RuntimeUnavailable
from engine.runtimes.base import Runtime
from engine.system.hardware import HardwareReport

# name -> "module:Class"; modules import lazily so a missing optional backend costs nothing.
RUNTIMES: dict[str, str] = {
    "pytorch": "engine.runtimes.pytorch:PyTorchRuntime",
    "openvino": "engine.runtimes.openvino:OpenVINORuntime",
    "onediff": "engine.runtimes.onediff:OneDiffRuntime",
}
CHOICES = ("auto", "pytorch", "openvino", "onediff")


def runtime_class(name: str) -> type[Runtime]:
    module_name, class_name = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def unavailable_reason(name: str, hardware: HardwareReport) -> str | None:
    if name not in RUNTIMES:
        return f"unknown runtime {name!r}"
    try:
        cls = runtime_class(name)
    except ImportError as e:
        return f"{name} does not import: {e}"
    return cls.available(hardware)


@dataclass
class Choice:
    name: str
    reason: str  # why this one, in one line
    skipped: dict[str, str] = field(default_factory=dict)  # other runtimes -> why not

    @property
    def cls(self) -> type[Runtime]:
        return runtime_class(self.name)


def _preference(hardware: HardwareReport) -> list[tuple[str, str]]:
    """Candidates in order, each with the reason it would be chosen."""
    if hardware.has_cuda:
        gpu = hardware.cuda_devices[0].name
        return [("onediff", f"CUDA GPU ({gpu}) and OneDiff with a working backend: compiled UNet and VAE"),
                ("pytorch", f"CUDA GPU ({gpu}): PyTorch with fp16 and SDPA attention")]
    order = []
    # OpenVINO's CPU plugin also runs on AMD (AVX2); its static-shape graphs beat eager PyTorch there too.
    order.append(("openvino", f"{hardware.cpu.vendor} CPU ({hardware.cpu.model}) with OpenVINO: "
                              f"static-shape compiled graphs" + (", bf16" if hardware.cpu.has_fast_bf16 else ", fp32")))
    order.append(("pytorch", "PyTorch runs everywhere" + (
        "; bf16 on this CPU" if hardware.cpu.has_fast_bf16 else "; this CPU has no hardware bf16, so fp32")))
    return order


def pick(hardware: HardwareReport, wish: str = "auto") -> Choice:
    wish = (wish or "auto").lower()
    if wish not in CHOICES:
        raise RuntimeUnavailable(f"Unknown runtime {wish!r}; choose one of: {', '.join(CHOICES)}.")
    if wish != "auto":
        reason = unavailable_reason(wish, hardware)
        if reason:
            raise RuntimeUnavailable(f"Runtime {wish} cannot run here: {reason}.")
        return Choice(wish, "chosen by the user")
    skipped = {}
    for name, why in _preference(hardware):
        reason = unavailable_reason(name, hardware)
        if reason is None:
            return Choice(name, why, skipped)
        skipped[name] = reason
    raise RuntimeUnavailable("No runtime can run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
