"""From A1111's requests to ours and back: the field mapping (validated before any work, a 422 naming the A1111
field; what we cannot honour refused, never ignored), and A1111's response with our readout in info["fast_sd"]."""
from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

from engine import UserError
from engine.requests import HiresFixRequest, Img2ImgRequest, Txt2ImgRequest, parse_request
from engine.samplers import canonical_sampler
from engine.store.outputs import parameters_info
from ui.http.a1111.schemas import ApiError, GenerationApi, Img2ImgApi, Txt2ImgApi, decode_image

# A1111 hires upscaler names -> ours. "None", "Nearest" and "Lanczos" resize the decoded image.
HR_UPSCALERS = {
    "latent": "latent (bicubic)", "latent (antialiased)": "latent (bicubic)", "latent (bicubic)": "latent (bicubic)",
    "latent (bicubic antialiased)": "latent (bicubic)", "latent (nearest)": "latent (nearest-exact)",
    "latent (nearest-exact)": "latent (nearest-exact)", "none": "Lanczos", "lanczos": "Lanczos", "nearest": "Lanczos",
}

VERSION = "fast-sd"  # what the info text says made the picture


RESIZE_MODES = {0: "resize", 1: "crop and resize", 2: "resize and fill", 3: "resize"}  # 3: A1111's latent upscale


SCHEDULERS = {"automatic": "", "karras": " Karras"}  # A1111's separate scheduler field -> our sampler suffix


def refuse_unsupported(req: GenerationApi) -> None:
    if req.restore_faces:
        raise ApiError(422, "restore_faces: face restoration is not available on this server.")
    if req.tiling:
        raise ApiError(422, "tiling: seamless tiling is not available on this server.")
    if req.subseed_strength:
        raise ApiError(422, "subseed_strength: variation seeds are not available on this server.")
    if req.script_name:  # A1111 answers an unknown script with a 422 too
        raise ApiError(422, f"script_name {req.script_name!r}: this server has no scripts.")
    if req.alwayson_scripts:
        raise ApiError(422, f"alwayson_scripts: this server has no always-on scripts "
                            f"({', '.join(map(str, req.alwayson_scripts))}).")


def sampler_of(req: GenerationApi) -> str:
    name = req.sampler_name or req.sampler_index or "Euler"
    scheduler = (req.scheduler or "automatic").strip().lower()
    if scheduler not in SCHEDULERS:
        raise ApiError(422, f"scheduler {req.scheduler!r}: choose one of {', '.join(SCHEDULERS)}.")
    candidates = [name + SCHEDULERS[scheduler]] if SCHEDULERS[scheduler] and "karras" not in name.lower() else [name]
    try:
        return canonical_sampler(candidates[0])
    except UserError as e:
        raise ApiError(422, f"sampler_name: {e}") from None


def common_fields(req: GenerationApi) -> dict[str, Any]:
    return {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
            "guidance": req.cfg_scale, "sampler": sampler_of(req), "seed": req.seed, "batch_size": req.batch_size,
            "styles": list(req.styles or [])}


# our request field -> the A1111 field the client sent, so a 422 names what the client can change
A1111_NAMES = {"guidance": "cfg_scale", "factor": "hr_scale", "hires_steps": "hr_second_pass_steps",
               "hires_strength": "denoising_strength", "strength": "denoising_strength", "batch_count": "n_iter",
               "sampler": "sampler_name"}


_FIELD_AT = re.compile(r"(^Invalid request: |; )(" + "|".join(A1111_NAMES) + r"):")


def checked(cls, fields: dict[str, Any]) -> None:
    try:
        parse_request(cls, fields)
    except UserError as e:
        raise ApiError(422, _FIELD_AT.sub(lambda m: m.group(1) + A1111_NAMES[m.group(2)] + ":", str(e))) from None


def txt2img_request(req: Txt2ImgApi) -> tuple[str, dict[str, Any]]:
    """('txt2img' | 'hires_fix', our request fields), validated here so a bad field never reaches the device."""
    refuse_unsupported(req)
    fields = {**common_fields(req), "width": req.width, "height": req.height, "batch_count": req.n_iter}
    if not req.enable_hr:
        checked(Txt2ImgRequest, fields)
        return "txt2img", fields
    upscaler = HR_UPSCALERS.get((req.hr_upscaler or "Latent").strip().lower())
    if upscaler is None:
        raise ApiError(422, f"hr_upscaler {req.hr_upscaler!r}: this server has "
                            f"{', '.join(sorted({k.title() for k in HR_UPSCALERS}))}.")
    for name, same in (("hr_prompt", req.prompt), ("hr_negative_prompt", req.negative_prompt),
                       ("hr_checkpoint_name", "Use same checkpoint"), ("hr_sampler_name", "Use same sampler")):
        value = getattr(req, name)
        if value not in (None, "", same):
            raise ApiError(422, f"{name} {value!r}: the second pass uses the first pass's "
                                f"{name.removeprefix('hr_').replace('_', ' ')} here.")
    factor = req.hr_scale
    if (req.hr_resize_x > 0 or req.hr_resize_y > 0) and req.width > 0 and req.height > 0:  # a target size
        factor = max(req.hr_resize_x / req.width, req.hr_resize_y / req.height)
    fields.update(factor=factor, upscaler=upscaler, hires_steps=req.hr_second_pass_steps,
                  hires_strength=0.7 if req.denoising_strength is None else req.denoising_strength)
    checked(HiresFixRequest, fields)
    return "hires_fix", fields


def img2img_request(req: Img2ImgApi) -> tuple[dict[str, Any], Any]:
    refuse_unsupported(req)
    if req.mask:
        raise ApiError(422, "mask: inpainting is not supported yet; send img2img without a mask.")
    if not req.init_images:
        raise ApiError(422, "init_images: img2img needs one image (base64).")
    if req.n_iter != 1:
        raise ApiError(422, f"n_iter {req.n_iter}: img2img runs one batch here; use batch_size for more images.")
    if len(req.init_images) > 1:
        raise ApiError(422, f"init_images: one image per request, got {len(req.init_images)}.")
    if req.resize_mode not in RESIZE_MODES:
        raise ApiError(422, f"resize_mode {req.resize_mode}: choose 0 (resize), 1 (crop and resize), "
                            f"2 (resize and fill) or 3 (latent upscale, done as resize).")
    image = decode_image(req.init_images[0], "init_images[0]")
    fields = {**common_fields(req), "width": req.width, "height": req.height, "resize_mode": RESIZE_MODES[req.resize_mode],
              "strength": 0.75 if req.denoising_strength is None else req.denoising_strength}
    checked(Img2ImgRequest, fields)
    return fields, image


def png_base64(image, parameters_text: str | None = None) -> str:
    """A PNG as plain base64 (what A1111 sends), with its parameters text when it has one."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"pnginfo": parameters_info(parameters_text)} if parameters_text else {}))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def generation_response(result, req: GenerationApi, sent: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    params, texts = result.parameters, result.infotexts
    n = len(result.images)
    info = {
        "prompt": params.get("prompt", ""), "all_prompts": [params.get("prompt", "")] * n,
        "negative_prompt": params.get("negative_prompt", ""),
        "all_negative_prompts": [params.get("negative_prompt", "")] * n,
        "seed": result.seeds[0] if result.seeds else params.get("seed"), "all_seeds": list(result.seeds),
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": params.get("width"), "height": params.get("height"), "sampler_name": params.get("sampler"),
        "cfg_scale": params.get("guidance"), "steps": params.get("steps"), "batch_size": params.get("batch_size"),
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": params.get("model"),
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.get("strength", params.get("hires_strength")),
        "extra_generation_params": {k: params[k] for k in ("task", "runtime", "factor", "upscaler", "hires_steps",
                                                           "resize_mode") if k in params},
        "index_of_first_image": 0, "infotexts": texts, "styles": list(params.get("styles") or []),
        "job_timestamp": extra.pop("job_timestamp"),
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": VERSION,
        "fast_sd": {"readout": result.readout.to_dict(), "notices": list(result.notices),
                    "saved_paths": list(result.saved_paths), **extra},
    }
    images = [png_base64(im, text) for im, text in zip(result.images, texts)] if req.send_images else []
    return {"images": images, "parameters": sent, "info": json.dumps(info, default=str)}


TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")


def model_name(title: str) -> str:
    """A1111 titles are 'name [shorthash]'; we load by name."""
    return TITLE_HASH.sub("", str(title).strip())
