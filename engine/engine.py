"""The Engine: holds the loaded model and its runtime, runs one job at a time."""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hardware as hardware_mod
from . import runtimes
from .errors import UserError
from .metadata import format_parameters
from .outputs import clean_partials, save_png
from .preview import latents_to_rgb
from .caches import LRU, result_key
from .models import LoadedModel, load_model, load_tiny_autoencoder
from .options import DEFAULTS, LABELS, RUNTIME_FIELDS, Optimizations, is_on
from .requests import (HiresFixRequest, Img2ImgRequest, TiledUpscaleRequest, Txt2ImgRequest, load_image,
                       parse_request)
from .runtimes.base import Runtime, WarmupResult, WarmupShape
from .tasks.common import ProgressFn, StopFlag
from .tasks.hires_fix import run_hires_fix
from .tasks.img2img import run_img2img
from .tasks.tiled_upscale import run_tiled_upscale
from .tasks.txt2img import run_txt2img
from .devices import PeakMemory
from .telemetry import Readout, StageTimer

log = logging.getLogger(__name__)
try:  # diffusers warns on every from_pipe / dtype move about things that do not apply here
    from diffusers.utils import logging as _diffusers_logging

    _diffusers_logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    parameters: dict[str, Any]  # the exact request that ran (snapped size, resolved seed)
    readout: Readout
    notices: list[str] = field(default_factory=list)
    extra_images: dict[str, list] = field(default_factory=dict)  # e.g. hires fix's base images
    saved_paths: list[str] = field(default_factory=list)


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


class Engine:
    """Generation backend; runs without any UI. Pass it around, don't make it global."""

    def __init__(self, hardware: hardware_mod.HardwareReport | None = None, runtime: str = "auto",
                 optimizations: Optimizations | None = None, models_dir: Path | None = None,
                 cache_dir: Path | None = None, outputs_dir: Path | None = None, preview_every: int = 2,
                 history_size: int = 20, taesd: str | None = None):
        self.hardware = hardware or hardware_mod.detect()
        self.optimizations = optimizations or Optimizations()  # what the user asked for
        self.models_dir = Path(models_dir) if models_dir else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.taesd = load_tiny_autoencoder(taesd, models_dir=self.models_dir) if taesd else None
        self.runtime_wish = runtime
        self.choice = runtimes.pick(self.hardware, runtime)
        self.runtime: Runtime = self.choice.cls(
            self.hardware, self.effective_options(self.optimizations, self.choice.cls)[0], self.cache_dir)
        self.result_cache = LRU(32)
        self.model: LoadedModel | None = None
        # One job (or load) on the device at a time; re-entrant so a runtime switch holds it across its reload.
        self._lock = threading.RLock()
        self._stop = StopFlag()
        self.outputs_dir = Path(outputs_dir) if outputs_dir else None  # None: do not save
        if self.outputs_dir is not None and self.outputs_dir.is_dir():
            clean_partials(self.outputs_dir)
        self.preview_every = preview_every  # steps between live previews; 0 = none
        self.live = LiveStatus()
        self._config_dir: str | Path | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)

    # ------------------------------------------------------------ options

    def option_reasons(self, runtime_cls=None) -> dict[str, str]:
        """Option -> why it cannot act here (runtime and hardware, or a missing TAESD model)."""
        reasons = dict((runtime_cls or type(self.runtime)).option_reasons(self.hardware))
        if self.taesd is None:
            reasons["tiny_vae"] = "needs a TAESD model: set --taesd PATH (a diffusers AutoencoderTiny folder)"
        return reasons

    def effective_options(self, wanted: Optimizations, runtime_cls=None) -> tuple[Optimizations, dict[str, str]]:
        """`wanted` minus what cannot act here (reset to its default), and {label: reason} for each one dropped."""
        reasons = self.option_reasons(runtime_cls)
        dropped = {name: why for name, why in reasons.items() if is_on(wanted, name)}
        effective = wanted.model_copy(update={name: getattr(DEFAULTS, name) for name in dropped})
        return effective, {LABELS[name]: why for name, why in dropped.items()}

    @property
    def not_applied(self) -> dict[str, str]:
        return self.effective_options(self.optimizations)[1]

    def set_optimizations(self, wanted: Optimizations) -> Optimizations:
        """Apply a new set of options; those the runtime owns re-prepare the model. Returns what took effect."""
        effective, _ = self.effective_options(wanted)
        current = self.runtime.optimizations
        if any(getattr(effective, f) != getattr(current, f) for f in RUNTIME_FIELDS):
            self.set_runtime(self.runtime_wish, wanted)
        else:
            with self._lock:
                self.optimizations = wanted
                if self.model is not None:
                    self.model.options = effective
        return effective

    # ------------------------------------------------------------ model and runtime

    def load(self, source: str, *, allow_any_path: bool = True, config_dir: str | Path | None = None) -> LoadedModel:
        """Load and prepare a model. On failure the previous model stays loaded."""
        with self._lock:
            model = load_model(source, models_dir=self.models_dir, allow_any_path=allow_any_path,
                               config_dir=config_dir, skeleton_for=self.runtime.cached_components)
            try:
                self.runtime.prepare(model)
            except UserError:
                raise
            except Exception as e:
                if self.runtime.name == "pytorch":
                    raise
                model = self._fall_back_to_pytorch(source, e, allow_any_path, config_dir)
            model.options = self.effective_options(self.optimizations)[0]
            model.taesd = self._checked_taesd(model)
            if model.taesd is not None:
                model.taesd.to(self.runtime.device)
            old, self.model = self.model, model
            self._config_dir = config_dir  # a runtime switch reloads the same way
            del old
            gc.collect()
            log.info("loaded %s (%s) in %.2f s", model.name, model.family, model.load_seconds)
            return model

    def _fall_back_to_pytorch(self, source: str, error: Exception, allow_any_path: bool, config_dir) -> LoadedModel:
        """A runtime that cannot prepare this model: PyTorch serves it instead, and the Engine tab says why."""
        from .runtimes.pytorch import PyTorchRuntime

        failed = self.runtime.name
        log.warning("%s could not prepare %s (%s); falling back to PyTorch", failed, source, error)
        reason = f"{failed} could not prepare {source} ({type(error).__name__}: {str(error)[:200]}); using PyTorch"
        self.runtime = PyTorchRuntime(self.hardware, self.effective_options(self.optimizations, PyTorchRuntime)[0],
                                      self.cache_dir)
        self.choice = runtimes.Choice("pytorch", reason, {**self.choice.skipped, failed: reason})
        model = load_model(source, models_dir=self.models_dir, allow_any_path=allow_any_path, config_dir=config_dir)
        self.runtime.prepare(model)
        return model

    def set_runtime(self, wish: str, optimizations: Optimizations | None = None) -> runtimes.Choice:
        """Switch runtime (and options); the loaded model is prepared again from its source."""
        choice = runtimes.pick(self.hardware, wish)
        opts = optimizations or self.optimizations
        runtime = choice.cls(self.hardware, self.effective_options(opts, choice.cls)[0], self.cache_dir)
        with self._lock:  # no job may run between the swap and the reload
            source = self.model.source.text if self.model else None
            previous = (self.choice, self.runtime, self.optimizations, self.runtime_wish)
            self.choice, self.runtime, self.optimizations, self.runtime_wish = choice, runtime, opts, wish
            if source:
                try:
                    self.load(source, config_dir=self._config_dir)
                except Exception:
                    # The old model is still loaded, prepared for the old runtime: keep them together.
                    self.choice, self.runtime, self.optimizations, self.runtime_wish = previous
                    raise
        return choice

    def _checked_taesd(self, model: LoadedModel):
        """The tiny autoencoder, where its latent channels match the model's VAE."""
        if self.taesd is None:
            return None
        if self.taesd.config.latent_channels != model.pipe.vae.config.latent_channels:
            log.warning("the tiny autoencoder has %s latent channels, the model %s: not used",
                        self.taesd.config.latent_channels, model.pipe.vae.config.latent_channels)
            return None
        return self.taesd

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
            "applied": list(getattr(self.runtime, "applied", [])),
            "not_applied": self.not_applied,
        }

    def warmup(self, sizes: list[tuple[int, int]], batch_size: int = 1) -> list[WarmupResult]:
        """Prepare (width, height) shapes ahead; sizes snap like requests do."""
        model = self.require_model()
        shapes = []
        for w, h in sizes:
            req, _ = Txt2ImgRequest(width=w, height=h, batch_size=batch_size).snapped(model.vae_scale_factor)
            shapes.append(WarmupShape(req.width, req.height, batch_size))
        with self._lock:
            return self.runtime.warmup(model, shapes)

    def _shape_cache(self, compiles_before: int) -> str:
        """'warm', 'compiled now (N s)', or 'eager' for runtimes that do not compile per shape."""
        if self.runtime.name == "pytorch":
            return "eager (no compile)"
        new = self.runtime.compile_events[compiles_before:]
        if not new:
            return "warm (cache hit)"
        return f"compiled now ({sum(e.seconds for e in new):.1f} s, {len(new)} graphs)"

    def stop(self) -> None:
        """Ask the running job to end after its current step."""
        self._stop.requested = True

    # ------------------------------------------------------------ tasks

    def _job(self, task: str, model: LoadedModel, request, notices: list[str], work,
             progress: ProgressFn | None, inputs_key: str = "") -> GenerationResult:
        """Run `work(timer, progress)` under the device lock with telemetry; build the result and readout.

        work returns (images, steps_run, steps_planned, details, extra_images). `inputs_key` names input
        images (their hash) for the result cache.
        """
        with self._lock:
            if model is not self.model:
                raise UserError("The model or runtime changed while this job waited; run it again.")
            options = model.options
            cache_key = None
            if options.result_cache:
                output_options = options.model_dump(exclude={"prompt_cache", "result_cache"})
                cache_key = result_key(model.identity or model.name, task, self.runtime.name, self.runtime.precision,
                                       {**request.model_dump(), "inputs": inputs_key}, output_options)
                hit = self.result_cache.get(cache_key)
                if hit is not None:
                    return self._cached_result(hit, notices)
            stop = self._stop = StopFlag(on_latents=self._on_latents if self.preview_every else None,
                                         early_stop_threshold=options.early_stop_threshold)
            self.live = LiveStatus(task=task, started=time.perf_counter(), running=True)
            timer = StageTimer()
            compiles_before = len(self.runtime.compile_events)
            prompt_hits = (model.prompt_cache.hits, model.prompt_cache.misses)
            deepcache = getattr(getattr(model.pipe, "unet", None), "deepcache", None)
            if deepcache is not None:
                deepcache.reset_counts()
            try:
                with PeakMemory(self.runtime.device) as rss:
                    images, steps_done, planned, details, extra = work(timer, self._live_progress(progress))
            except Exception as e:
                if not _is_out_of_memory(e):
                    raise
                self._free_memory()
                raise UserError(f"Out of memory during {task} at {getattr(request, 'width', None) or '?'}x"
                                f"{getattr(request, 'height', None) or '?'}: try a smaller size or batch, or the "
                                f"low-memory preset. What the job held has been freed.") from None
            finally:
                self.live.running = False
            total_s = timer.elapsed_s()
            shape_cache = self._shape_cache(compiles_before)
        stopped_by_user = stop.requested and steps_done < planned
        if stopped_by_user:
            notices.append(f"Stopped after {steps_done} of {planned} steps.")
        details = dict(details)
        early = stop.early_stop
        if early is not None:
            details["early_stop_step"] = early["step"]
            notices.append(f"Early stop at step {early['step']} of {early['of']}: the latents changed by "
                           f"{early['change']:.2%} in that step (threshold {options.early_stop_threshold:.2%}).")
        if options.prompt_cache:
            hits = model.prompt_cache.hits - prompt_hits[0]
            misses = model.prompt_cache.misses - prompt_hits[1]
            details["prompt_cache"] = "hit" if hits and not misses else ("miss" if misses and not hits
                                                                          else f"{hits} hits, {misses} misses")
        if deepcache is not None:
            details["unet_calls_full"] = deepcache.full_calls
            details["unet_calls_shallow"] = deepcache.shallow_calls
        if options.tiny_vae and model.taesd is not None:
            details["decoder"] = "tiny autoencoder (TAESD)"
        for label, why in self.not_applied.items():
            notices.append(f"Not applied here: {label} ({why}).")
        denoise_s = sum(s for name, s in timer.stages_s.items() if name.endswith("denoising"))
        readout = Readout(
            total_s=total_s,
            stages_s=dict(timer.stages_s),
            steps=steps_done,
            it_per_s=steps_done / denoise_s if denoise_s > 0 else 0.0,
            peak_rss_bytes=rss.peak_rss_bytes,
            peak_vram_allocated_bytes=rss.vram_allocated_bytes,
            peak_vram_reserved_bytes=rss.vram_reserved_bytes,
            runtime=self.runtime.name,
            precision=self.runtime.precision,
            device=self.runtime.device,
            model=model.name,
            width=images[0].width if images else 0,
            height=images[0].height if images else 0,
            batch_size=len(images),
            shape_cache=shape_cache,
            details=details,
            notices=list(notices),
        )
        parameters = {"task": task, "model": model.name, "runtime": self.runtime.name, **request.model_dump()}
        seeds = [request.seed + i for i in range(len(images))]
        result = GenerationResult(images=images, seeds=seeds, parameters=parameters, readout=readout,
                                  notices=notices, extra_images=extra)
        if self.outputs_dir is not None:
            start = time.perf_counter()
            for image, seed in zip(images, seeds):
                text = format_parameters({**parameters, "seed": seed, "width": image.width, "height": image.height})
                result.saved_paths.append(str(save_png(image, text, self.outputs_dir, seed)))
            readout.stages_s["save"] = time.perf_counter() - start
        self.history.appendleft({
            "time": time.strftime("%H:%M:%S"), "task": task, "size": f"{readout.width}x{readout.height}",
            "images": len(images), "steps": steps_done, "runtime": readout.runtime, "precision": readout.precision,
            "total_s": round(readout.total_s, 2), "it_per_s": round(readout.it_per_s, 2),
            "peak_ram_gib": round(readout.peak_rss_bytes / 2**30, 2), "shape": readout.shape_cache,
        })
        if cache_key is not None and images and not stopped_by_user:  # never cache a stopped job
            self.result_cache.put(cache_key, {"result": result, "images": [im.copy() for im in images],
                                              "time": time.strftime("%H:%M:%S")})
        return result

    def _cached_result(self, hit: dict, notices: list[str]) -> GenerationResult:
        """An identical earlier request: its saved images (or the kept copies), no UNet run."""
        from PIL import Image

        start = time.perf_counter()
        old: GenerationResult = hit["result"]
        images = []
        for i, kept in enumerate(hit["images"]):
            path = old.saved_paths[i] if i < len(old.saved_paths) else None
            if path and Path(path).is_file():
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            else:
                images.append(kept.copy())
        seconds = time.perf_counter() - start
        r = old.readout
        readout = Readout(
            total_s=seconds, stages_s={"result_cache": seconds}, steps=0, it_per_s=0.0,
            peak_rss_bytes=0, peak_vram_allocated_bytes=None, peak_vram_reserved_bytes=None,
            runtime=r.runtime, precision=r.precision, device=r.device, model=r.model, width=r.width, height=r.height,
            batch_size=r.batch_size, shape_cache="result cache hit (no UNet run)",
            details={**r.details, "cached_from": hit["time"]},
            notices=notices + [f"Cached result: the same request (model, parameters, seed) ran at {hit['time']}; "
                               f"returned without running the model."],
        )
        self.history.appendleft({
            "time": time.strftime("%H:%M:%S"), "task": old.parameters.get("task", ""),
            "size": f"{r.width}x{r.height}", "images": len(images), "steps": 0, "runtime": r.runtime,
            "precision": r.precision, "total_s": round(seconds, 3), "it_per_s": 0, "peak_ram_gib": 0,
            "shape": readout.shape_cache,
        })
        return GenerationResult(images=images, seeds=list(old.seeds), parameters=dict(old.parameters),
                                readout=readout, notices=readout.notices, extra_images=old.extra_images,
                                saved_paths=list(old.saved_paths))

    def _free_memory(self) -> None:
        gc.collect()
        if self.runtime.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _live_progress(self, progress: ProgressFn | None) -> ProgressFn:
        def report(step: int, total: int) -> None:
            self.live.step, self.live.total = step, total
            if progress is not None:
                progress(step, total)

        return report

    def _on_latents(self, step: int, total: int, latents) -> None:
        live = self.live
        if self.preview_every and (step % self.preview_every == 0 or step == total):
            model = self.model
            if model is not None and model.options.tiny_vae and model.taesd is not None:
                import torch

                from .tasks.common import tiny_decode

                with torch.no_grad():  # the tiny autoencoder makes a real preview for a few ms
                    live.preview = model.pipe.image_processor.postprocess(
                        tiny_decode(model.taesd, latents[:1]), output_type="pil")[0]
            else:
                live.preview = latents_to_rgb(latents, model.is_sdxl if model else False,
                                              scale=model.vae_scale_factor if model else 8)
            live.preview_step = step

    def _prepare(self, cls, request):
        if isinstance(request, dict):
            request = parse_request(cls, request)
        return self.require_model(), request

    def _check_memory(self, model: LoadedModel, width: int, height: int, batch: int) -> None:
        """Refuse before starting a job that clearly cannot fit in the memory that is free.

        Activations grow with pixels x batch x UNet width; about 5 KB per pixel for SD 1.5 at
        batch 1 with guidance (measured: 512x512 peaks ~1.3 GiB above the weights).
        """
        import psutil

        unet_config = getattr(model.pipe.unet, "config", None)
        width_factor = (unet_config.block_out_channels[0] / 320) if unet_config is not None else 1.0
        need = batch * width * height * 5000 * width_factor
        free = psutil.virtual_memory().available
        if need > free:
            raise UserError(f"{batch} image(s) at {width}x{height} need about {need / 2**30:.0f} GiB and "
                            f"{free / 2**30:.0f} GiB is free: lower the size or batch size (or use tiled upscale).")

    @staticmethod
    def _prompt_notices(model: LoadedModel, request) -> list[str]:
        """The text encoder reads 77 tokens; say so when a prompt is cut, rather than cut silently."""
        tokenizer = model.pipe.tokenizer
        notices = []
        for label, text in (("Prompt", request.prompt), ("Negative prompt", request.negative_prompt)):
            ids = tokenizer(text, truncation=False).input_ids if text else []
            limit = tokenizer.model_max_length
            if len(ids) > limit:
                kept = tokenizer.decode(ids[1:limit - 1])
                notices.append(f"{label} is {len(ids) - 2} tokens; the text encoder reads {limit - 2}, so only "
                               f"\"{kept}\" was used.")
        return notices

    def txt2img(self, request: Txt2ImgRequest | dict, progress: ProgressFn | None = None) -> GenerationResult:
        model, request = self._prepare(Txt2ImgRequest, request)
        request, notices = request.snapped(model.vae_scale_factor)
        request = request.with_seed()
        notices += self._prompt_notices(model, request)
        self._check_memory(model, request.width, request.height, request.batch_size)

        def work(timer, progress):
            images, done_total = [], 0
            total = request.steps * request.batch_count
            for k in range(request.batch_count):
                if self._stop.requested:
                    break
                one = request.model_copy(update={"seed": request.seed + k * request.batch_size})
                batch_images, done = run_txt2img(model, self.runtime, one, timer,
                                                 lambda i, n, o=done_total: progress(o + i, total), self._stop)
                images += batch_images
                done_total += done
            return images, done_total, total, ({"batches": request.batch_count} if request.batch_count > 1 else {}), {}

        return self._job("txt2img", model, request, notices, work, progress)

    def img2img(self, request: Img2ImgRequest | dict, image: Any,
                progress: ProgressFn | None = None) -> GenerationResult:
        model, request = self._prepare(Img2ImgRequest, request)
        init = load_image(image)
        request, notices = request.sized_for(init.size, model.vae_scale_factor)
        request = request.with_seed()
        notices += self._prompt_notices(model, request)
        self._check_memory(model, request.width, request.height, request.batch_size)

        def work(timer, progress):
            images, done, planned = run_img2img(model, self.runtime, request, init, timer, progress, self._stop)
            if planned == 0:
                notices.append("Strength 0: the input is returned (resized) and no denoising step ran.")
            else:
                notices.append(f"Ran {planned} of {request.steps} steps (steps x strength {request.strength:g}).")
            return images, done, planned, {"steps_planned": planned}, {}

        return self._job("img2img", model, request, notices, work, progress, inputs_key=_image_key(init))

    def hires_fix(self, request: HiresFixRequest | dict, progress: ProgressFn | None = None) -> GenerationResult:
        model, request = self._prepare(HiresFixRequest, request)
        request, notices = request.snapped(model.vae_scale_factor)
        request = request.with_seed()
        notices += self._prompt_notices(model, request)
        target = request.target_size(model.vae_scale_factor)
        self._check_memory(model, target[0], target[1], request.batch_size)

        def work(timer, progress):
            base, finals, done, planned = run_hires_fix(model, self.runtime, request, timer, progress, self._stop)
            notices.append(f"Base {request.width}x{request.height}, final {target[0]}x{target[1]} "
                           f"({request.upscaler}).")
            return finals, done, planned, {"base_size": f"{request.width}x{request.height}",
                                           "final_size": f"{target[0]}x{target[1]}"}, {"base": base}

        return self._job("hires_fix", model, request, notices, work, progress)

    def tiled_upscale(self, request: TiledUpscaleRequest | dict, image: Any,
                      progress: ProgressFn | None = None) -> GenerationResult:
        model, request = self._prepare(TiledUpscaleRequest, request)
        init = load_image(image)
        out_w, out_h, notices = request.output_size(init.size, model.vae_scale_factor)
        request = request.with_seed()
        notices += self._prompt_notices(model, request)

        def work(timer, progress):
            image_out, details = run_tiled_upscale(model, self.runtime, request, init, out_w, out_h, timer,
                                                   progress, self._stop)
            notices.append(f"{details['tiles']} tiles of {details['tile_size']} px, overlap {details['tile_overlap']}"
                           + (f", {details['seconds_per_tile']:.2f} s per tile" if details.get("seconds_per_tile")
                              else "") + ".")
            steps = details.get("steps_run", 0)
            return [image_out], steps, details.get("steps_planned", 0), details, {}

        return self._job("tiled_upscale", model, request, notices, work, progress, inputs_key=_image_key(init))


def _image_key(image) -> str:
    import hashlib

    return f"{image.size}:{hashlib.sha256(image.tobytes()).hexdigest()}"


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                            or "failed to allocate" in text)
