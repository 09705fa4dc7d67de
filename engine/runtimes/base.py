"""The small interface every runtime implements."""
from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.options import Optimizations, owned_elsewhere
from engine.system.hardware import HardwareReport


@dataclass(frozen=True)
class WarmupShape:
    """One shape a task will run: the UNet at (width, height) for `batch` images, with or without guidance
    (and, with CFG truncation, without it after the cut), the VAE decoder at `decode_batch` images, and
    (img2img, hires fix, tiles) the VAE encoder at one image."""

    width: int
    height: int
    batch: int = 1
    guidance: bool = True
    decode_batch: int = 1
    encode: bool = False
    truncated: bool = False

    @property
    def unet_batch(self) -> int:
        return self.batch * (2 if self.guidance else 1)

    @property
    def unet_batches(self) -> tuple[int, ...]:
        """Every batch the UNet runs at in such a job."""
        return (self.unet_batch, self.batch) if self.guidance and self.truncated else (self.unet_batch,)


@dataclass
class WarmupResult:
    width: int
    height: int
    batch_size: int
    seconds: float
    compiled: bool  # False: the shape was already warm, or the runtime has nothing to compile
    state: str = "nothing to compile (eager)"  # what to tell the user


@dataclass
class CompileEvent:
    part: str
    shape: tuple
    seconds: float


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
        self.compile_events: list[CompileEvent] = []  # one entry per compile this runtime did
        self.applied: list[str] = []  # what prepare() did, for the Engine tab
        self.decisions: list[str] = []  # what it chose by measuring or reading this machine, and why (Engine tab)
        self.deepcache = None  # DeepCache's Schedule where prepare() installed it (runtimes/deepcache.py)
        self.unet_calls: dict[str, int] = {}  # "x2" -> UNet calls this job without DeepCache (which counts its own)
        self.proven = False  # a job ran to its end on this runtime (set by the engine)

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
        """Make `model.pipe` ready for this runtime (device, dtype, attention, compile).

        Transactional: if it raises, the model this runtime prepared before still works."""

    @property
    def compiles(self) -> bool:
        """Whether this runtime compiles graphs lazily, at a shape's first run (which can fail there)."""
        return False

    @property
    def fallible(self) -> str | None:
        """What of this runtime may fail where eager PyTorch would not (the name the Engine gives a fallback),
        or None where this runtime is already the fallback."""
        return self.name

    @classmethod
    def option_reasons(cls, hardware: HardwareReport) -> dict[str, str]:
        """Optimizations this runtime cannot apply here -> one line saying why (the UI greys them out)."""
        return owned_elsewhere(cls.name)

    # Whether a LoRA change may be fused into the live model's weights (the runtime reads them at each call);
    # otherwise the model is prepared again with the LoRAs fused before conversion.
    fuses_in_place: bool = True

    def cached_components(self, identity_of: Callable[[str], str | None]) -> set[str]:
        """Pipeline components this runtime can supply from its own cache (their weights need not load);
        identity_of(component) is that component's cache identity."""
        return set()

    def inference_context(self):
        """Context every task runs inside (autocast and no_grad where needed)."""
        return contextlib.nullcontext()

    def limit_threads(self, threads: int) -> None:
        """Use at most `threads` CPU threads (a replica sharing the machine with others); said on the Engine tab."""
        import torch

        torch.set_num_threads(threads)
        self.decisions.append(f"CPU threads limited to {threads} (this replica's share of the machine)")

    # -- per job

    def compile_mark(self) -> int:
        return len(self.compile_events)

    def shape_state(self, mark: int) -> str:
        """For the readout: 'eager (no compile)', 'warm (cache hit)' or 'compiled now (N s, K graphs)'."""
        if not self.compiles:
            return "eager (no compile)"
        new = self.compile_events[mark:]
        if not new:
            return "warm (cache hit)"
        return f"compiled now ({sum(e.seconds for e in new):.1f} s, {len(new)} graphs)"

    def begin_denoise(self, pipe, steps: int) -> None:
        """A denoising pass of `steps` starts (DeepCache forgets features kept from an earlier pass)."""
        if self.deepcache is not None:
            self.deepcache.reset(steps)  # never reuse features of an earlier (perhaps stopped) pass

    def begin_job(self) -> None:
        """A job starts: per-job counters go back to zero."""
        self.unet_calls = {}
        if self.deepcache is not None:
            self.deepcache.reset_counts()

    def count_unet_call(self, batch: int) -> None:
        """A UNet call at `batch` without DeepCache, for the readout."""
        self.unet_calls[f"x{batch}"] = self.unet_calls.get(f"x{batch}", 0) + 1

    def job_details(self) -> dict:
        """Runtime facts about the last job for the readout: UNet calls by graph and batch (DeepCache's full and
        shallow calls)."""
        cache = self.deepcache
        if cache is None:
            return {"unet_calls": unet_calls_text(self.unet_calls)} if self.unet_calls else {}
        return {"unet_calls": unet_calls_text(cache.calls), "unet_calls_full": cache.full_calls,
                "unet_calls_shallow": cache.shallow_calls}

    # -- warm-up

    def warmup(self, model, shapes: list[WarmupShape]) -> list[WarmupResult]:
        """Compile ahead what `shapes` will run; eager runtimes have nothing to do."""
        return [WarmupResult(s.width, s.height, s.batch, 0.0, False) for s in shapes]

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({self.precision})"


def unet_calls_text(calls: dict[str, int]) -> str:
    """{"full x2": 7, "shallow x1": 13} -> "7 full x2, 13 shallow x1" (x: the UNet's batch)."""
    return ", ".join(f"{n} {kind}" for kind, n in calls.items())


class ShapeLog:
    """Notes the first call of a module at each input shape as a compile (torch.compile and OneDiff compile
    on first use of a shape), so the readout can say 'compiled now' or 'warm'."""

    def __init__(self, module, part: str, events: list[CompileEvent]):
        self.part, self.events = part, events
        self.seen: set[tuple] = set()
        self._pending: tuple | None = None
        module.register_forward_pre_hook(self._before, with_kwargs=True)
        module.register_forward_hook(self._after, with_kwargs=True)

    @staticmethod
    def _key(args, kwargs) -> tuple:
        tensors = [*args, *kwargs.values()]
        return tuple(tuple(t.shape) for t in tensors if hasattr(t, "shape"))

    def _before(self, module, args, kwargs):
        key = self._key(args, kwargs)
        self._pending = (key, time.perf_counter()) if key not in self.seen else None

    def _after(self, module, args, kwargs, output):
        if self._pending is not None:
            key, start = self._pending
            self.seen.add(key)
            self.events.append(CompileEvent(self.part, key, time.perf_counter() - start))
            self._pending = None
