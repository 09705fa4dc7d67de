"""Typed, validated generation requests.

Validation happens here, before any work starts; every bad field gets one clear line.
Sizes are snapped to the model's multiple (the VAE scale factor) and the snap is reported.
"""
from __future__ import annotations

import io
import random
import threading
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from engine.errors import UserError
from engine.samplers import DEFAULT_SAMPLER, DEFAULT_SCHEDULE, canonical_sampler, parse_sampler, with_sampler_pair

MIN_SIZE = 64
MAX_SIZE = 2048
MAX_STEPS = 150
MAX_BATCH = 8
MAX_SEED = 2**32 - 1
MAX_UPSCALE_SIZE = 4096  # tiled upscale output side
MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 8192 * 8192
# Decoded bytes an input image may take, checked from its header before it is decoded: a 6000x4000 photo fits.
MAX_IMAGE_BYTES = 96 << 20
# Input images decoded at once, whatever the number of requests: a decode may take twice MAX_IMAGE_BYTES, and a
# queue of jobs decoding together took the process to 3.7 GiB. A task decodes and shrinks its input under it.
IMAGE_SLOTS = threading.BoundedSemaphore(2)
MAX_PROMPT_CHARS = 20_000  # before styles; prompts.MAX_CHARS bounds the expanded prompt too
ResizeMode = Literal["resize", "crop and resize", "resize and fill"]
HiresUpscaler = Literal["latent (bicubic)", "latent (nearest-exact)", "Lanczos"]
# A1111's hires upscaler names -> ours. "None", "Nearest" and "Lanczos" resize the decoded image.
HIRES_UPSCALER_NAMES = {
    "latent": "latent (bicubic)", "latent (antialiased)": "latent (bicubic)", "latent (bicubic)": "latent (bicubic)",
    "latent (bicubic antialiased)": "latent (bicubic)", "latent (nearest)": "latent (nearest-exact)",
    "latent (nearest-exact)": "latent (nearest-exact)", "none": "Lanczos", "lanczos": "Lanczos", "nearest": "Lanczos",
}


def hires_upscaler_named(name: str | None) -> str | None:
    """Ours for an A1111 hires upscaler name (any case), or None where we have no such upscaler."""
    return HIRES_UPSCALER_NAMES.get(" ".join(str(name or "").split()).lower())


class GenerationRequest(BaseModel):
    """Fields shared by every task."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance: float = Field(7.0, ge=0.0, le=30.0)
    sampler: str = DEFAULT_SAMPLER
    schedule: str = Field(DEFAULT_SCHEDULE, description="A1111's Schedule type; Automatic: the sampler's own")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM's eta (0: deterministic); None: 0")
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    styles: tuple[str, ...] = Field((), description="styles from the styles file, applied in this order")

    _sampler_pair = model_validator(mode="before")(classmethod(lambda cls, data: with_sampler_pair(data)))

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        try:
            return canonical_sampler(value)
        except UserError as e:
            raise ValueError(str(e)) from None

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str, info: ValidationInfo) -> str:
        try:
            return parse_sampler(info.data.get("sampler", DEFAULT_SAMPLER), value)[1]
        except UserError as e:
            raise ValueError(str(e)) from None

    @field_validator("eta")
    @classmethod
    def _eta_for_ddim(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("sampler") != "DDIM":
            raise ValueError(f"eta {value:g} applies to the DDIM sampler here; the ancestral and SDE samplers run at "
                             f"eta 1 and the others take none.")
        return value

    def with_seed(self):
        """Resolve seed -1 to a concrete random seed, so the result can report (and repeat) it."""
        if self.seed >= 0:
            return self
        return self.model_copy(update={"seed": random.SystemRandom().randint(0, MAX_SEED)})


MAX_BATCH_COUNT = 16


class Txt2ImgRequest(GenerationRequest):
    width: int = Field(512, ge=MIN_SIZE, le=MAX_SIZE)
    height: int = Field(512, ge=MIN_SIZE, le=MAX_SIZE)
    batch_count: int = Field(1, ge=1, le=MAX_BATCH_COUNT, description="batches run one after another")

    def snapped(self, multiple: int) -> tuple["Txt2ImgRequest", list[str]]:
        """Round width/height to the model's multiple; the notices say what changed."""
        notices = []
        update = {}
        for name in ("width", "height"):
            value = getattr(self, name)
            snapped = snap_size(value, multiple)
            if snapped != value:
                update[name] = snapped
                notices.append(f"{name} {value} was snapped to {snapped} (a multiple of {multiple}).")
        return (self.model_copy(update=update) if update else self), notices


class Img2ImgRequest(GenerationRequest):
    """Width/height None: the input image's size (scaled to fit the limits), snapped."""

    width: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE)
    height: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE)
    strength: float = Field(0.75, ge=0.0, le=1.0)
    resize_mode: ResizeMode = "resize"
    vae_tiling: bool = False

    def sized_for(self, image_size: tuple[int, int], multiple: int) -> tuple["Img2ImgRequest", list[str]]:
        notices = []
        w, h = self.width, self.height
        if w is None or h is None:
            iw, ih = image_size
            scale = min(1.0, MAX_SIZE / iw, MAX_SIZE / ih)
            if scale < 1.0:
                notices.append(f"The {iw}x{ih} input was scaled to fit {MAX_SIZE} per side.")
            w = w or max(MIN_SIZE, round(iw * scale))
            h = h or max(MIN_SIZE, round(ih * scale))
        update = {}
        for name, value in (("width", w), ("height", h)):
            snapped = snap_size(value, multiple)
            update[name] = snapped
            if snapped != value:
                notices.append(f"{name} {value} was snapped to {snapped} (a multiple of {multiple}).")
        return self.model_copy(update=update), notices


MaskedContent = Literal["original", "fill", "latent noise", "latent nothing"]
InpaintArea = Literal["whole picture", "only masked"]
MAX_OUTPAINT = 1024  # pixels added on one side


class InpaintRequest(Img2ImgRequest):
    """img2img inside a mask (white: repaint), A1111's inpaint fields; outpaint_*: pixels the canvas grows by on
    each side (the new area is masked)."""

    strength: float = Field(0.75, ge=0.0, le=1.0)
    mask_blur: int = Field(4, ge=0, le=64, description="Gaussian blur radius of the mask's edge, in pixels")
    masked_content: MaskedContent = Field("original", description="what the masked area starts from")
    inpaint_area: InpaintArea = Field("whole picture", description="only masked: the masked region at full size")
    only_masked_padding: int = Field(32, ge=0, le=256, description="pixels around the mask, with 'only masked'")
    invert_mask: bool = Field(False, description="repaint what is not masked")
    outpaint_left: int = Field(0, ge=0, le=MAX_OUTPAINT)
    outpaint_right: int = Field(0, ge=0, le=MAX_OUTPAINT)
    outpaint_up: int = Field(0, ge=0, le=MAX_OUTPAINT)
    outpaint_down: int = Field(0, ge=0, le=MAX_OUTPAINT)

    @property
    def outpaint(self) -> tuple[int, int, int, int]:
        return self.outpaint_left, self.outpaint_up, self.outpaint_right, self.outpaint_down


class HiresFixRequest(Txt2ImgRequest):
    factor: float = Field(2.0, ge=1.25, le=4.0)
    upscaler: HiresUpscaler = "latent (bicubic)"
    hires_strength: float = Field(0.5, ge=0.0, le=1.0)
    hires_steps: int = Field(0, ge=0, le=MAX_STEPS, description="0: same as steps")
    vae_tiling: bool = False

    def target_size(self, multiple: int) -> tuple[int, int]:
        w = snap_size(round(self.width * self.factor), multiple)
        h = snap_size(round(self.height * self.factor), multiple)
        if w > MAX_SIZE or h > MAX_SIZE:
            raise UserError(f"Hires fix: {self.width}x{self.height} x{self.factor:g} is {w}x{h}; the limit is "
                            f"{MAX_SIZE} per side. Use a smaller base size or factor, or tiled upscale.")
        return w, h


class TiledUpscaleRequest(GenerationRequest):
    factor: float = Field(2.0, ge=1.0, le=4.0)
    tile_size: int = Field(512, ge=64, le=1024)
    tile_overlap: int = Field(64, ge=0, le=256)
    strength: float = Field(0.35, ge=0.0, le=1.0)
    steps: int = Field(20, ge=1, le=MAX_STEPS)

    def output_size(self, image_size: tuple[int, int], multiple: int) -> tuple[int, int, list[str]]:
        iw, ih = image_size
        raw_w, raw_h = round(iw * self.factor), round(ih * self.factor)
        w, h = snap_size(raw_w, multiple), snap_size(raw_h, multiple)
        if w > MAX_UPSCALE_SIZE or h > MAX_UPSCALE_SIZE:
            raise UserError(f"Tiled upscale: {iw}x{ih} x{self.factor:g} is {w}x{h}; the limit is "
                            f"{MAX_UPSCALE_SIZE} per side.")
        notices = [] if (w, h) == (raw_w, raw_h) else [
            f"Output {raw_w}x{raw_h} was snapped to {w}x{h} (a multiple of {multiple})."]
        return w, h, notices


# Bytes a pixel of each mode takes once decoded: Pillow keeps every mode not named here in 4 bytes a pixel
# (RGB as RGBX), whatever the file's bits per sample.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decoded_bytes(image) -> int:
    """What decoding `image` (opened, not yet loaded) takes, from its header: width x height x bytes a pixel."""
    return image.size[0] * image.size[1] * _PIXEL_BYTES.get(image.mode, 4)


def open_image(value: Any):
    """Whatever the UI or API sends -> a PIL image opened but not decoded, its size and decoded bytes checked
    from the header; or one clear error."""
    from PIL import Image, UnidentifiedImageError

    if value is None:
        raise UserError("No image given: upload an image first.")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (str, Path)):
            image = Image.open(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            import numpy as np

            image = Image.fromarray(np.asarray(value))
    except Image.DecompressionBombError as e:
        raise UserError(f"The image is too large; the limit is {MAX_IMAGE_SIDE} pixels per side.") from e
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
        raise UserError(f"That file is not an image that can be read ({type(e).__name__}).") from e
    w, h = image.size
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        raise UserError(f"The image is {w}x{h}; it must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels.")
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise UserError(f"The image is {w}x{h}; the limit is {MAX_IMAGE_SIDE} pixels per side.")
    need = decoded_bytes(image)
    if need > MAX_IMAGE_BYTES:
        raise UserError(f"The image is {w}x{h} {image.mode}: {need >> 20} MiB once decoded; the limit is "
                        f"{MAX_IMAGE_BYTES >> 20} MiB (about 5000x5000 in colour). Send a smaller image.")
    return image


def load_image(value: Any):
    """Whatever the UI or API sends -> an RGB PIL image, or one clear error. Callers that keep only a smaller
    copy decode under IMAGE_SLOTS (engine/tasks/base.py)."""
    from PIL import Image, ImageOps

    image = open_image(value)
    try:
        image.load()
        if not isinstance(value, Image.Image):  # a phone photo's orientation, as Gradio's own loading applied it
            image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, TypeError, SyntaxError) as e:  # a truncated or damaged file
        raise UserError(f"That file is not an image that can be read ({type(e).__name__}).") from e
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        return background
    return image.convert("RGB")


def snap_size(value: int, multiple: int) -> int:
    """Nearest multiple (ties go up), never below one multiple."""
    return max(multiple, int((value + multiple / 2) // multiple) * multiple)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512x512, 768x512' -> [(512, 512), (768, 512)], each side within the request limits."""
    sizes = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        w, sep, h = part.strip().lower().partition("x")
        if not sep or not w.strip().isdigit() or not h.strip().isdigit():
            raise UserError(f"{part.strip()!r} is not WIDTHxHEIGHT (e.g. 512x512).")
        w, h = int(w), int(h)
        if not (MIN_SIZE <= w <= MAX_SIZE and MIN_SIZE <= h <= MAX_SIZE):
            raise UserError(f"{w}x{h}: each side must be between {MIN_SIZE} and {MAX_SIZE}.")
        sizes.append((w, h))
    if not sizes:
        raise UserError("No sizes given; write e.g. 512x512,768x512.")
    return sizes


_R = TypeVar("_R", bound=BaseModel)


def parse_request(cls: type[_R], data: dict[str, Any]) -> _R:
    """Build a request from untrusted input; a bad field becomes one readable sentence."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(describe_validation_error(e, data)) from e


def describe_validation_error(error: ValidationError, data: dict[str, Any] | None = None) -> str:
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        got = ""
        if data is not None and err["loc"] and err["loc"][0] in data:
            got = f" (got {data[err['loc'][0]]!r})"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "is not a known field"
        lines.append(f"{field}: {msg}{got}")
    return "Invalid request: " + "; ".join(lines)
