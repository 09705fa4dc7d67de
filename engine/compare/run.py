"""Compare: one txt2img request run once per column, each column changing one thing (a preset, the runtime, the
step count or the sampler); a grid PNG with each column's time, peak memory and PSNR against the first image.

Every column shares the prompt, size and seed (seed -1 is resolved once) at batch size 1. The engine's runtime
and options are put back afterwards (`engine.temporarily()`): a comparison must not change the user's setup, and
the device is held throughout, so no other job runs with a column's settings. Each column first runs one untimed, unsaved step
(its setup time, with the option or runtime switch): that compiles its shapes, fuses its LoRAs and encodes its
prompt, so the timed run is what a user gets from then on, and the first column pays no more than the others.
The result cache is off, so every column runs the model.

    comparison = compare(engine, {"prompt": "a red circle", "width": 128, "height": 128, "seed": 7},
                         "steps", [5, 10, 20, 30])
    comparison.grid, comparison.saved_path, [c.psnr_text for c in comparison.columns]
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from engine.compare.columns import CompareColumn, CompareProgress, Comparison, parse_values, psnr
from engine.compare.grid import draw_grid, parameters_text
from engine.errors import UserError
from engine.lora.tags import with_tag, without_tags
from engine.options import PRESETS_DIR, Optimizations, Preset, load_preset, preset_loras
from engine.requests import Txt2ImgRequest, parse_request
from engine.samplers import parse_sampler
from engine.store.outputs import save_png

if TYPE_CHECKING:
    from engine.engine import Engine


log = logging.getLogger(__name__)


def compare(engine: Engine, request: dict[str, Any] | Txt2ImgRequest, axis: str, values: Sequence[Any], *,
            presets_dir: Path = PRESETS_DIR, warm_up: bool = True,
            progress: Callable[[CompareProgress], None] | None = None,
            stop: threading.Event | None = None) -> Comparison:
    """Run `request` once per value of `axis` (at most four), then build and save the grid.

    A column that fails shows its message and the others still run. Setting `stop` (or engine.stop()) ends the
    running column after its step and skips the rest. The runtime and options are restored in any case."""
    engine.require_model()
    if fixed := engine.status()["fixed"]:
        raise UserError(f"Compare is not available here: {fixed}")
    data = request.model_dump() if isinstance(request, Txt2ImgRequest) else dict(request or {})
    base = parse_request(Txt2ImgRequest, {**data, "batch_size": 1, "batch_count": 1}).with_seed()
    base = base.snapped(engine.model.vae_scale_factor)[0]  # as the task will, so the saved text says what ran
    parsed = parse_values(axis, values, engine.hardware, presets_dir)
    columns = [CompareColumn(f"{axis}: {v}", v) for v in parsed]
    stop = stop or threading.Event()
    notices = []
    if engine.optimizations.result_cache:
        notices.append("The result cache was off during the comparison, so every column ran the model.")
    with engine.temporarily() as restored:  # the device held throughout; the runtime and options put back after
        try:
            for i, column in enumerate(columns, 1):
                if stop.is_set():
                    column.error = "Not run: stopped."
                    continue
                _run_column(engine, base, axis, column, i, len(columns), presets_dir, warm_up, progress, stop)
                if column.stopped:
                    stop.set()
        finally:
            if progress:
                progress(CompareProgress(len(columns), len(columns), "", "restoring"))
    notices += restored
    _psnr(columns)
    text = parameters_text(engine, base, axis, columns)
    grid = draw_grid(base, axis, columns, engine.model.name)
    saved_path = None
    if engine.outputs_dir is not None:
        try:
            saved_path = str(save_png(grid, text, engine.outputs_dir, base.seed))
        except OSError as e:
            notices.append(f"The grid could not be saved: {e}.")
    return Comparison(axis, base, columns, grid, text, saved_path, notices)


def _run_column(engine: Engine, base: Txt2ImgRequest, axis: str, column: CompareColumn, index: int, count: int,
                presets_dir: Path, warm_up: bool, progress, stop: threading.Event) -> None:
    def report(phase: str, step: int = 0, total: int = 0) -> None:
        if progress:
            progress(CompareProgress(index, count, column.label, phase, step, total))

    def on_step(step: int, total: int, phase: str = "running") -> None:
        if stop.is_set():
            engine.stop()
        report(phase, step, total)

    try:
        report("preparing")
        start = time.perf_counter()
        column.request = _prepare(engine, base, axis, column, presets_dir)
        if warm_up:
            report("warming up")
            _warm_run(engine, column.request, lambda step, total: on_step(step, total, "warming up"))
        column.setup_s = time.perf_counter() - start
        if stop.is_set():
            column.error = "Not run: stopped."
            return
        column.result = engine.txt2img(column.request, progress=on_step)
        column.notices += [n for n in column.result.notices if n not in column.notices]
    except Exception as e:  # one column's failure is shown in its place; the others still run
        if not isinstance(e, UserError):
            log.exception("compare column %s failed", column.label)
        column.error = " ".join((str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}").split())


def _prepare(engine: Engine, base: Txt2ImgRequest, axis: str, column: CompareColumn,
             presets_dir: Path) -> Txt2ImgRequest:
    """Set the engine up for this column (options, runtime); the request it runs."""
    value, wanted = column.value, _uncached(engine.optimizations)
    if axis == "preset":
        preset: Preset = load_preset(value, presets_dir)
        engine.set_optimizations(_uncached(preset.optimizations))
        return _preset_request(engine, base, preset, presets_dir, column)
    if axis == "runtime":
        if value != engine.runtime_wish:
            engine.set_runtime(value, wanted)
        else:
            engine.set_optimizations(wanted)
        return base
    engine.set_optimizations(wanted)
    if axis == "sampler":  # 'DPM++ 2M Karras' is the pair; a bare name runs with its own schedule (Automatic)
        sampler, schedule = parse_sampler(value)
        return base.model_copy(update={"sampler": sampler, "schedule": schedule})
    return base.model_copy(update={axis: value})


def _warm_run(engine: Engine, request: Txt2ImgRequest, progress) -> None:
    """The column's job at one step, not saved (it stays in the history: it ran)."""
    with engine.temporarily(save=False, restore=False):
        engine.txt2img(request.model_copy(update={"steps": 1}), progress=progress)


def _uncached(options: Optimizations) -> Optimizations:
    return options.model_copy(update={"result_cache": False})


def _preset_request(engine: Engine, base: Txt2ImgRequest, preset: Preset, presets_dir: Path,
                    column: CompareColumn) -> Txt2ImgRequest:
    """The request with the preset's defaults, and its LoRA for this model, as picking it on the Optimizations
    tab would set the txt2img controls."""
    model_name = engine.model.name if engine.model else None
    lora_name, advice = preset.lora.advice(model_name)
    prompt = without_tags(base.prompt, preset_loras(presets_dir, model_name) - {lora_name})
    if lora_name:
        prompt = with_tag(prompt, lora_name, 1.0)
    elif advice:
        column.notices.append(advice.replace("**", ""))
    update = {k: v for k, v in preset.defaults.model_dump().items() if v is not None}
    return parse_request(Txt2ImgRequest, {**base.model_dump(), **update, "prompt": prompt})


def _psnr(columns: list[CompareColumn]) -> None:
    """Against the first column that has an image."""
    with_image = [c for c in columns if c.image is not None]
    if not with_image:
        return
    reference = with_image[0]
    reference.reference = True
    for c in with_image[1:]:
        try:
            c.psnr = psnr(reference.image, c.image)
        except ValueError:
            c.psnr = None
