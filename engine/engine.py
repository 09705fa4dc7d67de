"""The Engine: a small facade over the loaded model, its runtime and the job runner.

load / set_runtime / set_optimizations change what is loaded (a failure leaves the old model serving);
run (and txt2img, img2img, hires_fix, tiled_upscale) validates a task and hands it to the JobRunner.
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

from engine import runtimes
from engine.errors import UserError
from engine.jobs.runner import GenerationResult, JobRunner, LiveStatus
from engine.lora import core as lora
from engine.lora.core import LoraUse
from engine.models.loading import (
    LoadedModel,
    ModelSource,
    available_models,
    available_tiny_autoencoders,
    available_vaes,
    load_model,
    load_tiny_autoencoder,
    tiny_autoencoder_family,
    tiny_autoencoder_mismatch,
)
from engine.options import RUNTIME_FIELDS, Optimizations, effective
from engine.requests import parse_request
from engine.runtimes.base import Runtime, WarmupResult
from engine.runtimes.warmup import warmup_shapes
from engine.store.caches import DEFAULT_RESULTS_BYTES
from engine.system import devices
from engine.system import hardware as hardware_mod
from engine.tasks import HiresFix, Img2Img, Task, TiledUpscale, Txt2Img
from engine.tasks.context import ProgressFn
from engine.text.styles import STYLES_FILE, Styles

log = logging.getLogger(__name__)
try:  # diffusers warns on every from_pipe / dtype move about things that do not apply here
    from diffusers.utils import logging as _diffusers_logging

    _diffusers_logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass

__all__ = ["Engine", "GenerationResult"]


class Engine:
    """Generation backend; runs without any UI. Pass it around, don't make it global."""

    def __init__(self, hardware: hardware_mod.HardwareReport | None = None, runtime: str = "auto",
                 optimizations: Optimizations | None = None, models_dir: Path | None = None,
                 cache_dir: Path | None = None, outputs_dir: Path | None = None, preview_every: int = 2,
                 history_size: int = 20, taesd: str | None = None, styles_file: Path | None = STYLES_FILE,
                 result_cache_dir: Path | None = None, result_cache_bytes: int = DEFAULT_RESULTS_BYTES,
                 remote_hub: bool = False):
        self.pool = None  # serve.ReplicaPool once use_replicas(): jobs run on Ray Serve replicas
        self.hardware = hardware or hardware_mod.detect()
        self.optimizations = optimizations or Optimizations()  # what the user asked for
        self.models_dir = Path(models_dir) if models_dir else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.remote_hub = remote_hub  # may remote users (allow_any_path=False) name hub ids? the operator's choice
        self.taesd = load_tiny_autoencoder(taesd, models_dir=self.models_dir) if taesd else None
        self.taesd_family = tiny_autoencoder_family(taesd, self.taesd.config.latent_channels) if taesd else None
        self.taesd_name = taesd or None
        self.runtime_wish = runtime
        self.model: LoadedModel | None = None
        self.choice = runtimes.pick(self.hardware, runtime)
        self.runtime: Runtime = self._new_runtime(self.choice.cls, self.optimizations)
        self.jobs = JobRunner(outputs_dir, preview_every, history_size, result_cache_dir, result_cache_bytes)
        self._config_dir: str | Path | None = None
        self.styles = Styles(styles_file)

    def use_replicas(self, pool) -> None:
        """Send jobs to `pool`'s replicas (engine/serve.py, started) from now on. This engine's own model stays
        loaded only to validate requests and key the result cache; the model, runtime and options are the
        replicas'."""
        self.pool = pool

    def _local_only(self, what: str) -> None:
        if self.pool is not None:
            raise UserError(f"{what} is not available with --replicas: the model, runtime and options are the "
                            f"replicas' own, set by the command line at start ({self.pool.replicas} replicas of "
                            f"{self.pool.info.get('model')} on {self.pool.info.get('runtime')}); restart with other "
                            f"flags to change them.")

    live = property(lambda self: self.jobs.live, doc="LiveStatus of the running (or last) job")
    config_dir = property(lambda self: self._config_dir, doc="the configs folder the loaded model was given")
    history = property(lambda self: self.jobs.history, doc="the last jobs' readout rows, newest first")
    outputs_dir = property(lambda self: self.jobs.outputs_dir)

    # ------------------------------------------------------------ options

    def option_reasons(self, runtime_cls=None, model: LoadedModel | None = None) -> dict[str, str]:
        """Option -> why it cannot act here (runtime and hardware, or the tiny autoencoder)."""
        if self.pool is not None and runtime_cls is None and model is None:
            return {name: "set for every replica at start by the command line (--preset and option flags); "
                          "restart to change" for name in type(self.optimizations).model_fields}
        reasons = dict((runtime_cls or type(self.runtime)).option_reasons(self.hardware))
        model = model or self.model
        if self.taesd is None:
            reasons["tiny_vae"] = "needs a TAESD model: set --taesd PATH (a diffusers AutoencoderTiny folder)"
        elif model is not None and (why := tiny_autoencoder_mismatch(self.taesd_family, model)):
            reasons["tiny_vae"] = why
        return reasons

    def effective_options(self, wanted: Optimizations, runtime_cls=None, model=None):
        """`wanted` minus what cannot act here, and {label: reason} for each option dropped."""
        return effective(wanted, self.option_reasons(runtime_cls, model))

    @property
    def not_applied(self) -> dict[str, str]:
        return self.effective_options(self.optimizations)[1]

    def set_optimizations(self, wanted: Optimizations) -> Optimizations:
        """Apply a new set of options; those the runtime owns re-prepare the model. Returns what took effect."""
        self._local_only("Changing the optimizations")
        now, _ = self.effective_options(wanted)
        if any(getattr(now, f) != getattr(self.runtime.optimizations, f) for f in RUNTIME_FIELDS):
            self.set_runtime(self.runtime_wish, wanted)
        else:
            with self.jobs.lock:
                self.optimizations = wanted
                if self.model is not None:
                    self.model.options = now
        return now

    # ------------------------------------------------------------ model and runtime

    def _new_runtime(self, cls, optimizations: Optimizations) -> Runtime:
        return cls(self.hardware, self.effective_options(optimizations, cls)[0], self.cache_dir)

    def _prepared(self, runtime: Runtime, source: str | ModelSource, allow_any_path: bool, config_dir,
                  loras: tuple[LoraUse, ...] = (), vae: str | ModelSource | None = None) -> LoadedModel:
        model = load_model(source, models_dir=self.models_dir, allow_any_path=allow_any_path,
                           allow_hub=allow_any_path or self.remote_hub, config_dir=config_dir,
                           skeleton_for=runtime.cached_components, loras=loras,
                           keep_lora_originals=runtime.fuses_in_place, vae=vae)
        runtime.prepare(model)
        return model

    def _install(self, model: LoadedModel, config_dir) -> None:
        reasons = self.option_reasons(model=model)
        model.options = effective(self.optimizations, reasons)[0]
        usable = self.taesd is not None and "tiny_vae" not in reasons
        model.taesd = self.taesd.to(self.runtime.device) if usable else None
        model.taesd_name = self.taesd_name if usable else None
        old, self.model, self._config_dir = self.model, model, config_dir  # a runtime switch reloads the same way
        del old
        gc.collect()
        log.info("loaded %s (%s) in %.2f s", model.name, model.family, model.load_seconds)

    def load(self, source: str | ModelSource, *, allow_any_path: bool = True, config_dir: str | Path | None = None,
             vae: str | ModelSource | None = None) -> LoadedModel:
        """Load and prepare a model (with `vae` in place of its own VAE). On failure the previous model stays
        loaded, on its runtime. allow_any_path=False: what a remote user may name (models_dir's lists; hub ids
        only with remote_hub); a ModelSource (a model loaded before) is loaded again exactly."""
        self._local_only("Loading another model")
        with self.jobs.lock:
            try:
                model = self._prepared(self.runtime, source, allow_any_path, config_dir, vae=vae)
            except UserError:
                raise
            except Exception as e:
                if self.runtime.fallible is None:
                    raise  # eager PyTorch is the fallback: nothing to fall back to
                model = self._fall_back(e, f"could not prepare {getattr(source, 'text', source)}", source, allow_any_path, config_dir,
                                        vae=vae)
            self._install(model, config_dir)
            return model

    def set_tiny_autoencoder(self, text: str | None, *, allow_any_path: bool = True) -> str | None:
        """Use another tiny autoencoder (None or "": none); the loaded model keeps serving. Returns why the tiny
        autoencoder option cannot act with the loaded model, or None when it can."""
        self._local_only("Changing the tiny autoencoder")
        taesd = load_tiny_autoencoder(text, models_dir=self.models_dir, allow_any_path=allow_any_path,
                                      allow_hub=allow_any_path or self.remote_hub) if text else None
        family = tiny_autoencoder_family(text, taesd.config.latent_channels) if taesd is not None else None
        with self.jobs.lock:
            self.taesd, self.taesd_family, self.taesd_name = taesd, family, text or None
            if self.model is not None:
                reasons = self.option_reasons()
                self.model.options = effective(self.optimizations, reasons)[0]
                usable = taesd is not None and "tiny_vae" not in reasons
                self.model.taesd = taesd.to(self.runtime.device) if usable else None
                self.model.taesd_name = text if usable else None
                return reasons.get("tiny_vae")
        return None

    def _fall_back(self, error: Exception, what: str, source: str | ModelSource, allow_any_path: bool, config_dir,
                   loras: tuple[LoraUse, ...] = (), vae: str | ModelSource | None = None) -> LoadedModel:
        """`source` prepared on eager PyTorch, for a runtime (or torch.compile) that failed; the Engine tab says
        why. The engine takes the new runtime only once the model is ready on it."""
        from engine.runtimes.pytorch import PyTorchRuntime

        failed = self.runtime.fallible
        reason = f"{failed} {what} ({type(error).__name__}: {str(error)[:200]}); using eager PyTorch"
        log.warning("%s", reason, exc_info=error)
        opts = self.optimizations.model_copy(update={"torch_compile": False})
        runtime = self._new_runtime(PyTorchRuntime, opts)
        model = self._prepared(runtime, source, allow_any_path, config_dir, loras, vae)
        self.runtime, self.optimizations = runtime, opts
        self.choice = runtimes.Choice("pytorch", reason, {**self.choice.skipped, failed: reason})
        return model

    def set_runtime(self, wish: str, optimizations: Optimizations | None = None) -> runtimes.Choice:
        """Switch runtime (and options); the loaded model is prepared again from its source. A failure
        leaves the old runtime and model serving."""
        self._local_only("Switching the runtime")
        choice = runtimes.pick(self.hardware, wish)
        opts = optimizations or self.optimizations
        runtime = self._new_runtime(choice.cls, opts)
        with self.jobs.lock:  # no job may run between the prepare and the swap
            model = (self._prepared(runtime, self.model.source, True, self._config_dir, self.model.loras.uses,
                                    self.model.vae_source) if self.model else None)
            self.choice, self.runtime, self.optimizations, self.runtime_wish = choice, runtime, opts, wish
            if model is not None:
                self._install(model, self._config_dir)
        return choice

    def _use_loras(self, uses: tuple[LoraUse, ...]) -> str:
        """Fuse this LoRA set (the caller holds the lock); what it cost, for the readout. A LoRA that cannot
        apply raises UserError and the model keeps serving with the set it had."""
        model, start = self.model, time.perf_counter()
        if self.runtime.fuses_in_place:
            plans = [lora.plan(model.pipe, model.family, u, self.models_dir) for u in uses]
            model.loras.fuse(model.pipe, plans)
            return f"fused in {time.perf_counter() - start:.2f} s" if uses else "unfused"
        converted = len(getattr(self.runtime, "conversions", ()))
        self._install(self._prepared(self.runtime, model.source, True, self._config_dir, uses, model.vae_source),
                      self._config_dir)
        how = ("converted" if len(getattr(self.runtime, "conversions", ())) > converted
               else "from cache" if hasattr(self.runtime, "conversions") else "reloaded")
        return f"{'fused, ' if uses else ''}{how} in {time.perf_counter() - start:.1f} s"

    def model_names(self) -> list[str]:
        """What the model picker offers: the built-ins, then models under --models-dir."""
        return [name for name, _ in available_models(self.models_dir)]

    def vae_names(self) -> list[str]:
        return available_vaes(self.models_dir)

    def tiny_autoencoder_names(self) -> list[str]:
        return available_tiny_autoencoders(self.models_dir)

    def lora_names(self) -> list[str]:
        """LoRAs a prompt may name (<models-dir>/lora, then the built-in ones)."""
        return lora.available(self.models_dir)

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise UserError("No model is loaded yet; load one on the Engine tab or start with --model.")
        return self.model

    def status(self) -> dict[str, Any]:
        if self.pool is not None:  # what runs the jobs: the replicas (one replica's report stands for all)
            info = self.pool.info
            keys = ("model", "family", "runtime", "device", "precision", "reason", "skipped", "applied",
                    "decisions", "not_applied", "loras", "cpu")
            return {**{k: info.get(k) for k in keys}, "replicas": self.pool.describe()}
        return {
            "model": self.model.name if self.model else None, "family": self.model.family if self.model else None,
            "runtime": self.runtime.name, "device": self.runtime.device, "precision": self.runtime.precision,
            "reason": self.choice.reason, "skipped": dict(self.choice.skipped), "applied": list(self.runtime.applied),
            "decisions": list(self.runtime.decisions), "not_applied": self.not_applied,
            "loras": [p.summary for p in self.model.loras.plans] if self.model else [],
            "cpu": self.hardware.cpu.describe(),
        }

    def warmup(self, sizes: list[tuple[int, int]], batch_size: int = 1, guidance: float = 7.0,
               tasks: tuple[str, ...] = ("txt2img",)) -> list[WarmupResult]:
        """Compile ahead what `tasks` run at these (width, height) sizes; guidance <= 1 runs the UNet at batch 1."""
        self._local_only("Warming up from the Engine tab (use --warmup at start)")
        model = self.require_model()
        shapes = warmup_shapes(model, sizes, batch_size, guidance, tuple(tasks))
        with self.jobs.lock:
            return self.runtime.warmup(model, shapes)

    def queue_place(self, thread: int):
        """jobs.QueuePlace of the job a thread waits to run, or None once it runs (or never waited)."""
        if self.pool is not None:
            return self.jobs.remote_place(thread, self.pool.replicas)
        return self.jobs.queue_place(thread)

    def live_of(self, thread: int):
        """The LiveStatus of the job a thread runs: with replicas each job has its own; else the device's one."""
        if self.pool is not None:  # not another user's job: an empty status until this one is sent
            return self.jobs.remote_live.get(thread) or LiveStatus()
        return self.jobs.live

    def stop(self) -> None:
        """Ask the running job (with replicas: every running job) to end after its current step."""
        if self.pool is not None:
            self.pool.stop()
        self.jobs.stop()

    # ------------------------------------------------------------ tasks

    def run(self, task_cls: type[Task], request, image: Any = None,
            progress: ProgressFn | None = None, *, expand_styles: bool = True) -> GenerationResult:
        """Validate, check memory, then run on the device (or on a replica). A runtime that compiles lazily and
        fails at its first job is replaced by eager PyTorch once, and the job runs again there. `expand_styles`
        False: the prompt pair has its styles in already (a replica running what the front expanded)."""
        model = self.require_model()
        if expand_styles:
            request = self.styled(task_cls, request)
        task = task_cls(model, request, image)
        if self.pool is not None:  # the replica checks its own memory
            return self.jobs.run_remote(task, self.pool, progress)
        need = task.memory_need()
        if need is not None:
            unet = getattr(model.pipe.unet, "config", None)
            devices.check_job_fits(self.runtime.device, unet.block_out_channels[0] if unet else 320, *need)
        with self.jobs.turn(task.name):
            # The same model prepared again (a LoRA change on OpenVINO) may run the job; another may not.
            if self.model is None or self.model.source.text != model.source.text:
                raise UserError("The model changed while this job waited; run it again.")
            change = None
            if task.loras != self.model.loras.uses or self.model.loras.stale(self.models_dir):
                change = self._use_loras(task.loras)
            if task.model is not self.model:
                task = task_cls(self.model, request, image)
            if change is not None:
                task.details["lora_change"] = change
            try:
                result = self.jobs.run(task, self.runtime, self.not_applied, progress)
            except Exception as e:
                if isinstance(e, UserError) or self.runtime.proven or not (self.runtime.compiles
                                                                           and self.runtime.fallible):
                    raise
                self._install(self._fall_back(e, "failed at its first run", task.model.source, True,
                                              self._config_dir, task.loras, task.model.vae_source), self._config_dir)
                details, task = task.details, task_cls(self.model, request, image)
                task.details.update(details)
                result = self.jobs.run(task, self.runtime, self.not_applied, progress)
                result.notices.insert(0, f"{self.choice.reason}.")
            self.runtime.proven = True
            return result

    def styled(self, task_cls: type[Task], request):
        """The request with its styles expanded into the prompt pair (the style names stay, for the PNG)."""
        if isinstance(request, dict):
            request = parse_request(task_cls.request_type, request)
        if not request.styles:
            return request
        prompt, negative = self.styles.expand(request.prompt, request.negative_prompt, request.styles)
        return request.model_copy(update={"prompt": prompt, "negative_prompt": negative})

    def txt2img(self, request, progress: ProgressFn | None = None) -> GenerationResult:
        return self.run(Txt2Img, request, None, progress)

    def img2img(self, request, image: Any, progress: ProgressFn | None = None) -> GenerationResult:
        return self.run(Img2Img, request, image, progress)

    def hires_fix(self, request, progress: ProgressFn | None = None) -> GenerationResult:
        return self.run(HiresFix, request, None, progress)

    def tiled_upscale(self, request, image: Any, progress: ProgressFn | None = None) -> GenerationResult:
        return self.run(TiledUpscale, request, image, progress)

    def compare(self, request, axis: str, values, **options):
        """txt2img once per preset, runtime, step count or sampler, in one grid (engine/compare.py)."""
        from engine.compare.run import compare
        self._local_only("Compare")
        return compare(self, request, axis, values, **options)
