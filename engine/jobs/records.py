"""What is kept of finished jobs, whichever machine ran them: the PNGs, the history rows, the result cache.

`through(task, runtime, run)` is the one path a job takes past them: an identical earlier request returns its
kept result without running; a new result is saved, remembered and cached. Each record is a side feature: one
that fails is logged and said in the readout, and the picture is still delivered."""
from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.jobs.result_cache import DEFAULT_RESULTS_BYTES, DiskResultCache, MemoryResultCache, result_key
from engine.jobs.results import GenerationResult
from engine.store.outputs import clean_partials, save_png
from engine.system.devices import GIB
from engine.system.telemetry import Readout

log = logging.getLogger(__name__)


class Records:
    def __init__(self, outputs_dir: Path | None = None, history_size: int = 20,
                 result_cache_dir: Path | None = None, result_cache_bytes: int = DEFAULT_RESULTS_BYTES):
        self.outputs_dir = Path(outputs_dir) if outputs_dir else None  # None: do not save
        if self.outputs_dir is not None and self.outputs_dir.is_dir():
            clean_partials(self.outputs_dir)
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)
        # On disk it survives a restart; without a folder (tests, library use) it is this process's last 32.
        self.result_cache = (DiskResultCache(result_cache_dir, result_cache_bytes) if result_cache_dir
                             else MemoryResultCache(32))

    def through(self, task, runtime, run: Callable[[], GenerationResult]) -> GenerationResult:
        """`run()` the task unless the result cache has its result; keep what it made. `runtime` names the
        runtime and precision (a replica pool does too)."""
        key = self._key(task, runtime) if task.model.options.result_cache else None
        looked_up = time.perf_counter()  # a disk hit's reading counts in its time
        hit = self.result_cache.get(key) if key else None
        if hit is not None:
            return self._cached(hit, task.notices, looked_up)
        result = run()
        self._keep(result, task.name, key)
        return result

    @contextmanager
    def unsaved(self) -> Iterator[None]:
        """Jobs in this block save no PNG (the caller holds the device, so no other job is affected)."""
        outputs, self.outputs_dir = self.outputs_dir, None
        try:
            yield
        finally:
            self.outputs_dir = outputs

    def typical_s(self, task: str) -> float | None:
        """The median time of this task's recent jobs, for queue estimates."""
        times = sorted(row["total_s"] for row in list(self.history)[:8] if row["task"] == task)
        return times[len(times) // 2] if times else None

    @staticmethod
    def _key(task, runtime) -> str:
        model = task.model
        output_options = model.options.model_dump(exclude={"prompt_cache", "result_cache"})
        if model.options.tiny_vae:
            output_options["taesd"] = model.taesd_name  # another tiny autoencoder decodes other pixels
        return result_key(model.weights_key, task.name, runtime.name, runtime.precision,
                          {**task.request.model_dump(), "inputs": task.inputs_key}, output_options)

    def _keep(self, result: GenerationResult, task_name: str, key: str | None) -> None:
        def cache() -> None:
            if key is not None and result.images and not result.stopped:
                self.result_cache.put(key, result, time.strftime("%Y-%m-%d %H:%M:%S"))

        for what, act in (("Saving the images", lambda: self._save(result)),
                          ("Adding the history row", lambda: self._remember(task_name, result.readout)),
                          ("Keeping the result in the result cache", cache)):
            try:
                act()
            except Exception as e:
                log.warning("%s failed; the result is delivered", what, exc_info=True)
                result.readout.notices.append(f"{what} failed ({type(e).__name__}: {e}); the picture is "
                                              f"delivered all the same.")

    def _save(self, result: GenerationResult) -> None:
        if self.outputs_dir is None:
            return
        start = time.perf_counter()
        for image, seed, text in zip(result.images, result.seeds, result.infotexts):
            result.saved_paths.append(str(save_png(image, text, self.outputs_dir, seed)))
        result.readout.stages_s["save"] = time.perf_counter() - start

    def _remember(self, task_name: str, readout: Readout) -> None:
        self.history.appendleft({
            "time": time.strftime("%H:%M:%S"), "task": task_name, "size": f"{readout.width}x{readout.height}",
            "images": readout.batch_size, "steps": readout.steps, "runtime": readout.runtime,
            "precision": readout.precision, "total_s": round(readout.total_s, 3), "it_per_s": round(readout.it_per_s, 2),
            "peak_ram_gib": round(readout.peak_rss_bytes / GIB, 2), "shape": readout.shape_cache,
        })

    def _cached(self, hit: dict, notices: list[str], start: float) -> GenerationResult:
        """An identical earlier request: the images the cache kept, no UNet run."""
        old: GenerationResult = hit["result"]
        images = [kept.copy() for kept in hit["images"]]
        seconds = time.perf_counter() - start
        readout = replace(
            old.readout, total_s=seconds, stages_s={"result_cache": seconds}, steps=0, it_per_s=0.0, peak_rss_bytes=0,
            peak_vram_allocated_bytes=None, peak_vram_reserved_bytes=None, shape_cache="result cache hit (no UNet run)",
            details={**old.readout.details, "cached_from": hit["time"]},
            notices=notices + [f"Cached result: the same request (model, parameters, seed) ran at {hit['time']}; "
                               f"returned without running the model."])
        self._remember(old.parameters.get("task", ""), readout)
        return GenerationResult(images=images, seeds=list(old.seeds), parameters=dict(old.parameters),
                                readout=readout, notices=readout.notices, extra_images=old.extra_images,
                                saved_paths=list(old.saved_paths), infotexts=list(old.infotexts))
