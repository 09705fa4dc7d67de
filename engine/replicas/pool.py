"""Engine replicas on Ray Serve: N engines, each in its own process (one per GPU, or a share of the CPU cores),
behind the same UI and API.

The front (app.py's process) keeps an Engine with the model loaded on eager PyTorch only to validate requests
the same way (sizes, prompts, LoRA tags) and to key the result cache; the jobs run on the replicas:

    ReplicaEngine.run (front.py) -> ReplicaPool.run -> Ray Serve routes the call to a replica with a free
    slot (max_ongoing_requests=1: one job per replica, the rest wait in Serve's queue) -> Replica.run streams
    progress events (step, preview, the replica's memory) and then the GenerationResult -> the front saves the
    PNGs (only the front writes outputs, so each image is saved once), adds the history row and the cache entry.

Stop reaches the replicas through a small actor (`StopBoard`) each running job polls. A replica process that
dies mid-job (Ray raises ActorDiedError) is replaced by Serve; the job runs once more on another replica, or ends
with one clear message. Ray is imported only here and only in replica mode: without `ray[serve]` the app runs
as before and --replicas says what to install.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from engine.errors import UserError
from engine.replicas.replica import ReplicaConfig, ReplicaEvent, deployment

log = logging.getLogger(__name__)


APP_NAME = "fastsd"


INSTALL_HINT = "make serve-deps (or: pip install -r requirements-serve.txt)"


READY_TIMEOUT_S = 900.0  # model load, conversion and warm-up on every replica


def ray_missing() -> str | None:
    """None when Ray Serve imports, else one line saying what to install."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        return f"Ray Serve is not installed ({e}); {INSTALL_HINT}"
    return None


def _stop_board():
    import ray

    @ray.remote(num_cpus=0)
    class StopBoard:
        """Jobs the front asked to stop; each running job polls it."""

        def __init__(self):
            self.jobs: set[str] = set()

        def stop(self, jobs: list[str]) -> None:
            self.jobs.update(jobs)

        def stopped(self, job: str) -> bool:
            return job in self.jobs

        def forget(self, job: str) -> None:
            self.jobs.discard(job)

    return StopBoard.remote()


@dataclass
class RemoteJob:
    """A job the front sent out (what Stop reaches)."""

    job: str
    task: str
    replica: str = ""  # set by the first event: until then it waits for a free replica


class ReplicaPool:
    """The front's side: starts (or joins) Ray, deploys the replicas, runs jobs on them with progress, stop and
    one retry when a replica dies."""

    def __init__(self, config: ReplicaConfig, replicas: int, *, address: str | None = None, cpus: float = 1,
                 gpus: float = 0, app: str = APP_NAME, deploy: bool = True):
        missing = ray_missing()
        if missing:
            raise UserError(f"--replicas needs Ray Serve: {missing}")
        if replicas < 1 and deploy:
            raise UserError(f"--replicas must be at least 1, got {replicas}")
        self.config, self.replicas, self.address = config, replicas, address
        self.cpus, self.gpus, self.app, self.deploy = cpus, gpus, app, deploy
        self.handle = None
        self._deployed = False
        self.board = None
        self.info: dict = {}  # one replica's status: its runtime, precision, decisions
        self.started_s = 0.0
        self._jobs: dict[int, RemoteJob] = {}  # thread ident -> its job
        self._lock = threading.Lock()

    # -- start and stop

    def start(self) -> None:
        """Start (or join) Ray, deploy the replicas and wait until one answers. A failure is one UserError line
        (the log keeps Ray's own report)."""
        if self.address and self.address.startswith("ray://"):
            # Ray Client cannot stream a Serve response (what progress and previews need).
            raise UserError(f"--ray-address {self.address}: Ray Client (ray://) cannot stream Serve responses. Run "
                            f"this front on a node of the cluster (`ray start --address HEAD:6379`) and use "
                            f"--ray-address auto.")
        try:
            self._start()
        except UserError:
            self.shutdown()
            raise
        except Exception as e:
            log.warning("Ray Serve did not start", exc_info=e)
            self.shutdown()
            raise UserError(f"The replicas did not start: {type(e).__name__}: {str(e).strip()[:400]}") from e
        except BaseException:  # SIGTERM or Ctrl-C while the replicas start: leave nothing deployed
            self.shutdown()
            raise

    def _start(self) -> None:
        import ray
        from ray import serve

        start = time.perf_counter()
        if not ray.is_initialized():
            # A local instance sized to this machine, or the cluster this machine is a node of ("auto").
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "namespace": "fastsd"}
            if self.address:
                ray.init(address=self.address, **kwargs)  # the cluster's image has this app installed
            else:
                root = str(Path(__file__).resolve().parents[2])  # replicas import engine/ from this checkout
                ray.init(num_cpus=max(os.cpu_count() or 1, int(self.cpus * self.replicas + 0.999)),
                         object_store_memory=256 << 20, runtime_env={"env_vars": {"PYTHONPATH": root}}, **kwargs)
        if self.deploy and self.gpus:
            have = ray.cluster_resources().get("GPU", 0)
            if have < self.gpus * self.replicas:
                message = (f"{self.replicas} replicas of {self.gpus:g} GPU need {self.gpus * self.replicas:g} GPUs; "
                           f"the cluster has {have:g} now")
                if not self.address:  # nothing will add GPUs to a local instance: Serve would wait forever
                    raise UserError(message + ". Use fewer --replicas or --replica-gpus.")
                log.warning("%s; the replicas start as the autoscaler adds nodes", message)
        if self.deploy:
            serve.start(proxy_location="Disabled")  # the UI process is the ingress: no Serve HTTP proxy
            app = deployment(self.replicas, self.cpus, self.gpus).bind(asdict(self.config))
            self._deployed = True  # from here a shutdown deletes the application, even one half started
            self.handle = serve.run(app, name=self.app, route_prefix=None)
        else:
            self.handle = serve.get_app_handle(self.app)
        self.board = _stop_board()
        self.info = self.handle.status.remote().result(timeout_s=READY_TIMEOUT_S)
        if not self.deploy:
            self.replicas = sum(self.replica_states().values()) or 1
        self.started_s = time.perf_counter() - start
        log.info("%d replica(s) ready in %.1f s: %s on %s", self.replicas, self.started_s, self.info.get("model"),
                 self.info.get("runtime"))

    def shutdown(self) -> None:
        try:
            import ray
            from ray import serve

            if not ray.is_initialized():
                return
            if self.deploy and self._deployed:
                serve.delete(self.app)
            if not self.address:
                serve.shutdown()  # our own local instance: Serve's controller goes with it
            ray.shutdown()
        except Exception as e:  # on the way out: say it, do not raise
            log.warning("Ray Serve shutdown: %s", e)

    # -- what the UI shows

    name = property(lambda self: self.info.get("runtime", "?"), doc="the replicas' runtime (the result cache key)")
    precision = property(lambda self: self.info.get("precision", "?"))

    def replica_states(self) -> dict[str, int]:
        """Replica state -> count, from Serve (RUNNING, STARTING, ...)."""
        from ray import serve

        try:
            deployment_status = serve.status().applications[self.app].deployments["Replica"]
            return {str(k): v for k, v in deployment_status.replica_states.items()}
        except Exception as e:
            log.debug("serve.status: %s", e)
            return {}

    def describe(self) -> str:
        states = ", ".join(f"{n} {state.lower()}" for state, n in self.replica_states().items()) or "state unknown"
        where = f"Ray cluster {self.address}" if self.address else "a local Ray instance"
        share = f"{self.gpus:g} GPU" if self.gpus else f"{self.cpus:g} CPU"
        return (f"{self.replicas} Ray Serve replicas ({states}) on {where}, {share} each, one job per replica at a "
                f"time; started in {self.started_s:.0f} s")

    def running(self) -> list[RemoteJob]:
        with self._lock:
            return list(self._jobs.values())

    # -- jobs

    def stop(self) -> None:
        """Stop every running job (as Stop on one device stops the job that runs; waiting ones stay)."""
        jobs = [j.job for j in self.running() if j.replica]
        if jobs and self.board is not None:
            self.board.stop.remote(jobs)

    def run(self, task: str, request: dict, image: Any, on_event: Callable[[ReplicaEvent], None]):
        """Run one job on a replica; returns (GenerationResult, replica name, what a retry did or "")."""
        from ray.exceptions import RayActorError, RayTaskError

        job = RemoteJob(uuid.uuid4().hex, task)
        with self._lock:
            self._jobs[threading.get_ident()] = job
        retried = ""
        try:
            for attempt in (1, 2):
                try:
                    result, replica = self._attempt(job, task, request, image, on_event)
                    return result, replica, retried
                except RayTaskError as e:  # the job itself failed on the replica: the same error, not Ray's wrapper
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    if isinstance(cause, UserError):
                        raise UserError(str(cause)) from None
                    raise RuntimeError(f"{type(cause).__name__}: {cause}") from None
                except (RayActorError, ConnectionError) as e:  # the replica's process died (or was lost)
                    died = job.replica or "a replica"
                    log.warning("job %s: %s died (%s)", job.job, died, type(e).__name__)
                    if attempt == 2:
                        raise UserError(f"The replica running this job stopped ({died}), and so did the one it was "
                                        f"tried again on; no image was saved. The other replicas keep serving: "
                                        f"run it again.") from None
                    retried = f"{died} stopped mid-job; ran again on another replica"
                    job.replica = ""
                    on_event(None)  # waiting again: the live line says so until the next replica starts it
        finally:
            with self._lock:
                self._jobs.pop(threading.get_ident(), None)
            if self.board is not None:
                self.board.forget.remote(job.job)

    def _attempt(self, job: RemoteJob, task: str, request: dict, image: Any, on_event) -> tuple[Any, str]:
        stream = self.handle.options(method_name="run", stream=True).remote(task, request, image, job.job,
                                                                           self.board)
        for event in stream:
            job.replica = event.replica
            if event.result is not None:
                return event.result, event.replica
            on_event(event)
        raise ConnectionError("the replica's stream ended without a result")
