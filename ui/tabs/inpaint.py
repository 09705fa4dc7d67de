"""inpaint tab: a picture with a mask painted on it (or uploaded), A1111's inpaint controls, and outpainting."""
from __future__ import annotations

from typing import Any, get_args

import gradio as gr

from engine import Engine
from engine.errors import UserError
from engine.requests import InpaintArea, InpaintRequest, MaskedContent, ResizeMode, open_image
from ui.components import (Controls, common_controls, common_request, field_default, field_slider, generation_tab,
                           prompt_boxes)
from ui.running import stream_job


def build(engine: Engine, d: dict[str, Any], history: gr.Dataframe) -> Controls:
    def controls() -> Controls:
        # paths: the engine checks each file's decoded size from its header before decoding it
        editor = gr.ImageEditor(label="Picture: paint over what to repaint", type="filepath", height=380,
                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24),
                                eraser=gr.Eraser(default_size=24), layers=False, elem_id="inpaint-editor")
        mask = gr.Image(label="Or upload a mask (white: repaint)", type="filepath", image_mode=None, height=160)
        prompts = prompt_boxes(engine, d)
        with gr.Row():
            strength = field_slider(InpaintRequest, "strength", "Denoising strength", 0.05)
            mask_blur = field_slider(InpaintRequest, "mask_blur", "Mask blur", 1)
        with gr.Row():
            masked_content = gr.Radio(list(get_args(MaskedContent)), label="Masked content",
                                      value=field_default(InpaintRequest, "masked_content"))
            inpaint_area = gr.Radio(list(get_args(InpaintArea)), label="Inpaint area",
                                    value=field_default(InpaintRequest, "inpaint_area"))
        with gr.Row():
            padding = field_slider(InpaintRequest, "only_masked_padding", "Only masked padding, pixels", 4)
            invert_mask = gr.Checkbox(value=False, label="Invert mask (repaint what is not painted)")
        with gr.Accordion("Outpainting: grow the canvas (pixels on each side; the new area is painted)", open=False):
            with gr.Row():
                outpaint = {f"outpaint_{side}": gr.Number(value=0, precision=0, minimum=0, label=side.title())
                            for side in ("left", "right", "up", "down")}
        with gr.Row():
            resize_mode = gr.Radio(list(get_args(ResizeMode)), value=field_default(InpaintRequest, "resize_mode"),
                                   label="Resize mode")
            width = gr.Number(value=0, precision=0, label="Width (0 = picture's)")
            height = gr.Number(value=0, precision=0, label="Height (0 = picture's)")
        return {"editor": editor, "mask": mask, **prompts, "strength": strength, "mask_blur": mask_blur,
                "masked_content": masked_content, "inpaint_area": inpaint_area, "only_masked_padding": padding,
                "invert_mask": invert_mask, **outpaint, "resize_mode": resize_mode, "width": width,
                "height": height, **common_controls(d)}

    def inpaint(editor, mask, prompt, negative_prompt, strength, mask_blur, masked_content, inpaint_area,
                only_masked_padding, invert_mask, outpaint_left, outpaint_right, outpaint_up, outpaint_down,
                resize_mode, width, height, steps, guidance, sampler, seed, batch_size, styles=None, schedule=None,
                progress=gr.Progress()):
        request = {"strength": strength, "mask_blur": int(mask_blur), "masked_content": masked_content,
                   "inpaint_area": inpaint_area, "only_masked_padding": int(only_masked_padding),
                   "invert_mask": bool(invert_mask), "outpaint_left": int(outpaint_left or 0),
                   "outpaint_right": int(outpaint_right or 0), "outpaint_up": int(outpaint_up or 0),
                   "outpaint_down": int(outpaint_down or 0), "resize_mode": resize_mode,
                   "width": int(width) if width else None, "height": int(height) if height else None,
                   **common_request(prompt, negative_prompt, steps, guidance, sampler, seed, batch_size,
                                    styles, schedule)}
        yield from stream_job(engine, lambda: engine.inpaint(request, *editor_inputs(editor, mask)), progress)

    return generation_tab(engine, history, inpaint, controls, api_name="inpaint", button="Inpaint",
                          gallery_label="Inpainted")


def editor_inputs(editor: Any, mask: Any) -> tuple[Any, Any]:
    """The image editor's value -> (picture, mask): an uploaded mask wins; else what was painted (any layer's
    opaque pixels). Nothing painted and no mask: None (the engine says so, or outpaints)."""
    if not isinstance(editor, dict) or not editor.get("background"):
        raise UserError("No picture: upload one into the editor first.")
    if mask is not None:
        return editor["background"], mask
    painted = None
    for layer in editor.get("layers") or []:
        alpha = open_image(layer).convert("RGBA").getchannel("A")
        painted = alpha if painted is None else _lighter(painted, alpha)
    if painted is not None and painted.getbbox() is None:
        painted = None
    return editor["background"], painted


def _lighter(a, b):
    from PIL import ImageChops

    return ImageChops.lighter(a, b.resize(a.size))
