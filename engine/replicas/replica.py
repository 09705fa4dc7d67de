"""One Engine in a Ray Serve replica, and the Serve deployment of them (`build_app` for `serve deploy`)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.engine import Engine
from engine.options import Optimizations
from engine.tasks import TASKS

POLL_S = 0.25

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaConfig:
    """Everything a replica needs to build its Engine: plain values, so Ray can ship it (and a Serve config file
    can write it as the application's arguments, `build_app`)."""

    model: str = "builtin:shapes"
    model_config: str | None = None
    runtime: str = "auto"
    optimizations: dict = field(default_factory=dict)  # Optimizations fields
    models_dir: str | None = None
    cache_dir: str | None = None
    taesd: str | None = None
    warmup: tuple[tuple[int, int], ...] = ()
    warmup_tasks: tuple[str, ...] = ("txt2img",)
    guidance: float = 7.0
    threads: int | None = None  # CPU threads per replica; None: the runtime's own choice

    @classmethod
    def of(cls, values: dict) -> "ReplicaConfig":
        values = dict(values)
        values["warmup"] = tuple(tuple(size) for size in values.get("warmup", ()))
        values["warmup_tasks"] = tuple(values.get("warmup_tasks", ("txt2img",)))
        return cls(**values)


@dataclass
class ReplicaEvent:
    """What a replica streams while a job runs (the last one carries the result)."""

    replica: str
    step: int = 0
    total: int = 0
    preview: Any = None  # PIL image, only when a new one was made
    preview_step: int = 0
    memory: str = ""  # the replica's own memory line
    result: Any = None  # GenerationResult, in the last event


class Replica:
    """One Engine in a Ray Serve replica: loads the model once, prepares its runtime, warms its shapes, then runs
    one job at a time. Its outputs are not saved here (the front saves them), and it keeps no result cache (the
    front's is the one cache, whichever replica ran the job)."""

    def __init__(self, config: dict):
        cfg = ReplicaConfig.of(config)
        self.pid, self.host = os.getpid(), socket.gethostname()
        self.id = _replica_id()
        options = Optimizations(**{**cfg.optimizations, "result_cache": False})
        self.engine = Engine(runtime=cfg.runtime, optimizations=options, models_dir=cfg.models_dir,
                             cache_dir=cfg.cache_dir, outputs_dir=None, taesd=cfg.taesd, styles_file=None)
        if cfg.threads:
            self.engine.limit_threads(cfg.threads)
        self.engine.load(cfg.model, config_dir=cfg.model_config)
        self.warmed = [asdict(r) for r in self.engine.warmup(list(cfg.warmup), guidance=cfg.guidance,
                                                              tasks=cfg.warmup_tasks)] if cfg.warmup else []
        log.info("replica %s ready: %s on %s", self.name, self.engine.model.name, self.engine.status()["runtime"])

    @property
    def name(self) -> str:
        return f"{self.id} (pid {self.pid} on {self.host})"

    def status(self) -> dict:
        return {**self.engine.status(), "replica": self.name, "pid": self.pid, "host": self.host,
                "warmed": self.warmed, "source": self.engine.model.source.text}

    def run(self, task: str, request: dict, image: Any, job: str, board):
        """A generator: progress events while the job runs, then one event with the result. Errors propagate
        (a UserError reaches the front as itself)."""
        engine = self.engine
        box: dict[str, Any] = {}

        def target():
            try:
                box["result"] = engine.run(TASKS[task], request, image, expand_styles=False)
            except BaseException as e:  # raised again below, in Serve's thread
                box["error"] = e

        worker = threading.Thread(target=target, name=f"job-{job}", daemon=True)
        worker.start()
        sent_preview = -1
        while worker.is_alive():
            worker.join(POLL_S)
            # Asked again at every poll: a stop that comes before the job's first step (a LoRA being fused)
            # would otherwise land on no job.
            if board is not None and _ask(board.stopped.remote(job)):
                engine.stop()
            live = engine.live()
            if not live.running:
                continue
            preview = None
            if live.preview is not None and live.preview_step != sent_preview:
                preview, sent_preview = live.preview, live.preview_step
            yield ReplicaEvent(self.name, live.step, live.total, preview, live.preview_step,
                               engine.memory_text(live))
        if "error" in box:
            raise box["error"]
        yield ReplicaEvent(self.name, result=box["result"])


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (a test building a Replica by hand)
        return uuid.uuid4().hex[:8]


def _ask(ref, timeout: float = 5.0) -> bool:
    import ray

    try:
        return bool(ray.get(ref, timeout=timeout))
    except Exception:  # the front went away or is slow: keep running
        return False


def build_app(args: dict):
    """A Serve application builder, for `serve deploy` / a RayService config (docs/ray/serve-config.yaml):
    `engine.replicas.replica:build_app` with `args: {replicas, replica_cpus, replica_gpus, autoscaling, config}`, config being
    ReplicaConfig's fields. Checked here, so a wrong config fails at deploy with its own message."""
    config = ReplicaConfig.of(dict(args.get("config", {})))  # unknown fields fail here, not in every replica
    return deployment(int(args.get("replicas", 1)), float(args.get("replica_cpus", 1)),
                      float(args.get("replica_gpus", 0)), args.get("autoscaling")).bind(asdict(config))


def deployment(replicas: int, cpus: float, gpus: float, autoscaling: dict | None = None):
    from ray import serve

    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "max_ongoing_requests": 1,  # one job per replica at a time; the rest queue in Serve's router
        # A replica removed by autoscaling or a redeploy finishes its job first (up to 10 minutes).
        "health_check_period_s": 10, "graceful_shutdown_timeout_s": 600,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    return serve.deployment(Replica, name="Replica", **options)
