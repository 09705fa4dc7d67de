"""The AUTOMATIC1111-compatible API driven by two real A1111 clients from PyPI, each used as its own users use it,
against one app process serving builtin:tiny:

- webuiapi (mix1009/sdwebuiapi): A1111's own sampler and schedule-type labels ("DPM++ 2M", "Karras"), the full
  A1111 request body on every call, responses read loosely (json() of whatever comes back);
- sd-backend-client (IntraPaint's client): ComfyUI-style names translated to A1111's lowercase scheduler names
  ("karras", "sgm_uniform", "normal" by default), responses validated by strict pydantic models (info, progress,
  scripts, script-info, sd-vae), a client-side queue that waits for /progress to say job_count == 0 before it sends
  a job, and cancel by /interrupt;

and the options round trip Open WebUI does (GET /options, change sd_model_checkpoint, POST the whole dict back).
The expected lists are A1111 1.10's (modules/sd_samplers_*.py, modules/sd_schedulers.py, modules/api/models.py).
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
import webuiapi
from a1111_models import (EmbeddingsResponse, FaceRestorerItem, LoraItem, SamplerItem, SchedulerItem, ScriptInfo,
                          ScriptsList, SDModelItem, SDVaeItem, UpscalerItem)
from appserver import running_app
from PIL import Image, ImageDraw
from pydantic import TypeAdapter
from sd_backend_client import (A1111Webservice, BackendOption, DiffusionParams, DiffusionRequestBody, GenerationError,
                               GenerationStatus, ResizeMode, connect_to_backend)

USER, PASSWORD = "bea", "an0ther-pass"
PROMPT = "a red circle on a blue background"
MODEL, OTHER_MODEL = "builtin:tiny", "builtin:shapes"

# A1111's samplers (and DDPM, which Forge and ComfyUI-style clients send) as /sdapi/v1/samplers names them.
SAMPLERS = ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
            "DPM++ 3M SDE", "DDIM", "PLMS", "DDPM", "UniPC", "LCM"]
# A1111's schedulers (modules/sd_schedulers.py): name -> label; the label is what the infotext says.
SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
              "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
              "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
              "beta": "Beta"}
# sd-backend-client's scheduler names (ComfyUI's) -> what it sends; all of them are A1111 1.10 names.
CLIENT_SCHEDULERS = {"normal": "normal", "karras": "karras", "exponential": "exponential",
                     "sgm_uniform": "sgm_uniform", "simple": "simple", "ddim_uniform": "ddim", "beta": "beta",
                     "kl_optimal": "kl_optimal"}


def validated(model, data):
    return TypeAdapter(model).validate_python(data)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("clients-outputs")
    with running_app("--runtime", "pytorch", "--model", MODEL, "--auth", f"{USER}:{PASSWORD}",
                     "--outputs-dir", str(outputs)) as (url, _proc):
        yield url


@pytest.fixture(scope="module")
def wa(app):
    """webuiapi as its README sets it up, with a default sampler and a few steps."""
    return webuiapi.WebUIApi(baseurl=app + "sdapi/v1", username=USER, password=PASSWORD, sampler="Euler a", steps=3)


@pytest.fixture(scope="module")
def sbc(app):
    """sd-backend-client as its README sets it up: it probes the URL, then logs in when asked."""
    backend = connect_to_backend(app.rstrip("/"), credentials_provider=lambda: (USER, PASSWORD))
    yield backend
    backend.disconnect()


class Plain:
    """A plain HTTP client with a Basic login, as Open WebUI sends its AUTOMATIC1111_API_AUTH."""

    def __init__(self, app: str):
        self.base = app + "sdapi/v1/"
        self.http = requests.Session()
        self.http.headers["Authorization"] = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def get(self, path: str) -> requests.Response:
        return self.http.get(self.base + path, timeout=60)

    def post(self, path: str, body=None) -> requests.Response:
        return self.http.post(self.base + path, json=body, timeout=120)


def assert_picture(image, size):
    """What a user looks at: a decoded picture of the size asked for, not the black or flat frame that NaN latents
    decode to."""
    assert isinstance(image, Image.Image) and image.size == size, (type(image), getattr(image, "size", None))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert np.isfinite(pixels).all() and pixels.std() > 0.5 and pixels.max() > 0, "a blank picture"


def drawn(size=(96, 80)) -> Image.Image:
    image = Image.new("RGB", size, (20, 40, 200))
    ImageDraw.Draw(image).ellipse((20, 14, 70, 64), fill=(220, 30, 30))
    return image


def wait_idle(progress, timeout=60.0):
    deadline = time.monotonic() + timeout
    while progress()["state"]["job_count"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert progress()["state"]["job_count"] == 0, "the server still reports a job"


# -- webuiapi ----------------------------------------------------------------------------------------------------

def test_webuiapi_txt2img_with_a_sampler_and_a_schedule_type(wa):
    r = wa.txt2img(prompt=PROMPT, seed=5, width=64, height=64, steps=3, sampler_name="DPM++ 2M", scheduler="Karras")
    assert len(r.images) == 1
    assert_picture(r.images[0], (64, 64))
    assert r.info["sampler_name"] == "DPM++ 2M" and r.info["all_seeds"] == [5] and r.info["steps"] == 3
    text = r.info["infotexts"][0]
    assert "Sampler: DPM++ 2M," in text and "Schedule type: Karras" in text, text
    assert "Schedule type: Karras" in r.images[0].info["parameters"]  # the PNG's own parameters text says it too
    assert r.parameters["sampler_name"] == "DPM++ 2M" and r.parameters["scheduler"] == "Karras"


# Every pair is drawn on the engine (tests/engine/models/test_samplers.py); here a few, through the client.
@pytest.mark.parametrize("label", ["Automatic", "Karras", "SGM Uniform", "Align Your Steps", "Beta"])
def test_webuiapi_each_a1111_schedule_type_by_its_label(wa, label):
    r = wa.txt2img(prompt=PROMPT, seed=6, width=64, height=64, steps=3, sampler_name="Euler", scheduler=label)
    assert_picture(r.images[0], (64, 64))
    text = r.info["infotexts"][0]
    assert r.info["sampler_name"] == "Euler" and "Sampler: Euler," in text, text
    if label != "Automatic":  # A1111 names the schedule it used; Automatic is the sampler's own default
        assert f"Schedule type: {label}" in text, text


@pytest.mark.parametrize("sampler", ["Euler a", "Heun", "DPM++ SDE", "DPM++ 3M SDE", "DDIM", "PLMS", "LCM"])
def test_webuiapi_each_sampler(wa, sampler):
    r = wa.txt2img(prompt=PROMPT, seed=7, width=64, height=64, steps=3, sampler_name=sampler)
    assert_picture(r.images[0], (64, 64))
    assert r.info["sampler_name"] == sampler and f"Sampler: {sampler}," in r.info["infotexts"][0]


def test_webuiapi_img2img(wa):
    out = wa.img2img(images=[drawn()], prompt="a green square on a yellow background", seed=8, width=64, height=64,
                     steps=4, denoising_strength=0.6, sampler_name="Euler a", scheduler="Automatic", resize_mode=1)
    assert_picture(out.images[0], (64, 64))
    assert out.info["denoising_strength"] == 0.6 and out.info["sampler_name"] == "Euler a"
    assert "Denoising strength: 0.6" in out.info["infotexts"][0]


def test_webuiapi_progress_while_a_job_runs_and_interrupt(wa):
    wait_idle(wa.get_progress)
    box = {}
    job = threading.Thread(target=lambda: box.setdefault("r", wa.txt2img(
        prompt=PROMPT, seed=9, width=192, height=192, steps=150, sampler_name="DPM++ 2M", scheduler="Karras")))
    job.start()
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.is_alive():
        p = wa.get_progress()
        if p["state"]["sampling_step"] >= 2:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress seen while the job ran"
    state = seen["state"]
    assert state["job_count"] >= 1 and state["sampling_steps"] == 150 and 0 < seen["progress"] < 1, seen
    assert {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
            "sampling_steps"} <= set(state)
    assert wa.interrupt() == {}
    job.join(120)
    assert not job.is_alive()
    r = box["r"]  # an interrupted job answers 200 with the picture so far, as A1111 does
    assert_picture(r.images[0], (192, 192))
    wait_idle(wa.get_progress)


def test_webuiapi_lists(wa):
    samplers = validated(list[SamplerItem], wa.get_samplers())
    assert set(SAMPLERS) <= {s.name for s in samplers}, set(SAMPLERS) - {s.name for s in samplers}
    assert "DPM++ 2M" in wa.util_get_sampler_names()
    schedulers = validated(list[SchedulerItem], wa.get_schedulers())
    assert {(s.name, s.label) for s in schedulers} >= set(SCHEDULERS.items()), \
        set(SCHEDULERS.items()) - {(s.name, s.label) for s in schedulers}
    assert "karras" in wa.util_get_scheduler_names()
    models = validated(list[SDModelItem], wa.get_sd_models())
    assert {MODEL, OTHER_MODEL} <= {m.title for m in models}
    upscalers = validated(list[UpscalerItem], wa.get_upscalers())
    assert "None" in [u.name for u in upscalers]
    loras = validated(list[LoraItem], wa.get_loras())
    assert "lcm-shapes" in [lora.name for lora in loras]
    validated(EmbeddingsResponse, wa.get_embeddings())
    validated(list[SDVaeItem], wa.get_sd_vae())
    validated(list[FaceRestorerItem], wa.get_face_restorers())
    scripts = validated(ScriptsList, wa.get_scripts())
    assert isinstance(scripts.txt2img, list) and isinstance(scripts.img2img, list)
    flags = wa.get_cmd_flags()
    assert isinstance(flags, dict) and "detail" not in flags, flags
    assert wa.refresh_checkpoints() is None  # A1111 answers 200 with null
    assert wa.util_get_current_model() == MODEL


def test_each_list_endpoint_answers_200(app):
    s = Plain(app)
    failed = {}
    for path in ("samplers", "schedulers", "sd-models", "upscalers", "latent-upscale-modes", "loras", "embeddings",
                 "sd-vae", "face-restorers", "scripts", "script-info", "cmd-flags", "prompt-styles", "options",
                 "progress", "memory"):
        r = s.get(path)
        if r.status_code != 200:
            failed["GET " + path] = r.status_code
    for path in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
        r = s.post(path)  # A1111 clients POST these with no body
        if r.status_code != 200:
            failed["POST " + path] = r.status_code
    assert not failed, "; ".join(f"{k}: {v}" for k, v in failed.items())
    validated(list[ScriptInfo], s.get("script-info").json())


def test_options_round_trip_as_open_webui_does(app):
    """Open WebUI's set-model: GET /options, change sd_model_checkpoint, POST the whole dict back; then its txt2img."""
    s = Plain(app)
    options = s.get("options").json()
    assert options["sd_model_checkpoint"] == MODEL
    assert {"sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae", "CLIP_stop_at_last_layers", "samples_format",
            "samples_save", "outdir_samples"} <= set(options)
    try:
        options["sd_model_checkpoint"] = OTHER_MODEL
        r = s.post("options", options)
        assert r.status_code == 200, r.text[:300]
        now = s.get("options").json()
        assert now["sd_model_checkpoint"] == OTHER_MODEL
        assert {k: v for k, v in now.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")} == \
            {k: v for k, v in options.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")}
        # Open WebUI's body (routers/images.py): no seed, its configured sampler and scheduler
        r = s.post("txt2img", {"prompt": PROMPT, "batch_size": 1, "width": 64, "height": 64, "steps": 3,
                               "negative_prompt": "", "cfg_scale": 7, "sampler_name": "DPM++ 2M",
                               "scheduler": "Karras"})
        assert r.status_code == 200, r.text[:300]
        body = r.json()
        assert_picture(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))), (64, 64))
        info = json.loads(body["info"])
        assert info["sd_model_name"] == OTHER_MODEL and info["sampler_name"] == "DPM++ 2M"
    finally:
        options = s.get("options").json()
        options["sd_model_checkpoint"] = MODEL
        assert s.post("options", options).status_code == 200
    assert s.get("options").json()["sd_model_checkpoint"] == MODEL


# -- sd-backend-client -------------------------------------------------------------------------------------------

def test_sd_backend_client_finds_a_webui_and_its_capabilities(sbc):
    assert isinstance(sbc, A1111Webservice)
    caps = sbc.get_capabilities()  # /sdapi/v1/scripts, /schedulers, /controlnet/model_list, /interrogate probes
    assert caps.scheduler and not caps.controlnet and not caps.soft_inpainting


def test_sd_backend_client_txt2img_with_its_defaults(sbc):
    """A first call as its README writes it: DiffusionParams alone, so sampler euler_ancestral -> "Euler a" and
    scheduler "normal", a name A1111 takes from 1.10 on."""
    result = sbc.submit_txt2img(DiffusionParams(prompt=PROMPT, steps=3, width=64, height=64, seed=11)).wait(timeout=120)
    assert len(result.images) == 1 and result.seeds == [11]
    assert_picture(result.images[0], (64, 64))
    info = result.raw_info  # GenerationInfoData: the client's strict model of A1111's info
    assert info.sampler_name == "Euler a" and info.width == 64 and info.sd_model_name == MODEL
    assert "Schedule type: Normal" in info.infotexts[0], info.infotexts[0]


def test_sd_backend_client_txt2img_batch_with_comfy_names(sbc):
    params = DiffusionRequestBody(prompt=PROMPT, sampler="dpmpp_2m", scheduler="karras", steps=3, width=64, height=64,
                                  seed=21, batch_size=2, cfg_scale=6.5)
    sent = params.to_dict()
    assert sent["sampler_name"] == "DPM++ 2M" and sent["scheduler"] == "karras"  # what goes on the wire
    result = sbc.submit_txt2img(params).wait(timeout=120)
    assert result.seeds == [21, 22] and len(result.images) == 2
    for image in result.images:
        assert_picture(image, (64, 64))
    info = result.raw_info
    assert info.sampler_name == "DPM++ 2M" and info.cfg_scale == 6.5 and info.all_seeds == [21, 22]
    assert all("Schedule type: Karras" in text for text in info.infotexts), info.infotexts


@pytest.mark.parametrize("scheduler", ["normal", "sgm_uniform", "ddim_uniform", "kl_optimal"])
def test_sd_backend_client_each_scheduler_by_its_lowercase_name(sbc, scheduler):
    params = DiffusionRequestBody(prompt=PROMPT, sampler="euler", scheduler=scheduler, steps=3, width=64, height=64,
                                  seed=12)
    assert params.to_dict()["scheduler"] == CLIENT_SCHEDULERS[scheduler]
    result = sbc.submit_txt2img(params).wait(timeout=120)
    assert_picture(result.images[0], (64, 64))
    label = SCHEDULERS[CLIENT_SCHEDULERS[scheduler]]
    assert f"Schedule type: {label}" in result.raw_info.infotexts[0], result.raw_info.infotexts[0]


def test_sd_backend_client_img2img(sbc):
    params = DiffusionRequestBody(prompt="a green square on a yellow background", init_images=[drawn()], seed=13,
                                  denoising_strength=0.6, width=64, height=64, steps=4, sampler="euler",
                                  scheduler="sgm_uniform", resize_mode=ResizeMode.CROP_AND_RESIZE)
    sent = params.to_dict()
    assert sent["init_images"][0].startswith("data:image/png;base64,") and sent["resize_mode"] == 1
    result = sbc.submit_img2img(params).wait(timeout=120)
    assert result.seeds == [13]
    assert_picture(result.images[0], (64, 64))
    info = result.raw_info
    assert info.denoising_strength == 0.6 and info.sampler_name == "Euler"
    assert "Schedule type: SGM Uniform" in info.infotexts[0], info.infotexts[0]


def test_sd_backend_client_progress_and_cancel(sbc):
    """Its queue sends the job once /progress says job_count == 0; poll() then reads /progress; cancel() interrupts."""
    handle = sbc.submit_txt2img(DiffusionRequestBody(prompt=PROMPT, sampler="dpmpp_2m", scheduler="karras",
                                                     steps=150, width=192, height=192, seed=14))
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not handle.done:
        p = handle.poll()
        if p.status is GenerationStatus.ACTIVE and p.progress and p.progress > 0.01:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress seen while the job ran"
    assert 0 < seen.progress < 1 and seen.text_info
    body = sbc.progress_check()  # ProgressResponseBody: the client's strict model of /progress
    assert body.state.job_count >= 1 and body.state.sampling_steps == 150 and body.state.sampling_step >= 1
    assert handle.cancel()
    with pytest.raises(GenerationError) as e:
        handle.wait(timeout=120)
    assert e.value.status is GenerationStatus.CANCELLED
    wait_idle(lambda: sbc.progress_check().model_dump())


def test_sd_backend_client_lists(sbc):
    samplers = sbc.list_samplers()
    assert BackendOption(name="dpmpp_2m", display_name="DPM++ 2M") in samplers
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DDIM", "UniPC", "LCM"} <= \
        {s.display_name for s in samplers}
    schedulers = sbc.list_schedulers()
    assert BackendOption(name="karras", display_name="Karras") in schedulers
    assert set(CLIENT_SCHEDULERS) <= {s.name for s in schedulers}, set(CLIENT_SCHEDULERS) - {s.name for s in schedulers}
    assert {MODEL, OTHER_MODEL} <= {c.name for c in sbc.list_checkpoints()}
    assert isinstance(sbc.list_vaes(), list)  # /sd-vae, read as A1111's SDVaeItem
    assert "lcm-shapes" in [lora.name for lora in sbc.list_loras()]
    assert all(u.name != "None" for u in sbc.list_upscalers())
    assert sbc.list_hypernetworks() == []  # no /hypernetworks here: the client reads a 404 as none
    assert "Photographic" in [style.name for style in sbc.get_styles()]
    sbc.get_scripts()
    assert isinstance(sbc.get_script_info(), list)
    for refresh in (sbc.refresh_checkpoints, sbc.refresh_vae, sbc.refresh_loras):
        assert refresh().status_code == 200


def test_sd_backend_client_settings_and_a_checkpoint_override(sbc):
    config = sbc.get_config()
    assert config["sd_model_checkpoint"] == MODEL
    try:
        config["sd_model_checkpoint"] = OTHER_MODEL
        sbc.set_config(config)  # the whole dict back, as IntraPaint's settings panel saves it
        assert sbc.get_config()["sd_model_checkpoint"] == OTHER_MODEL
        # sd_model_name goes out as override_settings.sd_model_checkpoint; restored afterwards by default
        result = sbc.submit_txt2img(DiffusionParams(prompt=PROMPT, sd_model_name=MODEL, steps=2, width=64, height=64,
                                                    seed=15, sampler="euler", scheduler="karras")).wait(timeout=120)
        assert result.raw_info.sd_model_name == MODEL
        assert sbc.get_config()["sd_model_checkpoint"] == OTHER_MODEL
    finally:
        config = sbc.get_config()
        config["sd_model_checkpoint"] = MODEL
        sbc.set_config(config)
    assert sbc.get_config()["sd_model_checkpoint"] == MODEL
