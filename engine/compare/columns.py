"""What a comparison is made of: its axes and columns, the values checked before anything runs, PSNR."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine import runtimes
from engine.errors import UserError
from engine.options import PRESETS_DIR, load_preset
from engine.requests import MAX_STEPS, Txt2ImgRequest
from engine.samplers import canonical_sampler, sampler_label
from engine.system.devices import GIB

AXES = ("preset", "runtime", "steps", "sampler")
from engine.jobs.results import GenerationResult

MAX_COLUMNS = 4


@dataclass
class CompareProgress:
    """What a comparison is doing now, for a progress line."""

    column: int  # 1-based
    columns: int
    label: str  # "steps: 20"
    phase: str  # preparing / warming up / running / restoring
    step: int = 0
    total: int = 0


@dataclass
class CompareColumn:
    label: str
    value: Any
    request: Txt2ImgRequest | None = None  # what this column asked for (None: it never got that far)
    result: GenerationResult | None = None
    error: str | None = None  # one line, where the column failed or did not run
    setup_s: float = 0.0  # switching options or runtime, and the warm-up step: not part of total_s
    psnr: float | None = None  # dB against the reference column; inf: identical
    reference: bool = False
    notices: list[str] = field(default_factory=list)

    @property
    def image(self):
        return self.result.images[0] if self.result and self.result.images else None

    @property
    def total_s(self) -> float | None:
        return self.result.readout.total_s if self.result else None

    @property
    def stopped(self) -> bool:
        """Ended early by Stop (an early stop on the latents is the option working, not a stop)."""
        r = self.result
        return bool(r and self.request and r.readout.steps < self.request.steps
                    and "early_stop_step" not in r.readout.details)

    @property
    def psnr_text(self) -> str:
        if self.reference:
            return "reference"
        if self.psnr is None:
            return "n/a"
        return "identical" if math.isinf(self.psnr) else f"{self.psnr:.2f} dB"

    def summary(self) -> dict[str, Any]:
        """JSON-safe figures (no inf) for the UI and the API."""
        r = self.result.readout if self.result else None
        vram = r.peak_vram_allocated_bytes if r else None
        return {
            "label": self.label, "value": self.value, "error": self.error,
            "total_s": round(r.total_s, 3) if r else None, "setup_s": round(self.setup_s, 3),
            "peak_ram_gib": round(r.peak_rss_bytes / GIB, 3) if r else None,
            "peak_vram_gib": round(vram / GIB, 3) if vram is not None else None,
            "psnr": self.psnr_text, "psnr_db": None if self.psnr is None or math.isinf(self.psnr) else round(self.psnr, 2),
            "runtime": r.runtime if r else None, "precision": r.precision if r else None,
            "steps": r.steps if r else None, "shape": r.shape_cache if r else None,
            "sampler": sampler_label(self.request.sampler, self.request.schedule) if self.request else None,
            "guidance": self.request.guidance if self.request else None,
            "prompt": self.request.prompt if self.request else None,
            "notices": self.notices, "saved": self.result.saved_paths if self.result else [],
        }


@dataclass
class Comparison:
    axis: str
    request: Txt2ImgRequest  # the base request, seed resolved
    columns: list[CompareColumn]
    grid: Any  # PIL image
    parameters_text: str  # what the saved PNG carries (A1111 style; engine.metadata.parse_parameters reads it)
    saved_path: str | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> dict[str, Any]:
        return {"task": "compare", "axis": self.axis, **self.request.model_dump(),
                "columns": [c.summary() for c in self.columns], "saved": self.saved_path, "notices": self.notices}


def available_runtimes(hardware) -> list[str]:
    """Runtime choices that can run on this machine ('auto' first)."""
    return [name for name in runtimes.CHOICES
            if name == "auto" or runtimes.unavailable_reason(name, hardware) is None]


def parse_values(axis: str, values: Sequence[Any], hardware=None, presets_dir: Path = PRESETS_DIR) -> list[Any]:
    """The column values, checked before anything runs; blanks are no column. One UserError line for a bad one."""
    if axis not in AXES:
        raise UserError(f"Unknown comparison axis {axis!r}; choose one of: {', '.join(AXES)}.")
    given = [v.strip() if isinstance(v, str) else v for v in values or ()]
    given = [v for v in given if v not in (None, "")]
    if not given:
        raise UserError("Give at least one value to compare.")
    if len(given) > MAX_COLUMNS:
        raise UserError(f"{len(given)} values; a comparison has at most {MAX_COLUMNS} columns.")
    out = []
    for v in given:
        if axis == "steps":
            try:
                steps = int(v) if not isinstance(v, float) or v.is_integer() else None
            except (TypeError, ValueError):
                steps = None
            if steps is None:
                raise UserError(f"Steps value {v!r} is not a whole number.")
            if not 1 <= steps <= MAX_STEPS:
                raise UserError(f"Steps value {steps} must be between 1 and {MAX_STEPS}.")
            out.append(steps)
        elif axis == "sampler":
            out.append(canonical_sampler(str(v)))
        elif axis == "preset":
            out.append(load_preset(str(v), presets_dir).name)  # unknown or broken: its own message
        else:
            name = str(v).lower()
            runtimes.pick(hardware, name)  # RuntimeUnavailable (a UserError) says why not here
            out.append(name)
    return out


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two same-size 8-bit RGB images, in dB; inf where they are identical."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"sizes differ: {a.size} and {b.size}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
