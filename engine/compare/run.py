"""Compare: one txt2img request run once per column, each column changing one thing (a preset, the runtime, the
step count or the sampler); a grid PNG with each column's time, peak memory and PSNR against the first image.

Every column shares the prompt, size and seed (seed -1 is resolved once) at batch size 1. The engine's runtime
and options are put back afterwards: a comparison must not change the user's setup. The device lock is held
throughout, so no other job runs with a column's settings. Each column first runs one untimed, unsaved step
(its setup time, with the option or runtime switch): that compiles its shapes, fuses its LoRAs and encodes its
prompt, so the timed run is what a user gets from then on, and the first column pays no more than the others.
The result cache is off, so every column runs the model.

    comparison = engine.compare({"prompt": "a red circle", "width": 128, "height": 128, "seed": 7},
                                "steps", [5, 10, 20, 30])
    comparison.grid, comparison.saved_path, [c.psnr_text for c in comparison.columns]
"""
from __future__ import annotations

import logging
import math
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from engine import runtimes
from engine.errors import UserError
from engine.lora.core import with_tag, without_tags
from engine.models.samplers import canonical_sampler
from engine.options import PRESETS_DIR, Optimizations, Preset, load_preset, preset_loras
from engine.requests import MAX_STEPS, Txt2ImgRequest, parse_request
from engine.store.metadata import format_parameters, format_value
from engine.store.outputs import save_png
from engine.system.devices import GIB

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.jobs.runner import GenerationResult

log = logging.getLogger(__name__)

AXES = ("preset", "runtime", "steps", "sampler")
MAX_COLUMNS = 4
MIN_CELL = 256  # px: smaller images are enlarged (nearest, pixels kept) so the text under them fits


@dataclass
class CompareProgress:
    """What a comparison is doing now, for a progress line."""

    column: int  # 1-based
    columns: int
    label: str  # "steps: 20"
    phase: str  # preparing / warming up / running / restoring
    step: int = 0
    total: int = 0


@dataclass
class CompareColumn:
    label: str
    value: Any
    request: Txt2ImgRequest | None = None  # what this column asked for (None: it never got that far)
    result: GenerationResult | None = None
    error: str | None = None  # one line, where the column failed or did not run
    setup_s: float = 0.0  # switching options or runtime, and the warm-up step: not part of total_s
    psnr: float | None = None  # dB against the reference column; inf: identical
    reference: bool = False
    notices: list[str] = field(default_factory=list)

    @property
    def image(self):
        return self.result.images[0] if self.result and self.result.images else None

    @property
    def total_s(self) -> float | None:
        return self.result.readout.total_s if self.result else None

    @property
    def stopped(self) -> bool:
        """Ended early by Stop (an early stop on the latents is the option working, not a stop)."""
        r = self.result
        return bool(r and self.request and r.readout.steps < self.request.steps
                    and "early_stop_step" not in r.readout.details)

    @property
    def psnr_text(self) -> str:
        if self.reference:
            return "reference"
        if self.psnr is None:
            return "n/a"
        return "identical" if math.isinf(self.psnr) else f"{self.psnr:.2f} dB"

    def summary(self) -> dict[str, Any]:
        """JSON-safe figures (no inf) for the UI and the API."""
        r = self.result.readout if self.result else None
        vram = r.peak_vram_allocated_bytes if r else None
        return {
            "label": self.label, "value": self.value, "error": self.error,
            "total_s": round(r.total_s, 3) if r else None, "setup_s": round(self.setup_s, 3),
            "peak_ram_gib": round(r.peak_rss_bytes / GIB, 3) if r else None,
            "peak_vram_gib": round(vram / GIB, 3) if vram is not None else None,
            "psnr": self.psnr_text, "psnr_db": None if self.psnr is None or math.isinf(self.psnr) else round(self.psnr, 2),
            "runtime": r.runtime if r else None, "precision": r.precision if r else None,
            "steps": r.steps if r else None, "shape": r.shape_cache if r else None,
            "sampler": self.request.sampler if self.request else None,
            "guidance": self.request.guidance if self.request else None,
            "prompt": self.request.prompt if self.request else None,
            "notices": self.notices, "saved": self.result.saved_paths if self.result else [],
        }


@dataclass
class Comparison:
    axis: str
    request: Txt2ImgRequest  # the base request, seed resolved
    columns: list[CompareColumn]
    grid: Any  # PIL image
    parameters_text: str  # what the saved PNG carries (A1111 style; engine.metadata.parse_parameters reads it)
    saved_path: str | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> dict[str, Any]:
        return {"task": "compare", "axis": self.axis, **self.request.model_dump(),
                "columns": [c.summary() for c in self.columns], "saved": self.saved_path, "notices": self.notices}


# ---------------------------------------------------------------- values


def available_runtimes(hardware) -> list[str]:
    """Runtime choices that can run on this machine ('auto' first)."""
    return [name for name in runtimes.CHOICES
            if name == "auto" or runtimes.unavailable_reason(name, hardware) is None]


def parse_values(axis: str, values: Sequence[Any], hardware=None, presets_dir: Path = PRESETS_DIR) -> list[Any]:
    """The column values, checked before anything runs; blanks are no column. One UserError line for a bad one."""
    if axis not in AXES:
        raise UserError(f"Unknown comparison axis {axis!r}; choose one of: {', '.join(AXES)}.")
    given = [v.strip() if isinstance(v, str) else v for v in values or ()]
    given = [v for v in given if v not in (None, "")]
    if not given:
        raise UserError("Give at least one value to compare.")
    if len(given) > MAX_COLUMNS:
        raise UserError(f"{len(given)} values; a comparison has at most {MAX_COLUMNS} columns.")
    out = []
    for v in given:
        if axis == "steps":
            try:
                steps = int(v) if not isinstance(v, float) or v.is_integer() else None
            except (TypeError, ValueError):
                steps = None
            if steps is None:
                raise UserError(f"Steps value {v!r} is not a whole number.")
            if not 1 <= steps <= MAX_STEPS:
                raise UserError(f"Steps value {steps} must be between 1 and {MAX_STEPS}.")
            out.append(steps)
        elif axis == "sampler":
            out.append(canonical_sampler(str(v)))
        elif axis == "preset":
            out.append(load_preset(str(v), presets_dir).name)  # unknown or broken: its own message
        else:
            name = str(v).lower()
            runtimes.pick(hardware, name)  # RuntimeUnavailable (a UserError) says why not here
            out.append(name)
    return out


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two same-size 8-bit RGB images, in dB; inf where they are identical."""
    import numpy as np

    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"sizes differ: {a.size} and {b.size}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---------------------------------------------------------------- running


def compare(engine: Engine, request: dict[str, Any] | Txt2ImgRequest, axis: str, values: Sequence[Any], *,
            presets_dir: Path = PRESETS_DIR, warm_up: bool = True,
            progress: Callable[[CompareProgress], None] | None = None,
            stop: threading.Event | None = None) -> Comparison:
    """Run `request` once per value of `axis` (at most four), then build and save the grid.

    A column that fails shows its message and the others still run. Setting `stop` (or engine.stop()) ends the
    running column after its step and skips the rest. The runtime and options are restored in any case."""
    engine.require_model()
    data = request.model_dump() if isinstance(request, Txt2ImgRequest) else dict(request or {})
    base = parse_request(Txt2ImgRequest, {**data, "batch_size": 1, "batch_count": 1}).with_seed()
    base = base.snapped(engine.model.vae_scale_factor)[0]  # as the task will, so the saved text says what ran
    parsed = parse_values(axis, values, engine.hardware, presets_dir)
    columns = [CompareColumn(f"{axis}: {v}", v) for v in parsed]
    stop = stop or threading.Event()
    notices = []
    with engine.jobs.lock:  # re-entrant: the engine's own calls below take it again
        saved = (engine.runtime, engine.runtime_wish, engine.optimizations)
        if saved[2].result_cache:
            notices.append("The result cache was off during the comparison, so every column ran the model.")
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
            restored = _restore(engine, *saved)
            if restored:
                notices.append(restored)
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
    return base.model_copy(update={axis: value})


def _warm_run(engine: Engine, request: Txt2ImgRequest, progress) -> None:
    """The column's job at one step, not saved (it stays in the history: it ran)."""
    jobs = engine.jobs
    outputs, jobs.outputs_dir = jobs.outputs_dir, None  # the caller holds the lock: no other job saves meanwhile
    try:
        engine.txt2img(request.model_copy(update={"steps": 1}), progress=progress)
    finally:
        jobs.outputs_dir = outputs


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


def _restore(engine: Engine, runtime, wish: str, options: Optimizations) -> str | None:
    """Put the runtime and options back; a line for the user where that failed."""
    try:
        if engine.runtime is not runtime:
            engine.set_runtime(wish, options)
        elif engine.optimizations != options:
            engine.set_optimizations(options)
    except Exception as e:
        log.warning("could not restore the runtime after a comparison", exc_info=e)
        return (f"Could not go back to the {wish} runtime after the comparison ({e}); "
                f"now on {engine.runtime.name}.")
    return None


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


# ---------------------------------------------------------------- saving and drawing


def column_line(column: CompareColumn) -> str:
    """One column for the PNG text: its value and figures, ';' separated."""
    if column.result is None:
        return f"{column.value}; {column.error or 'not run'}"
    s = column.summary()
    vram = f"; VRAM {s['peak_vram_gib']:.2f} GiB" if s["peak_vram_gib"] is not None else ""
    return (f"{column.value}; {s['total_s']:.3f} s; setup {s['setup_s']:.2f} s; RAM {s['peak_ram_gib']:.2f} GiB{vram}; "
            f"PSNR {s['psnr']}; {s['runtime']} {s['precision']}; {s['steps']} steps; {s['sampler']}; "
            f"CFG {s['guidance']:g}")


def parameters_text(engine: Engine, base: Txt2ImgRequest, axis: str, columns: list[CompareColumn]) -> str:
    """The base request as A1111 "parameters" text, with the axis and one `Column N` pair per column."""
    text = format_parameters({"task": "compare", "model": engine.model.name, "runtime": engine.runtime.name,
                              **base.model_dump()})
    pairs = [f"Compare: {format_value(axis)}"]
    pairs += [f"Column {i}: {format_value(column_line(c))}" for i, c in enumerate(columns, 1)]
    return text + ", " + ", ".join(pairs)


def _cell_lines(column: CompareColumn) -> list[str]:
    if column.result is None:
        return []
    s = column.summary()
    memory = f"peak RAM {s['peak_ram_gib']:.2f} GiB"
    if s["peak_vram_gib"] is not None:
        memory += f", VRAM {s['peak_vram_gib']:.2f} GiB"
    steps = (f"stopped: {s['steps']} of {column.request.steps} steps" if column.stopped
             else f"{s['steps']} steps, {s['sampler']}")
    return [f"{s['total_s']:.2f} s end to end", memory, f"PSNR: {s['psnr']}", f"{s['runtime']}, {s['precision']}",
            steps]


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; the last line cut with an ellipsis."""
    chars = max(8, int(width / max(1.0, draw.textlength("n", font=font))))
    lines = textwrap.wrap(text, chars) or [""]
    while chars > 8 and any(draw.textlength(line, font=font) > width for line in lines):
        chars -= 2
        lines = textwrap.wrap(text, chars)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(0, len(lines[-1]) - 1)] + "…"
    return lines


def draw_grid(base: Txt2ImgRequest, axis: str, columns: list[CompareColumn], model_name: str):
    """The images side by side: a caption, a header per column and the figures under each image."""
    from PIL import Image, ImageDraw, ImageFont

    sizes = [c.image.size for c in columns if c.image is not None] or [(base.width, base.height)]
    w, h = max(s[0] for s in sizes), max(s[1] for s in sizes)
    scale = max(1, math.ceil(MIN_CELL / w))
    cell_w, cell_h = w * scale, h * scale
    pad = max(8, cell_w // 24)
    head_size, text_size = max(16, cell_w // 14), max(13, cell_w // 19)
    head_font, text_font = ImageFont.load_default(size=head_size), ImageFont.load_default(size=text_size)
    head_h, line_h = int(head_size * 1.5), int(text_size * 1.35)
    width = pad + len(columns) * (cell_w + pad)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption = _wrap(scratch, f"{base.prompt or '(no prompt)'}  ·  seed {base.seed}, {w}x{h}, "
                             f"{model_name}, compared by {axis}", text_font, width - 2 * pad, 2)
    caption_h = len(caption) * line_h + pad
    text_lines = max([len(_cell_lines(c)) for c in columns] + [5])
    height = pad + caption_h + head_h + cell_h + pad + text_lines * line_h + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(caption):
        draw.text((pad, pad + k * line_h), line, fill=(60, 60, 60), font=text_font)
    top = pad + caption_h
    for i, column in enumerate(columns):
        x = pad + i * (cell_w + pad)
        label = _wrap(draw, column.label, head_font, cell_w, 1)[0]
        draw.text((x, top), label, fill="black", font=head_font)
        image_top = top + head_h
        if column.image is not None:
            image = column.image.convert("RGB")
            if scale > 1:
                image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            grid.paste(image, (x, image_top))
            for k, line in enumerate(_cell_lines(column)):
                draw.text((x, image_top + cell_h + pad + k * line_h), line, fill=(20, 20, 20), font=text_font)
        else:
            draw.rectangle([x, image_top, x + cell_w - 1, image_top + cell_h - 1], fill=(238, 238, 238),
                           outline=(200, 200, 200))
            message = _wrap(draw, column.error or "not run", text_font, cell_w - 2 * pad, max(1, cell_h // line_h - 1))
            for k, line in enumerate(message):
                draw.text((x + pad, image_top + pad + k * line_h), line, fill=(160, 30, 30), font=text_font)
    return grid
