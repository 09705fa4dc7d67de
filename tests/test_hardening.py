"""A shared instance against hostile requests: one test per finding of the adversarial pass (issue 29), numbered
as it numbers them, and a fuzz test over every public endpoint of a running app."""
import base64
import csv
import json
import os
import shutil
import stat
import struct
import threading
import zlib

import psutil
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine import Engine, UserError
from engine.models.loading import ModelLoadError
from engine.text.styles import MAX_TEXT, Styles
from ui.http.a1111.routes import SdApi

# ---------------------------------------------------------------- 1. loading from outside --models-dir


@pytest.fixture
def models_dir(tmp_path, tiny_saved):
    """A models folder with one model (`mine`), and a working directory holding folders a hub-shaped or listed
    name would match there: `owner/name` (a model) and `mine` (not a model)."""
    models = tmp_path / "models"
    shutil.copytree(tiny_saved["folder"], models / "mine")
    cwd = tmp_path / "cwd"
    shutil.copytree(tiny_saved["folder"], cwd / "owner" / "name")
    (cwd / "mine").mkdir(parents=True)
    (cwd / "secret-folder").mkdir()
    return models, cwd


def test_1_remote_names_are_only_what_the_lists_give(models_dir, monkeypatch):
    models, cwd = models_dir
    monkeypatch.chdir(cwd)
    engine = Engine(runtime="pytorch", models_dir=models, outputs_dir=None)
    engine.load("builtin:tiny")
    with pytest.raises(ModelLoadError) as hub:  # a folder relative to the working directory was loaded here
        engine.load("owner/name", allow_any_path=False)
    assert "not one this server lists" in str(hub.value) and "hub id" not in str(hub.value)
    # the same answer whether or not the path exists, inside or outside the folder
    answers = {}
    for name in ("../cwd/secret-folder", "../cwd/no-such-folder", str(cwd / "secret-folder"), "mine/unet",
                 "mine/unet/diffusion_pytorch_model.safetensors", "mine/../mine"):
        with pytest.raises(ModelLoadError) as e:
            engine.load(name, allow_any_path=False)
        answers[name] = str(e.value).replace(repr(name), "NAME")
    assert len(set(answers.values())) == 1, answers
    for vae in ("owner/name", "../cwd/owner/name/vae", "mine/vae"):  # not under vae/: not a listed VAE
        with pytest.raises(ModelLoadError, match="not one this server lists"):
            engine.load("builtin:tiny", allow_any_path=False, vae=vae)
    with pytest.raises(ModelLoadError, match="not one this server lists"):
        engine.set_tiny_autoencoder("owner/name", allow_any_path=False)
    assert engine.model.name == "builtin:tiny"
    assert engine.load("mine", allow_any_path=False).source.value == str((models / "mine").resolve())


def test_1_a_hub_id_the_operator_allows_goes_to_the_hub_never_to_the_working_directory(models_dir, monkeypatch):
    models, cwd = models_dir
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing cached: the hub answers "not here"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    engine = Engine(runtime="pytorch", models_dir=models, outputs_dir=None, remote_hub=True)
    engine.load("builtin:tiny")
    with pytest.raises(ModelLoadError, match="Could not download"):
        engine.load("owner/name", allow_any_path=False)
    with pytest.raises(ModelLoadError, match="Could not download"):
        engine.set_tiny_autoencoder("owner/name", allow_any_path=False)
    assert engine.model.name == "builtin:tiny"


def test_1_switching_back_after_an_override_loads_exactly_the_model_that_was_loaded(models_dir, monkeypatch):
    models, cwd = models_dir
    monkeypatch.chdir(cwd)  # holds a folder `mine` too: the old restore resolved the name here first
    engine = Engine(runtime="pytorch", models_dir=models, outputs_dir=None)
    engine.load("mine", allow_any_path=False)
    client = TestClient(FastAPI(routes=SdApi(engine).router().routes))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                               "override_settings": {"sd_model_checkpoint": "builtin:tiny"}})
    assert r.status_code == 200, r.text
    assert engine.model.source.value == str((models / "mine").resolve()) and engine.model.name == "mine"
    engine.set_runtime("pytorch")  # a runtime switch reloads the same way
    assert engine.model.source.value == str((models / "mine").resolve())


# ---------------------------------------------------------------- 2. and 3. the styles file


def test_2_a_style_the_reader_could_not_read_back_is_refused_and_the_file_keeps_working(tmp_path):
    path = tmp_path / "styles.csv"
    styles = Styles(path)
    styles.save("kept", "a {prompt}", "blurry")
    os.chmod(path, 0o640)
    for prompt in ("x" * (csv.field_size_limit() + 10), "x" * (MAX_TEXT + 1), "bad \ud800 text"):
        with pytest.raises(UserError, match="characters|Unicode"):
            styles.save("huge", prompt, "")
    assert Styles(path).names() == ["kept"] and Styles(path).error is None  # still readable, by a fresh reader
    styles.save("another", "b", "")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the save kept the file's permissions
    path.write_bytes(path.read_bytes() + b'"unclosed,\xff\n')  # damaged by hand
    assert styles.names() == ["kept", "another"] and "could not be read" in styles.error  # still listed
    with pytest.raises(UserError, match="Not saved"):
        styles.save("third", "c", "")


def test_3_concurrent_saves_from_two_writers_keep_every_style(tmp_path):
    path = tmp_path / "styles.csv"
    writers = [Styles(path), Styles(path)]  # two apps (or replicas) on one file: the file lock orders them
    barrier = threading.Barrier(20)
    errors = []

    def save(i):
        barrier.wait()
        try:
            writers[i % 2].save(f"style {i}", f"prompt {i}", "")
        except Exception as e:  # noqa: BLE001 - any failure fails the test below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(Styles(path).names()) == sorted(f"style {i}" for i in range(20))


# ---------------------------------------------------------------- 4. memory from small requests


def _png_claiming(width, height, color_type=6):
    """A tiny PNG whose header declares width x height RGBA (its data is one compressed zero row per line)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(width * 4)
    data = zlib.compressobj(9)
    body = b"".join(data.compress(row) for _ in range(height)) + data.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_4_an_image_is_measured_from_its_header_and_a_prompt_by_its_length_before_any_work():
    from engine.requests import MAX_PROMPT_CHARS, Txt2ImgRequest, load_image, parse_request
    from engine.text.prompts import MAX_CHARS, tokenize

    png = _png_claiming(6000, 6000)  # within the per-side limit; 137 MiB decoded
    assert len(png) < 1 << 20
    rss = psutil.Process().memory_info().rss
    with pytest.raises(UserError, match="MiB once decoded"):
        load_image(png)
    assert psutil.Process().memory_info().rss - rss < 64 << 20  # refused from the header, not decoded
    assert load_image(_png_claiming(1000, 700)).size == (1000, 700)
    with pytest.raises(UserError, match="prompt"):
        parse_request(Txt2ImgRequest, {"prompt": "x" * (MAX_PROMPT_CHARS + 1)})

    class Tokenizer:  # the length is checked before the tokenizer sees the text
        def __call__(self, *a, **k):
            raise AssertionError("tokenized")

    with pytest.raises(UserError, match="characters"):
        tokenize(Tokenizer(), "a cat, " * (MAX_CHARS // 7 + 1))


# ---------------------------------------------------------------- 5. a 4xx where a 4xx belongs


def test_5_nested_json_bad_unicode_and_nan_are_one_line_4xx(tiny_engine, tmp_path):
    from engine.options import Preset, load_preset, save_preset
    from engine.requests import Txt2ImgRequest, parse_request

    client = TestClient(FastAPI(routes=SdApi(tiny_engine).router().routes))
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}",
                 b'{"prompt": "a \\ud800 cat"}', b'{"styles": ["\\udfff"]}', b'{"steps": NaN}',
                 b'{"cfg_scale": Infinity}'):
        r = client.post("/sdapi/v1/txt2img", content=body)
        assert r.status_code == 422, (body[:40], r.status_code, r.text[:200])
        assert "\n" not in r.json()["detail"] and "Traceback" not in r.json()["detail"]
    with pytest.raises(UserError, match="unicode"):  # pydantic refuses lone surrogates in a str field
        parse_request(Txt2ImgRequest, {"prompt": "a \ud800 cat"})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(Exception):
            Preset(name="p", defaults={"guidance": bad})
    save_preset(Preset(name="fine", defaults={"guidance": 5.0}), tmp_path)
    assert load_preset("fine", tmp_path).defaults.guidance == 5.0
    assert "nan" not in (tmp_path / "fine.toml").read_text().lower()


def test_5_the_ui_handlers_name_the_field_for_nan():
    import gradio as gr

    from engine.options import OPTION_SPECS
    from ui.tabs.optimizations import options_from

    values = [float("nan") if spec.kind in ("int", "float") else None for spec in OPTION_SPECS.values()]
    with pytest.raises(gr.Error) as e:
        options_from(values)
    assert "Invalid options:" in str(e.value) and "ValueError" not in str(e.value)


# ---------------------------------------------------------------- 6. authentication edges


def test_6_failed_logins_are_throttled_per_client():
    from ui.http.auth import LoginThrottle

    now = [0.0]
    throttle = LoginThrottle(burst=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") == 0
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 60 and throttle.retry_after("10.0.0.2") == 0
    now[0] = 61
    assert throttle.retry_after("10.0.0.1") == 0
    small = LoginThrottle(burst=1, max_clients=100)
    for i in range(1000):
        small.failed(f"c{i}")
    assert len(small._failures) == 100  # bounded memory


# ---------------------------------------------------------------- 7. blocking reads


def test_7_the_api_body_is_parsed_off_the_event_loop(tiny_engine, monkeypatch):
    import ui.http.a1111.schemas as sdapi

    threads = []
    real = sdapi.json.loads

    def loads(raw, *a, **k):
        threads.append(threading.current_thread())
        return real(raw, *a, **k)

    monkeypatch.setattr(sdapi.json, "loads", loads)
    client = TestClient(FastAPI(routes=SdApi(tiny_engine).router().routes))
    assert client.post("/sdapi/v1/png-info", content=json.dumps({"image": "x" * 1_000_000})).status_code == 422
    assert threads and all(t is not threading.main_thread() and "AnyIO worker" in t.name for t in threads), threads


# ---------------------------------------------------------------- a running app: login, uploads, fuzz

USER, PASSWORD = "ann", "s3cret-pass"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from appserver import running_app

    outputs = tmp_path_factory.mktemp("hardening-outputs")
    styles = tmp_path_factory.mktemp("hardening-styles") / "styles.csv"
    styles.write_text("name,prompt,negative_prompt\nKept,a {prompt},\n")
    presets = tmp_path_factory.mktemp("hardening-presets")  # the fuzz saves presets: never into the repository
    with running_app("--runtime", "pytorch", "--model", "builtin:tiny", "--auth", f"{USER}:{PASSWORD}",
                     "--outputs-dir", str(outputs), "--styles", str(styles), "--presets-dir", str(presets),
                     "--max-upload-mb", "1", "--queue-size", "4") as (url, proc):
        yield url, proc, styles


def _http(url, path, *, method="GET", body=None, headers=None, auth=True, opener=None):
    import urllib.error
    import urllib.request

    headers = dict(headers or {})
    if auth and opener is None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers)
    try:
        with (opener.open if opener else urllib.request.urlopen)(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_fuzz_every_endpoint_never_a_5xx_and_the_app_keeps_serving(app, fuzz_report):
    """Malformed values for every field of every /sdapi/v1 route and every page endpoint (Gradio's HTTP API):
    never a 5xx, never an internal fault, and the app serves after; its RSS before and after is reported."""
    import urllib.parse

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url, proc, styles = app
    page = _logged_in(url)  # the page's routes take its login cookie
    before = psutil.Process(proc.pid).memory_info().rss
    weird = st.one_of(
        st.none(), st.booleans(), st.sampled_from([-1, 0, 1, 2**31, -2**63, 10**30]),
        st.sampled_from([float("nan"), float("inf"), -0.0, 1e308, 0.5]),
        st.text(max_size=30), st.sampled_from(["", "\ud800", "../../etc/passwd", "owner/name", "a" * 30_000,
                                               "builtin:tiny", "<lora:../x:1>", "data:image/png;base64,"]),
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
    api_fields = ["prompt", "negative_prompt", "styles", "seed", "sampler_name", "scheduler", "batch_size", "n_iter",
                  "steps", "cfg_scale", "width", "height", "enable_hr", "hr_scale", "init_images", "mask",
                  "resize_mode", "denoising_strength", "override_settings", "sd_model_checkpoint", "image",
                  "fast_sd_runtime", "alwayson_scripts"]
    routes = ["txt2img", "img2img", "options", "png-info", "interrupt", "skip", "refresh-checkpoints"]
    gets = ["progress", "options", "sd-models", "samplers", "schedulers", "upscalers", "loras", "prompt-styles",
            "memory", "sd-vae", "embeddings", "scripts", "latent-upscale-modes"]
    info = json.loads(_http(url, "gradio_api/info", opener=page)[2])
    pages = {name: len(spec["parameters"]) for name, spec in info["named_endpoints"].items()}
    assert {"/txt2img", "/img2img", "/load_model", "/save_preset", "/set_tiny_autoencoder"} <= set(pages), sorted(pages)
    # a body of one or two valid fields and the rest malformed: cheap jobs at most (1 step, 64 px)
    small = {"steps": 1, "width": 64, "height": 64}

    @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(routes), fields=st.dictionaries(st.sampled_from(api_fields), weird, max_size=5),
           get=st.sampled_from(gets), endpoint=st.sampled_from(sorted(pages)), args=st.lists(weird, max_size=20))
    def fuzz(route, fields, get, endpoint, args):
        body = json.dumps({**small, **fields}).encode()
        status, _, raw = _http(url, f"sdapi/v1/{route}", method="POST", body=body)
        assert status < 500 and status != 401, (route, fields, status, raw[:300])
        query = urllib.parse.urlencode({"skip_current_image": str(args[:1])})
        assert _http(url, f"sdapi/v1/{get}?{query}")[0] == 200, get
        data = (args + [None] * pages[endpoint])[:pages[endpoint]]
        status, _, raw = _http(url, f"gradio_api/call{endpoint}", method="POST", opener=page,
                               body=json.dumps({"data": data}).encode(), headers={"Content-Type": "application/json"})
        assert status < 500 and status != 401, (endpoint, data, status, raw[:300])
        if status == 200:
            event = json.loads(raw)["event_id"]
            _, _, stream = _http(url, f"gradio_api/call{endpoint}/{event}", opener=page)
            text = stream.decode("utf-8", "replace")
            assert "The engine is still usable" not in text, (endpoint, data, text[-600:])  # an internal fault

    fuzz()
    assert _http(url, "sdapi/v1/samplers")[0] == 200 and proc.poll() is None
    assert "Kept" in styles.read_text()
    after = psutil.Process(proc.pid).memory_info().rss
    fuzz_report(before, after)
    assert after - before < 1 << 30, (before, after)


@pytest.fixture
def fuzz_report(request):
    def report(before, after):
        line = f"app RSS before the fuzz {before / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB"
        request.node.user_properties.append(("rss", line))
        print(line)
    return report


def _logged_in(url):
    import http.cookiejar
    import urllib.parse
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    opener.open(urllib.request.Request(url + "login", data=urllib.parse.urlencode(
        {"username": USER, "password": PASSWORD}).encode()), timeout=30)
    return opener


def test_6_login_schema_and_uploads_on_the_running_app(app):
    # last in this file: it locks this client's logins out for a minute
    import urllib.parse

    url, _, _ = app
    assert _http(url, "openapi.json", auth=False)[0] == 401
    assert _http(url, "openapi.json")[0] == 200
    # uploads over --max-upload-mb are refused (Gradio's own route, logged in by the page's cookie)
    import urllib.error
    import urllib.request

    opener = _logged_in(url)
    boundary = "fuzzboundary"
    big = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
           f"Content-Type: image/png\r\n\r\n").encode() + bytes(2 << 20) + f"\r\n--{boundary}--\r\n".encode()
    try:
        opener.open(urllib.request.Request(url + "gradio_api/upload", data=big, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"}), timeout=60)
        status = 200
    except urllib.error.HTTPError as e:
        status = e.code
    assert status == 413
    # failed logins: a burst, then 429 with Retry-After, on the page's login and on Basic alike
    wrong = urllib.parse.urlencode({"username": USER, "password": "wrong"}).encode()
    codes = [_http(url, "login", method="POST", body=wrong, auth=False,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})[0] for _ in range(12)]
    assert codes[:10] == [400] * 10 and codes[10:] == [429, 429], codes
    status, headers, _ = _http(url, "sdapi/v1/options")
    assert status == 429 and int({k.lower(): v for k, v in headers.items()}["retry-after"]) > 0
    assert _http(url, "sdapi/v1/options", auth=False)[0] == 401  # no credentials: not a login attempt
