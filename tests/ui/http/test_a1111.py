"""The AUTOMATIC1111-compatible API, driven by a real A1111 client from PyPI (webuiapi) against a real app
process, and the Host/Origin guard in front of the UI and the API."""
import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import webuiapi
from a1111_models import ProgressResponse, SamplerItem, SDModelItem, TextToImageResponse
from appserver import running_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.samplers import SAMPLER_NAMES

USER, PASSWORD = "ann", "s3cret-pass"
PROMPT = "a red circle on a blue background"


A1111_STATE_KEYS = {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
                    "sampling_steps"}
A1111_INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "subseed", "width", "height",
                   "sampler_name", "cfg_scale", "steps", "batch_size", "sd_model_name", "denoising_strength",
                   "infotexts", "styles", "job_timestamp", "index_of_first_image", "version"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("api-outputs")
    with running_app("--runtime", "pytorch", "--auth", f"{USER}:{PASSWORD}", "--outputs-dir", str(outputs),
                     "--allowed-host", "sd.lan") as (url, _proc):
        yield url, outputs


@pytest.fixture(scope="module")
def api(app):
    url, _ = app
    return webuiapi.WebUIApi(baseurl=url + "sdapi/v1", username=USER, password=PASSWORD, sampler="Euler a", steps=8)


def request(url, path, *, method="GET", body=None, headers=None, auth=True):
    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_txt2img_through_the_real_client(api):
    result = api.txt2img(prompt=PROMPT, seed=11, width=128, height=128, cfg_scale=7.0, batch_size=2,
                         save_images=True)
    TextToImageResponse.model_validate(result.json)
    assert len(result.images) == 2 and result.images[0].size == (128, 128)
    info = result.info
    assert A1111_INFO_KEYS <= set(info), A1111_INFO_KEYS - set(info)
    assert info["all_seeds"] == [11, 12] and info["sampler_name"] == "Euler a" and info["steps"] == 8
    assert info["sd_model_name"] == "builtin:shapes"
    # Our numbers, for a client that knows us: stage times, peak memory, runtime.
    readout = info["fast_sd"]["readout"]
    assert readout["total_s"] > 0 and readout["peak_rss_bytes"] > 0 and readout["runtime"] == "pytorch"
    assert len(info["fast_sd"]["saved_paths"]) == 2  # asked for; A1111's API saves nothing unless asked
    # Each PNG carries its A1111 parameters text, as A1111's API images do.
    assert "Seed: 11" in result.images[0].info["parameters"] and info["infotexts"][1].count("Seed: 12") == 1
    assert result.parameters["prompt"] == PROMPT and result.parameters["width"] == 128
    # The same seed alone draws the same picture (batched maths differs only in the last bits).
    import numpy as np

    again = api.txt2img(prompt=PROMPT, seed=11, width=128, height=128, cfg_scale=7.0, steps=8)
    diff = np.abs(np.asarray(again.images[0], float) - np.asarray(result.images[0], float))
    assert diff.mean() < 1.0


def test_styles_are_listed_and_honoured(app):
    url, _ = app
    status, _, body = request(url, "sdapi/v1/prompt-styles")
    styles = {s["name"]: s for s in json.loads(body)}
    assert status == 200 and "{prompt}" in styles["Photographic"]["prompt"]
    status, _, body = request(url, "sdapi/v1/txt2img", method="POST", body={
        "prompt": "a red circle", "styles": ["Photographic", "Default negative"], "steps": 1, "width": 64,
        "height": 64, "seed": 3})
    info = json.loads(json.loads(body)["info"])
    assert status == 200 and info["styles"] == ["Photographic", "Default negative"]
    assert info["prompt"] == styles["Photographic"]["prompt"].replace("{prompt}", "a red circle")
    assert info["negative_prompt"] == ", ".join(styles[n]["negative_prompt"] for n in ("Photographic",
                                                                                       "Default negative"))
    assert 'Styles array: "[\\"Photographic\\", \\"Default negative\\"]"' in info["infotexts"][0]
    status, _, body = request(url, "sdapi/v1/txt2img", method="POST", body={"prompt": "x", "styles": ["Nope"]})
    assert status == 422 and "styles: Unknown style 'Nope'" in json.loads(body)["detail"]


def test_hires_and_img2img_through_the_real_client(api):
    hires = api.txt2img(prompt=PROMPT, seed=3, width=128, height=128, enable_hr=True, hr_scale=1.5,
                        hr_second_pass_steps=4, denoising_strength=0.5, hr_upscaler=webuiapi.HiResUpscaler.Latent)
    assert hires.images[0].size == (192, 192)
    assert hires.info["extra_generation_params"]["task"] == "hires_fix"
    assert hires.info["denoising_strength"] == 0.5
    out = api.img2img(images=[hires.images[0]], prompt="a green square on a yellow background", seed=4, width=128,
                      height=128, denoising_strength=0.6, resize_mode=1)
    assert out.images[0].size == (128, 128)
    assert out.info["extra_generation_params"]["task"] == "img2img"
    assert out.parameters["init_images"] is None  # not echoed unless include_init_images, as in A1111
    assert out.info["denoising_strength"] == 0.6


def test_progress_during_a_job_and_interrupt(api):
    ProgressResponse.model_validate(api.get_progress())
    assert api.get_progress()["state"]["job_count"] == 0
    box = {}
    job = threading.Thread(target=lambda: box.setdefault("r", api.txt2img(prompt=PROMPT, seed=9, width=128,
                                                                            height=128, steps=150)))
    job.start()
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.is_alive():
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            seen = p
            break
        time.sleep(0.1)
    assert seen is not None, "no progress seen while the job ran"
    ProgressResponse.model_validate(seen)
    assert A1111_STATE_KEYS <= set(seen["state"]) and seen["state"]["sampling_steps"] == 150
    assert 0 < seen["progress"] < 1 and seen["state"]["job_count"] == 1
    Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))  # the live preview, a real PNG
    assert api.interrupt() == {}
    job.join(120)
    result = box["r"]
    assert result.images, "an interrupted job still returns the picture so far, as A1111 does"
    assert result.info["fast_sd"]["readout"]["steps"] < 150
    assert any("Stopped after" in n for n in result.info["fast_sd"]["notices"])


def test_models_samplers_loras_and_a_model_switch_through_options(api):
    models = api.get_sd_models()
    for m in models:
        SDModelItem.model_validate(m)
    titles = [m["title"] for m in models]
    assert "builtin:shapes" in titles and "builtin:tiny" in titles
    for s in api.get_samplers():
        SamplerItem.model_validate(s)
    assert "Euler a" in api.util_get_sampler_names() and "LCM" in api.util_get_sampler_names()
    assert "lcm-shapes" in [lora["name"] for lora in api.get_loras()]
    assert api.util_get_current_model() == "builtin:shapes"
    try:
        api.util_set_model("builtin:tiny")  # the client picks the title from sd-models, then POSTs options
        assert api.util_get_current_model() == "builtin:tiny"
        r = api.txt2img(prompt=PROMPT, seed=1, width=64, height=64, steps=2)
        assert r.info["sd_model_name"] == "builtin:tiny"
        # override_settings: one job on another model, then back (A1111's default restore)
        r = api.txt2img(prompt=PROMPT, seed=1, width=128, height=128, steps=2,
                        override_settings={"sd_model_checkpoint": "builtin:shapes"})
        assert r.info["sd_model_name"] == "builtin:shapes"
        assert api.util_get_current_model() == "builtin:tiny"
    finally:
        api.set_options({"sd_model_checkpoint": "builtin:shapes"})
    assert api.util_get_current_model() == "builtin:shapes"


def test_without_credentials_the_api_is_refused(app):
    url, _ = app
    anonymous = webuiapi.WebUIApi(baseurl=url + "sdapi/v1")
    with pytest.raises(RuntimeError) as e:
        anonymous.txt2img(prompt=PROMPT, width=64, height=64, steps=1)
    assert e.value.args[0] == 401
    wrong = webuiapi.WebUIApi(baseurl=url + "sdapi/v1", username=USER, password="nope")
    with pytest.raises(RuntimeError):
        wrong.txt2img(prompt=PROMPT, width=64, height=64, steps=1)
    for path in ("sdapi/v1/options", "sdapi/v1/progress", "sdapi/v1/sd-models"):
        assert request(url, path, auth=False)[0] == 401


def test_foreign_host_is_refused_on_the_ui_and_the_api(app):
    url, _ = app
    port = url.rstrip("/").rsplit(":", 1)[1]
    for path in ("", "config", "sdapi/v1/options", "sdapi/v1/txt2img"):
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            method = "POST" if path.endswith("txt2img") else "GET"
            status, headers, body = request(url, path, method=method, body={} if method == "POST" else None,
                                            headers={"Host": host})
            assert status == 403, (path, host, status)
            assert b"--allowed-host" in body
    # the names it serves: loopback, and one added with --allowed-host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"sd.lan:{port}"):
        assert request(url, "sdapi/v1/options", headers={"Host": host})[0] == 200, host


def test_security_headers_on_the_ui_and_the_api(app):
    url, _ = app
    for path in ("", "sdapi/v1/samplers"):
        status, headers, _ = request(url, path)
        headers = {k.lower(): v for k, v in headers.items()}
        assert status == 200
        assert headers["x-frame-options"] == "SAMEORIGIN" and "frame-ancestors 'self'" in headers[
            "content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "same-origin"


def test_pages_of_other_origins_are_refused(app):
    url, _ = app
    own = url.rstrip("/")
    body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 1}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": own.replace("127.0.0.1", "localhost")},  # another origin, same machine
                    {"Sec-Fetch-Site": "cross-site"}):
        assert request(url, "sdapi/v1/txt2img", method="POST", body=body, headers=headers)[0] == 403, headers
        assert request(url, "sdapi/v1/interrupt", method="POST", body={}, headers=headers)[0] == 403, headers
        # reads too: Gradio's CORS middleware would otherwise hand them to the other page
        assert request(url, "sdapi/v1/progress", headers=headers)[0] == 403, headers
    # a preflight is answered by the guard before Gradio's CORS middleware can allow it
    status, headers, _ = request(url, "sdapi/v1/txt2img", method="OPTIONS", auth=False, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in {k.lower() for k in headers}
    # the page's own origin may write; a link followed from another site still opens the page
    assert request(url, "sdapi/v1/interrupt", method="POST", body={}, headers={"Origin": own})[0] == 200
    assert request(url, "", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})[0] == 200
    # behind a proxy that rewrites Host, the page's origin is an --allowed-host name
    assert request(url, "sdapi/v1/interrupt", method="POST", body={},
                   headers={"Origin": "https://sd.lan"})[0] == 200


# Each request has exactly one bad field, so none may run a job; each must be a 422 with a message.
NOT_A_NUMBER = st.text(alphabet="abcxyz ,;", min_size=1, max_size=6)
BAD_FIELDS = st.one_of(
    st.tuples(st.sampled_from(["width", "height", "steps", "batch_size", "n_iter", "seed"]),
              st.one_of(st.integers(max_value=-2), st.integers(min_value=2**33), NOT_A_NUMBER,
                        st.floats(min_value=-1e6, max_value=1e6).filter(lambda f: f != int(f)))),
    st.tuples(st.just("width"), st.integers(min_value=2049, max_value=10**9)),
    st.tuples(st.just("cfg_scale"), st.one_of(st.floats(min_value=30.5, max_value=1e12), NOT_A_NUMBER)),
    st.tuples(st.just("sampler_name"), st.text(min_size=1, max_size=12).filter(
        lambda s: " ".join(s.split()).lower() not in {n.lower() for n in SAMPLER_NAMES})),
    st.tuples(st.just("prompt"), st.one_of(st.integers(), st.lists(st.integers(), max_size=2))),
    st.tuples(st.just("hr_scale"), st.floats(min_value=4.5, max_value=1e9)),
    st.tuples(st.just("init_images"), st.lists(st.text(alphabet="!@#$%^&*()", min_size=1, max_size=20),
                                               min_size=1, max_size=1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=BAD_FIELDS, endpoint=st.sampled_from(["txt2img", "img2img"]))
def test_bad_inputs_get_a_422_with_a_message_and_the_server_keeps_serving(app, bad, endpoint):
    url, outputs = app
    saved = len(list(outputs.rglob("*.png")))
    field, value = bad
    body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 1, field: value}
    if field == "hr_scale":
        body["enable_hr"] = True
    if endpoint == "img2img" and field != "init_images":
        body["init_images"] = ["not base64 !"] if field in ("hr_scale",) else [_png_b64()]
    if endpoint == "txt2img" and field == "init_images":
        body["width"] = 4096  # txt2img ignores init_images: give it one bad field of its own
    status, _, raw = request(url, f"sdapi/v1/{endpoint}", method="POST", body=body)
    assert status == 422, (body, status, raw[:300])
    detail = json.loads(raw)["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in detail
    assert len(list(outputs.rglob("*.png"))) == saved, "a bad request ran a job"
    assert request(url, "sdapi/v1/samplers")[0] == 200


def test_malformed_bodies_get_a_422(app):
    url, _ = app
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"'):
        status, _, body = request(url, "sdapi/v1/txt2img", method="POST", body=raw)
        assert status == 422 and json.loads(body)["detail"]
    # each of these once raised inside the server (a 500): now a 422 that says what is wrong
    for path, body in (("txt2img", {"enable_hr": True, "width": 0, "hr_resize_x": 1024}),
                       ("txt2img", {"enable_hr": True, "hr_resize_x": int("9" * 400)}),
                       ("img2img", {"init_images": ["data:image/png;base64"]}),
                       ("png-info", {"image": "data:image/png;base64"}),
                       ("png-info", {"image": _bomb_png_b64()}),
                       ("txt2img", {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}),
                       ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}}),
                       ("txt2img", {"sampler_name": "DDIM", "scheduler": "Karras"}),
                       ("txt2img", {"sampler_name": "Euler a", "eta": 0.5}),
                       ("txt2img", {"s_churn": 0.5}), ("txt2img", {"subseed_strength": 0.3}),
                       ("txt2img", {"enable_hr": True, "hr_scheduler": "Exponential"}),
                       ("txt2img", {"enable_hr": True, "hr_checkpoint_name": "other.safetensors"})):
        status, _, raw = request(url, f"sdapi/v1/{path}", method="POST", body=body)
        assert status == 422 and json.loads(raw)["detail"], (path, body, status, raw[:200])
    status, _, raw = request(url, "sdapi/v1/txt2img", method="POST", body=b'{"seed": ' + b"9" * 5000 + b"}")
    assert status == 422
    status, _, body = request(url, "sdapi/v1/options", method="POST", body={"sd_model_checkpoint": "../../etc"})
    assert status == 422 and "models folder" in json.loads(body)["detail"]
    # a bad value is named by the A1111 field the client sent, not by ours
    status, _, body = request(url, "sdapi/v1/txt2img", method="POST", body={"cfg_scale": 99})
    assert status == 422 and json.loads(body)["detail"].startswith("Invalid request: cfg_scale:")
    assert request(url, "sdapi/v1/samplers")[0] == 200  # still serving


_PNG = None


def _bomb_png_b64():
    """A PNG whose header claims 30000x30000 pixels (Pillow refuses to open it as a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _png_b64():
    global _PNG
    if _PNG is None:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
        _PNG = base64.b64encode(buffer.getvalue()).decode()
    return _PNG


def test_allowed_hosts():
    from ui.http.guard import AllowedHosts, host_name

    assert host_name("[::1]:7860") == "::1" and host_name("Example.COM.:80") == "example.com"
    assert host_name("[::1]evil.com") == "" and host_name("[::1].evil") == "" and host_name("[::1]:x") == ""
    assert AllowedHosts(["*.example.com"]).allows("a.example.com")
    hosts = AllowedHosts(["localhost", ".example.com"])
    assert hosts.allows("localhost:7860") and hosts.allows("a.example.com") and hosts.allows("example.com")
    assert not hosts.allows("example.com.evil.net") and not hosts.allows("") and not hosts.allows("evilexample.com")
    hosts.add_origin("https://abc123.gradio.live")
    assert hosts.allows("abc123.gradio.live") and "https://abc123.gradio.live" in hosts.origins
    assert AllowedHosts(["*"]).allows("anything")
    import socket

    everywhere = AllowedHosts.for_server("0.0.0.0", ["sd.lan"])
    assert everywhere.allows("127.0.0.1") and everywhere.allows(socket.gethostname())
    assert everywhere.origin_allowed("https://sd.lan") and not everywhere.origin_allowed("http://localhost:3000")
    assert AllowedHosts.for_server("10.1.2.3").allows("10.1.2.3:7860")


def test_api_login_by_the_page_cookie_and_bad_basic_headers(app):
    url, _ = app
    import http.cookiejar
    import urllib.parse

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    opener.open(urllib.request.Request(url + "login", data=form), timeout=30)
    with opener.open(url + "sdapi/v1/options", timeout=30) as r:  # the page's login cookie, no Basic header
        assert r.status == 200 and json.loads(r.read())["sd_model_checkpoint"]
    for header in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer x",
                   "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()):
        assert request(url, "sdapi/v1/options", auth=False, headers={"Authorization": header})[0] == 401, header


def test_override_restores_a_model_started_from_a_path(tiny_saved, tmp_path):
    """The model given at start by its path comes back after a job on another model (the restore does not go
    through the remote-name check), and sd-models lists it so clients can find what is loaded."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from engine import Engine
    from ui.http.a1111.routes import SdApi

    engine = Engine(runtime="pytorch", models_dir=tmp_path, outputs_dir=None)
    folder = str(tiny_saved["folder"])
    engine.load(folder)
    client = TestClient(FastAPI(routes=SdApi(engine).router().routes))
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == folder
    assert folder in [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                               "override_settings": {"sd_model_checkpoint": "builtin:tiny",
                                                                     "samples_format": "jpg"}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sd_model_name"] == "builtin:tiny" and info["fast_sd"]["model_override"] == "builtin:tiny"
    assert any("samples_format" in n for n in info["fast_sd"]["notices"])
    assert engine.model.source.text == folder


def test_no_api_flag_serves_no_routes(tiny_engine):
    from ui.http.server import server_kwargs

    with_api, _ = server_kwargs(tiny_engine, "127.0.0.1")
    without, hosts = server_kwargs(tiny_engine, "127.0.0.1", ["sd.lan"], api=False)
    assert any(r.path == "/sdapi/v1/txt2img" for r in with_api["routes"]) and "routes" not in without
    assert hosts.allows("sd.lan") and len(without["middleware"]) == 2  # the Host guard and the login guard
