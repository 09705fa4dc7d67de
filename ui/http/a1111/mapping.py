"""From A1111's requests to ours and back: the field mapping (validated before any work, a 422 naming the A1111
field; what we cannot honour refused, never ignored), and A1111's response with our readout in info["fast_sd"]."""
from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

from engine import UserError
from engine.requests import (HIRES_UPSCALER_NAMES, HiresFixRequest, Img2ImgRequest, InpaintRequest, Txt2ImgRequest,
                             hires_upscaler_named, parse_request)
from engine.samplers import parse_sampler
from engine.store.metadata import VERSION
from engine.store.outputs import parameters_info
from ui.http.a1111.schemas import ApiError, GenerationApi, Img2ImgApi, Txt2ImgApi, decode_image



RESIZE_MODES = {0: "resize", 1: "crop and resize", 2: "resize and fill", 3: "resize"}  # 3: A1111's latent upscale
# A1111 samplers whose step takes eta (ancestral and SDE): they run at A1111's default eta 1 here
ETA_ONE = {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}


def _off(value: Any, *defaults: Any) -> bool:
    return value is None or value in defaults


def refuse_unsupported(req: GenerationApi) -> None:
    """A 422 naming the first field whose value would draw another picture than A1111's here. A field at A1111's
    default (or one that only matters with another that is off) passes: clients send them all."""
    checks = [
        ("restore_faces", _off(req.restore_faces, False), "face restoration is not available on this server"),
        ("tiling", _off(req.tiling, False), "seamless tiling is not available on this server"),
        ("subseed_strength", _off(req.subseed_strength, 0), "variation seeds are not available on this server"),
        ("seed_resize_from_w", req.seed_resize_from_w <= 0 and req.seed_resize_from_h <= 0,
         "resizing the seed from another size is not available on this server"),
        ("s_churn", _off(req.s_churn, 0), "stochastic churn is not available on this server"),
        ("s_noise", _off(req.s_noise, 1) or _off(req.s_churn, 0), "churn noise applies with s_churn, not here"),
        ("s_min_uncond", _off(req.s_min_uncond, 0), "skipping the negative prompt at low sigma is not available"),
        ("ddim_discretize", _off(req.ddim_discretize, "uniform", ""), "DDIM runs its uniform timesteps here"),
        ("refiner_checkpoint", _off(req.refiner_checkpoint, "", "None", "none"), "there is no refiner pass here"),
        ("disable_extra_networks", not req.disable_extra_networks,
         "LoRA tags in the prompt always apply here; remove them instead"),
        ("firstpass_image", not req.firstpass_image, "a first-pass image is not taken here"),
        ("infotext", not req.infotext, "send the fields themselves (POST /sdapi/v1/png-info reads a parameters text)"),
        ("script_name", not req.script_name, "this server has no scripts"),  # A1111 answers an unknown script so
    ]
    for name, fine, why in checks:
        if not fine:
            raise ApiError(422, f"{name} {getattr(req, name)!r}: {why}.")
    scripts = {name: args for name, args in (req.alwayson_scripts or {}).items() if not _disabled_script(args)}
    if scripts:
        raise ApiError(422, f"alwayson_scripts: this server has no always-on scripts ({', '.join(map(str, scripts))}).")
    if isinstance(req, Txt2ImgApi) and (req.firstphase_width or req.firstphase_height):
        raise ApiError(422, "firstphase_width: the deprecated first-phase size is not taken; send width, height and "
                            "hr_scale.")
    if isinstance(req, Img2ImgApi):
        if req.latent_mask:
            raise ApiError(422, "latent_mask: a second mask for the latents is not taken; the mask serves both.")
        if req.mask and not req.mask_round:
            raise ApiError(422, "mask_round false: the mask is rounded to 0 or 1 here (its blurred edge is kept "
                                "for the paste back).")
        if not _off(req.initial_noise_multiplier, 1):
            raise ApiError(422, f"initial_noise_multiplier {req.initial_noise_multiplier}: the initial noise is not "
                                f"scaled here (1 only).")


def _disabled_script(args: Any) -> bool:
    """An always-on script entry that asks for nothing: {"args": []} or {"args": [False, ...]} (A1111's off)."""
    if isinstance(args, dict):
        args = args.get("args")
    return not args or (isinstance(args, list) and args[0] is False)


def sampler_of(req: GenerationApi) -> tuple[str, str, float | None]:
    """(sampler, schedule type, eta) for the engine: A1111 1.9+ sends the two apart; older clients send
    'DPM++ 2M Karras'. eta is DDIM's; the ancestral and SDE samplers take only A1111's default 1."""
    name = req.sampler_name or req.sampler_index or "Euler"
    field = "sampler_name"
    try:
        parse_sampler(name)
        field = "scheduler"
        sampler, schedule = parse_sampler(name, req.scheduler)
    except UserError as e:
        raise ApiError(422, f"{field}: {e}") from None
    eta = req.eta
    if sampler == "DDIM":
        return sampler, schedule, eta if eta is not None else None
    if sampler in ETA_ONE and not _off(eta, 1):
        raise ApiError(422, f"eta {eta:g}: the {sampler} sampler runs at eta 1 here (only DDIM takes another).")
    return sampler, schedule, None  # samplers without eta ignore it, as in A1111


def common_fields(req: GenerationApi) -> dict[str, Any]:
    sampler, schedule, eta = sampler_of(req)
    fields = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
              "guidance": req.cfg_scale, "sampler": sampler, "schedule": schedule, "seed": req.seed,
              "batch_size": req.batch_size, "styles": list(req.styles or [])}
    if eta is not None:
        fields["eta"] = eta
    return fields


# our request field -> the A1111 field the client sent, so a 422 names what the client can change
A1111_NAMES = {"guidance": "cfg_scale", "factor": "hr_scale", "hires_steps": "hr_second_pass_steps",
               "hires_strength": "denoising_strength", "strength": "denoising_strength", "batch_count": "n_iter",
               "sampler": "sampler_name", "schedule": "scheduler"}


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
    upscaler = hires_upscaler_named(req.hr_upscaler or "Latent")
    if upscaler is None:
        raise ApiError(422, f"hr_upscaler {req.hr_upscaler!r}: this server has "
                            f"{', '.join(sorted({k.title() for k in HIRES_UPSCALER_NAMES}))}.")
    for name, same in (("hr_prompt", req.prompt), ("hr_negative_prompt", req.negative_prompt),
                       ("hr_checkpoint_name", "Use same checkpoint"), ("hr_sampler_name", "Use same sampler"),
                       ("hr_scheduler", "Use same scheduler")):
        value = getattr(req, name)
        if value not in (None, "", same) and not _same_sampler(name, value, fields):
            raise ApiError(422, f"{name} {value!r}: the second pass uses the first pass's "
                                f"{name.removeprefix('hr_').replace('_', ' ')} here.")
    factor = req.hr_scale
    if (req.hr_resize_x > 0 or req.hr_resize_y > 0) and req.width > 0 and req.height > 0:  # a target size
        factor = max(req.hr_resize_x / req.width, req.hr_resize_y / req.height)
    fields.update(factor=factor, upscaler=upscaler, hires_steps=req.hr_second_pass_steps,
                  hires_strength=0.7 if req.denoising_strength is None else req.denoising_strength)
    checked(HiresFixRequest, fields)
    return "hires_fix", fields


def _same_sampler(name: str, value: str, first: dict[str, Any]) -> bool:
    """hr_sampler_name / hr_scheduler naming the first pass's own (its request fields)."""
    try:
        if name == "hr_sampler_name":
            return parse_sampler(value, first["schedule"])[0] == first["sampler"]
        return name == "hr_scheduler" and parse_sampler(first["sampler"], value)[1] == first["schedule"]
    except UserError:
        return False


MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3


def _inpaint_fields(req: Img2ImgApi) -> dict[str, Any]:
    """A1111's inpaint fields (its defaults: fill, only masked, no padding) as ours."""
    blur = req.mask_blur
    if blur is None:
        if req.mask_blur_x != req.mask_blur_y:
            raise ApiError(422, f"mask_blur_x {req.mask_blur_x} / mask_blur_y {req.mask_blur_y}: one blur radius "
                                f"for both directions here; send mask_blur.")
        blur = req.mask_blur_x
    if req.inpainting_fill not in range(len(MASKED_CONTENT)):
        raise ApiError(422, f"inpainting_fill {req.inpainting_fill}: choose 0 (fill), 1 (original), 2 (latent "
                            f"noise) or 3 (latent nothing).")
    return {"mask_blur": blur, "masked_content": MASKED_CONTENT[req.inpainting_fill],
            "inpaint_area": "only masked" if req.inpaint_full_res else "whole picture",
            "only_masked_padding": req.inpaint_full_res_padding, "invert_mask": bool(req.inpainting_mask_invert)}


def img2img_request(req: Img2ImgApi) -> tuple[str, dict[str, Any], Any]:
    """("img2img" or, with a mask, "inpaint"; the request fields; the image or (image, mask))."""
    refuse_unsupported(req)
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
    fields = {**common_fields(req), "width": req.width, "height": req.height,
              "resize_mode": RESIZE_MODES[req.resize_mode],
              "strength": 0.75 if req.denoising_strength is None else req.denoising_strength}
    if req.mask:
        fields.update(_inpaint_fields(req))
        checked(InpaintRequest, fields)
        return "inpaint", fields, (image, decode_image(req.mask, "mask"))
    checked(Img2ImgRequest, fields)
    return "img2img", fields, image


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
        "scheduler": params.get("schedule"), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": params.get("model"), "sd_model_hash": params.get("model_hash") or "",
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.get("strength", params.get("hires_strength")),
        "extra_generation_params": {"Schedule type": params.get("schedule"),
                                    **{k: params[k] for k in ("task", "runtime", "factor", "upscaler", "hires_steps",
                                                              "resize_mode", "mask_blur", "masked_content",
                                                              "inpaint_area") if k in params}},
        "index_of_first_image": 0, "infotexts": texts, "styles": list(params.get("styles") or []),
        "job_timestamp": extra.pop("job_timestamp"),
        "clip_skip": 1, "is_using_inpainting_conditioning":
            str(result.readout.details.get("inpainting_unet", "")).startswith("yes"), "version": VERSION,
        "fast_sd": {"readout": result.readout.to_dict(), "notices": list(result.notices),
                    "saved_paths": list(result.saved_paths), **extra},
    }
    images = [png_base64(im, text) for im, text in zip(result.images, texts)] if req.send_images else []
    return {"images": images, "parameters": sent, "info": json.dumps(info, default=str)}


TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")


def model_name(title: str) -> str:
    """A1111 titles are 'name [shorthash]'; we load by name."""
    return TITLE_HASH.sub("", str(title).strip())


# A1111 settings that change the picture, at the values this server draws with: an override_settings entry at
# another value is refused (it would draw another picture); POST /options logs it as not applied.
PICTURE_SETTINGS: dict[str, Any] = {
    "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "eta_ancestral": 1.0, "eta_ddim": 0.0,
    "s_churn": 0.0, "s_min_uncond": 0.0, "s_noise": 1.0, "s_tmin": 0.0, "s_tmax": 0.0, "rho": 0.0, "sigma_min": 0.0,
    "sigma_max": 0.0, "always_discard_next_to_last_sigma": False, "sd_unet": "Automatic", "sd_vae": "Automatic",
    "k_sched_type": "Automatic", "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6,
}
SAME_VAE = ("Automatic", "None", None)


def options_now(engine, status: dict[str, Any]) -> dict[str, Any]:
    """GET /sdapi/v1/options: A1111's keys that clients read, with this server's values (ours prefixed fast_sd_)."""
    return {
        **PICTURE_SETTINGS,
        "sd_model_checkpoint": engine.model_title(), "sd_checkpoint_hash": "", "sd_checkpoints_limit": 1,
        "sd_vae_overrides_per_model_preferences": True, "samples_save": engine.outputs_dir is not None,
        "outdir_samples": str(engine.outputs_dir) if engine.outputs_dir else "", "samples_format": "png",
        "save_images_add_number": True, "enable_pnginfo": True, "save_txt": False, "grid_save": False,
        "live_previews_enable": bool(engine.preview_every), "show_progress_every_n_steps": engine.preview_every or -1,
        "token_merging_ratio": float(getattr(engine.optimizations, "token_merging_ratio", 0.0) or 0.0),
        "token_merging_ratio_hr": 0.0, "token_merging_ratio_img2img": 0.0, "hide_samplers": [],
        "sd_lora": "None", "lora_preferred_name": "Alias from file", "add_model_hash_to_info": True,
        "add_model_name_to_info": True, "add_version_to_infotext": True, "randn_source": "CPU",
        "fast_sd_runtime": status["runtime"], "fast_sd_precision": status["precision"],
    }


def picture_setting_refused(key: str, value: Any) -> str | None:
    """Why an override_settings entry cannot be honoured, or None (ours, at our value, or not a picture setting)."""
    if key not in PICTURE_SETTINGS:
        return None
    if key == "sd_vae":
        return None if value in SAME_VAE else (f"override_settings.sd_vae {value!r}: a VAE is chosen with the model "
                                               f"here (the Engine tab or --vae), not per request.")
    ours = PICTURE_SETTINGS[key]
    try:
        same = value == ours or (isinstance(ours, float) and float(value) == ours)
    except (TypeError, ValueError):
        same = False
    return None if same else f"override_settings.{key} {value!r}: this server draws with {ours!r} only."
