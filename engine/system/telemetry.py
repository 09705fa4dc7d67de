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

    @classmethod
    def of_job(cls, timer: StageTimer, output, memory, runtime, model_name: str, shape_cache: str, details: dict,
               notices: list[str]) -> "Readout":
        """The readout of a finished task: its TaskOutput, peak memory (devices.PeakMemory) and runtime."""
        denoise_s = sum(s for name, s in timer.stages_s.items() if name.endswith("denoising"))
        first = output.images[0] if output.images else None
        return cls(total_s=timer.elapsed_s(), stages_s=dict(timer.stages_s), steps=output.steps_run,
                   it_per_s=output.steps_run / denoise_s if denoise_s > 0 else 0.0,
                   peak_rss_bytes=memory.peak_rss_bytes, peak_vram_allocated_bytes=memory.vram_allocated_bytes,
                   peak_vram_reserved_bytes=memory.vram_reserved_bytes, runtime=runtime.name,
                   precision=runtime.precision, device=runtime.device, model=model_name,
                   width=first.width if first else 0, height=first.height if first else 0,
                   batch_size=len(output.images), shape_cache=shape_cache, details=details, notices=list(notices))

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
