"""Pieces the tabs share: prompt boxes, the common generation controls, sliders ranged by the request
fields, and a generation tab's frame (inputs left, Generate/Stop, images and readout right)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr
from pydantic import BaseModel

from engine import Engine
from engine.lora.tags import with_tag
from engine.requests import GenerationRequest, Txt2ImgRequest
from engine.samplers import DEFAULT_SAMPLER, DEFAULT_SCHEDULE, SAMPLER_NAMES, schedules_for
from ui.running import reported

UI_DEFAULTS: dict[str, Any] = {"prompt": "", "negative_prompt": "", "styles": [], "width": 256, "height": 256,
                               "steps": 20, "guidance": 7.0, "sampler": DEFAULT_SAMPLER, "schedule": DEFAULT_SCHEDULE,
                               "seed": -1, "batch_size": 1}
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
    """Prompt, negative prompt, the styles picker (returned as "styles": api_order passes it last, so API clients that
    send the older positional arguments still work), the LoRA and the embedding pickers."""
    prompt = gr.Textbox(label="Prompt", value=d["prompt"], lines=lines,
                        placeholder="a red circle on a blue background  ((word:1.3) weights, BREAK, "
                                    "LoRAs: <lora:name:0.8>; no 75-token limit)")
    negative = gr.Textbox(label="Negative prompt", value=d["negative_prompt"], lines=max(1, lines - 1))
    styles = style_picker(engine, d, prompt, negative)
    lora_picker(engine, prompt)
    embedding_picker(engine, prompt, negative)
    return {"prompt": prompt, "negative_prompt": negative, "styles": styles}


def style_picker(engine: Engine, d: dict[str, Any], prompt: gr.Textbox, negative: gr.Textbox) -> gr.Dropdown:
    """Styles from the styles file (A1111's styles.csv), applied in the order picked when the job runs; the
    current prompt pair saved as a style."""
    known = engine.styles.names()
    with gr.Row(elem_classes="style-picker"):
        styles = gr.Dropdown(known, value=[s for s in d.get("styles", []) if s in known], multiselect=True,
                             label="Styles", scale=4, elem_classes="styles",
                             info=engine.styles.error or "added to the prompt pair when the job runs")
        with gr.Column(scale=1, min_width=110):
            refresh = gr.Button("Refresh styles", size="sm")
            save = gr.Button("Save as style", size="sm")
    name = gr.Textbox(label="New style name", placeholder="name, then Save as style again", visible=False,
                      elem_classes="style-name")

    def save_style(style_name, text, negative_text, chosen):
        if not (style_name or "").strip():  # first click: ask for a name
            return gr.update(visible=True), gr.skip()
        with reported("Saving the style"):
            style = engine.styles.save(style_name, text or "", negative_text or "")
        gr.Info(f"Saved style {style.name!r} to {engine.styles.path.name}.")
        return gr.update(value="", visible=False), gr.update(choices=engine.styles.names(),
                                                             value=[*(chosen or []), style.name])

    refresh.click(lambda: gr.update(choices=engine.styles.names(), info=engine.styles.error
                                    or "added to the prompt pair when the job runs"),
                  None, styles, api_name=False, queue=False)
    save.click(save_style, [name, prompt, negative, styles], [name, styles], api_name=False, queue=False)
    return styles


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


def with_word(text: str, word: str) -> str:
    """`word` added at the end of a prompt, as A1111's pickers add an embedding's name."""
    text = (text or "").rstrip()
    return f"{text} {word}" if text else word


def embedding_picker(engine: Engine, prompt: gr.Textbox, negative: gr.Textbox) -> None:
    """A textual-inversion embedding from <models-dir>/embeddings, its name added to the prompt or the negative
    prompt (where the name is written is where it acts, as in A1111)."""
    with gr.Row(elem_classes="embedding-picker"):
        name = gr.Dropdown(engine.embedding_names(), value=None, label="Embedding", scale=3,
                           info="files in <models-dir>/embeddings that fit the loaded model")
        where = gr.Radio(["Prompt", "Negative prompt"], value="Prompt", label="Add to", scale=2)
        with gr.Column(scale=1, min_width=110):
            add = gr.Button("Add name", size="sm")
            refresh = gr.Button("Refresh list", size="sm")

    def added(text, negative_text, n, box):
        if not n:
            return gr.skip(), gr.skip()
        if box == "Negative prompt":
            return gr.skip(), with_word(negative_text, n)
        return with_word(text, n), gr.skip()

    add.click(added, [prompt, negative, name, where], [prompt, negative], api_name=False, queue=False)
    refresh.click(lambda: gr.update(choices=engine.embedding_names()), None, name, api_name=False, queue=False)


def size_sliders(d: dict[str, Any], prefix: str = "") -> Controls:
    with gr.Row():
        return {"width": field_slider(Txt2ImgRequest, "width", f"{prefix}Width", 8, d["width"]),
                "height": field_slider(Txt2ImgRequest, "height", f"{prefix}Height", 8, d["height"])}


def common_controls(d: dict[str, Any], batch_size: bool = True) -> Controls:
    """Steps, guidance, sampler, schedule type, seed, batch size: the same controls on every generation tab (the
    Compare tab runs one image per column: no batch size). The schedule types offered are the sampler's."""
    with gr.Row():
        steps = field_slider(GenerationRequest, "steps", "Steps", 1, d["steps"])
        guidance = field_slider(GenerationRequest, "guidance", "Guidance (CFG)", 0.5, d["guidance"])
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLER_NAMES), value=d["sampler"], label="Sampler")
        schedule = gr.Dropdown(list(schedules_for(d["sampler"])), value=d["schedule"], label="Schedule type",
                               info="Automatic: the sampler's own, as in A1111")
    with gr.Row():
        seed = gr.Number(value=d["seed"], precision=0, label="Seed (-1 = random)")
        batch = field_slider(GenerationRequest, "batch_size", "Batch size", 1, d["batch_size"]) if batch_size else None
    sampler.change(schedule_choices, [sampler, schedule], schedule, api_name=False, queue=False, show_progress="hidden")
    controls = {"steps": steps, "guidance": guidance, "sampler": sampler, "schedule": schedule, "seed": seed,
                "batch_size": batch}
    return {k: v for k, v in controls.items() if v is not None}


def schedule_choices(sampler: str, schedule: str):
    """The schedule types the sampler takes; the chosen one kept where it still applies."""
    try:
        allowed = list(schedules_for(sampler))
    except Exception:  # an unknown name typed in: the request says what is wrong
        return gr.skip()
    return gr.update(choices=allowed, value=schedule if schedule in allowed else DEFAULT_SCHEDULE)


def common_request(prompt, negative_prompt, steps, guidance, sampler, seed, batch_size, styles=None,
                   schedule=None) -> dict[str, Any]:
    """The GenerationRequest fields, from the values of prompt_boxes and common_controls."""
    return {"prompt": prompt or "", "negative_prompt": negative_prompt or "", "steps": steps,
            "guidance": guidance, "sampler": sampler, "schedule": schedule or DEFAULT_SCHEDULE,
            "seed": -1 if seed is None else seed,
            "batch_size": batch_size, "styles": list(styles or [])}


# Inputs added after the first API clients were written; they go last, so a client sending the older positional
# arguments still works.
API_LAST = ("styles", "schedule")


def api_order(controls: Controls) -> Controls:
    """The controls in the API's parameter order: as given, the later additions (API_LAST) at the end."""
    return {**{k: v for k, v in controls.items() if k not in API_LAST},
            **{k: controls[k] for k in API_LAST if k in controls}}


def generation_tab(engine: Engine, history: gr.Dataframe, handler: Callable, build_controls: Callable[[], Controls],
                   *, api_name: str, button: str = "Generate", gallery_label: str = "Images",
                   stop_api_name: str | bool = False) -> Controls:
    """Inputs on the left (`build_controls` returns them in `handler`'s parameter order, API_LAST at the end),
    Generate and Stop under them, images, readout and parameters on the right. Generate streams `handler`; Stop
    stops the engine."""
    with gr.Row():
        with gr.Column(scale=3):
            controls = api_order(build_controls())
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
             concurrency_limit=None, show_progress_on=[gallery])  # the readout keeps its live line readable
    # Not queued: it must run while the generation holds the queue's one slot.
    stop.click(engine.stop, queue=False, api_name=stop_api_name)
    return controls



MODEL_OWN_VAE, NO_TINY_AUTOENCODER = "Automatic (the model's own)", "None"


@dataclass
class ModelPickers:
    model: gr.Dropdown
    vae: gr.Dropdown
    load: gr.Button
    taesd: gr.Dropdown
    use_taesd: gr.Button


def model_pickers(engine: Engine) -> ModelPickers:
    """Dropdowns of what is under --models-dir (models, VAEs, tiny autoencoders) with a refresh button; with
    --allow-hub-ids a model or VAE box also takes a hub id typed in. The engine checks every name it is sent
    (a refresh may list new files, so the boxes take any text)."""
    model_now = engine.model.name if engine.model else "builtin:shapes"
    hub = engine.remote_hub
    with gr.Row(elem_classes="model-pickers"):
        model = gr.Dropdown(_with(engine.model_names(), model_now), value=model_now, allow_custom_value=True,
                            label="Model", scale=3, elem_id="model-picker",
                            info="builtin:NAME or a model under the models folder"
                                 + (", or a hub id (owner/name)" if hub else ""))
        vae_now = (engine.model.vae if engine.model else None) or MODEL_OWN_VAE
        vae = gr.Dropdown(_with([MODEL_OWN_VAE, *engine.vae_names()], vae_now), value=vae_now,
                          allow_custom_value=True, label="VAE", scale=2, elem_id="vae-picker",
                          info="<models-dir>/vae" + (", or a hub id" if hub else ""))
        with gr.Column(scale=1, min_width=120):
            load = gr.Button("Load model", variant="primary", size="sm")
            refresh = gr.Button("Refresh lists", size="sm")
    with gr.Row():
        taesd_now = engine.tiny.name or NO_TINY_AUTOENCODER
        taesd = gr.Dropdown(_with([NO_TINY_AUTOENCODER, *engine.tiny_autoencoder_names()], taesd_now),
                            value=taesd_now, label="Tiny autoencoder", scale=3, elem_id="taesd-picker",
                            info="fast decodes and real previews when the option is on; <models-dir>/taesd")
        use_taesd = gr.Button("Use tiny autoencoder", size="sm", scale=1)

    def refreshed():
        return (gr.update(choices=_with(engine.model_names(), engine.model.name if engine.model else None)),
                gr.update(choices=[MODEL_OWN_VAE, *engine.vae_names()]),
                gr.update(choices=[NO_TINY_AUTOENCODER, *engine.tiny_autoencoder_names()]))

    refresh.click(refreshed, None, [model, vae, taesd], api_name=False, queue=False)
    return ModelPickers(model, vae, load, taesd, use_taesd)


def _with(choices: list[str], current: str | None) -> list[str]:
    """The choices, with the current value first when it is not among them (a hub id, a path given at start)."""
    return choices if not current or current in choices else [current, *choices]
