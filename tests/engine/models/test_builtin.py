"""builtin:shapes draws what the prompt says: checked by simple colour analysis, not by eye."""
from __future__ import annotations

import numpy as np
import pytest

from engine import Engine
from engine.models.builtin import ASSETS_MODELS
from tools.shapes_score import PROMPTS, SEEDS, analyse

needs_model = pytest.mark.skipif(not (ASSETS_MODELS / "shapes" / "model_index.json").is_file(),
                                reason="assets/models/shapes is not in this checkout")

SAMPLER = "DPM++ 2M Karras"  # measured on the shipped weights, guidance 7: DPM++ 2M Karras 83%, Euler 83%, Euler a 75%
TXT2IMG_FLOOR = 0.8  # the target
IMG2IMG_FLOOR = 0.8  # the target


@pytest.fixture(scope="module")
def engine():
    engine = Engine(runtime="pytorch")
    engine.load("builtin:shapes")
    engine.preview_every = 0
    return engine


@needs_model
def test_it_is_an_ordinary_diffusers_sd_pipeline(engine):
    model = engine.model
    assert type(model.pipe).__name__ == "StableDiffusionPipeline" and model.family == "sd1"
    assert model.pipe.vae.config.latent_channels == 4 and model.vae_scale_factor == 8
    assert model.native_size == 128
    files = list((ASSETS_MODELS / "shapes").rglob("*"))
    assert sum(f.stat().st_size for f in files if f.is_file()) <= 30 * 10**6
    assert all(f.suffix != ".bin" for f in files) and any(f.suffix == ".safetensors" for f in files)


@needs_model
def test_named_colours_dominate(engine, capsys):
    good, report = 0, []
    for colour, shape, background in PROMPTS:
        prompt = f"a {colour} {shape} on a {background} background"
        result = engine.txt2img({"prompt": prompt, "width": 128, "height": 128, "steps": 20, "guidance": 7.0,
                                 "sampler": SAMPLER, "seed": 100, "batch_size": SEEDS})
        for image in result.images:
            got_bg, got_fg = analyse(image)
            ok = got_bg == background and got_fg == colour
            good += ok
            report.append(f"{prompt}: border {got_bg}, foreground {got_fg}{'' if ok else '  <-- miss'}")
    rate = good / (len(PROMPTS) * SEEDS)
    with capsys.disabled():
        print(f"\nbuiltin:shapes txt2img: named colours dominate in {rate:.0%} of {len(PROMPTS) * SEEDS} images")
    assert rate >= TXT2IMG_FLOOR, f"{rate:.0%} matched:\n" + "\n".join(report)


@needs_model
def test_img2img_changes_red_to_blue(engine, capsys):
    base = engine.txt2img({"prompt": "a red circle on a white background", "width": 128, "height": 128,
                           "steps": 20, "guidance": 7.0, "sampler": SAMPLER, "seed": 7, "batch_size": SEEDS})
    good, report = 0, []
    for i, image in enumerate(base.images):
        out = engine.img2img({"prompt": "a blue circle on a white background", "strength": 0.6, "steps": 20,
                              "guidance": 7.0, "sampler": SAMPLER, "seed": 200 + i}, image)
        got_bg, got_fg = analyse(out.images[0])
        ok = got_fg == "blue" and got_bg == "white"
        good += ok
        report.append(f"seed {200 + i}: before {analyse(image)}, after border {got_bg}, foreground {got_fg}")
    with capsys.disabled():
        print(f"\nbuiltin:shapes img2img red -> blue: {good / SEEDS:.0%} of {SEEDS}")
    assert good / SEEDS >= IMG2IMG_FLOOR, "\n".join(report)


def test_the_analysis_can_fail():
    """The check reads drawn pictures right and refuses noise, so the 80% test means something."""
    from tools.train_shapes import Item, draw

    image = draw([Item("red", "circle", 0.5, 0.5, 0.25)], "blue")
    assert analyse(image) == ("blue", "red")
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    from PIL import Image

    assert analyse(Image.fromarray(noise)) != ("blue", "red")


@needs_model
def test_shipped_lcm_lora_draws_the_teacher_picture_in_few_steps(engine, capsys):
    """The distilled LoRA (assets/lora/lcm-shapes) at guidance 1, LCM sampler: the issue's targets, measured
    against the teacher (DDIM, 30 steps, CFG 7) picture of the same prompt and seed."""
    from tools.shapes_score import colours_right, prompt_text, psnr

    def pictures(suffix, **request):
        return {p: engine.txt2img({"prompt": prompt_text(*p) + suffix, "width": 128, "height": 128, "seed": 100,
                                   "batch_size": SEEDS, **request}).images for p in PROMPTS}

    teacher = pictures("", sampler="DDIM", steps=30, guidance=7.0)
    scores = {}
    for steps in (1, 4):
        got = pictures(" <lora:lcm-shapes:1>", sampler="LCM", steps=steps, guidance=1.0)
        good = sum(colours_right(im, p[0], p[2]) for p in PROMPTS for im in got[p]) / (len(PROMPTS) * SEEDS)
        db = float(np.mean([psnr(a, b) for p in PROMPTS for a, b in zip(got[p], teacher[p])]))
        scores[steps] = (good, db)
    with capsys.disabled():
        print(f"\nlcm-shapes LoRA: 1 step {scores[1][0]:.0%} colours, {scores[1][1]:.2f} dB to the teacher; "
              f"4 steps {scores[4][0]:.0%}, {scores[4][1]:.2f} dB")
    assert scores[1][0] >= 0.8 and scores[1][1] >= 18.0
    assert scores[4][1] >= 17.5
