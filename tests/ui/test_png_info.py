"""PNG info's "Send to": every generation tab gets every setting it has from a PNG's parameters, hires included;
what this server lacks keeps the tab's own value and says so."""
import pytest

from engine.store.metadata import format_parameters, parse_parameters
from ui.components import UI_DEFAULTS
from ui.tabs.png_info import TARGETS, is_hires, sent_fields

A1111_HIRES = ("a cat\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, "
               "Seed: 39, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
               "Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (nearest-exact), Version: v1.10.1")


def is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine


def test_a_hires_picture_restores_every_hires_setting(engine):
    fields = parse_parameters(A1111_HIRES)
    assert is_hires(fields)
    values, note = sent_fields(engine, fields, UI_DEFAULTS, TARGETS["hires"][1])
    assert note is None
    assert {k: values[k] for k in ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "sampler",
                                   "schedule", "seed", "factor", "upscaler", "hires_strength", "hires_steps")} == {
        "prompt": "a cat", "negative_prompt": "lowres", "width": 512, "height": 768, "steps": 28, "guidance": 6.5,
        "sampler": "DPM++ 2M", "schedule": "Karras", "seed": 39, "factor": 1.5, "upscaler": "latent (nearest-exact)",
        "hires_strength": 0.45, "hires_steps": 12}


def test_img2img_gets_the_denoising_strength_and_the_common_settings(engine):
    text = format_parameters({"prompt": "p", "steps": 9, "sampler": "Euler a", "schedule": "Automatic",
                              "guidance": 5.0, "seed": 3, "width": 64, "height": 64, "task": "img2img",
                              "strength": 0.3, "resize_mode": "crop and resize"})
    values, _ = sent_fields(engine, parse_parameters(text), UI_DEFAULTS, TARGETS["img2img"][1])
    assert (values["strength"], values["steps"], values["sampler"], values["schedule"], values["seed"]) == (
        0.3, 9, "Euler a", "Automatic", 3)
    assert "image" not in values  # the picture itself goes in by the button


def test_what_this_server_lacks_keeps_the_tabs_own_and_says_so(engine):
    fields = parse_parameters(A1111_HIRES.replace("DPM++ 2M", "DPM adaptive").replace(
        "Latent (nearest-exact)", "4x-UltraSharp"))
    values, note = sent_fields(engine, fields, UI_DEFAULTS, TARGETS["hires"][1])
    assert is_skip(values["sampler"]) and is_skip(values["upscaler"])
    assert "DPM adaptive" in note and "4x-UltraSharp" in note
    # a setting the PNG does not have keeps the tab's value; the prompt pair, seed and styles always change
    values, _ = sent_fields(engine, {"prompt": "only a prompt"}, UI_DEFAULTS, TARGETS["txt2img"][1])
    assert values["prompt"] == "only a prompt" and values["seed"] == -1 and is_skip(values["steps"])


def test_a_hires_factor_below_the_slider_is_clamped(engine):
    fields = parse_parameters(A1111_HIRES.replace("Hires upscale: 1.5", "Hires upscale: 1.1"))
    values, note = sent_fields(engine, fields, UI_DEFAULTS, TARGETS["hires"][1])
    assert values["factor"] == 1.25 and "1.1 is outside" in note
