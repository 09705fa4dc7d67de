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
from engine.samplers import AUTOMATIC, DEFAULT_RHO, SAMPLER_NAMES, SAMPLERS, SCHEDULES
from engine.store.metadata import parse_parameters
from ui.http.a1111.mapping import (PICTURE_SETTINGS, SAME_VAE, generation_response, img2img_request, model_name,
                                   options_now, picture_setting_refused, png_base64, txt2img_request)
from ui.http.a1111.schemas import (MAX_BODY_BYTES, ApiError, GenerationApi, Img2ImgApi, Txt2ImgApi, decode_base64,
                                   parse_body, validated)
from ui.http.auth import authorized

log = logging.getLogger(__name__)


PREFIX = "/sdapi/v1"
NEEDS_MODEL = {"Uniform", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta"}  # A1111's need_inner_model




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
        add("/cmd-flags", self.endpoint(self.cmd_flags), methods=["GET"])
        add("/sd-models", self.endpoint(self.sd_models), methods=["GET"])
        add("/sd-vae", self.endpoint(self.sd_vae), methods=["GET"])
        add("/samplers", self.endpoint(self.samplers), methods=["GET"])
        add("/schedulers", self.endpoint(self.schedulers), methods=["GET"])
        add("/upscalers", self.endpoint(self.upscalers), methods=["GET"])
        add("/latent-upscale-modes", self.endpoint(self.latent_modes), methods=["GET"])
        add("/loras", self.endpoint(self.loras), methods=["GET"])
        add("/embeddings", self.endpoint(lambda _: self.engine.embeddings()), methods=["GET"])
        add("/prompt-styles", self.endpoint(self.prompt_styles), methods=["GET"])
        add("/face-restorers", self.endpoint(lambda _: []), methods=["GET"])
        add("/realesrgan-models", self.endpoint(lambda _: []), methods=["GET"])
        add("/hypernetworks", self.endpoint(lambda _: []), methods=["GET"])
        add("/scripts", self.endpoint(lambda _: {"txt2img": [], "img2img": []}), methods=["GET"])
        add("/script-info", self.endpoint(lambda _: []), methods=["GET"])
        # The lists are read from the folders on every GET: a refresh has nothing to do but answer (embeddings
        # are read into the loaded model's text encoder, so that one reloads them).
        for name in ("checkpoints", "vae", "loras"):
            add(f"/refresh-{name}", self.endpoint(lambda _: None, body=True), methods=["POST"])
        add("/refresh-embeddings", self.endpoint(self.refresh_embeddings, body=True), methods=["POST"])
        add("/png-info", self.endpoint(self.png_info, body=True), methods=["POST"])
        add("/memory", self.endpoint(self.memory), methods=["GET"])
        return router

    # -- generation

    def _run(self, req: GenerationApi, run: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """Run under the settings the request overrides (the model), restoring them after when asked; the switch,
        the job and the switch back hold the device together, so no other job runs on the override model. The
        pictures are saved where the client asks (save_images), as A1111 saves API pictures."""
        settings = dict(req.override_settings or {})
        wanted = settings.pop("sd_model_checkpoint", None)
        extra: dict[str, Any] = {"job_timestamp": time.strftime("%Y%m%d%H%M%S")}
        for key, value in settings.items():
            if why := picture_setting_refused(key, value):
                raise ApiError(422, why)
        notices = [f"Ignored setting {k!r} in override_settings: not one this server has." for k in settings
                   if k not in PICTURE_SETTINGS]
        self.job_timestamp = extra["job_timestamp"]
        if wanted is not None and not (isinstance(wanted, str) and wanted.strip()):
            raise ApiError(422, "override_settings.sd_model_checkpoint: expected a title from /sdapi/v1/sd-models.")
        model = model_name(wanted) if wanted else None
        switched = model is not None and model != self.engine.model_title()
        save = bool(req.save_images) and not req.do_not_save_samples
        with self.engine.temporarily(model=model, save=save,
                                     restore=bool(req.override_settings_restore_afterwards)) as after:
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
        task, fields, image = img2img_request(req)
        self._check_styles(req)
        call = self.engine.inpaint if task == "inpaint" else self.engine.img2img
        result, extra = self._run(req, lambda: call(fields, image))
        sent = req.model_dump()
        if not req.include_init_images:  # as A1111: the echo does not send the images back
            sent["init_images"], sent["mask"] = None, None
        return generation_response(result, req, sent, extra)

    # -- progress and control

    def progress(self, query: dict) -> dict:
        live = self.engine.live()
        skip_image = str(query.get("skip_current_image", "false")).lower() in ("1", "true", "yes")
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": self.engine.job_count(), "job_timestamp": self.job_timestamp or "0", "job_no": 0,
                 "sampling_step": 0, "sampling_steps": 0}
        if not live.running:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                    "current_task": None}
        fraction = live.step / live.total if live.total else 0.0
        state.update(job=live.task, job_count=max(state["job_count"], 1), sampling_step=live.step,
                     sampling_steps=live.total)
        image = png_base64(live.preview) if not skip_image and live.preview is not None else None
        return {"progress": round(fraction, 4), "eta_relative": round(live.eta_s or 0.0, 2), "state": state,
                "current_image": image, "current_task": None,
                "textinfo": f"{live.task}: step {live.step}/{live.total}, {live.it_per_s:.2f} it/s"}

    def interrupt(self, _data: Any) -> dict:
        self.engine.stop()
        return {}

    # -- settings and lists

    def current_title(self) -> str | None:
        """The loaded model as /sd-models names it: a path inside the models folder is named relative to it."""
        return self.engine.model_title()

    def get_options(self, _query: dict) -> dict:
        return options_now(self.engine, self.engine.status())  # status once: with replicas it asks Ray Serve

    def set_options(self, data: dict) -> None:
        """Takes the whole dict GET gave (as Open WebUI sends it back): the checkpoint, sd_vae and our runtime are
        applied in one hold; a picture setting at another value than ours, and keys this server does not use, are
        named in the log and left alone, as A1111 leaves settings it does not know."""
        if not isinstance(data, dict):
            raise ApiError(422, "Invalid request: the body must be a JSON object of settings.")
        wanted, runtime, vae = data.get("sd_model_checkpoint"), data.get("fast_sd_runtime"), data.get("sd_vae")
        if wanted is not None and not (isinstance(wanted, str) and wanted.strip()):
            raise ApiError(422, "sd_model_checkpoint: expected a model title from /sdapi/v1/sd-models.")
        if runtime is not None and not isinstance(runtime, str):
            raise ApiError(422, "fast_sd_runtime: expected a runtime name.")
        if vae not in SAME_VAE:
            raise ApiError(422, f"sd_vae {vae!r}: a VAE is chosen with the model here (the Engine tab or --vae).")
        now = options_now(self.engine, self.engine.status())
        ignored = sorted(k for k, v in data.items() if k not in ("sd_model_checkpoint", "fast_sd_runtime", "sd_vae")
                         and (k not in now or (v != now[k] and picture_setting_refused(k, v))))
        if ignored:
            log.info("POST options: not applied (not settings of this server, or values it does not draw "
                     "with): %s", ", ".join(ignored[:50]))
        # Compare and switch in one hold: no job swaps the model in between.
        with self.engine.temporarily(model=model_name(wanted) if wanted is not None else None, runtime=runtime,
                                     restore=False):
            pass
        return None

    def refresh_embeddings(self, _data: Any) -> None:
        self.engine.refresh_embeddings()  # A1111 answers null; GET embeddings says what loaded

    def cmd_flags(self, _query: dict) -> dict:
        """A1111's command-line flags that clients read, as this server runs."""
        models = self.engine.models_dir
        return {"api": True, "nowebui": False, "listen": None, "port": None, "share": False, "api_auth": None,
                "ckpt_dir": str(models) if models else None, "lora_dir": str(models / "lora") if models else None,
                "embeddings_dir": str(models / "embeddings") if models else None,
                "vae_dir": str(models / "vae") if models else None, "no_half": False, "no_half_vae": False,
                "medvram": False, "lowvram": False, "xformers": False, "skip_torch_cuda_test": False,
                "hide_ui_dir_config": True, "freeze_settings": False, "disable_extra_extensions": True}

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
        return [{"name": name, "aliases": list(SAMPLERS[name].aliases),
                 "options": {"scheduler": SCHEDULES[SAMPLERS[name].automatic]}
                 if SAMPLERS[name].automatic not in (AUTOMATIC, "Uniform") else {}} for name in SAMPLER_NAMES]

    def schedulers(self, _query: dict) -> list[dict]:
        return [{"name": ident, "label": label, "aliases": ["SGMUniform"] if ident == "sgm_uniform" else None,
                 "default_rho": DEFAULT_RHO.get(label, -1.0), "need_inner_model": label in NEEDS_MODEL}
                for label, ident in SCHEDULES.items()]

    def sd_vae(self, _query: dict) -> list[dict]:
        models = self.engine.models_dir
        return [{"model_name": name, "filename": str(models / name) if models else name}
                for name in self.engine.vae_names()]

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
