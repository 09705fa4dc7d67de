"""The denoise context: what a task's denoising loop reports to, and the small extensions that act on it.

Each per-step behaviour (progress, live preview, early stop, the user's Stop) is one extension with
`reset` (a new denoising pass starts) and `on_step` (a step ended; return True to end the pass), in
the manner of InvokeAI's denoise extensions, instead of flags on one shared object. The context
turns them into the one diffusers `callback_on_step_end` a pipeline takes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.system.telemetry import StageTimer

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (step done, total steps)


@dataclass
class Step:
    number: int  # 1-based, counted over the whole job (several passes add up)
    total: int  # steps the whole job plans
    local: int  # 1-based within this pass
    local_total: int
    latents: torch.Tensor | None


class Extension:
    tensor_inputs: tuple[str, ...] = ()  # pipeline tensors it reads or changes at a step end, beyond the latents

    def reset(self) -> None:
        """A new denoising pass begins."""

    def on_step(self, step: Step) -> bool:
        """A step ended; True ends this pass after it."""
        return False

    def adjust(self, pipe, step: Step, tensors: dict) -> None:
        """A step ended: change what the pipeline carries into the next one (`tensors`, in place)."""

    def details(self) -> dict:
        """What it did, for the job's readout."""
        return {}

    def notices(self) -> list[str]:
        """What the user should know of what it did, in a line each."""
        return []


class Progress(Extension):
    def __init__(self, report: ProgressFn):
        self.report = report

    def on_step(self, step: Step) -> bool:
        self.report(step.number, step.total)
        return False


class Preview(Extension):
    """Every `every` steps (and at the last), `show(step, total, latents)` makes a live preview.

    A preview is a convenience: one that fails is logged once and turns previews off for the rest of the
    job, which goes on; `failed` says why, for the readout."""

    def __init__(self, every: int, show: Callable[[int, int, torch.Tensor], None]):
        self.every, self.show = every, show
        self.failed: str | None = None

    def on_step(self, step: Step) -> bool:
        if self.failed is None and step.latents is not None and (step.number % self.every == 0
                                                                 or step.number == step.total):
            try:
                self.show(step.number, step.total, step.latents)
            except Exception as e:
                log.warning("live preview failed at step %d; the job goes on without previews", step.number,
                            exc_info=True)
                self.failed = f"{type(e).__name__}: {e}"
        return False

    def notices(self) -> list[str]:
        return [f"Live preview failed ({self.failed}); the job went on without previews."] if self.failed else []


class EarlyStop(Extension):
    """Ends a pass once the latents change by less than `threshold` (relative L2) in one step; only in
    the second half of a pass, since at high noise the picture is not formed yet. `stopped` says where."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.stopped: dict | None = None
        self._previous: torch.Tensor | None = None

    def reset(self) -> None:
        self._previous = None

    def on_step(self, step: Step) -> bool:
        if step.latents is None or not (step.local_total / 2 <= step.local < step.local_total):
            return False
        previous, self._previous = self._previous, step.latents.detach().float().clone()
        if previous is None or previous.shape != self._previous.shape:
            return False
        change = float((self._previous - previous).norm() / previous.norm().clamp_min(1e-8))
        if change < self.threshold:
            self.stopped = {"step": step.number, "of": step.total, "change": change}
            return True
        return False

    def details(self) -> dict:
        return {"early_stop_step": self.stopped["step"]} if self.stopped else {}

    def notices(self) -> list[str]:
        if not self.stopped:
            return []
        return [f"Early stop at step {self.stopped['step']} of {self.stopped['of']}: the latents changed by "
                f"{self.stopped['change']:.2%} in that step (threshold {self.threshold:.2%})."]


class CfgTruncation(Extension):
    """Guidance for the first `fraction` of a pass's steps, then none: the UNet runs once per step on the
    conditional half of the embeddings (batch 1 per image), as diffusers' SDCFGCutoffCallback does, but for
    any batch size. `guided` / `unguided` count the steps of the job."""

    # SD's and SDXL's conditioning, and an inpaint pipeline's mask inputs (stacked for guidance too)
    tensor_inputs = ("prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents")

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.guided = self.unguided = 0
        self._cut = False

    def reset(self) -> None:
        self._cut = False

    def cut_after(self, local_total: int) -> int:
        """Steps of a pass of `local_total` that keep guidance (at least one)."""
        return max(1, int(self.fraction * local_total + 0.5))

    def adjust(self, pipe, step: Step, tensors: dict) -> None:
        if self._cut:
            self.unguided += 1
            return
        if not pipe.do_classifier_free_guidance:  # no guidance asked for (guidance 1, or a guidance-embedded model)
            return
        self.guided += 1
        if step.local != self.cut_after(step.local_total) or step.local == step.local_total:
            return
        for name in self.tensor_inputs:
            if tensors.get(name) is not None:
                tensors[name] = tensors[name].chunk(2)[1]  # diffusers stacks [unconditional, conditional]
        pipe._guidance_scale = 0.0  # do_classifier_free_guidance is False from the next step on
        self._cut = True

    def details(self) -> dict:
        if not self.guided:
            return {}
        return {"guided_steps": f"{self.guided} (then {self.unguided} without guidance, UNet batch 1)"}


class StopRequest(Extension):
    """The user's Stop: set `requested` from any thread; the pass ends after the current step."""

    def __init__(self):
        self.requested = False

    def on_step(self, step: Step) -> bool:
        return self.requested


@dataclass
class DenoiseContext:
    """Handed to a task's run(): its stage timer, the job's extensions, and the steps counted so far."""

    timer: StageTimer = field(default_factory=StageTimer)
    extensions: list[Extension] = field(default_factory=list)
    stop: StopRequest = field(default_factory=StopRequest)
    steps_done: int = 0

    @property
    def stopped(self) -> bool:
        return self.stop.requested

    def find(self, kind: type[Extension]) -> Extension | None:
        return next((e for e in self.extensions if isinstance(e, kind)), None)

    def callback(self, local_total: int, total: int):
        """diffusers callback_on_step_end for one pass of `local_total` steps, within a job of `total`."""
        for extension in (*self.extensions, self.stop):
            extension.reset()
        offset = self.steps_done

        def on_step_end(pipe, step_index, timestep, callback_kwargs):
            # Heun, DPM2 and DPM++ SDE call back twice per step (2n-1 times): counted in sampler steps
            loop = getattr(pipe, "_num_timesteps", None) or local_total
            done = step_index + 1 if loop == local_total else math.ceil((step_index + 1) * local_total / loop)
            self.steps_done = offset + done
            step = Step(self.steps_done, total, done, local_total, callback_kwargs.get("latents"))
            end = [extension.on_step(step) for extension in (*self.extensions, self.stop)]
            if any(end):
                pipe._interrupt = True
            for extension in self.extensions:
                extension.adjust(pipe, step, callback_kwargs)
            return callback_kwargs

        return on_step_end

    def tensor_inputs(self, pipe) -> list[str]:
        """The pipeline tensors the extensions read or change at each step end."""
        allowed = getattr(pipe, "_callback_tensor_inputs", ())
        names = ["latents"]
        for extension in self.extensions:
            names += [n for n in extension.tensor_inputs if n in allowed and n not in names]
        return names
