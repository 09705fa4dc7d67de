"""Running one job on the device: the denoise context and its extensions, live status and previews, peak memory,
an out-of-memory turned into one line, then the result with its readout. What is kept of it is engine/jobs/
records.py's; who may run when is engine/jobs/queue.py's."""
from __future__ import annotations

import logging
import time

from engine.errors import UserError
from engine.jobs.preview import latents_to_rgb
from engine.jobs.results import GenerationResult, LiveStatus
from engine.options import is_on
from engine.store.metadata import OPTION_LABELS, format_parameters
from engine.system import devices
from engine.system.telemetry import Readout
from engine.tasks.base import Task, TaskOutput
from engine.tasks.common import decode_latents
from engine.tasks.context import CfgTruncation, DenoiseContext, EarlyStop, Preview, Progress, ProgressFn

log = logging.getLogger(__name__)


def picture_options(options) -> dict:
    """The options on that change the picture (not only its speed), for the saved parameters."""
    names = [n for n in OPTION_LABELS if is_on(options, n) and (options.deepcache or not n.startswith("deepcache"))]
    return {name: getattr(options, name) for name in names}


class JobRunner:
    def __init__(self, preview_every: int = 2):
        self.preview_every = preview_every  # steps between live previews; 0 = none
        self.live = LiveStatus()
        self._context: DenoiseContext | None = None

    def stop(self) -> None:
        """Ask the running job to end after its current step."""
        if self._context is not None:
            self._context.stop.requested = True

    def run(self, task: Task, runtime, not_applied: dict[str, str], progress: ProgressFn | None) -> GenerationResult:
        """Run `task` on `runtime`; the caller holds the device and has checked the model is still the loaded one."""
        model = task.model
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
        notices = task.notices + output.notices + self._notices(ctx, output, not_applied)
        readout = Readout.of_job(ctx.timer, output, memory, runtime, model.name, runtime.shape_state(mark),
                                 details, notices)
        result = self._result(task, runtime, output, readout)
        result.stopped = ctx.stopped and output.steps_run < output.steps_planned
        return result

    def _context_for(self, task: Task, progress: ProgressFn | None) -> DenoiseContext:
        def report(step: int, total: int) -> None:
            self.live.step, self.live.total = step, total
            if progress is not None:
                progress(step, total)

        options = task.model.options
        extensions = [Progress(report)]
        if self.preview_every:
            extensions.append(Preview(self.preview_every, lambda step, total, latents: self._preview(
                task.model, step, latents)))
        if options.early_stop_threshold > 0:
            extensions.append(EarlyStop(options.early_stop_threshold))
        if options.cfg_truncated:
            extensions.append(CfgTruncation(options.cfg_truncation))
        return DenoiseContext(extensions=extensions)

    def _preview(self, model, step: int, latents) -> None:
        if model.options.tiny_vae and model.taesd is not None:
            self.live.preview = decode_latents(model, latents[:1])[0]  # a real preview, for a few ms
        else:
            self.live.preview = latents_to_rgb(latents, model.is_sdxl, scale=model.vae_scale_factor)
        self.live.preview_step = step

    @staticmethod
    def _details(ctx: DenoiseContext, model, prompt_counts: tuple[int, int]) -> dict:
        details, options = {}, model.options
        for extension in ctx.extensions:
            details.update(extension.details())
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
    def _notices(ctx: DenoiseContext, output: TaskOutput, not_applied: dict[str, str]) -> list[str]:
        notices = [line for extension in ctx.extensions if not isinstance(extension, EarlyStop)
                   for line in extension.notices()]
        if ctx.stopped and output.steps_run < output.steps_planned:
            notices.append(f"Stopped after {output.steps_run} of {output.steps_planned} steps.")
        notices += [line for extension in ctx.extensions if isinstance(extension, EarlyStop)
                    for line in extension.notices()]
        return notices + [f"Not applied here: {label} ({why})." for label, why in not_applied.items()]

    @staticmethod
    def _result(task: Task, runtime, output: TaskOutput, readout: Readout) -> GenerationResult:
        model, request = task.model, task.request
        parameters = {"task": task.name, "model": model.name, "runtime": runtime.name, **request.model_dump(),
                      **picture_options(model.options)}
        seeds = [request.seed + i for i in range(len(output.images))]
        # "Size" is the first pass's, as A1111 writes it: the base image of a hires fix, else the image
        sized = output.extra_images.get("base") or output.images
        infotexts = [format_parameters({**parameters, "seed": seed, "width": first.width, "height": first.height})
                     for first, seed in zip(sized, seeds)]
        return GenerationResult(images=output.images, seeds=seeds, parameters=parameters, readout=readout,
                                notices=readout.notices, extra_images=output.extra_images, infotexts=infotexts)
