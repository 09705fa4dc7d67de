"""Gradio Blocks: txt2img, the tabs still to come, and the Engine tab."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from engine import Engine, UserError
from engine.requests import MAX_BATCH, MAX_SIZE, MAX_STEPS, MIN_SIZE
from engine.runtimes import CHOICES
from engine.schedulers import DEFAULT_SAMPLER, SAMPLER_NAMES
from engine.telemetry import Readout

log = logging.getLogger(__name__)
CSS_PATH = Path(__file__).resolve().parent.parent / "assets" / "style.css"


def readout_markdown(readout: Readout, seeds: list[int]) -> str:
    gib = 1024**3
    vram = ("n/a (CPU)" if readout.peak_vram_allocated_bytes is None
            else f"{readout.peak_vram_allocated_bytes / gib:.2f} GiB alloc / "
                 f"{(readout.peak_vram_reserved_bytes or 0) / gib:.2f} GiB reserved")
    rows = [
        ("Total", f"**{readout.total_s:.2f} s**"),
        *[(name.replace("_", " ").capitalize(), f"{s:.2f} s") for name, s in readout.stages_s.items()],
        ("Speed", f"{readout.it_per_s:.2f} it/s ({readout.steps} steps)"),
        ("Peak RAM", f"{readout.peak_rss_bytes / gib:.2f} GiB"),
        ("Peak VRAM", vram),
        ("Runtime", f"{readout.runtime} on {readout.device}"),
        ("Precision", readout.precision),
        ("Size", f"{readout.width}x{readout.height}, batch {readout.batch_size}"),
        ("Seeds", ", ".join(str(s) for s in seeds)),
        ("Model", readout.model),
    ]
    text = "| Readout | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if readout.notices:
        text += "\n\n" + "\n".join(f"- {n}" for n in readout.notices)
    return text


def engine_markdown(engine: Engine) -> str:
    s = engine.status()
    lines = [f"**Runtime:** {s['runtime']} on {s['device']} ({s['precision']}) — {s['reason']}",
             f"**Model:** {s['model'] or 'none loaded'}" + (f" ({s['family']})" if s["family"] else "")]
    for name, why in s["skipped"].items():
        lines.append(f"- {name}: not used — {why}")
    return "\n\n".join(lines)


def _user_facing(e: Exception, what: str) -> gr.Error:
    if isinstance(e, UserError):
        return gr.Error(str(e))
    log.exception("%s failed", what)
    return gr.Error(f"{what} failed: {type(e).__name__}: {e}. The engine is still usable.")


def build_ui(engine: Engine, defaults: dict[str, Any] | None = None) -> gr.Blocks:
    d = {"prompt": "", "negative_prompt": "", "width": 256, "height": 256, "steps": 20, "guidance": 7.0,
         "sampler": DEFAULT_SAMPLER, "seed": -1, "batch_size": 1, **(defaults or {})}

    with gr.Blocks(title="Fast SD") as demo:
        gr.Markdown("## Fast SD — the runtime picked for your hardware, with the numbers beside every image")
        with gr.Tabs():
            with gr.Tab("txt2img", id="txt2img"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", value=d["prompt"], lines=3)
                        negative = gr.Textbox(label="Negative prompt", value=d["negative_prompt"], lines=2)
                        with gr.Row():
                            width = gr.Slider(MIN_SIZE, MAX_SIZE, value=d["width"], step=8, label="Width")
                            height = gr.Slider(MIN_SIZE, MAX_SIZE, value=d["height"], step=8, label="Height")
                        with gr.Row():
                            steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps")
                            guidance = gr.Slider(0, 30, value=d["guidance"], step=0.5, label="Guidance (CFG)")
                        with gr.Row():
                            sampler = gr.Dropdown(list(SAMPLER_NAMES), value=d["sampler"], label="Sampler")
                            seed = gr.Number(value=d["seed"], precision=0, label="Seed (-1 = random)")
                            batch = gr.Slider(1, MAX_BATCH, value=d["batch_size"], step=1, label="Batch size")
                        generate = gr.Button("Generate", variant="primary")
                    with gr.Column(scale=2):
                        gallery = gr.Gallery(label="Images", format="png", columns=2, height=420)
                        readout = gr.Markdown("Readout appears here after a generation.", elem_id="readout")
                        with gr.Accordion("Parameters used", open=False):
                            params = gr.JSON(label="Parameters")

            for name in ("img2img", "hires fix", "tiled upscale"):
                with gr.Tab(name):
                    gr.Markdown(f"**{name}** is coming in a later version; txt2img works now.")

            with gr.Tab("Engine", id="engine"):
                engine_info = gr.Markdown(engine_markdown(engine))
                with gr.Row():
                    runtime_choice = gr.Dropdown(list(CHOICES), value=engine.runtime_wish, label="Runtime")
                    apply_runtime = gr.Button("Use this runtime")
                with gr.Row():
                    model_box = gr.Textbox(label="Model (builtin:NAME, hub id owner/name, or a name under the models folder)",
                                           value=engine.model.name if engine.model else "builtin:tiny")
                    load_button = gr.Button("Load model")
                engine_message = gr.Markdown("")
                gr.Textbox(str(engine.hardware), label="Hardware", lines=8, interactive=False)

        def run_txt2img(prompt_v, negative_v, width_v, height_v, steps_v, guidance_v, sampler_v, seed_v, batch_v,
                        progress=gr.Progress()):
            request = {"prompt": prompt_v or "", "negative_prompt": negative_v or "", "width": width_v,
                       "height": height_v, "steps": steps_v, "guidance": guidance_v, "sampler": sampler_v,
                       "seed": -1 if seed_v is None else seed_v, "batch_size": batch_v}
            progress(0, desc="Starting")
            try:
                result = engine.txt2img(request, progress=lambda i, n: progress((i, n), desc=f"Step {i}/{n}"))
            except Exception as e:
                raise _user_facing(e, "Generation") from None
            captions = [(img, f"seed {s}") for img, s in zip(result.images, result.seeds)]
            return captions, readout_markdown(result.readout, result.seeds), result.parameters

        generate.click(
            run_txt2img,
            inputs=[prompt, negative, width, height, steps, guidance, sampler, seed, batch],
            outputs=[gallery, readout, params],
            api_name="txt2img",
        )

        def use_runtime(wish):
            try:
                choice = engine.set_runtime(wish)
            except Exception as e:
                raise _user_facing(e, "Switching runtime") from None
            return engine_markdown(engine), f"Now using **{choice.name}**: {choice.reason}."

        apply_runtime.click(use_runtime, inputs=[runtime_choice], outputs=[engine_info, engine_message],
                            api_name="set_runtime")

        def load(source, progress=gr.Progress()):
            progress(0, desc=f"Loading {source}")
            try:
                # Remote users may only name builtins, hub ids and models under --models-dir.
                model = engine.load(source, allow_any_path=False)
            except Exception as e:
                raise _user_facing(e, "Loading the model") from None
            return engine_markdown(engine), f"Loaded **{model.name}** ({model.family}) in {model.load_seconds:.1f} s."

        load_button.click(load, inputs=[model_box], outputs=[engine_info, engine_message], api_name="load_model")
    return demo


def launch_kwargs() -> dict[str, Any]:
    return {"css": CSS_PATH.read_text(encoding="utf-8") if CSS_PATH.is_file() else None}
