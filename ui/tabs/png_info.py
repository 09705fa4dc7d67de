"""PNG info tab: the generation parameters a saved PNG carries (ours or A1111's), and buttons that send them to
each generation tab with every setting the tab has: a hires fix's to the hires fix tab, the picture itself to
img2img and tiled upscale."""
from __future__ import annotations

from typing import Any

import gradio as gr

from engine import Engine
from engine.requests import HiresFixRequest, hires_upscaler_named
from engine.samplers import parse_sampler
from engine.store.metadata import parse_parameters
from engine.store.outputs import read_parameters
from ui.components import Controls

PROMPTS = ("prompt", "negative_prompt", "styles")
COMMON = ("steps", "guidance", "sampler", "schedule", "seed")
HIRES = ("factor", "upscaler", "hires_strength", "hires_steps")
# tab id -> (its label, the controls a PNG's parameters fill in)
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "txt2img": ("txt2img", (*PROMPTS, "width", "height", *COMMON)),
    "img2img": ("img2img", ("image", *PROMPTS, "strength", *COMMON)),
    "hires": ("hires fix", (*PROMPTS, "width", "height", *HIRES, *COMMON)),
    "upscale": ("tiled upscale", ("image", *PROMPTS, *COMMON)),
}
SENT = TARGETS["txt2img"][1]  # what "Send to txt2img" fills in
FACTOR_RANGE = tuple(getattr(m, a) for m in HiresFixRequest.model_fields["factor"].metadata for a in ("ge", "le")
                     if hasattr(m, a))


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


def is_hires(fields: dict[str, Any]) -> bool:
    return fields.get("task") == "hires_fix" or "factor" in fields


def sent_fields(engine: Engine, fields: dict[str, Any], d: dict[str, Any],
                names: tuple[str, ...] = SENT) -> tuple[dict[str, Any], str | None]:
    """The values for a tab's controls from a PNG's parameters. The prompt pair, seed and styles always change
    (to empty / -1 / none where the PNG has none); another control the PNG says nothing about keeps its value
    (gr.skip()). The styles are taken back out of the prompt pair (so Generate expands them to the same text),
    or, where the styles file no longer makes that text, the expanded prompt goes with no styles and a line says
    so; a sampler or upscaler this server lacks keeps the tab's and a line says which. Nothing of the prompt is
    lost either way."""
    reset = {"prompt": "", "negative_prompt": "", "seed": -1, "styles": []}
    values = {name: fields.get(name, reset.get(name, gr.skip())) for name in names if name != "image"}
    if "strength" in values and "strength" not in fields and "hires_strength" in fields:
        values["strength"] = fields["hires_strength"]  # a hires picture's second pass, as A1111 sends it
    notes = []
    if isinstance(values.get("factor"), (int, float)):  # the slider's range (A1111 goes lower)
        factor = min(max(float(values["factor"]), FACTOR_RANGE[0]), FACTOR_RANGE[1])
        if factor != values["factor"]:
            notes.append(f"Hires upscale {values['factor']:g} is outside {FACTOR_RANGE[0]:g}-{FACTOR_RANGE[1]:g} "
                         f"here; {factor:g} was set.")
        values["factor"] = factor
    if "sampler" in values and isinstance(values["sampler"], str):
        try:
            values["sampler"], values["schedule"] = parse_sampler(values["sampler"], fields.get("schedule"))
        except Exception:
            notes.append(f"The sampler {fields['sampler']!r} is not on this server; the tab keeps its own "
                         f"({d['sampler']}).")
            values["sampler"], values["schedule"] = gr.skip(), gr.skip()
    if "upscaler" in values and isinstance(values["upscaler"], str):
        ours = hires_upscaler_named(values["upscaler"])  # our own names too
        if ours is None:
            notes.append(f"The hires upscaler {values['upscaler']!r} is not on this server; the tab keeps its own.")
        values["upscaler"] = ours or gr.skip()
    if values.get("styles"):
        typed = engine.styles.extract(values["prompt"], values["negative_prompt"], values["styles"])
        if typed is None:
            notes.append(f"The styles {', '.join(values['styles'])} are not in the styles file as they were, so the "
                         f"full prompt was sent without them.")
            values["styles"] = []
        else:
            values["prompt"], values["negative_prompt"] = typed
    return values, " ".join(notes) or None


def build(engine: Engine, d: dict[str, Any], tab_controls: dict[str, Controls], tabs: gr.Tabs) -> None:
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="A PNG this app (or A1111) saved", type="filepath", height=300)
            with gr.Row():
                buttons = {tab: gr.Button(f"Send to {label}", size="sm") for tab, (label, _) in TARGETS.items()
                           if tab in tab_controls}
        with gr.Column():
            text = gr.Textbox(label="Parameters text", lines=6, interactive=False)
            fields = gr.JSON(label="Parsed")
    image.change(png_info, inputs=[image], outputs=[text, fields], api_name="png_info")

    def sender(tab: str):
        names = tuple(n for n in TARGETS[tab][1] if n in tab_controls[tab])

        def send(path, parsed):
            if not parsed:
                raise gr.Error("No parameters to send: open a PNG with generation parameters first.")
            target, target_names = tab, names
            if tab == "txt2img" and is_hires(parsed) and "hires" in tab_controls:
                gr.Info("This picture was made with hires fix: its settings went to the hires fix tab, where "
                        "hires fix runs here.")
                target, target_names = "hires", tuple(n for n in TARGETS["hires"][1] if n in tab_controls["hires"])
            values, note = sent_fields(engine, parsed, d, target_names)
            if note:
                gr.Warning(note)
            out = {tab_controls[target][n]: values[n] for n in target_names if n != "image"}
            if "image" in target_names:
                out[tab_controls[target]["image"]] = path
            # Every output of every target is listed; the ones not sent stay as they are.
            return [out.get(c, gr.skip()) for c in all_outputs] + [gr.Tabs(selected=target)]

        return send

    all_outputs = [tab_controls[t][n] for t, (_, names) in TARGETS.items() if t in tab_controls
                   for n in names if n in tab_controls[t]]
    for tab, button in buttons.items():
        button.click(sender(tab), inputs=[image, fields], outputs=[*all_outputs, tabs], api_name=False)
