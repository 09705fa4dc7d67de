"""Mask arithmetic for inpainting, on PIL images (mask: mode L, white = repaint), as AUTOMATIC1111 does it:
binary masks from any upload, the blurred edge, the "fill" start, the "only masked" crop region, outpainting's
grown canvas and the paste back that leaves every pixel outside the mask as it was."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from engine.errors import UserError
from engine.requests import open_image


def load_mask(value: Any, size: tuple[int, int]) -> Image.Image:
    """An uploaded mask -> binary L at `size`: an RGBA mask with transparency is its alpha, else its brightness,
    cut at 50% (A1111's create_binary_mask). A mask of another size is stretched to the image's, as A1111 does."""
    image = open_image(value)
    try:
        image.load()
    except (OSError, ValueError, TypeError, SyntaxError) as e:
        raise UserError(f"The mask is not an image that can be read ({type(e).__name__}).") from e
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        alpha = image.getchannel("A")
        gray = alpha if alpha.getextrema() != (255, 255) else image.convert("L")
    else:
        gray = image.convert("L")
    mask = gray.point(lambda v: 255 if v > 128 else 0)
    return mask if mask.size == size else mask.resize(size, Image.NEAREST)


def blurred(mask: Image.Image, radius: int) -> Image.Image:
    """The mask's edge softened: the weight the result has against the original at each pixel."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask.copy()


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted from its surroundings' colours (blurs of shrinking radius, each
    normalised by how much known picture it saw), so the sampler starts from the right colours, not the old ones."""
    known = 1.0 - np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = pixels * known
    for radius in (256, 64, 16, 4, 1):
        colour = _blur(pixels * known, radius)
        weight = _blur(np.repeat(known, 3, axis=2), radius)
        guess = colour / np.maximum(weight, 1e-4)
        out = np.where(known > 0.5, pixels, np.where(weight > 1e-3, guess, out))
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def _blur(array: np.ndarray, radius: int) -> np.ndarray:
    """Gaussian blur of a float HxWxC array over its two image axes (zeros beyond the edge)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(array, sigma=(radius, radius, 0), mode="constant", truncate=3.0)


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box around the mask grown by `padding`, widened to the output's aspect ratio and kept inside the
    picture (A1111's get_crop_region + expand_crop_region); None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    iw, ih = mask.size
    x1, y1 = max(0, box[0] - padding), max(0, box[1] - padding)
    x2, y2 = min(iw, box[2] + padding), min(ih, box[3] + padding)
    ratio = width / height
    w, h = x2 - x1, y2 - y1
    if w / h < ratio:  # too narrow: widen around the centre
        w = min(iw, round(h * ratio))
    else:
        h = min(ih, round(w / ratio))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(min(max(0, round(cx - w / 2)), iw - w))
    top = int(min(max(0, round(cy - h / 2)), ih - h))
    return left, top, left + w, top + h


def grown_canvas(image: Image.Image, mask: Image.Image | None, left: int, up: int, right: int,
                 down: int) -> tuple[Image.Image, Image.Image]:
    """Outpainting's canvas: the picture with `left/up/right/down` pixels added, the new area filled from the
    nearest edge and masked (the given mask, if any, kept where it was)."""
    w, h = image.size
    canvas_size = (w + left + right, h + up + down)
    array = np.asarray(image.convert("RGB"))
    padded = np.pad(array, ((up, down), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(padded)
    grown = Image.new("L", canvas_size, 255)
    grown.paste(mask if mask is not None else Image.new("L", (w, h), 0), (left, up))
    return canvas, grown


def paste_back(original: Image.Image, result: Image.Image, overlay: Image.Image,
               box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The result over the original through the blurred mask: outside it the original's pixels exactly. With a
    crop box the result (made at the output size) is shrunk into the box first."""
    if box is not None:
        region = result.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS)
        result = original.copy()
        result.paste(region, box[:2])
    return Image.composite(result.convert("RGB"), original.convert("RGB"), overlay)
