"""What a job gives back (GenerationResult), what a running job shows (LiveStatus) and where a waiting one
stands (QueuePlace): plain types shared by the runner, the records, the replicas and the UI."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from engine.system.telemetry import Readout


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    parameters: dict[str, Any]  # the exact request that ran (snapped size, resolved seed)
    readout: Readout
    notices: list[str] = field(default_factory=list)
    extra_images: dict[str, list] = field(default_factory=dict)  # e.g. hires fix's base images
    saved_paths: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)  # each image's A1111 parameters text (saved PNGs, the API)
    stopped: bool = False  # Stop ended it before its last step (such a result is not cached)


@dataclass
class LiveStatus:
    """What the UI polls while a job runs."""

    task: str = ""
    step: int = 0
    total: int = 0
    started: float = 0.0
    running: bool = False
    preview: Any = None  # PIL image
    preview_step: int = 0
    where: str = ""  # what runs it, where that is not this process's device (a replica)
    memory: str = ""  # that place's memory line ("" where it runs here: the Engine reads this machine's)
    sent: float = field(default_factory=time.perf_counter)  # when it was handed over (the order of a queue)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started if self.started else 0.0

    @property
    def it_per_s(self) -> float:
        return self.step / self.elapsed_s if self.step and self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.it_per_s
        return (self.total - self.step) / rate if rate > 0 and self.total else None


@dataclass
class QueuePlace:
    place: int  # 1: next once the running job ends
    ahead: list[str]  # tasks ahead of it, the running one first
    wait_s: float | None  # estimate before it starts; None until a job of each kind ahead has finished here
    waits_for: str = "the device"
