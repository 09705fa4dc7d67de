"""AUTOMATIC1111's HTTP API (/sdapi/v1/...) on the UI's own server, port and login, driving the same Engine
(so the same device lock: an API job waits while a UI job runs, and the other way round).

Requests use A1111's field names; unknown fields are ignored as A1111 does. A field we cannot honour
(face restoration, inpainting masks, scripts, ...) is refused with a 422 that says so rather than
ignored, since ignoring it would silently draw another picture; settings in override_settings other than the
checkpoint are ignored and named in info["fast_sd"]["notices"]. Responses are A1111's (`images` as plain base64 PNGs
carrying their parameters text, `parameters`, `info` as a JSON string); `info["fast_sd"]` adds our readout.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from engine import Engine, UserError
from engine.lora.core import available as available_loras
from engine.lora.core import resolve as resolve_lora
from engine.models.loading import available_models
from engine.models.samplers import SAMPLER_NAMES, canonical_sampler
from engine.requests import (
    MAX_BATCH_COUNT,
    MAX_SIZE,
    HiresFixRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
    describe_validation_error,
    open_image,
    parse_request,
)
from engine.store.metadata import parse_parameters
from engine.store.outputs import parameters_info
from ui.http.auth import authorized

log = logging.getLogger(__name__)
PREFIX = "/sdapi/v1"
VERSION = "fast-sd"
MAX_BODY_BYTES = 64 * 1024 * 1024  # a few init images; a bigger body is refused before it is parsed

# A1111 hires upscaler names -> ours. "None", "Nearest" and "Lanczos" resize the decoded image.
HR_UPSCALERS = {
    "latent": "latent (bicubic)", "latent (antialiased)": "latent (bicubic)", "latent (bicubic)": "latent (bicubic)",
    "latent (bicubic antialiased)": "latent (bicubic)", "latent (nearest)": "latent (nearest-exact)",
    "latent (nearest-exact)": "latent (nearest-exact)", "none": "Lanczos", "lanczos": "Lanczos", "nearest": "Lanczos",
}
RESIZE_MODES = {0: "resize", 1: "crop and resize", 2: "resize and fill", 3: "resize"}  # 3: A1111's latent upscale
SCHEDULERS = {"automatic": "", "karras": " Karras"}  # A1111's separate scheduler field -> our sampler suffix


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# ---------------------------------------------------------------- request models (A1111's names and defaults)


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
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
    denoising_strength: float | None = None
    subseed_strength: float = 0.0
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False


class Txt2ImgApi(_Generation):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIZE * 4)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIZE * 4)
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None


class Img2ImgApi(_Generation):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    mask: str | None = None
    include_init_images: bool = False


def _validated(cls: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise ApiError(422, f"Invalid request: the body must be a JSON object, got {type(data).__name__}.")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, describe_validation_error(e, data)) from None


def _refuse_unsupported(req: _Generation) -> None:
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


def _sampler(req: _Generation) -> str:
    name = req.sampler_name or req.sampler_index or "Euler"
    scheduler = (req.scheduler or "automatic").strip().lower()
    if scheduler not in SCHEDULERS:
        raise ApiError(422, f"scheduler {req.scheduler!r}: choose one of {', '.join(SCHEDULERS)}.")
    candidates = [name + SCHEDULERS[scheduler]] if SCHEDULERS[scheduler] and "karras" not in name.lower() else [name]
    try:
        return canonical_sampler(candidates[0])
    except UserError as e:
        raise ApiError(422, f"sampler_name: {e}") from None


def _common(req: _Generation) -> dict[str, Any]:
    return {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
            "guidance": req.cfg_scale, "sampler": _sampler(req), "seed": req.seed, "batch_size": req.batch_size,
            "styles": list(req.styles or [])}


# our request field -> the A1111 field the client sent, so a 422 names what the client can change
A1111_NAMES = {"guidance": "cfg_scale", "factor": "hr_scale", "hires_steps": "hr_second_pass_steps",
               "hires_strength": "denoising_strength", "strength": "denoising_strength", "batch_count": "n_iter",
               "sampler": "sampler_name"}
_FIELD_AT = re.compile(r"(^Invalid request: |; )(" + "|".join(A1111_NAMES) + r"):")


def _checked(cls, fields: dict[str, Any]) -> None:
    try:
        parse_request(cls, fields)
    except UserError as e:
        raise ApiError(422, _FIELD_AT.sub(lambda m: m.group(1) + A1111_NAMES[m.group(2)] + ":", str(e))) from None


def txt2img_request(req: Txt2ImgApi) -> tuple[str, dict[str, Any]]:
    """('txt2img' | 'hires_fix', our request fields), validated here so a bad field never reaches the device."""
    _refuse_unsupported(req)
    fields = {**_common(req), "width": req.width, "height": req.height, "batch_count": req.n_iter}
    if not req.enable_hr:
        _checked(Txt2ImgRequest, fields)
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
    _checked(HiresFixRequest, fields)
    return "hires_fix", fields


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


def img2img_request(req: Img2ImgApi) -> tuple[dict[str, Any], Any]:
    _refuse_unsupported(req)
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
    fields = {**_common(req), "width": req.width, "height": req.height, "resize_mode": RESIZE_MODES[req.resize_mode],
              "strength": 0.75 if req.denoising_strength is None else req.denoising_strength}
    _checked(Img2ImgRequest, fields)
    return fields, image


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


# ---------------------------------------------------------------- responses


def png_base64(image, parameters_text: str | None = None) -> str:
    """A PNG as plain base64 (what A1111 sends), with its parameters text when it has one."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"pnginfo": parameters_info(parameters_text)} if parameters_text else {}))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def generation_response(result, req: _Generation, sent: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
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


# ---------------------------------------------------------------- the router


class SdApi:
    """The routes and what they share: the engine, a bound on waiting jobs, the login check."""

    def __init__(self, engine: Engine, max_waiting: int = 16):
        self.engine = engine
        self.waiting = threading.BoundedSemaphore(max_waiting + 1)  # the running job and those waiting
        self.max_waiting = max_waiting
        # Jobs wait in threads of their own, so waiting jobs never take the pool that /progress and the
        # page's own routes run in.
        self.job_threads = anyio.CapacityLimiter(max_waiting + 1)
        self.job_timestamp = ""

    # -- plumbing

    def endpoint(self, fn: Callable, *, body: bool = False, job: bool = False):
        """Wrap a handler: login, body parsing, errors as A1111-style JSON (422 for bad input, never a traceback)."""

        async def handle(request: Request):
            if not await authorized(request):
                return JSONResponse({"detail": "Not authenticated"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="fast-sd"'})
            queued = False
            try:
                if job:  # refuse before reading a body the queue has no room for
                    if not self.waiting.acquire(blocking=False):
                        raise ApiError(503, f"The queue is full ({self.max_waiting} jobs waiting); try again later.")
                    queued = True
                args = [await self._body(request)] if body else [dict(request.query_params)]
                if job:
                    result = await anyio.to_thread.run_sync(fn, *args, limiter=self.job_threads)
                else:
                    result = await run_in_threadpool(fn, *args)
                return JSONResponse(result)
            except ApiError as e:
                return JSONResponse({"error": "ApiError", "detail": e.detail}, status_code=e.status)
            except UserError as e:
                log.debug("API %s: %s", request.url.path, e, exc_info=e)  # the client's to fix; --log-level debug
                return JSONResponse({"error": "UserError", "detail": str(e)}, status_code=422)
            except Exception as e:  # a fault of ours: one line to the client, the traceback to the log
                log.exception("API %s failed", request.url.path)
                return JSONResponse({"error": type(e).__name__,
                                     "detail": f"{request.url.path} failed: {type(e).__name__}: {e}. "
                                               f"The server is still usable."}, status_code=500)
            finally:
                if queued:
                    self.waiting.release()

        return handle

    @staticmethod
    async def _body(request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is {declared} bytes; the limit is {MAX_BODY_BYTES}.")
        raw = bytearray()  # grows in place: `bytes +=` copied the whole body for every chunk, on the event loop
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"The request body is over the limit of {MAX_BODY_BYTES} bytes.")
        return await run_in_threadpool(parse_body, raw)  # parsing megabytes stays off the event loop

    def router(self) -> APIRouter:
        router = APIRouter(prefix=PREFIX)
        add = router.add_api_route
        add("/txt2img", self.endpoint(self.txt2img, body=True, job=True), methods=["POST"])
        add("/img2img", self.endpoint(self.img2img, body=True, job=True), methods=["POST"])
        add("/progress", self.endpoint(self.progress), methods=["GET"])
        add("/interrupt", self.endpoint(self.interrupt, body=True), methods=["POST"])
        add("/skip", self.endpoint(self.interrupt, body=True), methods=["POST"])  # one job here: skip = interrupt
        add("/options", self.endpoint(self.get_options), methods=["GET"])
        add("/options", self.endpoint(self.set_options, body=True, job=True), methods=["POST"])
        add("/sd-models", self.endpoint(self.sd_models), methods=["GET"])
        add("/refresh-checkpoints", self.endpoint(lambda _: None, body=True), methods=["POST"])
        add("/samplers", self.endpoint(self.samplers), methods=["GET"])
        add("/schedulers", self.endpoint(self.schedulers), methods=["GET"])
        add("/upscalers", self.endpoint(self.upscalers), methods=["GET"])
        add("/latent-upscale-modes", self.endpoint(self.latent_modes), methods=["GET"])
        add("/loras", self.endpoint(self.loras), methods=["GET"])
        add("/refresh-loras", self.endpoint(lambda _: None, body=True), methods=["POST"])
        add("/sd-vae", self.endpoint(lambda _: []), methods=["GET"])
        add("/prompt-styles", self.endpoint(self.prompt_styles), methods=["GET"])
        add("/embeddings", self.endpoint(lambda _: {"loaded": {}, "skipped": {}}), methods=["GET"])
        add("/scripts", self.endpoint(lambda _: {"txt2img": [], "img2img": []}), methods=["GET"])
        add("/png-info", self.endpoint(self.png_info, body=True), methods=["POST"])
        add("/memory", self.endpoint(self.memory), methods=["GET"])
        return router

    # -- generation

    def _run(self, req: _Generation, run: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """Run under the settings the request overrides (the model), restoring them after when asked. With an
        override, the switch, the job and the restore hold the device lock together, so no other job runs on
        the override model or finds the model changed under it."""
        settings = dict(req.override_settings or {})
        wanted = settings.pop("sd_model_checkpoint", None)
        extra: dict[str, Any] = {"job_timestamp": time.strftime("%Y%m%d%H%M%S")}
        notices = [f"Ignored setting {k!r} in override_settings: not one this server has." for k in settings]
        self.job_timestamp = extra["job_timestamp"]
        if wanted is not None and not (isinstance(wanted, str) and wanted.strip()):
            raise ApiError(422, "override_settings.sd_model_checkpoint: expected a title from /sdapi/v1/sd-models.")
        with self.engine.jobs.lock if wanted else nullcontext():
            before = self.engine.model.source if self.engine.model else None
            before_config = self.engine.config_dir
            before_vae = self.engine.model.vae_source if self.engine.model else None
            switched = bool(wanted) and model_name(wanted) != self.current_title()
            if switched:
                self._load(wanted)
                extra["model_override"] = model_name(wanted)
            try:
                result = run()
            finally:
                if switched and before is not None and req.override_settings_restore_afterwards:
                    # Exactly the model that was loaded (the operator's --model, or a checked load), with its configs
                    # and VAE: its resolved source, never its name resolved again.
                    self.engine.load(before, config_dir=before_config, vae=before_vae)
        result.notices.extend(notices)
        return result, extra

    def _check_styles(self, req: _Generation) -> None:
        """Unknown style names are a 422 before any work (a model override included)."""
        try:
            self.engine.styles.expand("", "", req.styles or [])
        except UserError as e:
            raise ApiError(422, f"styles: {e}") from None

    def prompt_styles(self, _query: dict) -> list[dict]:
        return [{"name": n, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for n in self.engine.styles.names() for s in [self.engine.styles.get(n)]]

    def txt2img(self, data: dict) -> dict:
        req = _validated(Txt2ImgApi, data)
        task, fields = txt2img_request(req)
        self._check_styles(req)
        call = self.engine.hires_fix if task == "hires_fix" else self.engine.txt2img
        result, extra = self._run(req, lambda: call(fields))
        return generation_response(result, req, req.model_dump(), extra)

    def img2img(self, data: dict) -> dict:
        req = _validated(Img2ImgApi, data)
        fields, image = img2img_request(req)
        self._check_styles(req)
        result, extra = self._run(req, lambda: self.engine.img2img(fields, image))
        sent = req.model_dump()
        if not req.include_init_images:  # as A1111: the echo does not send the images back
            sent["init_images"], sent["mask"] = None, None
        return generation_response(result, req, sent, extra)

    # -- progress and control

    def progress(self, query: dict) -> dict:
        live = self.engine.live
        skip_image = str(query.get("skip_current_image", "false")).lower() in ("1", "true", "yes")
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": 0, "job_timestamp": self.job_timestamp or "0", "job_no": 0,
                 "sampling_step": 0, "sampling_steps": 0}
        if not live.running:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        fraction = live.step / live.total if live.total else 0.0
        state.update(job=live.task, job_count=1, sampling_step=live.step, sampling_steps=live.total)
        image = png_base64(live.preview) if not skip_image and live.preview is not None else None
        return {"progress": round(fraction, 4), "eta_relative": round(live.eta_s or 0.0, 2), "state": state,
                "current_image": image,
                "textinfo": f"{live.task}: step {live.step}/{live.total}, {live.it_per_s:.2f} it/s"}

    def interrupt(self, _data: Any) -> dict:
        self.engine.stop()
        return {}

    # -- settings and lists

    def current_title(self) -> str | None:
        """The loaded model as /sd-models names it: a path inside the models folder is named relative to it."""
        model = self.engine.model
        if model is None:
            return None
        source, root = model.source, self.engine.models_dir
        if source.kind in ("folder", "file") and root is not None and not source.text.startswith("builtin:"):
            try:
                return source.path.resolve().relative_to(Path(root).resolve()).as_posix()
            except (ValueError, OSError):
                pass
        return source.text

    def _load(self, name: str) -> None:
        self.engine.load(model_name(name), allow_any_path=False)

    def get_options(self, _query: dict) -> dict:
        engine, status = self.engine, self.engine.status()  # once: with replicas it asks Ray Serve
        return {"sd_model_checkpoint": self.current_title(),
                "sd_checkpoint_hash": None, "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
                "samples_save": engine.outputs_dir is not None,
                "outdir_samples": str(engine.outputs_dir) if engine.outputs_dir else "",
                "samples_format": "png", "fast_sd_runtime": status["runtime"],
                "fast_sd_precision": status["precision"]}  # with replicas: theirs

    def set_options(self, data: dict) -> None:
        if not isinstance(data, dict):
            raise ApiError(422, "Invalid request: the body must be a JSON object of settings.")
        wanted, runtime = data.get("sd_model_checkpoint"), data.get("fast_sd_runtime")
        if wanted is not None and not (isinstance(wanted, str) and wanted.strip()):
            raise ApiError(422, "sd_model_checkpoint: expected a model title from /sdapi/v1/sd-models.")
        if runtime is not None and not isinstance(runtime, str):
            raise ApiError(422, "fast_sd_runtime: expected a runtime name.")
        with self.engine.jobs.lock:  # compare and load in one hold: no job swaps the model in between
            if wanted is not None and model_name(wanted) != self.current_title():
                self._load(wanted)
            if runtime is not None and runtime != self.engine.status()["runtime"]:
                self.engine.set_runtime(runtime)
        return None  # other settings are A1111's own; ignored, as A1111 ignores settings it does not know

    def sd_models(self, _query: dict) -> list[dict]:
        models_dir = self.engine.models_dir
        listed = available_models(models_dir)
        current = self.current_title()
        if current is not None and current not in {name for name, _ in listed}:
            listed.append((current, "the model loaded now (given at start)"))  # so clients find what is loaded
        return [{"title": name, "model_name": name.removeprefix("builtin:").rsplit("/", 1)[-1].rsplit(".", 1)[0],
                 "hash": None, "sha256": None,
                 "filename": name if name.startswith("builtin:") or models_dir is None else str(models_dir / name),
                 "config": None, "description": about} for name, about in listed]

    def samplers(self, _query: dict) -> list[dict]:
        return [{"name": name, "aliases": [name.lower()], "options": {}} for name in SAMPLER_NAMES]

    def schedulers(self, _query: dict) -> list[dict]:
        return [{"name": name, "label": name.title(), "aliases": None, "default_rho": None, "need_inner_model": None}
                for name in SCHEDULERS]

    def upscalers(self, _query: dict) -> list[dict]:
        return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1},
                {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]

    def latent_modes(self, _query: dict) -> list[dict]:
        return [{"name": name} for name in ("Latent", "Latent (bicubic)", "Latent (nearest-exact)")]

    def loras(self, _query: dict) -> list[dict]:
        models_dir = self.engine.models_dir
        return [{"name": name, "alias": name, "path": str(resolve_lora(name, models_dir)), "metadata": {}}
                for name in available_loras(models_dir)]

    def png_info(self, data: dict) -> dict:
        if not isinstance(data, dict):
            raise ApiError(422, "Invalid request: expected {\"image\": base64}.")
        try:
            image = Image.open(io.BytesIO(decode_base64(data.get("image"), "image")))
        except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
            raise ApiError(422, f"image: not an image that can be read ({type(e).__name__}).") from None
        text = image.info.get("parameters") or ""
        return {"info": text,
                "items": {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"},
                "parameters": parse_parameters(text) if text else {}}

    def memory(self, _query: dict) -> dict:
        import psutil

        from engine.system import devices

        vm = psutil.virtual_memory()
        return {"ram": {"free": vm.available, "used": vm.total - vm.available, "total": vm.total},
                "cuda": {"error": "no CUDA device"} if not devices.is_cuda(self.engine.runtime.device) else {}}


TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")


def model_name(title: str) -> str:
    """A1111 titles are 'name [shorthash]'; we load by name."""
    return TITLE_HASH.sub("", str(title).strip())
