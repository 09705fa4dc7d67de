"""Inpainting and outpainting: with a plain tiny model (the known region blended back each step) and a 9-channel
tiny inpainting model, on PyTorch and OpenVINO. Pixels outside the blurred mask stay the original's; the masked
ones change; "only masked" pastes back into its place; outpainting grows the canvas."""
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from engine import Engine, UserError
from engine.options import Optimizations
from engine.store.metadata import parse_parameters
from engine.tasks.masking import crop_region, fill_masked, grown_canvas, load_mask

BASE = {"prompt": "a red circle", "steps": 4, "seed": 5, "sampler": "Euler", "strength": 0.8}


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def box_mask(size, box):
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def diffs(result, original, mask, blur):
    """Mean absolute difference outside the blurred mask and inside the mask's core."""
    out, org = np.asarray(result, dtype=float), np.asarray(original, dtype=float)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask)
    core = np.asarray(mask.filter(ImageFilter.MinFilter(2 * blur + 1)) if blur else mask) == 255
    return np.abs(out - org)[soft == 0].mean(), np.abs(out - org)[core].mean()


@pytest.fixture(scope="module", params=[("pytorch", "builtin:tiny"), ("pytorch", "builtin:tiny-inpaint"),
                                        ("openvino", "builtin:tiny"), ("openvino", "builtin:tiny-inpaint")],
                ids=lambda p: f"{p[0]}-{p[1].split(':')[1]}")
def engine(request, tmp_path_factory):
    runtime, model = request.param
    e = Engine(runtime=runtime, optimizations=Optimizations(precision="fp32"), outputs_dir=None,
               cache_dir=tmp_path_factory.mktemp("inpaint-cache"))
    e.load(model)
    assert e.model.is_inpainting == model.endswith("inpaint")
    return e


@pytest.mark.parametrize("content", ["original", "fill", "latent noise", "latent nothing"])
def test_inpainting_keeps_what_is_outside_the_mask_and_changes_what_is_inside(engine, content):
    image, mask = noise_image(128, 96), box_mask((128, 96), (40, 24, 90, 70))
    r = engine.inpaint({**BASE, "masked_content": content, "mask_blur": 4}, image, mask)
    outside, inside = diffs(r.images[0], image, mask, 4)
    assert r.images[0].size == image.size
    assert outside < 2 and inside > 10, (outside, inside)
    assert r.readout.details["inpainting_unet"].startswith("yes" if engine.model.is_inpainting else "no")


def test_only_masked_repaints_the_region_at_full_size_and_pastes_it_back_in_place(engine):
    image, mask = noise_image(256, 256, seed=1), box_mask((256, 256), (180, 190, 220, 230))
    r = engine.inpaint({**BASE, "inpaint_area": "only masked", "only_masked_padding": 8, "mask_blur": 2,
                        "width": 128, "height": 128}, image, mask)
    # the picture is fitted to the 128x128 output first (the mask at (90, 95)-(110, 115) there); the region (the
    # mask + 8 px, squared to the output's 1:1) was denoised at 128x128, then shrunk back into its place
    assert r.readout.details["inpaint_region"] == "37x37 at (82, 86)"
    assert r.images[0].size == (128, 128)
    small_image, small_mask = image.resize((128, 128), Image.LANCZOS), mask.resize((128, 128), Image.NEAREST)
    outside, inside = diffs(r.images[0], small_image, small_mask, 2)
    assert outside < 2 and inside > 10


def test_outpainting_grows_the_canvas_and_keeps_the_picture(engine):
    image = noise_image(64, 64, seed=2)
    r = engine.inpaint({**BASE, "outpaint_right": 32, "outpaint_down": 16, "mask_blur": 4}, image)
    assert r.images[0].size == (96, 80)
    new_area = box_mask((96, 80), (64, 0, 95, 79))
    ImageDraw.Draw(new_area).rectangle((0, 64, 95, 79), fill=255)
    original = Image.new("RGB", (96, 80))
    original.paste(image)
    outside, _ = diffs(r.images[0], original, new_area, 4)
    assert outside < 2
    assert any("grew to 96x80" in n for n in r.notices)


def test_invert_mask_repaints_the_unpainted_part(tiny_engine):
    image, mask = noise_image(96, 96), box_mask((96, 96), (0, 0, 47, 95))
    r = tiny_engine.inpaint({**BASE, "invert_mask": True, "mask_blur": 0}, image, mask)
    left, right = np.asarray(r.images[0], dtype=float)[:, :48], np.asarray(r.images[0], dtype=float)[:, 48:]
    assert np.array_equal(left, np.asarray(image, dtype=float)[:, :48])
    assert np.abs(right - np.asarray(image, dtype=float)[:, 48:]).mean() > 10


def test_a_missing_or_empty_mask_is_one_line(tiny_engine):
    image = noise_image(64, 64)
    with pytest.raises(UserError, match="No mask"):
        tiny_engine.inpaint(BASE, image)
    with pytest.raises(UserError, match="mask is empty"):
        tiny_engine.inpaint(BASE, image, Image.new("L", (64, 64), 0))
    with pytest.raises(UserError, match="mask is empty.*Invert"):
        tiny_engine.inpaint({**BASE, "invert_mask": True}, image, Image.new("L", (64, 64), 255))
    with pytest.raises(UserError, match="not an image"):
        tiny_engine.inpaint(BASE, image, b"not a png")


def test_the_png_parameters_carry_the_inpaint_settings(tiny_engine):
    image, mask = noise_image(64, 64), box_mask((64, 64), (10, 10, 40, 40))
    r = tiny_engine.inpaint({**BASE, "mask_blur": 6, "masked_content": "fill", "inpaint_area": "only masked",
                             "only_masked_padding": 12}, image, mask)
    text = r.infotexts[0]
    assert "Mask blur: 6" in text and "Inpaint area: Only masked" in text and "Masked area padding: 12" in text
    back = parse_parameters(text)
    assert (back["task"], back["mask_blur"], back["masked_content"], back["inpaint_area"],
            back["only_masked_padding"]) == ("inpaint", 6, "fill", "only masked", 12)


def test_an_inpainting_model_runs_txt2img_and_img2img_with_the_whole_picture_masked():
    e = Engine(runtime="pytorch", optimizations=Optimizations(precision="fp32"), outputs_dir=None)
    e.load("builtin:tiny-inpaint")
    assert e.txt2img({"prompt": "x", "steps": 3, "width": 64, "height": 64}).images[0].size == (64, 64)
    assert e.img2img(BASE, noise_image(96, 64)).images[0].size == (96, 64)


def test_masks_read_as_a1111_reads_them():
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((0, 0, 15, 31), fill=(0, 0, 0, 255))  # painted in black, opaque
    assert np.asarray(load_mask(rgba, (32, 32)))[:, :16].min() == 255  # the alpha is the mask
    gray = Image.new("L", (16, 16), 100)
    ImageDraw.Draw(gray).rectangle((0, 0, 7, 15), fill=200)
    assert set(np.unique(load_mask(gray, (32, 32)))) == {0, 255}  # cut at 50%, stretched to the picture
    assert load_mask(gray, (32, 32)).size == (32, 32)


def test_crop_region_pads_squares_and_stays_inside():
    mask = box_mask((200, 100), (150, 40, 170, 60))
    assert crop_region(mask, 10, 64, 64) == (140, 30, 181, 71)
    left, top, right, bottom = crop_region(mask, 50, 64, 64)
    assert (left, top, right, bottom) == (100, 0, 200, 100)  # grown past the edge: kept inside, still square
    assert crop_region(Image.new("L", (10, 10)), 4, 8, 8) is None


def test_fill_paints_the_hole_from_its_surroundings():
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = box_mask((64, 64), (16, 16, 47, 47))
    holed = image.copy()
    ImageDraw.Draw(holed).rectangle((16, 16, 47, 47), fill=(0, 255, 0))
    filled = np.asarray(fill_masked(holed, mask), dtype=int)
    assert np.abs(filled - [200, 30, 30]).max() <= 2  # the green inside is gone: the red around it fills it


def test_grown_canvas_stretches_the_edges_and_masks_the_new_area():
    image = noise_image(20, 10)
    canvas, mask = grown_canvas(image, None, 5, 0, 0, 3)
    assert canvas.size == (25, 13) and mask.size == (25, 13)
    assert np.array_equal(np.asarray(canvas)[:10, 5:], np.asarray(image))
    assert np.asarray(mask)[:10, 5:].max() == 0 and np.asarray(mask)[:, :5].min() == 255
