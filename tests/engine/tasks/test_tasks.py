"""img2img, hires fix and tiled upscale on builtin:tiny (PyTorch runtime)."""
import numpy as np
import pytest
from PIL import Image

from engine import UserError
from engine.tasks.tiling import feather_weights, grid


def gradient(w, h):
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x * np.ones_like(y), y * np.ones_like(x), (1 - x) * y], axis=2)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


BASE = {"prompt": "a red circle", "steps": 10, "seed": 3, "sampler": "Euler"}


def test_img2img_strength_zero_returns_input_exactly(tiny_engine):
    image = noise_image(128, 96)
    r = tiny_engine.img2img({**BASE, "strength": 0.0}, image)
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(image))
    assert r.readout.steps == 0 and "denoising" not in r.readout.stages_s
    assert any("Strength 0" in n for n in r.notices)


def test_img2img_strength_one_changes_the_image(tiny_engine):
    image = noise_image(128, 128)
    r = tiny_engine.img2img({**BASE, "strength": 1.0}, image)
    assert r.images[0].size == (128, 128)
    assert np.abs(np.asarray(r.images[0], dtype=int) - np.asarray(image, dtype=int)).mean() > 5


@pytest.mark.parametrize("steps,strength,expected", [(10, 0.55, 6), (10, 0.3, 3), (20, 0.75, 15), (7, 0.5, 4)])
def test_img2img_runs_round_steps_times_strength(tiny_engine, steps, strength, expected):
    r = tiny_engine.img2img({**BASE, "steps": steps, "strength": strength, "width": 64, "height": 64},
                            noise_image(64, 64))
    assert r.readout.steps == expected
    assert any(f"Ran {expected} of {steps}" in n for n in r.notices)


@pytest.mark.parametrize("mode", ["resize", "crop and resize", "resize and fill"])
def test_img2img_resize_modes_give_requested_size(tiny_engine, mode):
    r = tiny_engine.img2img({**BASE, "steps": 2, "strength": 0.5, "width": 128, "height": 64, "resize_mode": mode},
                            noise_image(100, 150))
    assert r.images[0].size == (128, 64)


def test_img2img_defaults_to_input_size_snapped(tiny_engine):
    r = tiny_engine.img2img({**BASE, "strength": 0.0}, noise_image(130, 90))
    assert r.images[0].size == (128, 88)
    assert any("snapped" in n for n in r.notices)


@pytest.mark.parametrize("upscaler", ["latent (bicubic)", "latent (nearest-exact)", "Lanczos"])
def test_hires_fix_returns_base_and_final(tiny_engine, upscaler):
    r = tiny_engine.hires_fix({**BASE, "width": 96, "height": 64, "steps": 4, "factor": 1.5, "upscaler": upscaler,
                               "hires_strength": 0.5})
    assert r.extra_images["base"][0].size == (96, 64)
    assert r.images[0].size == (144, 96)  # round(96*1.5), round(64*1.5), multiples of 8
    stages = r.readout.stages_s
    assert {"base_denoising", "hires_denoising", "base_vae_decode", "hires_vae_decode"} <= set(stages)
    assert r.readout.steps == 4 + 2


def test_hires_final_size_is_snapped(tiny_engine):
    r = tiny_engine.hires_fix({**BASE, "width": 64, "height": 64, "steps": 2, "factor": 1.3})
    assert r.images[0].size == (80, 80)  # 83.2 -> 83 -> 80


def test_tiled_upscale_300x200_by_2(tiny_engine):
    r = tiny_engine.tiled_upscale({**BASE, "steps": 4, "factor": 2, "tile_size": 256, "tile_overlap": 64},
                                  noise_image(300, 200))
    assert r.images[0].size == (600, 400)
    d = r.readout.details
    assert d["tiles"] == len(grid(600, 400, 256, 64)) and d["seconds_per_tile"] > 0
    assert any("tiles of 256" in n for n in r.notices)


def test_tiled_upscale_odd_size_is_snapped_and_stated(tiny_engine):
    r = tiny_engine.tiled_upscale({**BASE, "steps": 2, "factor": 1.5, "tile_size": 128, "tile_overlap": 32},
                                  noise_image(101, 67))
    assert r.images[0].size == (152, 104)
    assert any("snapped" in n for n in r.notices)


def test_tiles_cover_any_size_and_weights_feather():
    for w, h in [(600, 400), (1000, 130), (256, 256), (257, 511)]:
        cover = np.zeros((h, w), dtype=int)
        for t in grid(w, h, 256, 64):
            assert t.x + t.width <= w and t.y + t.height <= h
            cover[t.y:t.y + t.height, t.x:t.x + t.width] += 1
        assert cover.min() >= 1
    tiles = grid(600, 400, 256, 64)
    wts = feather_weights(tiles[0], 600, 400, 64)
    assert wts[0, 0] == 1.0 and wts[10, -1] < 0.05  # image corner kept, inner edge ramps


def test_no_seam_across_tile_borders(tiny_engine):
    image = gradient(256, 192)
    r = tiny_engine.tiled_upscale({**BASE, "steps": 6, "strength": 0.5, "factor": 2, "tile_size": 128,
                                   "tile_overlap": 48}, image)
    out = np.asarray(r.images[0], dtype=np.float32)
    h, w = out.shape[:2]
    tiles = grid(w, h, 128, 48)
    xs = sorted({e for t in tiles for e in (t.x, t.x + t.width)} - {0, w})
    ys = sorted({e for t in tiles for e in (t.y, t.y + t.height)} - {0, h})
    dx = np.abs(np.diff(out, axis=1)).mean(axis=(0, 2))  # dx[i]: column i vs i+1
    dy = np.abs(np.diff(out, axis=0)).mean(axis=(1, 2))
    border = np.concatenate([dx[[x - 1 for x in xs]], dy[[y - 1 for y in ys]]]).mean()
    inner = np.concatenate([np.delete(dx, [x - 1 for x in xs]), np.delete(dy, [y - 1 for y in ys])]).mean()
    assert border <= 1.5 * inner, (border, inner)


def test_upscale_memory_grows_only_with_buffers(tiny_engine):
    small = tiny_engine.tiled_upscale({**BASE, "steps": 2, "strength": 0.5, "factor": 2, "tile_size": 256,
                                       "tile_overlap": 32}, noise_image(512, 512))
    big = tiny_engine.tiled_upscale({**BASE, "steps": 2, "strength": 0.5, "factor": 2, "tile_size": 256,
                                     "tile_overlap": 32}, noise_image(1024, 1024))
    assert big.images[0].size == (2048, 2048) and small.images[0].size == (1024, 1024)
    assert big.readout.peak_rss_bytes < 1.5 * small.readout.peak_rss_bytes


def test_vae_tiling_decodes_large_images_close_to_plain(tiny_engine):
    req = {**BASE, "steps": 3, "strength": 0.6, "width": 640, "height": 576}
    image = gradient(640, 576)
    plain = tiny_engine.img2img(req, image)
    tiled = tiny_engine.img2img({**req, "vae_tiling": True}, image)
    diff = np.abs(np.asarray(plain.images[0], dtype=int) - np.asarray(tiled.images[0], dtype=int))
    assert tiled.images[0].size == (640, 576) and diff.mean() < 8


def test_tasks_share_the_loaded_weights(tiny_engine):
    from engine.tasks.common import derived_pipeline

    img2img = derived_pipeline(tiny_engine.model, "img2img")
    assert img2img.unet is tiny_engine.model.pipe.unet and img2img.vae is tiny_engine.model.pipe.vae


@pytest.mark.parametrize("image,needle", [
    (None, "No image"), (b"this is not a png", "not an image"), ("1x1", "at least"), ("huge", "limit"),
])
def test_bad_images_get_one_clear_message(tiny_engine, tmp_path, image, needle):
    if image == "1x1":
        image = Image.new("RGB", (1, 1))
    elif image == "huge":
        path = tmp_path / "huge.png"
        Image.new("1", (20000, 20000)).save(path)
        image = str(path)
    for call in (lambda: tiny_engine.img2img(BASE, image), lambda: tiny_engine.tiled_upscale(BASE, image)):
        with pytest.raises(UserError, match=needle):
            call()


@pytest.mark.parametrize("task,bad,needle", [
    ("img2img", {"strength": 1.5}, "strength"), ("img2img", {"strength": -0.1}, "strength"),
    ("tiled", {"factor": 9}, "factor"), ("tiled", {"factor": 0.5}, "factor"),
    ("hires", {"factor": 1.0}, "factor"), ("hires", {"factor": 5}, "factor"),
    ("hires", {"width": 1024, "height": 1024, "factor": 4}, "limit"),
])
def test_bad_numbers_get_one_clear_message(tiny_engine, task, bad, needle):
    image = noise_image(64, 64)
    call = {"img2img": lambda r: tiny_engine.img2img(r, image), "tiled": lambda r: tiny_engine.tiled_upscale(r, image),
            "hires": lambda r: tiny_engine.hires_fix(r)}[task]
    with pytest.raises(UserError, match=needle):
        call({**BASE, **bad})


def test_tiled_vae_encode_is_close_to_plain_encode(tiny_engine):
    import torch

    from engine.tasks.common import encode_images, generators

    image = gradient(640, 576)
    model = tiny_engine.model
    with torch.inference_mode():
        plain = encode_images(model, [image], generators(0, 1, "cpu"))
        tiled = encode_images(model, [image], generators(0, 1, "cpu"), tiled=True)
    assert tiled.shape == plain.shape == (1, 4, 72, 80)
    # same noise, means/stds differ only where tiles saw less context
    assert torch.mean(torch.abs(tiled - plain)) < 0.25 * torch.mean(torch.abs(plain))


def test_tiled_upscale_batch_size_makes_variants_from_consecutive_seeds(tiny_engine):
    request = {**BASE, "steps": 2, "strength": 0.5, "factor": 2, "tile_size": 128, "tile_overlap": 32, "seed": 40}
    image = noise_image(96, 64)
    two = tiny_engine.tiled_upscale({**request, "batch_size": 2}, image)
    second_alone = tiny_engine.tiled_upscale({**request, "seed": 41}, image)
    assert len(two.images) == 2 and two.seeds == [40, 41]
    assert not np.array_equal(np.asarray(two.images[0]), np.asarray(two.images[1]))
    assert np.array_equal(np.asarray(two.images[1]), np.asarray(second_alone.images[0]))
    assert two.readout.steps == 2 * second_alone.readout.steps
