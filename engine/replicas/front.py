"""The replica front: the Engine's interface, with the jobs run on Ray Serve replicas (engine/replicas/pool.py).

The front keeps the model loaded on eager PyTorch only to validate requests the same way (sizes, prompts, LoRA
tags) and to key the result cache. The model, runtime and options are the replicas', set by the command line at
start: what would change them is refused with one line, and `status()["fixed"]` says so for the UI to grey.

    Engine.run -> Records.through (the one result cache, the PNGs, the history) -> ReplicaPool.run -> a replica
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from engine.engine import Engine
from engine.errors import UserError
from engine.jobs.results import GenerationResult, LiveStatus, QueuePlace
from engine.replicas.pool import ReplicaPool
from engine.tasks.context import ProgressFn


class ReplicaEngine(Engine):
    waiting_text = "Sent to the replicas, starting…"

    def __init__(self, pool: ReplicaPool, model: str, config_dir: str | Path | None = None, **engine_args):
        super().__init__(**{**engine_args, "runtime": "pytorch"})
        super().load(model, config_dir=config_dir)  # the front's own copy: validation and cache keys
        self.pool = pool
        self._live: dict[int, LiveStatus] = {}  # thread ident -> its job's live status
        self._embeddings = threading.Lock()

    @property
    def fixed(self) -> str:
        info = self.pool.info
        return (f"set for every replica at start by the command line ({self.pool.replicas} replicas of "
                f"{info.get('model')} on {info.get('runtime')}); restart with other flags to change it")

    def _refuse(self, what: str):
        raise UserError(f"{what} is not available with --replicas: the model, runtime and options are {self.fixed}.")

    def load(self, *args, **kwargs):
        self._refuse("Loading another model")

    def set_runtime(self, *args, **kwargs):
        self._refuse("Switching the runtime")

    def set_optimizations(self, *args, **kwargs):
        self._refuse("Changing the optimizations")

    def set_tiny_autoencoder(self, *args, **kwargs):
        self._refuse("Changing the tiny autoencoder")

    def warmup(self, *args, **kwargs):
        self._refuse("Warming up from the Engine tab (use --warmup at start)")

    @contextmanager
    def temporarily(self, *, model: str | None = None, runtime: str | None = None, options=None, save: bool = True,
                    restore: bool = True) -> Iterator[list]:
        """Nothing can switch here; a block that asks for no switch runs as it is."""
        if runtime is not None or options is not None or not save or (
                model is not None and model != self.model_title()):
            self._refuse("Switching the model, runtime or options for a job")
        yield []

    def option_reasons(self, runtime_cls=None, model=None) -> dict[str, str]:
        if runtime_cls is not None or model is not None:  # the front's own model, being validated
            return super().option_reasons(runtime_cls, model)
        return {name: self.fixed for name in type(self.optimizations).model_fields}

    def status(self) -> dict[str, Any]:
        """What runs the jobs: the replicas (one replica's report stands for all)."""
        info = self.pool.info
        keys = ("model", "family", "runtime", "wish", "device", "precision", "reason", "skipped", "applied",
                "decisions", "not_applied", "loras", "cpu")
        return {**{k: info.get(k) for k in keys}, "replicas": self.pool.describe(), "fixed": self.fixed}

    def run(self, task_cls, request, image: Any = None, progress: ProgressFn | None = None, *,
            expand_styles: bool = True) -> GenerationResult:
        """Validate here, run on a replica (which checks its own memory); no device is held here: the replicas
        queue in Ray Serve."""
        with self._embeddings:  # the replicas read the folder before each job: the cache key follows it here
            self.loadout.refresh_embeddings()
        model = self.require_model()
        request = self.styles.applied(task_cls.request_type, request) if expand_styles else request
        task = task_cls(model, request, image)
        return self.records.through(task, self.pool, lambda: self._run_remote(task, progress))

    def _run_remote(self, task, progress: ProgressFn | None) -> GenerationResult:
        thread, live = threading.get_ident(), LiveStatus(task=task.name)  # running from its first event

        def on_event(event) -> None:
            if event is None:  # its replica died: waiting for another
                live.running, live.step, live.where, live.sent = False, 0, "", time.perf_counter()
                return
            if not live.running:
                live.started, live.running = time.perf_counter(), True
            live.step, live.total, live.where, live.memory = event.step, event.total, event.replica, event.memory
            if event.preview is not None:
                live.preview, live.preview_step = event.preview, event.preview_step
            if progress is not None and event.total:
                progress(event.step, event.total)

        self._live[thread] = live
        try:
            result, replica, retried = self.pool.run(task.name, task.request.model_dump(), task.image, on_event)
        finally:
            live.running = False
            self._live.pop(thread, None)
        readout = result.readout
        readout.details["replica"] = replica
        # What the front's validation said (a snapped size): the replica got the request already normalised.
        readout.notices[:0] = [n for n in task.notices if n not in readout.notices]
        if retried:
            readout.details["retried"] = retried
            readout.notices.append(f"Retried: {retried}.")
        result.notices = readout.notices
        return result

    def queue_place(self, thread: int) -> QueuePlace | None:
        """A job sent out but not started waits in Ray Serve's queue for a free replica."""
        waiting = sorted((live.sent, t, live.task) for t, live in list(self._live.items()) if not live.running)
        index = next((i for i, (_, t, _) in enumerate(waiting) if t == thread), None)
        if index is None:
            return None
        ahead = [task for _, _, task in waiting[:index]]
        typical = [self.records.typical_s(task) for task in ahead]
        wait = None if None in typical else sum(typical) / max(1, self.pool.replicas)
        return QueuePlace(index + 1, ahead, wait, waits_for="a free replica")

    def job_count(self) -> int:
        """Jobs sent out and not finished, running on a replica or waiting for one."""
        return len(self._live)

    def live(self, thread: int | None = None) -> LiveStatus:
        """Each job has its own; not another user's: an empty status until this thread's job is sent."""
        if thread is None:
            return next(iter(self._live.values()), LiveStatus())
        return self._live.get(thread) or LiveStatus()

    def memory_text(self, live: LiveStatus | None = None) -> str:
        return (live.memory if live is not None else "") or "memory: on the replicas"

    def stop(self) -> None:
        """Stop every running job (as Stop on one device stops the job that runs; waiting ones stay)."""
        self.pool.stop()

    def close(self) -> None:
        self.pool.shutdown()
