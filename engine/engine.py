"""The Engine: holds the loaded model and its runtime, runs one job at a time."""
from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hardware as hardware_mod
from . import runtimes
from .errors import UserError
from .models import LoadedModel, load_model
from .options import Optimizations
from .requests import Txt2ImgRequest, parse_request
from .runtimes.base import Runtime, WarmupResult
from .tasks.common import ProgressFn, StopFlag
from .tasks.txt2img import run_txt2img
from .telemetry import CudaPeakMemory, PeakRssSampler, Readout, StageTimer

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    parameters: dict[str, Any]  # the exact request that ran (snapped size, resolved seed)
    readout: Readout
    notices: list[str] = field(default_factory=list)


class Engine:
    """Generation backend; runs without any UI. Pass it around, don't make it global."""

    def __init__(self, hardware: hardware_mod.HardwareReport | None = None, runtime: str = "auto",
                 optimizations: Optimizations | None = None, models_dir: Path | None = None):
        self.hardware = hardware or hardware_mod.detect()
        self.optimizations = optimizations or Optimizations()
        self.models_dir = Path(models_dir) if models_dir else None
        self.runtime_wish = runtime
        self.choice = runtimes.pick(self.hardware, runtime)
        self.runtime: Runtime = self.choice.cls(self.hardware, self.optimizations)
        self.model: LoadedModel | None = None
        self._lock = threading.Lock()  # one job (or load) on the device at a time
        self._stop = StopFlag()

    # ------------------------------------------------------------ model and runtime

    def load(self, source: str, *, allow_any_path: bool = True, config_dir: str | Path | None = None) -> LoadedModel:
        """Load and prepare a model. On failure the previous model stays loaded."""
        with self._lock:
            model = load_model(source, models_dir=self.models_dir, allow_any_path=allow_any_path,
                               config_dir=config_dir)
            self.runtime.prepare(model)
            old, self.model = self.model, model
            del old
            gc.collect()
            log.info("loaded %s (%s) in %.2f s", model.name, model.family, model.load_seconds)
            return model

    def set_runtime(self, wish: str, optimizations: Optimizations | None = None) -> runtimes.Choice:
        """Switch runtime (and options); the loaded model is prepared again from its source."""
        choice = runtimes.pick(self.hardware, wish)
        opts = optimizations or self.optimizations
        runtime = choice.cls(self.hardware, opts)
        source = self.model.source.text if self.model else None
        with self._lock:
            self.choice, self.runtime, self.optimizations, self.runtime_wish = choice, runtime, opts, wish
        if source:
            self.load(source)
        return choice

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise UserError("No model is loaded yet; load one on the Engine tab or start with --model.")
        return self.model

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model.name if self.model else None,
            "family": self.model.family if self.model else None,
            "runtime": self.runtime.name,
            "device": self.runtime.device,
            "precision": self.runtime.precision,
            "reason": self.choice.reason,
            "skipped": dict(self.choice.skipped),
        }

    def warmup(self, sizes: list[tuple[int, int]], batch_size: int = 1) -> list[WarmupResult]:
        """Prepare (width, height) shapes ahead; sizes snap like requests do."""
        model = self.require_model()
        shapes = []
        for w, h in sizes:
            req, _ = Txt2ImgRequest(width=w, height=h, batch_size=batch_size).snapped(model.vae_scale_factor)
            shapes.append((req.width, req.height, batch_size))
        with self._lock:
            return self.runtime.warmup(model, shapes)

    def stop(self) -> None:
        """Ask the running job to end after its current step."""
        self._stop.requested = True

    # ------------------------------------------------------------ tasks

    def txt2img(self, request: Txt2ImgRequest | dict, progress: ProgressFn | None = None) -> GenerationResult:
        if isinstance(request, dict):
            request = parse_request(Txt2ImgRequest, request)
        model = self.require_model()
        request, notices = request.snapped(model.vae_scale_factor)
        request = request.with_seed()
        with self._lock:
            self._stop = StopFlag()
            timer = StageTimer()
            with PeakRssSampler() as rss, CudaPeakMemory(self.runtime.device) as vram:
                images, steps_done = run_txt2img(model, self.runtime, request, timer, progress, self._stop)
            total_s = timer.elapsed_s()
        if steps_done < request.steps:
            notices.append(f"Stopped after {steps_done} of {request.steps} steps.")
        denoise_s = timer.stages_s.get("denoising", 0.0)
        readout = Readout(
            total_s=total_s,
            stages_s=dict(timer.stages_s),
            steps=steps_done,
            it_per_s=steps_done / denoise_s if denoise_s > 0 else 0.0,
            peak_rss_bytes=rss.peak_rss_bytes,
            peak_vram_allocated_bytes=vram.allocated_bytes,
            peak_vram_reserved_bytes=vram.reserved_bytes,
            runtime=self.runtime.name,
            precision=self.runtime.precision,
            device=self.runtime.device,
            model=model.name,
            width=request.width,
            height=request.height,
            batch_size=request.batch_size,
            notices=list(notices),
        )
        parameters = {"task": "txt2img", "model": model.name, **request.model_dump()}
        seeds = [request.seed + i for i in range(request.batch_size)]
        return GenerationResult(images=images, seeds=seeds, parameters=parameters, readout=readout, notices=notices)
