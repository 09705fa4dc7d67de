"""The page: one tab per module, assembled; the history table under them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from engine import Engine
from engine.options import PRESETS_DIR
from engine.samplers import parse_sampler
from ui.tabs import compare as compare_tab
from ui.components import UI_DEFAULTS
from ui.formatting import HISTORY_COLUMNS, engine_markdown, history_rows
from ui.tabs import engine as engine_tab
from ui.tabs import hires_fix as hires_fix_tab
from ui.tabs import img2img as img2img_tab
from ui.tabs import inpaint as inpaint_tab
from ui.tabs import optimizations as optimizations_tab
from ui.tabs import png_info as png_info_tab
from ui.tabs import tiled_upscale as tiled_upscale_tab
from ui.tabs import txt2img as txt2img_tab

CSS_PATH = Path(__file__).resolve().parent.parent / "assets" / "style.css"


def build_ui(engine: Engine, defaults: dict[str, Any] | None = None, presets_dir: Path = PRESETS_DIR) -> gr.Blocks:
    d = {**UI_DEFAULTS, **(defaults or {})}
    d["sampler"], d["schedule"] = parse_sampler(d["sampler"], d.get("schedule"))  # 'DPM++ 2M Karras': the pair
    # Gradio keeps a copy of every shown image and upload in its temp folder: drop those over 2 hours old.
    with gr.Blocks(title="Fast SD", delete_cache=(900, 7200)) as demo:
        gr.Markdown("## Fast SD — the runtime picked for your hardware, with the numbers beside every image")
        # Every generation tab updates it; it is placed under the tabs.
        history = gr.Dataframe(headers=HISTORY_COLUMNS, value=history_rows(engine) or None, interactive=False,
                               wrap=True, render=False)
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                txt2img = txt2img_tab.build(engine, d, history)
            with gr.Tab("img2img", id="img2img"):
                img2img = img2img_tab.build(engine, d, history)
            with gr.Tab("inpaint", id="inpaint"):
                inpaint_tab.build(engine, d, history)
            with gr.Tab("hires fix", id="hires"):
                hires = hires_fix_tab.build(engine, d, history)
            with gr.Tab("tiled upscale", id="upscale"):
                upscale = tiled_upscale_tab.build(engine, d, history)
            with gr.Tab("Compare", id="compare"):
                compare_tab.build(engine, d, history, presets_dir)
            with gr.Tab("PNG info", id="pnginfo"):
                png_info_tab.build(engine, d, {"txt2img": txt2img, "img2img": img2img, "hires": hires,
                                               "upscale": upscale}, tabs)
            with gr.Tab("Engine", id="engine") as engine_page:
                engine_controls = engine_tab.build(engine, d, guidance=txt2img["guidance"])
            # The runtime notes what it decides as jobs run (its threads at the first compile): read them afresh.
            engine_page.select(lambda: engine_markdown(engine), outputs=[engine_controls.info], show_progress="hidden",
                               queue=False, api_name="engine_summary")
            with gr.Tab("Optimizations", id="optimizations"):
                options = optimizations_tab.build(engine, d, presets_dir, txt2img, engine_controls.info)
        engine_tab.wire_runtime(engine, engine_controls, options)
        with gr.Accordion("History (last jobs, newest first)", open=False):
            history.render()
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Arguments for demo.launch(): Gradio 6 takes the stylesheet there."""
    # Gradio keeps each session's component state (about 0.5 MB here) for its 10 000 most recent sessions, and
    # every API call is a session of its own: a loop of calls grew the process by that much a call. 256 browser
    # tabs or clients at once is far more than one device serves.
    return {"css": CSS_PATH.read_text(encoding="utf-8") if CSS_PATH.is_file() else None,
            "state_session_capacity": 256}
