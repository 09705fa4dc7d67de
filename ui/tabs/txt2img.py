"""txt2img tab: prompt, size, batch count and the common controls."""
from __future__ import annotations

from typing import Any

import gradio as gr

from engine import Engine
from engine.requests import Txt2ImgRequest
from ui.components import (Controls, common_controls, common_request, field_slider, generation_tab, prompt_boxes,
                           size_sliders)
from ui.running import stream_job


def build(engine: Engine, d: dict[str, Any], history: gr.Dataframe) -> Controls:
    def controls() -> Controls:
        prompts = prompt_boxes(engine, d, lines=3)
        size = size_sliders(d)
        common = common_controls(d)
        batch_count = field_slider(Txt2ImgRequest, "batch_count", "Batch count", 1)
        return {**prompts, **size, "batch_count": batch_count, **common}

    # Every input is a named positional parameter: Gradio only hooks up a Progress that follows those.
    def txt2img(prompt, negative_prompt, width, height, batch_count, steps, guidance, sampler, seed,
                batch_size, styles=None, schedule=None, progress=gr.Progress()):
        request = {"width": width, "height": height, "batch_count": batch_count,
                   **common_request(prompt, negative_prompt, steps, guidance, sampler, seed, batch_size,
                                    styles, schedule)}
        yield from stream_job(engine, lambda: engine.txt2img(request), progress)

    return generation_tab(engine, history, txt2img, controls, api_name="txt2img", stop_api_name="stop")
