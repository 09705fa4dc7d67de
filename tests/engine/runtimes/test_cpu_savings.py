"""Less work per image: DeepCache and CFG truncation on OpenVINO (and CFG truncation on PyTorch), the INT8
convolution probe, and warm-up of every graph a preset runs. Calls are counted; no time is asserted."""
import json

import numpy as np
import pytest
from pictures import pixels

from engine import Engine
from engine.options import Optimizations, load_preset
from engine.runtimes.openvino import probe as probe_module
from engine.runtimes.openvino.probe import Int8ConvProbe

REQ = {"prompt": "a red circle on a blue background", "negative_prompt": "blurry", "width": 64, "height": 64,
       "steps": 6, "seed": 4, "sampler": "Euler"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, ov_tiny):
    # builtin:tiny converted once (conftest); DeepCache's two UNet graphs are converted here
    return ov_tiny.copy(tmp_path_factory.mktemp("ov-savings") / "cache")


@pytest.fixture(scope="module")
def plain(cache_dir):
    engine = Engine(runtime="openvino", cache_dir=cache_dir, outputs_dir=None)
    engine.load("builtin:tiny")
    return engine


@pytest.fixture(scope="module")
def deepcache(cache_dir):
    engine = Engine(runtime="openvino", cache_dir=cache_dir, outputs_dir=None,
                    optimizations=Optimizations(deepcache_interval=3, cfg_truncation=0.5))
    engine.load("builtin:tiny")
    return engine


def graph_calls(engine, monkeypatch):
    """(part, UNet batch) of every OpenVINO UNet inference."""
    calls, infer = [], engine.runtime.infer

    def counted(part, inputs):
        if part.startswith("unet"):
            calls.append((part, inputs["sample"].shape[0]))
        return infer(part, inputs)

    monkeypatch.setattr(engine.runtime, "infer", counted)
    return calls


def test_deepcache_with_a_full_call_every_step_matches_plain_openvino(plain, deepcache, monkeypatch):
    """The full graph that also returns the deep features is the plain UNet: same pixels."""
    monkeypatch.setattr(deepcache.runtime.deepcache, "interval", 1)
    monkeypatch.setattr(deepcache.model, "options", deepcache.model.options.model_copy(update={"cfg_truncation": 1.0}))
    calls = graph_calls(deepcache, monkeypatch)
    assert np.array_equal(pixels(deepcache.txt2img(REQ)), pixels(plain.txt2img(REQ)))
    assert calls == [("unet_deep", 2)] * 6


def test_deepcache_runs_the_shallow_graph_between_full_calls(deepcache, monkeypatch):
    monkeypatch.setattr(deepcache.model, "options", deepcache.model.options.model_copy(update={"cfg_truncation": 1.0}))
    calls = graph_calls(deepcache, monkeypatch)
    result = deepcache.txt2img({**REQ, "steps": 7})
    assert [part for part, _ in calls] == ["unet_deep", "unet_shallow", "unet_shallow"] * 2 + ["unet_deep"]
    assert result.readout.details["unet_calls"] == "3 full x2, 4 shallow x2"
    assert "DeepCache every 3" in deepcache.status()["applied"][0]


def test_cfg_truncation_runs_batch_one_after_the_cut_and_keeps_the_conditional_features(deepcache, monkeypatch):
    calls = graph_calls(deepcache, monkeypatch)
    result = deepcache.txt2img({**REQ, "steps": 8})  # guidance for 4 steps, then batch 1
    assert [batch for _, batch in calls] == [2] * 4 + [1] * 4
    # steps 1-4: full, shallow, shallow, full; after the cut the kept features are halved, not recomputed
    assert [part for part, _ in calls] == ["unet_deep", "unet_shallow", "unet_shallow", "unet_deep",
                                           "unet_shallow", "unet_shallow", "unet_deep", "unet_shallow"]
    assert result.readout.details["guided_steps"] == "4 (then 4 without guidance, UNet batch 1)"


def test_cfg_truncation_on_pytorch_counts_and_changes_the_picture(tiny_engine):
    engine = Engine(runtime="pytorch", outputs_dir=None, optimizations=Optimizations(cfg_truncation=0.5))
    engine.load("builtin:tiny")
    cut = engine.txt2img({**REQ, "batch_size": 2})
    full = tiny_engine.txt2img({**REQ, "batch_size": 2})
    assert cut.readout.details["unet_calls"] == "3 x4, 3 x2"
    assert not np.array_equal(pixels(cut), pixels(full))
    assert "CFG truncation: 0.5" in cut.infotexts[0]  # in the PNG parameters: it changes the picture
    with_guidance_off = engine.txt2img({**REQ, "guidance": 1.0})
    assert with_guidance_off.readout.details["unet_calls"] == "6 x1" and "guided_steps" not in with_guidance_off.readout.details


def test_cfg_truncation_on_sdxl_slices_its_pooled_and_time_inputs(ov_tiny_sdxl, tmp_path):
    engine = Engine(runtime="openvino", cache_dir=ov_tiny_sdxl.copy(tmp_path / "cache"), outputs_dir=None,
                    optimizations=Optimizations(cfg_truncation=0.5))
    engine.load("builtin:tiny-sdxl")
    result = engine.txt2img({**REQ, "steps": 4})
    assert result.readout.details["unet_calls"] == "2 x2, 2 x1"


def test_warmup_compiles_every_graph_the_balanced_preset_runs(ov_tiny_int8h_deepcache, tmp_path, monkeypatch):
    monkeypatch.setattr(probe_module, "measure", lambda core, hint: Int8ConvProbe(1.5, 1.0, 1.5, hint))
    options = load_preset("balanced").optimizations
    cache = ov_tiny_int8h_deepcache.copy(tmp_path / "cache")  # the graphs this preset runs, converted once
    engine = Engine(runtime="openvino", cache_dir=cache, outputs_dir=None, optimizations=options)
    engine.load("builtin:tiny")
    engine.warmup([(64, 64)], guidance=7.0)
    compiled = {(part, dict(shape)["sample"][0]) for part, shape in (k for k in engine.runtime._compiled)
                if part.startswith("unet")}
    assert compiled == {("unet_deep", 2), ("unet_shallow", 2), ("unet_deep", 1), ("unet_shallow", 1)}
    result = engine.txt2img({**REQ, "steps": 20, "guidance": 7.0})
    assert result.readout.shape_cache == "warm (cache hit)"
    assert "int8 convolutions" in result.readout.precision


def test_int8_convolution_probe_decides_and_the_engine_tab_says_why(tmp_path, monkeypatch):
    """auto keeps them where the probe finds them faster, drops them where slower (memory not short)."""
    from ui.formatting import engine_markdown

    measured = []

    def fake(core, hint):
        measured.append(hint)
        return Int8ConvProbe(0.8, 10.0, 8.0, hint)

    monkeypatch.setattr(probe_module, "measure", fake)
    slow = Engine(runtime="openvino", cache_dir=tmp_path, outputs_dir=None,
                  optimizations=Optimizations(int8_convolutions="auto", int8_weights=True))
    assert not slow.runtime._hybrid and slow.runtime.variant.endswith("-int8")
    assert "INT8 convolutions (auto) off: int8 convolutions measured 0.80x" in engine_markdown(slow)
    again = Engine(runtime="openvino", cache_dir=tmp_path, outputs_dir=None,
                   optimizations=Optimizations(int8_convolutions="auto"))
    int8_line = [d for d in again.runtime.decisions if d.startswith("INT8 convolutions")]
    assert len(measured) == 1 and "cached probe" in int8_line[0]  # measured once per machine
    forced = Engine(runtime="openvino", cache_dir=tmp_path, outputs_dir=None,
                    optimizations=Optimizations(int8_convolutions="on"))
    assert forced.runtime._hybrid and forced.runtime.variant.endswith("-int8h")
    monkeypatch.setattr("engine.system.devices.free_bytes", lambda device: 2 << 30)
    short = Engine(runtime="openvino", cache_dir=tmp_path / "other", outputs_dir=None,
                   optimizations=Optimizations(int8_convolutions="auto"))
    assert short.runtime._hybrid and any("on for memory" in d for d in short.runtime.decisions)


def test_the_probe_really_measures_and_a_damaged_answer_is_measured_again(tmp_path):
    import openvino as ov

    from engine.system.hardware import detect

    cpu = detect().cpu
    first = probe_module.int8_convolution_probe(ov.Core(), cpu, "f32", tmp_path)
    assert first.int8_ms > 0 and first.other_ms > 0 and not first.cached
    saved = next((tmp_path / "probes").glob("int8-conv-*.json"))
    assert json.loads(saved.read_text())["speedup"] == pytest.approx(first.speedup)
    saved.write_text("{not json")
    again = probe_module.int8_convolution_probe(ov.Core(), cpu, "f32", tmp_path)
    assert not again.cached and json.loads(saved.read_text())["int8_ms"] == again.int8_ms


def test_old_presets_with_a_boolean_int8_convolutions_still_load():
    assert Optimizations(int8_convolutions=True).int8_convolutions == "on"
    assert Optimizations(int8_convolutions=False).int8_convolutions == "off"


def test_a_shallow_graph_missing_from_the_cache_is_calibrated_again(ov_tiny_int8h_deepcache, tmp_path):
    """With the full graph cached and the shallow one not, calibration inputs were skipped, so the rebuilt
    shallow graph silently got int8 weights only."""
    from engine.runtimes.openvino.quantize import has_quantized_convolutions

    options = Optimizations(int8_convolutions="on", deepcache_interval=2)
    cache = ov_tiny_int8h_deepcache.copy(tmp_path / "cache")  # converted with these options (conftest)
    shallow = list(cache.rglob("unet_shallow.*"))
    assert shallow and any(cache.rglob("unet_deep.xml"))
    for path in shallow:
        path.unlink()
    engine = Engine(runtime="openvino", cache_dir=cache, outputs_dir=None, optimizations=options)
    engine.load("builtin:tiny")
    assert [part for part, _ in engine.runtime.conversions] == ["unet_shallow"]
    assert has_quantized_convolutions(engine.runtime._irs["unet_shallow"])


def test_engine_tab_says_how_openvino_uses_the_cores(plain):
    plain.txt2img({**REQ, "steps": 2})
    line = next(d for d in plain.status()["decisions"] if d.startswith("One image at a time"))
    assert f"of {plain.hardware.cpu.logical_cores} logical cores" in line and "one after another" in line
