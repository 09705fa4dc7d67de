"""Optimizations tab: one control per option, built from engine.options.OPTION_SPECS; presets."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from pydantic import ValidationError

from engine import Engine, UserError
from engine.lora.tags import with_tag, without_tags
from engine.options import (OPTION_SPECS, Optimizations, OptionSpec, Preset, load_preset, preset_loras, preset_names,
                            save_preset)
from engine.requests import describe_validation_error
from engine.samplers import AUTOMATIC
from ui.components import Controls
from ui.formatting import engine_markdown, options_markdown
from ui.running import reported

PER_ROW = 4


@dataclass
class OptionsTab:
    info: gr.Markdown
    boxes: list  # one control per OPTION_SPECS entry, in its order


def option_info(spec: OptionSpec, reason: str | None) -> str:
    return f"Unavailable: {reason}" if reason else spec.help


def option_control(spec: OptionSpec, value: Any, reason: str | None):
    """A control that cannot act here (runtime, hardware) is disabled and says why."""
    common = {"label": spec.label, "info": option_info(spec, reason), "interactive": reason is None,
              "elem_id": f"opt-{spec.name}"}
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=value, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=value, **common)
    return gr.Slider(spec.minimum, spec.maximum, value=value, step=spec.step, **common)


def option_updates(engine: Engine, values: Optimizations | None = None) -> list:
    """gr.update per option control: enabled or not, and why; the value too when `values` is given."""
    reasons = engine.option_reasons()
    updates = []
    for name, spec in OPTION_SPECS.items():
        update = {"interactive": name not in reasons, "info": option_info(spec, reasons.get(name))}
        if values is not None:
            update["value"] = getattr(values, name)
        updates.append(gr.update(**update))
    return updates


def options_from(values) -> Optimizations:
    data = dict(zip(OPTION_SPECS, values))  # pydantic takes a slider's 3.0 for an int, and refuses NaN and 3.5
    try:
        return Optimizations.model_validate(data)
    except ValidationError as e:
        raise gr.Error(f"Invalid options: {describe_validation_error(e, data)}") from None


def with_option_parameters(fn: Callable, *leading: str, trailing: tuple[str, ...] = ()) -> Callable:
    """Name a `*values` handler's parameters after the options: Gradio reads them off the signature for the API."""
    names = [*leading, *OPTION_SPECS, *trailing]
    fn.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                          for n in names])
    return fn


def _option_grid(engine: Engine) -> list:
    reasons = engine.option_reasons()
    specs = list(OPTION_SPECS.values())
    boxes = []
    for start in range(0, len(specs), PER_ROW):
        with gr.Row():
            boxes += [option_control(spec, getattr(engine.optimizations, spec.name), reasons.get(spec.name))
                      for spec in specs[start:start + PER_ROW]]
    return boxes


def build(engine: Engine, d: dict[str, Any], presets_dir: Path, txt2img: Controls,
          engine_info: gr.Markdown) -> OptionsTab:
    gr.Markdown("Pick a preset or tick what you want, then **Apply**. A box that cannot act with this runtime on "
                "this hardware is greyed out and says why. Options the runtime owns re-prepare the model when "
                "they change.")
    with gr.Row():
        preset = gr.Dropdown(preset_names(presets_dir), value=d.get("preset"), label="Preset",
                             info="sets the boxes below and the sampler, steps and guidance")
        about = gr.Markdown("")
    boxes = _option_grid(engine)
    with gr.Row():
        apply = gr.Button("Apply", variant="primary")
        preset_name = gr.Textbox(label="Save as preset (name)", placeholder="my-preset", scale=2)
        save = gr.Button("Save as preset")
    info = gr.Markdown(options_markdown(engine))
    generation = [txt2img[name] for name in ("steps", "guidance", "sampler")]  # what a preset pre-fills
    prompt = txt2img["prompt"]  # where a preset's LoRA goes
    schedule = txt2img["schedule"]  # with the sampler; last, so the API's positional parameters stay

    def set_optimizations(*values):  # options the runtime owns re-prepare the model (seconds on a big one)
        with reported("Applying options"):
            engine.set_optimizations(options_from(values))
        return options_markdown(engine), engine_markdown(engine)

    apply.click(with_option_parameters(set_optimizations), inputs=boxes, outputs=[info, engine_info],
                api_name="set_optimizations")

    def pick_preset(name, text):
        if not name:
            return (gr.skip(),) * (3 + len(boxes) + len(generation))
        with reported("Loading the preset"):
            chosen = load_preset(name, presets_dir)
        given, model_name = chosen.defaults, engine.model.name if engine.model else None
        lora_name, advice = chosen.lora.advice(model_name)
        # A LoRA another preset added (an LCM-LoRA) goes when this preset does not use it.
        text = without_tags(text or "", preset_loras(presets_dir, model_name) - {lora_name})
        return (f"*{chosen.description}*" + (f"\n\n{advice}" if advice else ""),
                *option_updates(engine, chosen.optimizations),
                *(gr.skip() if v is None else v for v in (given.steps, given.guidance, given.sampler)),
                with_tag(text, lora_name, 1.0) if lora_name else text,
                gr.skip() if given.sampler is None else given.schedule or AUTOMATIC)

    preset.change(pick_preset, inputs=[preset, prompt], outputs=[about, *boxes, *generation, prompt, schedule],
                  api_name="preset")

    def save_as(name, steps, guidance, sampler, *values):
        *values, schedule_type = values
        optimizations = options_from(values)
        with reported("Saving the preset"):
            defaults = {"steps": steps, "guidance": guidance, "sampler": sampler, "schedule": schedule_type}
            try:  # the request models' rules: NaN, infinities and 20.5 steps are refused with the field named
                new = Preset(name=(name or "").strip(), description="Saved from the UI.",
                             optimizations=optimizations, defaults=defaults)
            except ValidationError as e:
                raise UserError(f"Not saved: {describe_validation_error(e, defaults)}") from None
            path = save_preset(new, presets_dir)
        return gr.update(choices=preset_names(presets_dir), value=new.name), f"Saved `{path.name}`."

    save.click(with_option_parameters(save_as, "name", "steps", "guidance", "sampler", trailing=("schedule",)),
               inputs=[preset_name, *generation, *boxes, schedule], outputs=[preset, about], api_name="save_preset")
    return OptionsTab(info, boxes)
