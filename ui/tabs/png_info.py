"""PNG info tab: the generation parameters a saved PNG carries, and a button that sends them to txt2img."""
from __future__ import annotations

from typing import Any

import gradio as gr

from engine import Engine
from engine.samplers import SAMPLER_NAMES
from engine.store.metadata import parse_parameters
from engine.store.outputs import read_parameters
from ui.components import Controls

SENT = ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "sampler", "seed", "styles")  # txt2img


def png_info(image):
    if not image:
        return "", None
    try:
        from PIL import Image

        with Image.open(image) as opened:
            text = read_parameters(opened)
    except Exception as e:
        raise gr.Error(f"Could not read that image ({type(e).__name__}).") from None
    if not text:
        return "This image carries no generation parameters.", None
    return text, parse_parameters(text)


def sent_fields(engine: Engine, fields: dict[str, Any], d: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The txt2img values for a PNG's parameters: the styles taken back out of the prompt pair (so Generate
    expands them to the same text), or, where the styles file no longer makes that text, the expanded prompt
    with no styles and a line saying so. Nothing of the prompt is lost either way."""
    fallback = {**d, "prompt": "", "negative_prompt": "", "seed": -1, "styles": []}
    values = {name: fields.get(name, fallback[name]) for name in SENT}
    if values["sampler"] not in SAMPLER_NAMES:
        values["sampler"] = d["sampler"]
    note = None
    if values["styles"]:
        typed = engine.styles.extract(values["prompt"], values["negative_prompt"], values["styles"])
        if typed is None:
            note = (f"The styles {', '.join(values['styles'])} are not in the styles file as they were, so the full "
                    f"prompt was sent without them.")
            values["styles"] = []
        else:
            values["prompt"], values["negative_prompt"] = typed
    return values, note


def build(engine: Engine, d: dict[str, Any], txt2img: Controls, tabs: gr.Tabs) -> None:
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="A PNG this app (or A1111) saved", type="filepath", height=300)
            send = gr.Button("Send to txt2img")
        with gr.Column():
            text = gr.Textbox(label="Parameters text", lines=6, interactive=False)
            fields = gr.JSON(label="Parsed")
    image.change(png_info, inputs=[image], outputs=[text, fields], api_name="png_info")

    def send_to_txt2img(fields):
        if not fields:
            raise gr.Error("No parameters to send: open a PNG with generation parameters first.")
        values, note = sent_fields(engine, fields, d)
        if note:
            gr.Warning(note)
        return (*values.values(), gr.Tabs(selected="txt2img"))

    send.click(send_to_txt2img, inputs=[fields], outputs=[*(txt2img[name] for name in SENT), tabs], api_name=False)
