"""AUTOMATIC1111's HTTP API (/sdapi/v1/...) on the UI's own server, port and login, driving the same Engine
(so the same device lock: an API job waits while a UI job runs, and the other way round).

Requests use A1111's field names; unknown fields are ignored as A1111 does. A field we cannot honour
(face restoration, inpainting masks, scripts, ...) is refused with a 422 that says so rather than
ignored, since ignoring it would silently draw another picture; settings in override_settings other than the
checkpoint are ignored and named in info["fast_sd"]["notices"]. Responses are A1111's (`images` as plain base64 PNGs
carrying their parameters text, `parameters`, `info` as a JSON string); `info["fast_sd"]` adds our readout.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from typing import Any, Callable

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from engine import Engine, UserError
from engine.lora.tags import available as available_loras
from engine.lora.tags import resolve as resolve_lora
from engine.models.sources import available_models
from engine.samplers import SAMPLER_NAMES
from engine.store.metadata import parse_parameters
from ui.http.a1111.mapping import (SCHEDULERS, generation_response, img2img_request, model_name, png_base64,
                                   txt2img_request)
from ui.http.a1111.schemas import (MAX_BODY_BYTES, ApiError, GenerationApi, Img2ImgApi, Txt2ImgApi, decode_base64,
                                   parse_body, validated)
from ui.http.auth import authorized

log = logging.getLogger(__name__)


PREFIX = "/sdapi/v1"




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

    def _run(self, req: GenerationApi, run: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """Run under the settings the request overrides (the model), restoring them after when asked; the switch,
        the job and the switch back hold the device together, so no other job runs on the override model."""
        settings = dict(req.override_settings or {})
        wanted = settings.pop("sd_model_checkpoint", None)
        extra: dict[str, Any] = {"job_timestamp": time.strftime("%Y%m%d%H%M%S")}
        notices = [f"Ignored setting {k!r} in override_settings: not one this server has." for k in settings]
        self.job_timestamp = extra["job_timestamp"]
        if wanted is not None and not (isinstance(wanted, str) and wanted.strip()):
            raise ApiError(422, "override_settings.sd_model_checkpoint: expected a title from /sdapi/v1/sd-models.")
        model = model_name(wanted) if wanted else None
        switched = model is not None and model != self.engine.model_title()
        with self.engine.temporarily(model=model, restore=bool(req.override_settings_restore_afterwards)) as after:
            if switched:
                extra["model_override"] = model
            result = run()
        notices += after  # a switch back that failed
        result.notices.extend(notices)
        return result, extra

    def _check_styles(self, req: GenerationApi) -> None:
        """Unknown style names are a 422 before any work (a model override included)."""
        try:
            self.engine.styles.expand("", "", req.styles or [])
        except UserError as e:
            raise ApiError(422, f"styles: {e}") from None

    def prompt_styles(self, _query: dict) -> list[dict]:
        return [{"name": n, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for n in self.engine.styles.names() for s in [self.engine.styles.get(n)]]

    def txt2img(self, data: dict) -> dict:
        req = validated(Txt2ImgApi, data)
        task, fields = txt2img_request(req)
        self._check_styles(req)
        call = self.engine.hires_fix if task == "hires_fix" else self.engine.txt2img
        result, extra = self._run(req, lambda: call(fields))
        return generation_response(result, req, req.model_dump(), extra)

    def img2img(self, data: dict) -> dict:
        req = validated(Img2ImgApi, data)
        fields, image = img2img_request(req)
        self._check_styles(req)
        result, extra = self._run(req, lambda: self.engine.img2img(fields, image))
        sent = req.model_dump()
        if not req.include_init_images:  # as A1111: the echo does not send the images back
            sent["init_images"], sent["mask"] = None, None
        return generation_response(result, req, sent, extra)

    # -- progress and control

    def progress(self, query: dict) -> dict:
        live = self.engine.live()
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
        return self.engine.model_title()

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
        # Compare and switch in one hold: no job swaps the model in between.
        with self.engine.temporarily(model=model_name(wanted) if wanted is not None else None, runtime=runtime,
                                     restore=False):
            pass
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
        ram, cuda = self.engine.memory()
        return {"ram": ram, "cuda": cuda if cuda is not None else {"error": "no CUDA device"}}
