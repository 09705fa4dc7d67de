"""Stage timer and the readout shown beside every image (peak memory comes from devices.PeakMemory)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


class StageTimer:
    """Wall time per named stage; a stage entered twice adds up."""

    def __init__(self):
        self.stages_s: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages_s[name] = self.stages_s.get(name, 0.0) + time.perf_counter() - start

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start


@dataclass
class Readout:
    """What the UI shows beside every image."""

    total_s: float
    stages_s: dict[str, float]
    steps: int
    it_per_s: float
    peak_rss_bytes: int
    peak_vram_allocated_bytes: int | None
    peak_vram_reserved_bytes: int | None
    runtime: str
    precision: str
    device: str
    model: str
    width: int
    height: int
    batch_size: int
    shape_cache: str = ""  # warm / compiled now / eager
    details: dict = field(default_factory=dict)  # task-specific: tiles, steps planned, pass sizes
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """Plain-text lines, for the console and for the UI's readout panel."""
        gib = 1024**3
        stages = ", ".join(f"{name.replace('_', ' ')} {s:.2f} s" for name, s in self.stages_s.items())
        vram = ("n/a (CPU)" if self.peak_vram_allocated_bytes is None
                else f"{self.peak_vram_allocated_bytes / gib:.2f} GiB allocated, "
                     f"{(self.peak_vram_reserved_bytes or 0) / gib:.2f} GiB reserved")
        lines = [
            f"Total: {self.total_s:.2f} s ({stages})",
            f"Speed: {self.it_per_s:.2f} it/s over {self.steps} steps, {self.width}x{self.height} x{self.batch_size}",
            f"Peak RAM: {self.peak_rss_bytes / gib:.2f} GiB; peak VRAM: {vram}",
            f"Runtime: {self.runtime} on {self.device}, precision {self.precision}, shape {self.shape_cache}; "
            f"model {self.model}",
        ]
        lines += self.notices
        return "\n".join(lines)
