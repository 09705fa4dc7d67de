"""Every precision path on every CPU: PyTorch fp32 and bf16 (autocast runs on any x86 CPU, emulated where the
hardware lacks bf16) and OpenVINO with the f32 and bf16 hints, forced whatever this machine would pick, through
each task and feature that reads the model's tensors outside the model. A side feature (preview, saving, the
result cache) that fails never fails the job."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from appserver import ROOT
from PIL import Image
from lora_files import known_matrices, save_kohya

from engine import Engine
from engine.compare.run import compare
from engine.options import Optimizations
from engine.system.hardware import HardwareReport, parse_cpuinfo

CPUINFO = ROOT / "tests" / "data" / "cpuinfo"
REQ = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 3, "seed": 5,
       "sampler": "Euler", "guidance": 5.0}


TILED = {k: v for k, v in REQ.items() if k not in ("width", "height")}  # its size comes from the image and factor


def picture(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def check_image(result, size=(64, 64)) -> None:
    """A real picture came back: the size asked, not blank, and the job said nothing failed."""
    image = result.images[0]
    assert image.size == size and image.mode == "RGB"
    assert picture(image).std() > 0.5
    assert not [n for n in result.readout.notices if "failed" in n], result.readout.notices


def noise_image(w=64, h=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def cpu_only() -> HardwareReport:
    from engine.system.hardware import detect

    return replace(detect(), cuda_devices=(), mps_available=False)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from engine.models.loading import load_model

    root = tmp_path_factory.mktemp("precision-models")
    (root / "lora").mkdir()
    save_kohya(root / "lora" / "known.safetensors", known_matrices(load_model("builtin:tiny").pipe))
    return root


# ---------------------------------------------------------------- PyTorch, fp32 and bf16


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def torch_engine(request, lora_dir, tmp_path_factory):
    engine = Engine(hardware=cpu_only(), runtime="pytorch", optimizations=Optimizations(precision=request.param),
                    models_dir=lora_dir, outputs_dir=tmp_path_factory.mktemp("out"), preview_every=1,
                    taesd="builtin:taesd")
    engine.load("builtin:tiny")
    assert engine.runtime.precision == request.param
    return engine


def test_pytorch_txt2img_with_previews(torch_engine):
    result = torch_engine.txt2img(REQ)
    check_image(result)
    assert result.readout.precision == torch_engine.runtime.precision
    live = torch_engine.live()
    assert isinstance(live.preview, Image.Image) and live.preview_step == REQ["steps"]
    assert picture(live.preview).shape == (64, 64, 3)
    assert result.saved_paths and Path(result.saved_paths[0]).is_file()


def test_pytorch_previews_and_decodes_through_the_tiny_autoencoder(torch_engine):
    options = torch_engine.optimizations
    torch_engine.set_optimizations(options.model_copy(update={"tiny_vae": True}))
    try:
        result = torch_engine.txt2img(REQ)
        check_image(result)
        assert result.readout.details["decoder"].startswith("tiny autoencoder")
        assert torch_engine.live().preview.size == (64, 64)
    finally:
        torch_engine.set_optimizations(options)


def test_pytorch_img2img_and_tiled_vae(torch_engine):
    check_image(torch_engine.img2img({**REQ, "strength": 0.6}, noise_image()))
    # 640 px wide: the VAE encodes and decodes in tiles, blended in numpy
    tiled = torch_engine.img2img({**REQ, "strength": 0.5, "width": 640, "height": 64, "vae_tiling": True},
                                 noise_image(640, 64))
    check_image(tiled, (640, 64))


@pytest.mark.parametrize("upscaler", ["latent (bicubic)", "Lanczos"])
def test_pytorch_hires_fix(torch_engine, upscaler):
    result = torch_engine.hires_fix({**REQ, "factor": 1.5, "upscaler": upscaler, "hires_strength": 0.5})
    check_image(result, (96, 96))


def test_pytorch_tiled_upscale(torch_engine):
    result = torch_engine.tiled_upscale({**TILED, "factor": 2, "tile_size": 64, "tile_overlap": 16, "strength": 0.4},
                                        noise_image())
    check_image(result, (128, 128))


def test_pytorch_lora_fuses_and_restores(torch_engine):
    pipe = torch_engine.model.pipe
    layer = pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1").weight
    before = layer.detach().clone()
    plain = picture(torch_engine.txt2img(REQ).images[0])
    with_lora = torch_engine.txt2img({**REQ, "prompt": REQ["prompt"] + " <lora:known:1>"})
    check_image(with_lora)
    assert with_lora.readout.details["lora"].startswith("known x1")
    assert np.abs(picture(with_lora.images[0]) - plain).mean() > 0.5
    torch_engine.txt2img(REQ)
    assert torch.equal(layer, before) and layer.dtype == before.dtype


def test_pytorch_deepcache(torch_engine):
    options = torch_engine.optimizations
    torch_engine.set_optimizations(options.model_copy(update={"deepcache_interval": 2}))
    try:
        result = torch_engine.txt2img({**REQ, "steps": 5})
        check_image(result)
        assert any("DeepCache" in a for a in torch_engine.status()["applied"])
    finally:
        torch_engine.set_optimizations(options)


def test_pytorch_compare_measures_psnr(torch_engine):
    comparison = compare(torch_engine, REQ, "steps", [2, 3])
    assert all(c.image is not None and c.error is None for c in comparison.columns), \
        [c.error for c in comparison.columns]
    assert comparison.columns[1].psnr is not None and math.isfinite(comparison.columns[1].psnr)


# ---------------------------------------------------------------- OpenVINO, f32 and bf16 hints


@pytest.fixture(scope="module")
def ov_cache(ov_tiny, tmp_path_factory):
    """One cache for both hints: the IR does not depend on the hint, only the compiled graphs do."""
    return ov_tiny.copy(tmp_path_factory.mktemp("ov-precision") / "cache")


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def ov_engine(request, ov_cache, lora_dir):
    engine = Engine(hardware=cpu_only(), runtime="openvino", cache_dir=ov_cache, models_dir=lora_dir,
                    optimizations=Optimizations(precision=request.param), outputs_dir=None, preview_every=1)
    engine.load("builtin:tiny")
    assert engine.runtime._hint == ("bf16" if request.param == "bf16" else "f32")
    return engine


def test_openvino_txt2img_img2img_hires_and_tiles(ov_engine):
    result = ov_engine.txt2img(REQ)
    check_image(result)
    assert ov_engine.live().preview_step == REQ["steps"] and ov_engine.live().preview is not None
    check_image(ov_engine.img2img({**REQ, "strength": 0.6}, noise_image()))
    check_image(ov_engine.hires_fix({**REQ, "factor": 1.5, "upscaler": "Lanczos", "hires_strength": 0.5}), (96, 96))
    check_image(ov_engine.tiled_upscale({**TILED, "factor": 2, "tile_size": 64, "tile_overlap": 16, "strength": 0.4},
                                        noise_image()), (128, 128))


def test_openvino_lora_and_compare(ov_engine):
    plain = picture(ov_engine.txt2img(REQ).images[0])
    with_lora = ov_engine.txt2img({**REQ, "prompt": REQ["prompt"] + " <lora:known:1>"})
    check_image(with_lora)
    assert np.abs(picture(with_lora.images[0]) - plain).mean() > 0.5
    comparison = compare(ov_engine, REQ, "steps", [2, 3])
    assert all(c.image is not None for c in comparison.columns), [c.error for c in comparison.columns]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_deepcache_graphs(ov_tiny_int8h_deepcache, tmp_path, precision):
    engine = Engine(hardware=cpu_only(), runtime="openvino", cache_dir=ov_tiny_int8h_deepcache.copy(tmp_path / "c"),
                    optimizations=Optimizations(precision=precision, int8_convolutions="on", deepcache_interval=2),
                    outputs_dir=None, preview_every=1)
    engine.load("builtin:tiny")
    assert not engine.runtime.conversions  # both graphs came from the cache: this test is about running them
    check_image(engine.txt2img({**REQ, "steps": 5}))


# ---------------------------------------------------------------- side features never fail a job


def test_a_failing_preview_still_delivers_the_image_and_says_so_once(tiny_engine, monkeypatch, caplog):
    calls = []

    def broken(model, step, latents):
        calls.append(step)
        raise TypeError("Got unsupported ScalarType BFloat16")

    monkeypatch.setattr(tiny_engine.runner, "_preview", broken)
    monkeypatch.setattr(tiny_engine, "preview_every", 1)
    with caplog.at_level(logging.WARNING):
        result = tiny_engine.txt2img({**REQ, "steps": 4, "seed": 99})
    assert result.images[0].size == (64, 64) and picture(result.images[0]).std() > 0.5
    assert calls == [1]  # turned off after the first failure
    notices = [n for n in result.readout.notices if "preview" in n.lower()]
    assert notices == ["Live preview failed (TypeError: Got unsupported ScalarType BFloat16); the job went on "
                       "without previews."]
    assert len([r for r in caplog.records if "live preview failed" in r.getMessage()]) == 1


def test_failing_save_history_or_cache_still_delivers_the_image(tmp_path, monkeypatch):
    engine = Engine(runtime="pytorch", optimizations=Optimizations(precision="fp32", result_cache=True),
                    outputs_dir=tmp_path / "out")
    engine.load("builtin:tiny")

    def fails(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("engine.jobs.records.save_png", fails)
    monkeypatch.setattr(engine.records.result_cache, "put", fails)
    result = engine.txt2img(REQ)
    assert result.images[0].size == (64, 64) and not result.saved_paths
    said = " ".join(result.readout.notices)
    assert "Saving the images failed (OSError: No space left on device)" in said
    assert "Keeping the result in the result cache failed" in said
    assert engine.history[0]["task"] == "txt2img"  # the history row still went in


# ---------------------------------------------------------------- what each kind of CPU gets


KINDS = {
    # file: (kind, AVX-512, hardware bf16, VNNI, AMX, PyTorch and OpenVINO precision under auto)
    "epyc-zen3-avx2.txt": ("Zen 3", False, False, False, False, "fp32"),
    "epyc-zen4-avx512-bf16.txt": ("Zen 4", True, True, True, False, "bf16"),
    "xeon-emerald-rapids-amx.txt": ("Emerald Rapids", True, True, True, True, "bf16"),
}


def hardware_of(name: str) -> HardwareReport:
    cpu = parse_cpuinfo((CPUINFO / name).read_text(), logical_cores=2)
    return replace(cpu_only(), cpu=cpu)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_cpu_kinds_are_detected_from_their_cpuinfo(name):
    kind, avx512, bf16, vnni, amx, precision = KINDS[name]
    cpu = hardware_of(name).cpu
    assert (cpu.kind, cpu.avx512, cpu.has_fast_bf16, cpu.vnni, cpu.amx_bf16 and cpu.amx_int8) == \
        (kind, avx512, bf16, vnni, amx)
    line = cpu.describe()
    assert kind in line and ("bf16 in hardware" if bf16 else "no hardware bf16") in line
    assert ("AMX" in line.split(";")[0]) == amx


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_cpu_kind_gets_its_precision_and_the_reason(name):
    from engine.runtimes.openvino import OpenVINORuntime
    from engine.runtimes.pytorch import PyTorchRuntime

    hardware, precision = hardware_of(name), KINDS[name][-1]
    for cls in (PyTorchRuntime, OpenVINORuntime):
        runtime = cls(hardware, Optimizations(), cache_dir=None)
        assert runtime.precision == precision
        assert any(d.startswith(f"Precision {precision} (auto") for d in runtime.decisions), runtime.decisions
    forced = PyTorchRuntime(hardware, Optimizations(precision="bf16"))
    assert forced.precision == "bf16"  # forced bf16 runs on every CPU (emulated without the hardware)
    if not KINDS[name][2]:
        assert "emulated" in forced.decisions[0]


def test_the_engine_tab_names_this_cpu_and_why(tiny_engine):
    from ui.formatting import engine_markdown

    text = engine_markdown(tiny_engine)
    assert f"**CPU:** {tiny_engine.hardware.cpu.describe()}" in text
    assert "Precision fp32 (asked)" in text


def test_bf16_through_the_a1111_api_with_previews(tmp_path):
    """The issue's first report, end to end: the app on PyTorch bf16 answers a txt2img with a picture."""
    import base64
    import io
    import json
    import urllib.request

    from appserver import running_app

    with running_app("--runtime", "pytorch", "--precision", "bf16", "--model", "builtin:tiny", "--outputs-dir",
                     str(tmp_path)) as (url, _proc):
        body = json.dumps({"prompt": REQ["prompt"], "width": 64, "height": 64, "steps": 3, "seed": 5}).encode()
        request = urllib.request.Request(url + "sdapi/v1/txt2img", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert image.size == (64, 64) and picture(image.convert("RGB")).std() > 0.5
    readout = json.loads(answer["info"])["fast_sd"]
    assert readout["readout"]["precision"] == "bf16", readout
    assert not [n for n in readout["notices"] if "failed" in n], readout["notices"]
