"""AUTOMATIC1111's request bodies as it names and defaults them, and reading a body: its size, its JSON (too deep
or not valid Unicode is a 422), its base64 images."""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import UserError
from engine.requests import MAX_BATCH_COUNT, MAX_SIZE, describe_validation_error, open_image

MAX_BODY_BYTES = 64 * 1024 * 1024  # a few init images; a bigger body is refused before it is parsed


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class GenerationApi(BaseModel):
    """The fields of A1111's StableDiffusionProcessing*API models (modules/api/models.py), with its defaults. Each
    is honoured with A1111's meaning or refused with a 422 naming it (mapping.refuse_unsupported); fields of
    extensions A1111 does not have are ignored, as A1111 ignores them."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = Field(1, ge=1, le=MAX_BATCH_COUNT)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    ddim_discretize: str | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    do_not_reload_embeddings: bool = False
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] | None = None
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgApi(GenerationApi):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIZE * 4)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIZE * 4)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None


class Img2ImgApi(GenerationApi):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


def validated(cls: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise ApiError(422, f"Invalid request: the body must be a JSON object, got {type(data).__name__}.")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, describe_validation_error(e, data)) from None


def decode_base64(text: Any, field: str) -> bytes:
    """A1111 sends base64, with or without a data: URL prefix."""
    if not isinstance(text, str) or not text.strip():
        raise ApiError(422, f"{field}: expected a base64-encoded image.")
    data = text.partition(",")[2] if text.lstrip().startswith("data:") else text
    if not data.strip():
        raise ApiError(422, f"{field}: the data URL has no image after its comma.")
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64.") from None


def decode_image(text: Any, field: str) -> bytes:
    """The image's bytes, checked from its header (readable, within the size limits); the engine decodes it when
    the job is made, a few at a time."""
    raw = decode_base64(text, field)
    try:
        open_image(raw)
    except UserError as e:
        raise ApiError(422, f"{field}: {e}") from None
    return raw


MAX_JSON_DEPTH = 32  # A1111's bodies nest 3 or 4 deep (alwayson_scripts args)


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(raw: bytes | bytearray) -> Any:
    """The body as JSON, or an ApiError 422 saying why not: not JSON, nested too deep, text that is not valid
    Unicode (a lone surrogate, which JSON can carry and UTF-8 cannot)."""
    try:
        data = json.loads(raw or b"{}")
    except RecursionError:
        raise ApiError(422, f"The body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels).") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints too long to convert
        raise ApiError(422, f"The body is not valid JSON: {str(e)[:200]}.") from None
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(422, f"The body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels).")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise ApiError(422, "The body has text that is not valid Unicode (a lone UTF-16 surrogate).")
    return data
