"""The job runner: one task at a time on the device, with live status, telemetry, saving, history and caches.

The Engine decides what runs (model, runtime, options); the runner runs it: under the device lock,
inside a denoise context whose extensions report progress and previews, with peak memory sampled,
then builds the result and readout, saves the images, adds a history row, and keeps the result
for an identical request when the result cache is on.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.jobs.preview import latents_to_rgb
from engine.options import is_on
from engine.store.caches import DEFAULT_RESULTS_BYTES, DiskResultCache, MemoryResultCache, result_key
from engine.store.metadata import OPTION_LABELS, format_parameters
from engine.store.outputs import clean_partials, save_png
from engine.system import devices
from engine.system.telemetry import Readout
from engine.tasks.base import Task, TaskOutput
from engine.tasks.context import CfgTruncation, DenoiseContext, EarlyStop, Preview, Progress, ProgressFn

log = logging.getLogger(__name__)


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
    where: str = ""  # the replica running it (replica mode)
    memory: str = ""  # that replica's memory line (replica mode; else the UI reads this machine's)
    started_wait: float = field(default_factory=time.perf_counter)  # when it was sent (replica mode's queue order)

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


def picture_options(options) -> dict:
    """The options on that change the picture (not only its speed), for the saved parameters."""
    names = [n for n in OPTION_LABELS if is_on(options, n) and (options.deepcache or not n.startswith("deepcache"))]
    return {name: getattr(options, name) for name in names}


@dataclass
class Waiting:
    """A job waiting for the device: its thread, its task, when it came."""

    thread: int
    task: str
    since: float = field(default_factory=time.perf_counter)


@dataclass
class QueuePlace:
    place: int  # 1: next once the running job ends
    ahead: list[str]  # tasks ahead of it, the running one first
    wait_s: float | None  # estimate before it starts; None until a job of each kind ahead has finished here
    waits_for: str = "the device"


class JobRunner:
    def __init__(self, outputs_dir: Path | None = None, preview_every: int = 2, history_size: int = 20,
                 result_cache_dir: Path | None = None, result_cache_bytes: int = DEFAULT_RESULTS_BYTES):
        self.lock = threading.RLock()  # one job (or load) on the device; re-entrant for a runtime switch
        self.outputs_dir = Path(outputs_dir) if outputs_dir else None  # None: do not save
        if self.outputs_dir is not None and self.outputs_dir.is_dir():
            clean_partials(self.outputs_dir)
        self.preview_every = preview_every  # steps between live previews; 0 = none
        self.live = LiveStatus()
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)
        # On disk it survives a restart; without a folder (tests, library use) it is this process's last 32.
        self.result_cache = (DiskResultCache(result_cache_dir, result_cache_bytes) if result_cache_dir
                             else MemoryResultCache(32))
        self._context: DenoiseContext | None = None
        self._turns = threading.Condition()
        self._waiting: list[Waiting] = []  # jobs in arrival order; only the first may take the lock
        self.remote_live: dict[int, LiveStatus] = {}  # replica mode: thread ident -> its job's live status

    @contextmanager
    def turn(self, task: str):
        """Hold the device for one job, in arrival order (a bare lock wakes waiters in any order, so a place in
        the queue would mean nothing). A thread already holding the lock (Compare's columns) goes straight in."""
        if self.lock._is_owned():  # RLock's own ownership test (what threading.Condition uses)
            with self.lock:
                yield
            return
        me = Waiting(threading.get_ident(), task)
        with self._turns:
            self._waiting.append(me)
        try:
            with self._turns:
                self._turns.wait_for(lambda: self._waiting[0] is me)
            self.lock.acquire()
        finally:
            with self._turns:
                self._waiting.remove(me)
                self._turns.notify_all()
        try:
            yield
        finally:
            self.lock.release()

    def queue_place(self, thread: int) -> QueuePlace | None:
        """Where the job of this thread stands while it waits (None: it is not waiting), and how long until it
        starts: the running job's time left plus the median time of recent jobs of each task ahead."""
        with self._turns:
            waiting = list(self._waiting)
        index = next((i for i, w in enumerate(waiting) if w.thread == thread), None)
        if index is None:
            return None
        live = self.live
        ahead = ([live.task] if live.running else []) + [w.task for w in waiting[:index]]
        wait = 0.0
        if live.running:
            left = live.eta_s if live.eta_s is not None else self._typical_s(live.task)
            wait = None if left is None else max(0.0, left)
        for w in waiting[:index]:
            typical = self._typical_s(w.task)
            wait = None if wait is None or typical is None else wait + typical
        return QueuePlace(index + 1, ahead, wait)

    def _typical_s(self, task: str) -> float | None:
        times = sorted(row["total_s"] for row in list(self.history)[:8] if row["task"] == task)
        return times[len(times) // 2] if times else None

    def stop(self) -> None:
        """Ask the running job to end after its current step."""
        if self._context is not None:
            self._context.stop.requested = True

    def run(self, task: Task, runtime, not_applied: dict[str, str], progress: ProgressFn | None) -> GenerationResult:
        """Run `task` on `runtime`; the caller holds `lock` and has checked the model is still the loaded one."""
        model, options = task.model, task.model.options
        key = self._cache_key(task, runtime) if options.result_cache else None
        looked_up = time.perf_counter()  # a disk hit's reading counts in its time
        hit = self.result_cache.get(key) if key else None
        if hit is not None:
            return self._cached(hit, task.notices, looked_up)
        ctx = self._context = self._context_for(task, progress)
        self.live = LiveStatus(task=task.name, started=time.perf_counter(), running=True)
        mark, prompt_counts = runtime.compile_mark(), (model.prompt_cache.hits, model.prompt_cache.misses)
        runtime.begin_job()
        try:
            with devices.PeakMemory(runtime.device) as memory:
                output = task.run(runtime, ctx)
        except Exception as e:
            if not devices.is_out_of_memory(e):
                raise
            devices.release(runtime.device)
            size = f"{getattr(task.request, 'width', None) or '?'}x{getattr(task.request, 'height', None) or '?'}"
            raise UserError(f"Out of memory during {task.name} at {size}: try a smaller size or batch, or the "
                            f"low-memory preset. What the job held has been freed.") from e
        finally:
            self.live.running = False
            devices.trim_heap()  # what the job (and jobs that ended while it ran) freed goes back to the system
        details = {**output.details, **runtime.job_details(), **self._details(ctx, model, prompt_counts),
                   **task.details}
        notices = task.notices + output.notices + self._job_notices(ctx, output, options, not_applied)
        readout = Readout.of_job(ctx.timer, output, memory, runtime, model.name, runtime.shape_state(mark),
                                 details, notices)
        result = self._result(task, runtime, output, readout)
        result.stopped = ctx.stopped and output.steps_run < output.steps_planned
        self._keep(result, task.name, key)
        return result

    def run_remote(self, task: Task, pool, progress: ProgressFn | None) -> GenerationResult:
        """Run `task` on one of the pool's replicas (engine/serve.py); no device lock here, the replicas queue.
        The front saves the images (each once, whichever replica made them) and keeps the one result cache."""
        key = self._cache_key(task, pool) if task.model.options.result_cache else None
        looked_up = time.perf_counter()
        hit = self.result_cache.get(key) if key else None
        if hit is not None:
            return self._cached(hit, task.notices, looked_up)
        thread, live = threading.get_ident(), LiveStatus(task=task.name)  # running from its first event

        def on_event(event) -> None:
            if event is None:  # its replica died: waiting for another
                live.running, live.step, live.where, live.started_wait = False, 0, "", time.perf_counter()
                return
            if not live.running:
                live.started, live.running = time.perf_counter(), True
            live.step, live.total, live.where, live.memory = event.step, event.total, event.replica, event.memory
            if event.preview is not None:
                live.preview, live.preview_step = event.preview, event.preview_step
            if progress is not None and event.total:
                progress(event.step, event.total)

        self.remote_live[thread] = self.live = live
        try:
            result, replica, retried = pool.run(task.name, task.request.model_dump(), task.image, on_event)
            readout = result.readout
            readout.details["replica"] = replica
            # What the front's validation said (a snapped size): the replica got the request already normalised.
            readout.notices[:0] = [n for n in task.notices if n not in readout.notices]
            if retried:
                readout.details["retried"] = retried
                readout.notices.append(f"Retried: {retried}.")
            result.notices = readout.notices
        finally:
            live.running = False
            self.remote_live.pop(thread, None)
        self._keep(result, task.name, key)
        return result

    def remote_place(self, thread: int, replicas: int) -> QueuePlace | None:
        """Replica mode: a job sent out but not started waits in Ray Serve's queue for a free replica."""
        waiting = sorted((live.started_wait, t, live.task) for t, live in list(self.remote_live.items())
                         if not live.running)
        index = next((i for i, (_, t, _) in enumerate(waiting) if t == thread), None)
        if index is None:
            return None
        ahead = [task for _, _, task in waiting[:index]]
        typical = [self._typical_s(task) for task in ahead]
        wait = None if None in typical else sum(typical) / max(1, replicas)
        return QueuePlace(index + 1, ahead, wait, waits_for="a free replica")

    # -- pieces of a run

    def _context_for(self, task: Task, progress: ProgressFn | None) -> DenoiseContext:
        def report(step: int, total: int) -> None:
            self.live.step, self.live.total = step, total
            if progress is not None:
                progress(step, total)

        extensions = [Progress(report)]
        if self.preview_every:
            extensions.append(Preview(self.preview_every, lambda step, total, latents: self._preview(
                task.model, step, latents)))
        if task.model.options.early_stop_threshold > 0:
            extensions.append(EarlyStop(task.model.options.early_stop_threshold))
        if task.model.options.cfg_truncated:
            extensions.append(CfgTruncation(task.model.options.cfg_truncation))
        return DenoiseContext(extensions=extensions)

    def _preview(self, model, step: int, latents) -> None:
        if model.options.tiny_vae and model.taesd is not None:
            from engine.tasks.common import decode_latents

            self.live.preview = decode_latents(model, latents[:1])[0]  # a real preview, for a few ms
        else:
            self.live.preview = latents_to_rgb(latents, model.is_sdxl, scale=model.vae_scale_factor)
        self.live.preview_step = step

    @staticmethod
    def _cache_key(task: Task, runtime) -> str:
        model = task.model
        output_options = model.options.model_dump(exclude={"prompt_cache", "result_cache"})
        if model.options.tiny_vae:
            output_options["taesd"] = model.taesd_name  # another tiny autoencoder decodes other pixels
        return result_key(model.weights_key, task.name, runtime.name, runtime.precision,
                          {**task.request.model_dump(), "inputs": task.inputs_key}, output_options)

    @staticmethod
    def _details(ctx: DenoiseContext, model, prompt_counts: tuple[int, int]) -> dict:
        details, options, early = {}, model.options, ctx.find(EarlyStop)
        if early is not None and early.stopped is not None:
            details["early_stop_step"] = early.stopped["step"]
        truncation = ctx.find(CfgTruncation)
        if truncation is not None and truncation.guided:
            details["guided_steps"] = f"{truncation.guided} (then {truncation.unguided} without guidance, UNet batch 1)"
        if options.prompt_cache:
            hits, misses = model.prompt_cache.hits - prompt_counts[0], model.prompt_cache.misses - prompt_counts[1]
            details["prompt_cache"] = ("hit" if hits and not misses else "miss" if misses and not hits
                                       else f"{hits} hits, {misses} misses")
        if options.tiny_vae and model.taesd is not None:
            details["decoder"] = "tiny autoencoder (TAESD)"
        if model.loras.plans:
            details["lora"] = ", ".join(p.summary for p in model.loras.plans)
        return details

    @staticmethod
    def _job_notices(ctx: DenoiseContext, output: TaskOutput, options, not_applied: dict[str, str]) -> list[str]:
        notices = []
        preview = ctx.find(Preview)
        if preview is not None and preview.failed:
            notices.append(f"Live preview failed ({preview.failed}); the job went on without previews.")
        if ctx.stopped and output.steps_run < output.steps_planned:
            notices.append(f"Stopped after {output.steps_run} of {output.steps_planned} steps.")
        early = ctx.find(EarlyStop)
        if early is not None and early.stopped is not None:
            notices.append(f"Early stop at step {early.stopped['step']} of {early.stopped['of']}: the latents changed "
                           f"by {early.stopped['change']:.2%} in that step (threshold {options.early_stop_threshold:.2%}).")
        return notices + [f"Not applied here: {label} ({why})." for label, why in not_applied.items()]

    def _result(self, task: Task, runtime, output: TaskOutput, readout: Readout) -> GenerationResult:
        model, request = task.model, task.request
        parameters = {"task": task.name, "model": model.name, "runtime": runtime.name, **request.model_dump(),
                      **picture_options(model.options)}
        seeds = [request.seed + i for i in range(len(output.images))]
        infotexts = [format_parameters({**parameters, "seed": seed, "width": image.width, "height": image.height})
                     for image, seed in zip(output.images, seeds)]
        result = GenerationResult(images=output.images, seeds=seeds, parameters=parameters, readout=readout,
                                  notices=readout.notices, extra_images=output.extra_images, infotexts=infotexts)
        return result

    def _keep(self, result: GenerationResult, task_name: str, key: str | None) -> None:
        """The records of a finished job: its PNGs, its history row, its result-cache entry. Each is a side
        feature: one that fails is logged and said in the readout, and the picture is still delivered."""
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
            "peak_ram_gib": round(readout.peak_rss_bytes / devices.GIB, 2), "shape": readout.shape_cache,
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
