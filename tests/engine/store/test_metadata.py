"""PNG parameters as AUTOMATIC1111 writes and reads them: its keys and order, its quoting, a third-party parser
(sd-parsers) reading ours as A1111's, and A1111's own texts restored here."""
import io

from PIL import Image
from sd_parsers import ParserManager

from engine.store.metadata import format_parameters, parse_parameters
from engine.store.outputs import parameters_info

HIRES = {"prompt": "a red circle, on blue: 'quoted' \"too\"", "negative_prompt": "blurry, low quality",
         "steps": 20, "sampler": "DPM++ 2M", "schedule": "Karras", "guidance": 7.5, "seed": 123456, "width": 512,
         "height": 768, "model": "shapes", "task": "hires_fix", "factor": 2.0, "hires_steps": 10,
         "upscaler": "latent (bicubic)", "hires_strength": 0.55, "strength": 0.75, "styles": ["a, b"],
         "runtime": "pytorch"}
# As A1111 1.10 writes a hires-fix picture with a LoRA and an embedding (keys, order and quoting from
# modules/processing.py create_infotext and the hires pass's extra_generation_params).
A1111_TEXT = (
    "masterpiece, a cat sitting on a chair <lora:add_detail:0.8>\n"
    "Negative prompt: lowres, bad anatomy, easynegative\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3920245713, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    "Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (nearest-exact), "
    "Lora hashes: \"add_detail: 7c6bad76eb54\", TI hashes: \"easynegative: c74b4e810b03\", Version: v1.10.1")


def test_written_as_a1111_writes_it():
    text = format_parameters(HIRES)
    lines = text.splitlines()
    assert lines[0] == HIRES["prompt"] and lines[1] == "Negative prompt: blurry, low quality"
    assert lines[2].startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 123456, "
                               "Size: 512x768, Model: shapes, Denoising strength: 0.55, Hires upscale: 2, "
                               "Hires steps: 10, Hires upscaler: Latent (bicubic), ")
    assert lines[2].endswith("Version: fast-sd")
    assert "Upscale factor" not in text and text.count("Denoising strength") == 1  # the hires pass's, not img2img's


def test_round_trip_restores_every_setting_hires_included():
    back = parse_parameters(format_parameters(HIRES))
    for key in ("prompt", "negative_prompt", "steps", "sampler", "schedule", "guidance", "seed", "width", "height",
                "model", "task", "factor", "hires_steps", "upscaler", "hires_strength", "styles", "runtime"):
        assert back[key] == HIRES[key], key
    assert "strength" not in back  # img2img's strength belongs to img2img texts


def test_a1111s_own_text_is_restored():
    p = parse_parameters(A1111_TEXT)
    assert p["prompt"].startswith("masterpiece") and p["negative_prompt"].endswith("easynegative")
    assert (p["sampler"], p["schedule"], p["steps"], p["guidance"], p["seed"]) == ("DPM++ 2M", "Karras", 28, 6.5,
                                                                                    3920245713)
    assert (p["width"], p["height"], p["task"], p["factor"], p["hires_steps"]) == (512, 768, "hires_fix", 1.5, 12)
    assert p["hires_strength"] == 0.45 and p["upscaler"] == "latent (nearest-exact)"
    assert p["model_hash"] == "6ce0161689" and p["lora_hashes"] == "add_detail: 7c6bad76eb54"


def test_texts_of_before_the_split_and_of_older_versions_here():
    p = parse_parameters("a cat\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 42, Size: 640x480, "
                         "Model: v1-5, Denoising strength: 0.6")
    assert (p["sampler"], p["schedule"], p["strength"]) == ("DPM++ 2M", "Karras", 0.6)  # img2img's: no hires
    old = parse_parameters("a cat\nSteps: 8, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Upscale factor: 2, "
                           "Hires denoising strength: 0.5, Hires upscaler: Lanczos, Task: hires_fix")
    assert (old["factor"], old["hires_strength"], old["upscaler"], old["task"]) == (2.0, 0.5, "Lanczos", "hires_fix")


def test_a_third_party_parser_reads_ours_as_a1111s():
    text = format_parameters({**HIRES, "model": "v1-5-pruned-emaonly"})
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=parameters_info(text))
    buffer.seek(0)
    with Image.open(buffer) as image:
        info = ParserManager().parse(image)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M" and sampler.parameters["scheduler"] == "Karras"
    assert sampler.parameters["cfg_scale"] == "7.5" and sampler.parameters["seed"] == "123456"
    assert sampler.prompts[0].value == HIRES["prompt"] and sampler.negative_prompts[0].value == HIRES["negative_prompt"]
    assert info.metadata["Size"] == "512x768" and info.metadata["Hires upscale"] == "2"
