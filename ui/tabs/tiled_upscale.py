"""tiled upscale tab: an image enlarged, then denoised tile by tile."""
from __future__ import annotations

from typing import Any

import gradio as gr

from engine import Engine
from engine.requests import TiledUpscaleRequest
from ui.components import Controls, common_controls, common_request, field_slider, generation_tab, prompt_boxes
from ui.running import stream_job


def build(engine: Engine, d: dict[str, Any], history: gr.Dataframe) -> Controls:
    def controls() -> Controls:
        image = gr.Image(label="Image to upscale", type="filepath", image_mode=None, height=300)  # as img2img
        prompts = prompt_boxes(engine, d)
        with gr.Row():
            factor = field_slider(TiledUpscaleRequest, "factor", "Upscale by", 0.25)
            strength = field_slider(TiledUpscaleRequest, "strength", "Denoising strength", 0.05)
        with gr.Row():
            tile_size = field_slider(TiledUpscaleRequest, "tile_size", "Tile size", 8, value=min(512, d["width"]))
            tile_overlap = field_slider(TiledUpscaleRequest, "tile_overlap", "Tile overlap", 8)
        return {"image": image, **prompts, "factor": factor, "strength": strength, "tile_size": tile_size,
                "tile_overlap": tile_overlap, **common_controls(d)}

    def tiled_upscale(image, prompt, negative_prompt, factor, strength, tile_size, tile_overlap, steps, guidance,
                      sampler, seed, batch_size, styles=None, schedule=None, progress=gr.Progress()):
        request = {"factor": factor, "strength": strength, "tile_size": tile_size, "tile_overlap": tile_overlap,
                   **common_request(prompt, negative_prompt, steps, guidance, sampler, seed, batch_size,
                                    styles, schedule)}
        yield from stream_job(engine, lambda: engine.tiled_upscale(request, image), progress)

    return generation_tab(engine, history, tiled_upscale, controls, api_name="tiled_upscale", button="Upscale",
                          gallery_label="Upscaled")
