"""img2img tab: an init image, denoising strength, resize mode and output size."""
from __future__ import annotations

from typing import Any, get_args

import gradio as gr

from engine import Engine
from engine.requests import Img2ImgRequest, ResizeMode
from ui.components import (Controls, common_controls, common_request, field_default, field_slider, generation_tab,
                           prompt_boxes)
from ui.running import stream_job


def build(engine: Engine, d: dict[str, Any], history: gr.Dataframe) -> Controls:
    def controls() -> Controls:
        # a path: the engine checks its decoded size from the header before decoding it (Gradio would decode first)
        image = gr.Image(label="Init image", type="filepath", image_mode=None, height=300)
        prompts = prompt_boxes(engine, d)
        with gr.Row():
            strength = field_slider(Img2ImgRequest, "strength", "Denoising strength", 0.05, value=0.6)
            resize_mode = gr.Radio(list(get_args(ResizeMode)), value=field_default(Img2ImgRequest, "resize_mode"),
                                   label="Resize mode")
        with gr.Row():
            width = gr.Number(value=0, precision=0, label="Width (0 = input's)")
            height = gr.Number(value=0, precision=0, label="Height (0 = input's)")
            vae_tiling = gr.Checkbox(value=False, label="Tiled VAE")
        return {"image": image, **prompts, "strength": strength, "resize_mode": resize_mode, "width": width,
                "height": height, "vae_tiling": vae_tiling, **common_controls(d)}

    def img2img(image, prompt, negative_prompt, strength, resize_mode, width, height, vae_tiling, steps, guidance,
                sampler, seed, batch_size, styles=None, schedule=None, progress=gr.Progress()):
        request = {"strength": strength, "resize_mode": resize_mode, "width": int(width) if width else None,
                   "height": int(height) if height else None, "vae_tiling": bool(vae_tiling),
                   **common_request(prompt, negative_prompt, steps, guidance, sampler, seed, batch_size,
                                    styles, schedule)}
        yield from stream_job(engine, lambda: engine.img2img(request, image), progress)

    return generation_tab(engine, history, img2img, controls, api_name="img2img")
