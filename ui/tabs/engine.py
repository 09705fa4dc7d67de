"""Engine tab: which runtime and model, why; switch runtime, warm up shapes, load another model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine import Engine
from engine.requests import parse_sizes
from engine.runtimes import CHOICES
from engine.runtimes.warmup import TASKS as WARMUP_TASKS
from ui.components import MODEL_OWN_VAE, NO_TINY_AUTOENCODER, model_pickers
from ui.formatting import engine_markdown, options_markdown, warmup_markdown
from ui.running import reported
from ui.tabs.optimizations import OptionsTab, option_updates


@dataclass
class EngineTab:
    info: gr.Markdown
    message: gr.Markdown
    runtime: gr.Dropdown
    use_runtime: gr.Button


def build(engine: Engine, d: dict[str, Any], guidance: gr.Slider) -> EngineTab:
    """`guidance` is the txt2img tab's slider: warm-up prepares the UNet for that guidance (<= 1: no CFG)."""
    info = gr.Markdown(engine_markdown(engine))
    # With replicas the runtime, model and warm-up are the command line's, for every replica: shown, not offered.
    fixed = {"interactive": False, "info": engine.status()["fixed"]} if engine.status()["fixed"] else {}
    with gr.Row():
        runtime = gr.Dropdown(list(CHOICES), value=engine.status()["runtime" if fixed else "wish"],
                              label="Runtime", **fixed)
        use_runtime = gr.Button("Use this runtime", interactive=not fixed)
    with gr.Row():
        sizes_box = gr.Textbox(label="Warm up sizes (WIDTHxHEIGHT, comma separated)",
                               value=f"{d['width']}x{d['height']}", scale=3)
        tasks_box = gr.CheckboxGroup(list(WARMUP_TASKS), value=["txt2img"], label="Warm up for", scale=2,
                                     info="with the txt2img tab's guidance")
        warmup_button = gr.Button("Warm up", interactive=not fixed)
    report = gr.Markdown("")
    pickers = model_pickers(engine)
    if fixed:
        pickers.load.interactive = pickers.use_taesd.interactive = False
    message = gr.Markdown("")
    gr.Textbox(str(engine.hardware), label="Hardware", lines=8, interactive=False)

    def warmup(sizes, tasks, guidance, progress=gr.Progress()):
        if not tasks:
            raise gr.Error("Pick at least one task to warm up for.")
        results = []
        with reported("Warm-up"):
            parsed = parse_sizes(sizes)
            for i, size in enumerate(parsed):
                progress((i, len(parsed)), desc=f"Warming up {size[0]}x{size[1]}")
                results += engine.warmup([size], guidance=guidance, tasks=tuple(tasks))
        return warmup_markdown(results)

    warmup_button.click(warmup, inputs=[sizes_box, tasks_box, guidance], outputs=[report], api_name="warmup")

    def load_model(model, vae=None, progress=gr.Progress()):
        progress(0, desc=f"Loading {model}")
        vae = None if vae in (None, "", MODEL_OWN_VAE) else vae
        with reported("Loading the model"):
            # Remote users may only name what the pickers list (hub ids where the operator allows them).
            loaded = engine.load(model, allow_any_path=False, vae=vae)
        with_vae = f" with VAE {loaded.vae}" if loaded.vae else ""
        return (engine_markdown(engine),
                f"Loaded **{loaded.name}** ({loaded.family}){with_vae} in {loaded.load_seconds:.1f} s.")

    pickers.load.click(load_model, inputs=[pickers.model, pickers.vae], outputs=[info, message], api_name="load_model")

    def use_tiny_autoencoder(name):
        with reported("Loading the tiny autoencoder"):
            why = engine.set_tiny_autoencoder(None if name == NO_TINY_AUTOENCODER else name, allow_any_path=False)
        if name == NO_TINY_AUTOENCODER:
            return "No tiny autoencoder: decodes use the model's VAE."
        return f"Tiny autoencoder **{name}**" + (f" loaded, but it cannot act: {why}." if why else
                                                 " in use where the option is on.")

    pickers.use_taesd.click(use_tiny_autoencoder, inputs=[pickers.taesd], outputs=[message],
                            api_name="set_tiny_autoencoder")
    return EngineTab(info, message, runtime, use_runtime)


def wire_runtime(engine: Engine, tab: EngineTab, options: OptionsTab) -> None:
    """Switching runtime changes which options can act: the Optimizations tab's boxes follow."""
    def set_runtime(runtime, progress=gr.Progress()):
        progress(0, desc=f"Preparing {runtime} (first use of a model converts it; later starts read the cache)")
        with reported("Switching runtime"):
            choice = engine.set_runtime(runtime)
        return (engine_markdown(engine), f"Now using **{choice.name}** ({engine.status()['precision']}): {choice.reason}.",
                options_markdown(engine), *option_updates(engine))

    tab.use_runtime.click(set_runtime, inputs=[tab.runtime], outputs=[tab.info, tab.message, options.info,
                                                                      *options.boxes], api_name="set_runtime")
