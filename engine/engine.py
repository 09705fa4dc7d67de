"""The Engine: a small facade over the loaded model, its runtime and the jobs.

load / set_runtime / set_optimizations change what is loaded (a failure leaves the old model serving);
run (and txt2img, img2img, inpaint, hires_fix, tiled_upscale) validates a task and runs it in its turn on the device;
temporarily(...) switches for one block and back. engine/replicas/front.py has the same interface with the jobs
run on Ray Serve replicas; callers (the UI, the API, Compare) use only these public methods.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from engine.errors import UserError
from engine.jobs.queue import DeviceQueue
from engine.jobs.records import Records
from engine.jobs.result_cache import DEFAULT_RESULTS_BYTES
from engine.jobs.results import GenerationResult, LiveStatus, QueuePlace
from engine.jobs.runner import JobRunner
from engine.loadout import Loadout
from engine.lora.tags import available as available_loras
from engine.models.loading import LoadedModel, ModelSource
from engine.models.sources import available_models, available_tiny_autoencoders, available_vaes, title_of
from engine.models.tiny_autoencoder import TinyAutoencoderSlot
from engine.options import Optimizations
from engine.runtimes import Choice
from engine.runtimes.base import WarmupResult
from engine.runtimes.warmup import warmup_shapes
from engine.system import devices
from engine.system import hardware as hardware_mod
from engine.tasks import HiresFix, Img2Img, Inpaint, Task, TiledUpscale, Txt2Img
from engine.tasks.context import ProgressFn
from engine.text.styles import STYLES_FILE, Styles

log = logging.getLogger(__name__)
try:  # diffusers warns on every from_pipe / dtype move about things that do not apply here
    from diffusers.utils import logging as _diffusers_logging

    _diffusers_logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass

__all__ = ["Engine", "GenerationResult"]


def _loaded(name: str, doc: str = ""):
    return property(lambda self: getattr(self.loadout, name), doc=doc)


class Engine:
    """Generation backend; runs without any UI. Pass it around, don't make it global."""

    waiting_text = "Waiting for the device (one job runs at a time)…"

    def __init__(self, hardware: hardware_mod.HardwareReport | None = None, runtime: str = "auto",
                 optimizations: Optimizations | None = None, models_dir: Path | None = None,
                 cache_dir: Path | None = None, outputs_dir: Path | None = None, preview_every: int = 2,
                 history_size: int = 20, taesd: str | None = None, styles_file: Path | None = STYLES_FILE,
                 result_cache_dir: Path | None = None, result_cache_bytes: int = DEFAULT_RESULTS_BYTES,
                 remote_hub: bool = False):
        self.hardware = hardware or hardware_mod.detect()
        self.models_dir = Path(models_dir) if models_dir else None
        self.loadout = Loadout(self.hardware, runtime, optimizations or Optimizations(), self.models_dir,
                               Path(cache_dir) if cache_dir else None, remote_hub, taesd)
        self.records = Records(outputs_dir, history_size, result_cache_dir, result_cache_bytes)
        self.queue = DeviceQueue(self.records.typical_s)
        self.runner = JobRunner(preview_every)
        self.styles = Styles(styles_file)

    model = _loaded("model", "the LoadedModel (None before the first load)")
    runtime = _loaded("runtime")
    choice = _loaded("choice", "why this runtime: runtimes.Choice")
    runtime_wish = _loaded("runtime_wish", "the runtime asked for ('auto', 'openvino', ...)")
    optimizations = _loaded("optimizations", "the options asked for (model.options: those in effect)")
    tiny = _loaded("tiny", "the tiny autoencoder slot")
    config_dir = _loaded("config_dir", "the configs folder the loaded model was given")
    remote_hub = _loaded("remote_hub", "may remote users name hub ids? the operator's choice")
    not_applied = _loaded("not_applied", "{option label: why it cannot act here} for the options asked for")
    embedding_names = _loaded("embedding_names", "the embeddings a prompt may name: () -> list[str]")
    embeddings = _loaded("embeddings", "the loaded ones as A1111's GET embeddings answers: (reasons=False) -> dict")
    history = property(lambda self: self.records.history, doc="the last jobs' readout rows, newest first")
    outputs_dir = property(lambda self: self.records.outputs_dir)
    preview_every = property(lambda s: s.runner.preview_every, lambda s, n: setattr(s.runner, "preview_every", n))

    # ------------------------------------------------------------ what is loaded, and switching it

    def option_reasons(self, runtime_cls=None, model: LoadedModel | None = None) -> dict[str, str]:
        """Option -> why it cannot act here (runtime and hardware, or the tiny autoencoder)."""
        return self.loadout.option_reasons(runtime_cls, model)

    def set_optimizations(self, wanted: Optimizations) -> Optimizations:
        """Apply a new set of options; those the runtime owns re-prepare the model. Returns what took effect."""
        with self.queue.hold():
            return self.loadout.set_optimizations(wanted)

    def load(self, source: str | ModelSource, *, allow_any_path: bool = True, config_dir: str | Path | None = None,
             vae: str | ModelSource | None = None) -> LoadedModel:
        """Load and prepare a model (with `vae` in place of its own VAE). On failure the previous model stays
        loaded, on its runtime. allow_any_path=False: what a remote user may name (models_dir's lists; hub ids
        only with remote_hub); a ModelSource (a model loaded before) is loaded again exactly."""
        with self.queue.hold():
            return self.loadout.load(source, allow_any_path, config_dir, vae)

    def set_tiny_autoencoder(self, text: str | None, *, allow_any_path: bool = True) -> str | None:
        """Use another tiny autoencoder (None or "": none); the loaded model keeps serving. Returns why the tiny
        autoencoder option cannot act with the loaded model, or None when it can."""
        slot = TinyAutoencoderSlot.of(text, self.models_dir, allow_any_path=allow_any_path,
                                      allow_hub=allow_any_path or self.loadout.remote_hub)
        with self.queue.hold():
            return self.loadout.set_tiny_autoencoder(slot)

    def set_runtime(self, wish: str, optimizations: Optimizations | None = None) -> Choice:
        """Switch runtime (and options); the loaded model is prepared again from its source. A failure
        leaves the old runtime and model serving."""
        with self.queue.hold():  # no job may run between the prepare and the swap
            return self.loadout.set_runtime(wish, optimizations)

    @contextmanager
    def temporarily(self, *, model: str | None = None, runtime: str | None = None,
                    options: Optimizations | None = None, save: bool = True, restore: bool = True) -> Iterator[list]:
        """Hold the device for a switch, the block and the switch back, so no other job runs on what the block
        switched to. `model` is a name a remote user may give (the loaded one's title: no switch). Yields a list
        that holds, after the block, a line for the user where switching back failed."""
        with self.queue.hold():
            was, notes = self.loadout.snapshot(), []
            try:
                if model is not None and model != self.model_title():
                    self.load(model, allow_any_path=False)
                if runtime is not None and runtime not in (self.runtime_wish, self.runtime.name):
                    self.set_runtime(runtime, options)
                elif options is not None:
                    self.set_optimizations(options)
                with nullcontext() if save else self.records.unsaved():
                    yield notes
            finally:
                if restore and (line := self.loadout.restore(was)):
                    notes.append(line)

    # ------------------------------------------------------------ what is there

    def model_names(self) -> list[str]:
        """What the model picker offers: the built-ins, then models under --models-dir."""
        return [name for name, _ in available_models(self.models_dir)]

    def model_title(self) -> str | None:
        """The loaded model as the lists name it (a path inside the models folder relative to it)."""
        return title_of(self.model.source, self.models_dir) if self.model else None

    def vae_names(self) -> list[str]:
        return available_vaes(self.models_dir)

    def tiny_autoencoder_names(self) -> list[str]:
        return available_tiny_autoencoders(self.models_dir)

    def lora_names(self) -> list[str]:
        """LoRAs a prompt may name (<models-dir>/lora, then the built-in ones)."""
        return available_loras(self.models_dir)

    def refresh_embeddings(self, reasons: bool = False) -> dict[str, dict]:
        """Read <models-dir>/embeddings again into the loaded model (A1111's POST /sdapi/v1/refresh-embeddings);
        waits for the running job. Returns `embeddings()`."""
        with self.queue.hold():
            self.loadout.refresh_embeddings(force=True)  # nothing without a model
            return self.embeddings(reasons)

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise UserError("No model is loaded yet; load one on the Engine tab or start with --model.")
        return self.model

    def status(self) -> dict[str, Any]:
        """What runs the jobs; `fixed` says why the model, runtime and options cannot change here (or None)."""
        return {**self.loadout.status(), "fixed": None}

    def warmup(self, sizes: list[tuple[int, int]], batch_size: int = 1, guidance: float = 7.0,
               tasks: tuple[str, ...] = ("txt2img",)) -> list[WarmupResult]:
        """Compile ahead what `tasks` run at these (width, height) sizes; guidance <= 1 runs the UNet at batch 1."""
        model = self.require_model()
        shapes = warmup_shapes(model, sizes, batch_size, guidance, tuple(tasks))
        with self.queue.hold():
            return self.runtime.warmup(model, shapes)

    # ------------------------------------------------------------ jobs

    def queue_place(self, thread: int) -> QueuePlace | None:
        """Where the job a thread waits to run stands, or None once it runs (or never waited)."""
        return self.queue.place(thread, self.runner.live)

    def job_count(self) -> int:
        """Jobs running or waiting for the device, A1111's state.job_count."""
        return self.queue.waiting() + (1 if self.live().running else 0)

    def live(self, thread: int | None = None) -> LiveStatus:
        """The running (or last) job's LiveStatus; one device runs one job, whichever thread asks."""
        return self.runner.live

    def memory_text(self, live: LiveStatus | None = None) -> str:
        """The memory line of what runs `live` (here: this machine's)."""
        return devices.live_memory(self.runtime.device).text()

    def memory(self) -> tuple[dict[str, int], dict[str, int] | None]:
        """RAM and (on CUDA) device memory, {free, used, total} in bytes, of the machine that runs the jobs."""
        return devices.machine_memory(self.runtime.device)

    def stop(self) -> None:
        """Ask the running job to end after its current step."""
        self.runner.stop()

    def limit_threads(self, threads: int) -> None:
        """Run on at most this many CPU threads (a replica's share of the cores)."""
        self.runtime.limit_threads(threads)

    def close(self) -> None:
        """Release what outlives the process's own memory (nothing, on one machine)."""

    def run(self, task_cls: type[Task], request, image: Any = None,
            progress: ProgressFn | None = None, *, expand_styles: bool = True) -> GenerationResult:
        """Validate, check memory, then run on the device in turn. `expand_styles` False: the prompt pair has its
        styles in already (a replica running what the front expanded)."""
        model = self.require_model()
        if expand_styles:
            request = self.styles.applied(task_cls.request_type, request)
        task = task_cls(model, request, image)
        if need := task.memory_need():
            unet = getattr(model.pipe.unet, "config", None)
            devices.check_job_fits(self.runtime.device, unet.block_out_channels[0] if unet else 320, *need)
        with self.queue.turn(task.name):
            task = self.loadout.current_task(task_cls, task, request, image)
            return self.records.through(task, self.runtime, lambda: self._run_task(task_cls, task, request, image,
                                                                                   progress))

    def _run_task(self, task_cls: type[Task], task: Task, request, image, progress) -> GenerationResult:
        """A runtime that compiles lazily and fails at its first job is replaced by eager PyTorch once, and the
        job runs again there."""
        try:
            result = self.runner.run(task, self.runtime, self.not_applied, progress)
        except Exception as e:
            if isinstance(e, UserError) or self.runtime.proven or not (self.runtime.compiles and self.runtime.fallible):
                raise
            self.loadout.fall_back_after(e, task.model)
            details, task = task.details, task_cls(self.model, request, image)
            task.details.update(details)
            result = self.runner.run(task, self.runtime, self.not_applied, progress)
            result.notices.insert(0, f"{self.choice.reason}.")
        self.runtime.proven = True
        return result

    def txt2img(self, request, progress: ProgressFn | None = None) -> GenerationResult:
        return self.run(Txt2Img, request, None, progress)

    def img2img(self, request, image: Any, progress: ProgressFn | None = None) -> GenerationResult:
        return self.run(Img2Img, request, image, progress)

    def inpaint(self, request, image: Any, mask: Any = None, progress: ProgressFn | None = None) -> GenerationResult:
        """`image` with `mask` (white: repaint); or an InpaintInput / {"image", "mask"} as `image`."""
        return self.run(Inpaint, request, image if mask is None else (image, mask), progress)

    def hires_fix(self, request, progress: ProgressFn | None = None) -> GenerationResult:
        return self.run(HiresFix, request, None, progress)

    def tiled_upscale(self, request, image: Any, progress: ProgressFn | None = None) -> GenerationResult:
        return self.run(TiledUpscale, request, image, progress)
