"""hires fix tab: a base image at one size, upscaled and denoised again; shows base and final."""
from __future__ import annotations

from typing import Any, get_args

import gradio as gr

from engine import Engine
from engine.requests import HiresFixRequest, HiresUpscaler
from ui.components import (Controls, common_controls, common_request, field_default, field_slider, generation_tab,
                           prompt_boxes, size_sliders)
from ui.running import stream_job


def build(engine: Engine, d: dict[str, Any], history: gr.Dataframe) -> Controls:
    def controls() -> Controls:
        prompts = prompt_boxes(engine, d)
        size = size_sliders(d, prefix="Base ")
        with gr.Row():
            factor = field_slider(HiresFixRequest, "factor", "Upscale by", 0.05)
            upscaler = gr.Dropdown(list(get_args(HiresUpscaler)), value=field_default(HiresFixRequest, "upscaler"),
                                   label="Upscaler")
        with gr.Row():
            hires_strength = field_slider(HiresFixRequest, "hires_strength", "Hires denoising strength", 0.05)
            hires_steps = field_slider(HiresFixRequest, "hires_steps", "Hires steps (0 = same)", 1)
            vae_tiling = gr.Checkbox(value=False, label="Tiled VAE")
        return {**prompts, **size, "factor": factor, "upscaler": upscaler, "hires_strength": hires_strength,
                "hires_steps": hires_steps, "vae_tiling": vae_tiling, **common_controls(d)}

    def hires_fix(prompt, negative_prompt, width, height, factor, upscaler, hires_strength, hires_steps, vae_tiling,
                  steps, guidance, sampler, seed, batch_size, styles=None, schedule=None, progress=gr.Progress()):
        request = {"width": width, "height": height, "factor": factor, "upscaler": upscaler,
                   "hires_strength": hires_strength, "hires_steps": hires_steps, "vae_tiling": bool(vae_tiling),
                   **common_request(prompt, negative_prompt, steps, guidance, sampler, seed, batch_size,
                                    styles, schedule)}
        yield from stream_job(engine, lambda: engine.hires_fix(request), progress,
                              shown=lambda r: (r.extra_images["base"] + r.images, r.seeds * 2))

    return generation_tab(engine, history, hires_fix, controls, api_name="hires_fix", gallery_label="Base and final")
