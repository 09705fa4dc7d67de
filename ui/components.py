"""Pieces the tabs share: prompt boxes, the common generation controls, sliders ranged by the request
fields, and a generation tab's frame (inputs left, Generate/Stop, images and readout right)."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import gradio as gr
from pydantic import BaseModel

from engine import Engine
from engine.lora import with_tag
from engine.requests import GenerationRequest, Txt2ImgRequest
from engine.schedulers import DEFAULT_SAMPLER, SAMPLER_NAMES

UI_DEFAULTS: dict[str, Any] = {"prompt": "", "negative_prompt": "", "width": 256, "height": 256, "steps": 20,
                               "guidance": 7.0, "sampler": DEFAULT_SAMPLER, "seed": -1, "batch_size": 1}
Controls = dict[str, gr.components.Component]  # handler parameter name -> the component that feeds it


def field_default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


def field_slider(model: type[BaseModel], name: str, label: str, step: float, value: Any = None,
                 **kwargs) -> gr.Slider:
    """A slider over the range the request field accepts (its ge/le); value defaults to the field's default."""
    bounds = {attr: getattr(m, attr) for m in model.model_fields[name].metadata for attr in ("ge", "le")
              if hasattr(m, attr)}
    return gr.Slider(bounds["ge"], bounds["le"], value=field_default(model, name) if value is None else value,
                     step=step, label=label, **kwargs)


def prompt_boxes(engine: Engine, d: dict[str, Any], lines: int = 2) -> Controls:
    prompt = gr.Textbox(label="Prompt", value=d["prompt"], lines=lines,
                        placeholder="a red circle on a blue background  (LoRAs: <lora:name:0.8>)")
    negative = gr.Textbox(label="Negative prompt", value=d["negative_prompt"], lines=max(1, lines - 1))
    lora_picker(engine, prompt)
    return {"prompt": prompt, "negative_prompt": negative}


def lora_picker(engine: Engine, prompt: gr.Textbox) -> None:
    """A LoRA from the folder and a weight, added to the prompt as <lora:name:weight> (as AUTOMATIC1111 writes
    it), so the prompt alone says what ran and PNG info brings it back."""
    with gr.Row(elem_classes="lora-picker"):
        name = gr.Dropdown(engine.lora_names(), value=None, label="LoRA", scale=3,
                           info="files in <models-dir>/lora and the built-in ones")
        weight = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA weight", scale=2)
        with gr.Column(scale=1, min_width=110):
            add = gr.Button("Add to prompt", size="sm")
            refresh = gr.Button("Refresh list", size="sm")
    add.click(lambda text, n, w: with_tag(text or "", n, w) if n else gr.skip(), [prompt, name, weight], prompt,
              api_name=False, queue=False)
    refresh.click(lambda: gr.update(choices=engine.lora_names()), None, name, api_name=False, queue=False)


def size_sliders(d: dict[str, Any], prefix: str = "") -> Controls:
    with gr.Row():
        return {"width": field_slider(Txt2ImgRequest, "width", f"{prefix}Width", 8, d["width"]),
                "height": field_slider(Txt2ImgRequest, "height", f"{prefix}Height", 8, d["height"])}


def common_controls(d: dict[str, Any], batch_size: bool = True) -> Controls:
    """Steps, guidance, sampler, seed, batch size: the same five controls on every generation tab (the Compare
    tab runs one image per column: no batch size)."""
    with gr.Row():
        steps = field_slider(GenerationRequest, "steps", "Steps", 1, d["steps"])
        guidance = field_slider(GenerationRequest, "guidance", "Guidance (CFG)", 0.5, d["guidance"])
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLER_NAMES), value=d["sampler"], label="Sampler")
        seed = gr.Number(value=d["seed"], precision=0, label="Seed (-1 = random)")
        batch = field_slider(GenerationRequest, "batch_size", "Batch size", 1, d["batch_size"]) if batch_size else None
    controls = {"steps": steps, "guidance": guidance, "sampler": sampler, "seed": seed, "batch_size": batch}
    return {k: v for k, v in controls.items() if v is not None}


def common_request(prompt, negative_prompt, steps, guidance, sampler, seed, batch_size) -> dict[str, Any]:
    """The GenerationRequest fields, from the values of prompt_boxes and common_controls."""
    return {"prompt": prompt or "", "negative_prompt": negative_prompt or "", "steps": steps,
            "guidance": guidance, "sampler": sampler, "seed": -1 if seed is None else seed,
            "batch_size": batch_size}


def generation_tab(engine: Engine, history: gr.Dataframe, handler: Callable, build_controls: Callable[[], Controls],
                   *, api_name: str, button: str = "Generate", gallery_label: str = "Images",
                   stop_api_name: str | bool = False) -> Controls:
    """Inputs on the left (`build_controls` returns them in `handler`'s parameter order), Generate and Stop
    under them, images, readout and parameters on the right. Generate streams `handler`; Stop stops the engine."""
    with gr.Row():
        with gr.Column(scale=3):
            controls = build_controls()
            with gr.Row():
                go = gr.Button(button, variant="primary", scale=3)
                stop = gr.Button("Stop", variant="stop", scale=1)
        with gr.Column(scale=2):
            gallery = gr.Gallery(label=gallery_label, format="png", columns=2, height=420)
            readout = gr.Markdown("Readout appears here after a generation.", elem_id="readout")
            with gr.Accordion("Parameters used", open=False):
                params = gr.JSON(label="Parameters")
    # Gradio names the API's parameters after the handler's: keep them and the controls in step.
    names = [p.name for p in inspect.signature(handler).parameters.values() if p.name != "progress"]
    if names != list(controls):
        raise TypeError(f"{api_name}: handler parameters {names} != controls {list(controls)}")
    # No Gradio concurrency limit: every job reaches the engine's queue, which runs them in arrival order
    # and tells each waiting one its place (Gradio's queue would only count this tab's own clicks).
    go.click(handler, inputs=list(controls.values()), outputs=[gallery, readout, params, history], api_name=api_name,
             concurrency_limit=None)
    # Not queued: it must run while the generation holds the queue's one slot.
    stop.click(engine.stop, queue=False, api_name=stop_api_name)
    return controls

