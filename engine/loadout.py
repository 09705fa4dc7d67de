"""What is loaded: the model, the runtime it is prepared on, the options in effect and the tiny autoencoder; and
how each changes. A change is prepared aside and swapped in only once it is ready, so a failure leaves the old
model serving. The Engine holds the device around every call here."""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from engine import runtimes
from engine.errors import UserError
from engine.lora.tags import LoraUse
from engine.models.loading import LoadedModel, ModelSource, load_model
from engine.models.tiny_autoencoder import TinyAutoencoderSlot
from engine.options import RUNTIME_FIELDS, Optimizations, effective
from engine.runtimes.base import Runtime
from engine.system.hardware import HardwareReport
from engine.text import embeddings as text_embeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """Enough to put a loadout back as it was."""

    source: ModelSource | None
    config_dir: str | Path | None
    vae: ModelSource | None
    runtime: Runtime
    wish: str
    options: Optimizations


class Loadout:
    def __init__(self, hardware: HardwareReport, runtime: str, optimizations: Optimizations,
                 models_dir: Path | None, cache_dir: Path | None, remote_hub: bool, taesd: str | None):
        self.hardware, self.models_dir, self.cache_dir = hardware, models_dir, cache_dir
        self.remote_hub = remote_hub  # may remote users (allow_any_path=False) name hub ids? the operator's choice
        self.optimizations = optimizations  # what the user asked for
        self.tiny = TinyAutoencoderSlot.of(taesd, models_dir)
        self.runtime_wish = runtime
        self.model: LoadedModel | None = None
        self.config_dir: str | Path | None = None  # the configs folder the loaded model was given
        self.choice = runtimes.pick(hardware, runtime)
        self.runtime: Runtime = self._new_runtime(self.choice.cls, optimizations)

    # -- options

    def option_reasons(self, runtime_cls=None, model: LoadedModel | None = None) -> dict[str, str]:
        reasons = dict((runtime_cls or type(self.runtime)).option_reasons(self.hardware))
        if why := self.tiny.why_not(model or self.model):
            reasons["tiny_vae"] = why
        return reasons

    def effective_options(self, wanted: Optimizations, runtime_cls=None, model=None):
        return effective(wanted, self.option_reasons(runtime_cls, model))

    @property
    def not_applied(self) -> dict[str, str]:
        return self.effective_options(self.optimizations)[1]

    def status(self) -> dict:
        """What is loaded and runs it, and why: the Engine tab's summary."""
        model, runtime = self.model, self.runtime
        return {
            "model": model.name if model else None, "family": model.family if model else None,
            "runtime": runtime.name, "wish": self.runtime_wish, "device": runtime.device,
            "precision": runtime.precision, "reason": self.choice.reason, "skipped": dict(self.choice.skipped),
            "applied": list(runtime.applied), "decisions": list(runtime.decisions), "not_applied": self.not_applied,
            "loras": [p.summary for p in model.loras.plans] if model else [], "cpu": self.hardware.cpu.describe(),
        }

    def set_optimizations(self, wanted: Optimizations) -> Optimizations:
        now, _ = self.effective_options(wanted)
        if any(getattr(now, f) != getattr(self.runtime.optimizations, f) for f in RUNTIME_FIELDS):
            self.set_runtime(self.runtime_wish, wanted)
        else:
            self.optimizations = wanted
            if self.model is not None:
                self.model.options = now
        return now

    def _fit_options(self, model: LoadedModel) -> str | None:
        """The options and tiny autoencoder `model` runs with here; why the tiny autoencoder cannot act, if so."""
        reasons = self.option_reasons(model=model)
        model.options = effective(self.optimizations, reasons)[0]
        self.tiny.give(model, self.runtime.device, usable="tiny_vae" not in reasons)
        return reasons.get("tiny_vae")

    def set_tiny_autoencoder(self, slot: TinyAutoencoderSlot) -> str | None:
        self.tiny = slot
        return self._fit_options(self.model) if self.model is not None else None

    # -- model and runtime

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
        self._fit_options(model)
        old, self.model, self.config_dir = self.model, model, config_dir  # a runtime switch reloads the same way
        del old
        gc.collect()
        log.info("loaded %s (%s) in %.2f s", model.name, model.family, model.load_seconds)

    def load(self, source: str | ModelSource, allow_any_path: bool, config_dir, vae) -> LoadedModel:
        try:
            model = self._prepared(self.runtime, source, allow_any_path, config_dir, vae=vae)
        except UserError:
            raise
        except Exception as e:
            if self.runtime.fallible is None:
                raise  # eager PyTorch is the fallback: nothing to fall back to
            model = self._fall_back(e, f"could not prepare {getattr(source, 'text', source)}", source,
                                    allow_any_path, config_dir, vae=vae)
        self._install(model, config_dir)
        return model

    def _fall_back(self, error: Exception, what: str, source: str | ModelSource, allow_any_path: bool, config_dir,
                   loras: tuple[LoraUse, ...] = (), vae: str | ModelSource | None = None) -> LoadedModel:
        """`source` prepared on eager PyTorch, for a runtime (or torch.compile) that failed; the Engine tab says
        why. The loadout takes the new runtime only once the model is ready on it."""
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

    def fall_back_after(self, error: Exception, model: LoadedModel) -> None:
        """A runtime that compiles lazily failed at its first job: `model` again on eager PyTorch."""
        self._install(self._fall_back(error, "failed at its first run", model.source, True, self.config_dir,
                                      model.loras.uses, model.vae_source), self.config_dir)

    def set_runtime(self, wish: str, optimizations: Optimizations | None = None) -> runtimes.Choice:
        choice = runtimes.pick(self.hardware, wish)
        opts = optimizations or self.optimizations
        runtime = self._new_runtime(choice.cls, opts)
        model = (self._prepared(runtime, self.model.source, True, self.config_dir, self.model.loras.uses,
                                self.model.vae_source) if self.model else None)
        self.choice, self.runtime, self.optimizations, self.runtime_wish = choice, runtime, opts, wish
        if model is not None:
            self._install(model, self.config_dir)
        return choice

    def use_loras(self, uses: tuple[LoraUse, ...]) -> str:
        """Fuse this LoRA set; what it cost, for the readout. A LoRA that cannot apply raises UserError and the
        model keeps serving with the set it had."""
        model, start = self.model, time.perf_counter()
        if self.runtime.fuses_in_place:
            model.loras.fuse_uses(model.pipe, model.family, uses, self.models_dir)
            return f"fused in {time.perf_counter() - start:.2f} s" if uses else "unfused"
        converted = len(getattr(self.runtime, "conversions", ()))
        self._install(self._prepared(self.runtime, model.source, True, self.config_dir, uses, model.vae_source),
                      self.config_dir)
        how = ("converted" if len(getattr(self.runtime, "conversions", ())) > converted
               else "from cache" if hasattr(self.runtime, "conversions") else "reloaded")
        return f"{'fused, ' if uses else ''}{how} in {time.perf_counter() - start:.1f} s"

    def embedding_names(self) -> list[str]:
        """Textual-inversion embeddings a prompt may name: those in <models-dir>/embeddings that fit the loaded
        model (the folder read now; a job picks up a change by itself)."""
        folder = text_embeddings.read_folder(self.models_dir)
        if self.model is None:
            return [f.name for f in folder.files]
        return list(text_embeddings.plan(folder, self.model.pipe, self.model.is_sdxl).loaded)

    def embeddings(self, reasons: bool = False) -> dict[str, dict]:
        """The loaded model's embeddings as AUTOMATIC1111's /sdapi/v1/embeddings answers: {"loaded": {name: {step,
        sd_checkpoint, sd_checkpoint_name, shape, vectors}}, "skipped": {...}}; with `reasons`, why each skipped."""
        model = self.model
        return model.embeddings.a1111(reasons) if model else {"loaded": {}, "skipped": {}}

    def refresh_embeddings(self, force: bool = False) -> str | None:
        """Read <models-dir>/embeddings again (if it changed, or `force`) and put what fits into the text encoders'
        token tables: in place where the runtime reads the weights at each call, else by preparing the model again
        (only the text encoders convert: their cache identity holds the set). What it cost, for the readout, or
        None where nothing changed."""
        model, start = self.model, time.perf_counter()
        if model is None or not (force or model.embeddings.stale(self.models_dir)):
            return None
        folder = text_embeddings.read_folder(self.models_dir)
        sdxl = model.is_sdxl
        if folder.key == model.embeddings.key:  # files touched or skipped ones changed; the tables stay
            model.embeddings = text_embeddings.plan(folder, model.pipe, sdxl)
            return None
        if self.runtime.fuses_in_place:
            model.embeddings = text_embeddings.load(self.models_dir, model.pipe, sdxl, folder)
            return f"{len(model.embeddings.loaded)} loaded in {time.perf_counter() - start:.2f} s"
        self._install(self._prepared(self.runtime, model.source, True, self.config_dir, model.loras.uses,
                                     model.vae_source), self.config_dir)
        took = time.perf_counter() - start
        return f"{len(self.model.embeddings.loaded)} loaded, text encoders prepared in {took:.1f} s"

    def current_task(self, task_cls, task, request, image):
        """`task` on the model loaded now, with its LoRA set fused (the caller holds the device). The same model
        prepared again (a LoRA change on OpenVINO) may run it, another may not."""
        if self.model is None or self.model.source.text != task.model.source.text:
            raise UserError("The model changed while this job waited; run it again.")
        change = None
        if task.loras != self.model.loras.uses or self.model.loras.stale(self.models_dir):
            change = self.use_loras(task.loras)
        embeddings = self.refresh_embeddings()  # a file added to the folder is used without a refresh (as A1111)
        if task.model is not self.model:
            task = task_cls(self.model, request, image)
        if change is not None:
            task.details["lora_change"] = change
        if embeddings is not None:
            task.details["embeddings_change"] = embeddings
        return task

    # -- switching for a while

    def snapshot(self) -> Snapshot:
        model = self.model
        return Snapshot(model.source if model else None, self.config_dir, model.vae_source if model else None,
                        self.runtime, self.runtime_wish, self.optimizations)

    def restore(self, was: Snapshot) -> str | None:
        """Put back what `was` had; a line for the user where that failed."""
        try:
            if self.runtime is not was.runtime:
                self.set_runtime(was.wish, was.options)
            elif self.optimizations != was.options:
                self.set_optimizations(was.options)
            if was.source is not None and self.model is not None and self.model.source != was.source:
                self.load(was.source, True, was.config_dir, was.vae)  # exactly what was loaded: its resolved source
        except Exception as e:
            log.warning("could not switch back", exc_info=e)
            return (f"Could not switch back to {getattr(was.source, 'text', was.source)} on the {was.wish} runtime "
                    f"({e}); now {self.model.name if self.model else 'no model'} on {self.runtime.name}.")
        return None
