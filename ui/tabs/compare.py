"""Compare tab: one prompt and seed, up to four columns that differ in a preset, the runtime, the step count or the
sampler; the grid with each column's time, peak memory and PSNR against the first (engine/compare.py)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr

from engine import Engine
from engine.compare.columns import AXES, MAX_COLUMNS, CompareProgress, Comparison, available_runtimes
from engine.compare.run import compare as compare_columns
from engine.options import preset_names
from engine.samplers import SAMPLER_NAMES
from ui.components import api_order, common_controls, common_request, prompt_boxes, size_sliders
from ui.formatting import history_rows, live_markdown
from ui.running import POLL_S, run_in_thread, user_facing

STEP_CHOICES = ["1", "2", "4", "5", "8", "10", "15", "20", "25", "30", "40", "50"]
NO_COLUMN = ("(no column)", "")


def axis_choices(engine: Engine, axis: str, presets_dir: Path) -> tuple[list[str], list[str]]:
    """(the choices of a value field, the four values it starts with) for an axis."""
    if axis == "steps":
        return STEP_CHOICES, ["5", "10", "20", "30"]
    if axis == "sampler":
        return list(SAMPLER_NAMES), ["Euler", "Euler a", "DPM++ 2M Karras", "UniPC"]
    if axis == "preset":
        names = preset_names(presets_dir)
        return names, names[:MAX_COLUMNS]
    names = available_runtimes(engine.hardware)
    return names, [n for n in names if n != "auto"][:MAX_COLUMNS]


def value_updates(engine: Engine, axis: str, presets_dir: Path) -> list:
    choices, start = axis_choices(engine, axis, presets_dir)
    start = start + [""] * (MAX_COLUMNS - len(start))
    return [gr.update(choices=[*choices, NO_COLUMN], value=v) for v in start]


def result_markdown(comparison: Comparison) -> str:
    columns = comparison.columns
    vram = any(c.summary()["peak_vram_gib"] is not None for c in columns)
    head = ["column", "time (end to end)", "setup", "peak RAM", *(["peak VRAM"] if vram else []), "PSNR vs first",
            "runtime", "steps", "shape"]
    rows = []
    for c in columns:
        s = c.summary()
        if c.result is None:
            rows.append([c.label, f"**{c.error or 'not run'}**", *[""] * (len(head) - 2)])
            continue
        rows.append([c.label, f"**{s['total_s']:.2f} s**", f"{s['setup_s']:.2f} s", f"{s['peak_ram_gib']:.2f} GiB",
                     *([f"{s['peak_vram_gib']:.2f} GiB" if s["peak_vram_gib"] is not None else "n/a"] if vram else []),
                     s["psnr"], f"{s['runtime']} ({s['precision']})", f"{s['steps']}, {s['sampler']}", s["shape"]])
    text = "\n".join("| " + " | ".join(str(v).replace("|", "/") for v in row) + " |"
                     for row in [head, ["---"] * len(head), *rows])
    ran = [c for c in columns if c.result is not None]
    common = [n for n in ran[0].notices if all(n in c.notices for c in ran)] if ran else []
    notes = [*comparison.notices, *common]
    notes += [f"{c.label}: {n}" for c in ran for n in c.notices if n not in common]
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    if comparison.saved_path:
        text += f"\n\nSaved: `{comparison.saved_path}`"
    return text


def progress_text(p: CompareProgress) -> str:
    where = f"Column {p.column} of {p.columns} ({p.label})" if p.phase != "restoring" else "Comparison"
    what = f"step {p.step}/{p.total}" if p.phase == "running" and p.total else p.phase
    return f"{where}, {what}"


def build(engine: Engine, d: dict[str, Any], history: gr.Dataframe, presets_dir: Path) -> None:
    gr.Markdown("One prompt and seed, run once per column; each column changes one thing. Under each image: the "
                "time from request to saved image, peak memory and PSNR against the first image (higher: closer). "
                "Your runtime and options are put back afterwards.")
    with gr.Row():
        with gr.Column(scale=3):
            prompts = prompt_boxes(engine, d)
            size = size_sliders(d)
            common = common_controls(d, batch_size=False)
        with gr.Column(scale=2):
            axis = gr.Dropdown(list(AXES), value="steps", label="Compare by",
                               info="the other settings come from the controls on the left")
            choices, start = axis_choices(engine, "steps", presets_dir)
            values = []
            for row in range(MAX_COLUMNS // 2):
                with gr.Row():
                    values += [gr.Dropdown([*choices, NO_COLUMN], value=start[2 * row + k], allow_custom_value=True,
                                           label=f"Column {2 * row + k + 1}", elem_id=f"compare-value-{2 * row + k + 1}")
                               for k in range(2)]
            warm_up = gr.Checkbox(True, label="Warm up each column first",
                                  info="one untimed step first (compiles, LoRAs, prompt): its time is the setup")
            with gr.Row():
                go = gr.Button("Compare", variant="primary", scale=3)
                stop = gr.Button("Stop", variant="stop", scale=1)
    # No label: it would sit over the grid's own caption.
    grid = gr.Image(label="Comparison", show_label=False, type="pil", format="png", interactive=False,
                    elem_id="compare-grid")
    table = gr.Markdown("The figures appear here after a comparison.", elem_id="compare-table")
    with gr.Accordion("Parameters used", open=False):
        params = gr.JSON(label="Parameters")

    axis.change(lambda a: value_updates(engine, a, presets_dir), inputs=[axis], outputs=values, api_name=False,
                queue=False)
    running: dict[str, threading.Event | None] = {"stop": None}

    # Named positional parameters: the API's parameter names, and Gradio only hooks up a Progress after them.
    def compare(prompt, negative_prompt, width, height, steps, guidance, sampler, seed, axis, value_1,
                value_2, value_3, value_4, warm_up, styles=None, schedule=None, progress=gr.Progress()):
        request = {"width": width, "height": height,
                   **common_request(prompt, negative_prompt, steps, guidance, sampler, seed, 1, styles, schedule)}
        stop_event, state = threading.Event(), {}
        running["stop"] = stop_event
        thread, box = run_in_thread(lambda: compare_columns(
            engine, request, axis, [value_1, value_2, value_3, value_4], presets_dir=presets_dir, warm_up=bool(warm_up),
            progress=lambda p: state.update(now=p), stop=stop_event))
        progress(0, desc="Waiting for the device")
        last_preview = -1
        try:
            while thread.is_alive():
                thread.join(POLL_S)
                now, live = state.get("now"), engine.live(thread.ident)
                if now is None:
                    continue
                done = (now.column - 1 + (now.step / now.total if now.total else 0)) / now.columns
                progress(done, desc=progress_text(now))
                line = f"**{progress_text(now)}**"
                if now.phase == "running" and live.running:
                    line += " · " + live_markdown(engine)
                preview = gr.skip()
                if live.running and live.preview is not None and live.preview_step != last_preview:
                    last_preview, preview = live.preview_step, live.preview
                yield preview, line, gr.skip(), gr.skip()
        finally:
            running["stop"] = None
        if "error" in box:
            raise user_facing(box["error"], "Comparison")
        comparison: Comparison = box["result"]
        yield comparison.grid, result_markdown(comparison), comparison.parameters, history_rows(engine)

    def stop_comparison():
        event = running["stop"]
        if event is not None:  # only a comparison's own job: another tab's is not ours to stop
            event.set()
            engine.stop()

    columns = {f"value_{i}": value for i, value in enumerate(values, 1)}
    inputs = api_order({**prompts, **size, **common, "axis": axis, **columns, "warm_up": warm_up})
    go.click(compare, inputs=list(inputs.values()),
             outputs=[grid, table, params, history], api_name="compare")
    stop.click(stop_comparison, queue=False, api_name=False)
