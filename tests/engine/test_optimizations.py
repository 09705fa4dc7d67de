"""Each optimization checkbox acts (counted, not timed), or is disabled with a reason."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pictures import pixels

from engine import Engine, runtimes
from engine.errors import UserError
from engine.options import DEFAULTS, LABELS, Optimizations, Preset, load_preset, preset_names, preset_toml, save_preset
from engine.system import hardware

REQ = {"prompt": "a red circle", "negative_prompt": "", "width": 128, "height": 128, "steps": 6, "seed": 11,
       "sampler": "Euler", "guidance": 7.0}


class Calls:
    """Counts forward calls of a module (and the batch sizes it saw)."""

    def __init__(self, module):
        self.n = 0
        self.batches = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.n += 1
        first = args[0] if args else None
        self.batches.append(first.shape[0] if torch.is_tensor(first) else None)

    def close(self):
        self.handle.remove()


def engine_with(opts: Optimizations, runtime="pytorch", **kw) -> Engine:
    engine = Engine(runtime=runtime, optimizations=opts, **kw)
    engine.load("builtin:tiny")
    return engine


@pytest.fixture(scope="module")
def baseline():
    engine = engine_with(Optimizations(prompt_cache=False))
    return engine, engine.txt2img(REQ)


def test_prompt_cache_second_encoding_skips_the_text_encoder(baseline):
    engine = engine_with(Optimizations(prompt_cache=True))
    calls = Calls(engine.model.pipe.text_encoder)
    first = engine.txt2img(REQ)
    n_first = calls.n
    second = engine.txt2img({**REQ, "seed": 12, "batch_size": 2})
    calls.close()
    assert n_first == 2  # prompt and negative prompt
    assert calls.n == n_first, "the second job ran the text encoder again"
    assert first.readout.details["prompt_cache"] == "miss" and second.readout.details["prompt_cache"] == "hit"
    # Same pixels as without the cache, also for a batch (embeddings repeated per image).
    assert np.array_equal(pixels(first), pixels(baseline[1]))
    alone = engine_with(Optimizations(prompt_cache=False)).txt2img({**REQ, "seed": 12, "batch_size": 2})
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(alone.images, second.images))


def test_result_cache_returns_without_running_the_unet(tmp_path):
    engine = engine_with(Optimizations(result_cache=True), outputs_dir=tmp_path)
    first = engine.txt2img(REQ)
    calls = Calls(engine.model.pipe.unet)
    again = engine.txt2img(REQ)
    other_seed = engine.txt2img({**REQ, "seed": 99})
    calls.close()
    assert calls.n == REQ["steps"], "only the job with a new seed may run the UNet"
    assert "result cache hit" in again.readout.shape_cache and again.readout.steps == 0
    assert any("Cached result" in n for n in again.readout.notices)
    assert again.saved_paths == first.saved_paths  # the saved image, not a new file
    assert np.array_equal(pixels(again), pixels(first))
    assert "result cache" not in other_seed.readout.shape_cache
    assert len(list(tmp_path.rglob("*.png"))) == 2


def test_result_cache_off_runs_again(tmp_path):
    engine = engine_with(Optimizations(result_cache=False))
    engine.txt2img(REQ)
    calls = Calls(engine.model.pipe.unet)
    engine.txt2img(REQ)
    calls.close()
    assert calls.n == REQ["steps"]


def test_deepcache_runs_fewer_full_unet_calls(baseline):
    engine = engine_with(Optimizations(deepcache_interval=3))
    unet = engine.model.pipe.unet
    every_call, full_only = Calls(unet.conv_in), Calls(unet.mid_block)
    result = engine.txt2img({**REQ, "steps": 9})
    every_call.close(), full_only.close()
    assert every_call.n == 9 and full_only.n == 3  # full UNet at steps 1, 4, 7
    assert result.readout.details["unet_calls_full"] == 3 and result.readout.details["unet_calls_shallow"] == 6
    assert "DeepCache every 3" in engine.status()["applied"]


def test_deepcache_full_every_step_matches_plain_unet(baseline):
    from engine.runtimes.deepcache import DeepCache

    engine = engine_with(Optimizations(prompt_cache=False))
    cache = DeepCache(engine.model.pipe.unet, 2).install()
    cache.interval = 1  # every call full: must equal diffusers' own forward exactly
    assert np.array_equal(pixels(engine.txt2img(REQ)), pixels(baseline[1]))


@pytest.mark.parametrize("down", [("CrossAttnDownBlock2D", "DownBlock2D"), ("DownBlock2D", "CrossAttnDownBlock2D")])
def test_deepcache_shallow_branch_on_two_layers_per_block(down):
    """SD 1.5's and SDXL's layout in miniature (two layers per block, the first block with or without
    attention): the shallow branch runs one layer of the first down block, and fed the features the full
    call kept it gives the full call's output exactly."""
    from diffusers import UNet2DConditionModel

    from engine.runtimes.deepcache import deep_channels, full_forward, shallow_forward

    up = tuple(reversed([d.replace("Down", "Up") for d in down]))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 64), down_block_types=down, up_block_types=up,
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    x, t, ehs = torch.randn(2, 4, 16, 16), torch.tensor([500.0]), torch.randn(2, 7, 32)
    calls = Calls(unet.down_blocks[0].resnets[1])  # the first down block's second layer: full calls only
    with torch.no_grad():
        plain = unet(x, t, ehs).sample
        full, deep = full_forward(unet, x, t, ehs)
        shallow = shallow_forward(unet, x, t, ehs, deep)
    calls.close()
    assert calls.n == 2  # diffusers' forward and ours; none in the shallow branch
    assert deep.shape == (2, deep_channels(unet.config), 16, 16) and deep.shape[1] == 32  # after a layer of the last up block
    assert torch.allclose(full, plain, atol=1e-5) and torch.allclose(shallow, full, atol=1e-5)


def test_early_stop_reports_a_stop_step_below_the_maximum():
    request = {**REQ, "steps": 30}
    stopped = engine_with(Optimizations(early_stop_threshold=0.05)).txt2img(request)
    full = engine_with(Optimizations()).txt2img(request)
    step = stopped.readout.details["early_stop_step"]
    assert 15 <= step < 30 and stopped.readout.steps == step
    assert any(f"Early stop at step {step} of 30" in n for n in stopped.readout.notices)
    assert full.readout.steps == 30 and "early_stop_step" not in full.readout.details


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    """A TAESD-shaped AutoencoderTiny with small widths, saved as a diffusers folder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("taesd")
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(path)
    return path


def test_tiny_autoencoder_replaces_the_vae_decode(taesd_dir, baseline):
    engine = engine_with(Optimizations(tiny_vae=True, prompt_cache=False), taesd=str(taesd_dir))
    vae_calls, tiny_calls = Calls(engine.model.pipe.vae.decoder), Calls(engine.tiny.module.decoder)
    result = engine.txt2img(REQ)
    vae_calls.close(), tiny_calls.close()
    assert vae_calls.n == 0 and tiny_calls.n == 1 + 3  # the decode, and live previews at steps 2, 4, 6
    assert result.readout.details["decoder"].startswith("tiny autoencoder")
    assert result.images[0].size == (128, 128)
    assert not np.array_equal(pixels(result), pixels(baseline[1]))
    assert engine.live().preview is not None  # previews come from the tiny autoencoder too


def test_tiny_autoencoder_on_openvino(taesd_dir):
    engine = engine_with(Optimizations(tiny_vae=True), runtime="openvino", taesd=str(taesd_dir))
    result = engine.txt2img({**REQ, "steps": 2})
    assert result.readout.details["decoder"].startswith("tiny autoencoder") and result.images[0].size == (128, 128)


def test_tiny_autoencoder_without_a_model_is_disabled_with_the_reason():
    engine = engine_with(Optimizations(tiny_vae=True))
    assert "--taesd" in engine.option_reasons()["tiny_vae"]
    assert "Tiny autoencoder (TAESD)" in engine.not_applied
    result = engine.txt2img(REQ)
    assert any("Not applied here: Tiny autoencoder" in n for n in result.readout.notices)
    assert "decoder" not in result.readout.details


def test_vae_slicing_and_tiling():
    engine = engine_with(Optimizations(vae_slicing=False))
    calls = Calls(engine.model.pipe.vae.decoder)
    engine.txt2img({**REQ, "batch_size": 2, "steps": 2})
    assert calls.batches == [2]
    engine.set_optimizations(Optimizations(vae_slicing=True))
    calls.batches.clear()
    engine.txt2img({**REQ, "batch_size": 2, "steps": 2})
    assert calls.batches == [1, 1]
    engine.set_optimizations(Optimizations(vae_tiling=True))
    calls.batches.clear()
    result = engine.txt2img({**REQ, "width": 640, "height": 512, "steps": 2})
    calls.close()
    assert len(calls.batches) == 2 and result.images[0].size == (640, 512)  # two 512 px tiles


def test_pytorch_side_options_are_applied():
    engine = engine_with(Optimizations(channels_last=True, attention_slicing=True, token_merging_ratio=0.5))
    pipe = engine.model.pipe
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "ToMeBlock"]
    assert blocks, "token merging did not patch the transformer blocks"
    assert engine.status()["applied"] == ["attention slicing", "channels_last", "token merging 0.5"]
    assert engine.txt2img({**REQ, "steps": 2}).images[0].size == (128, 128)


def test_torch_compile_wraps_the_unet_or_says_why(monkeypatch):
    from engine.runtimes import pytorch

    engine = engine_with(Optimizations(torch_compile=True))
    if "torch_compile" in engine.option_reasons():
        assert "compiler" in engine.option_reasons()["torch_compile"]
    else:
        assert type(engine.model.pipe.unet).__name__ == "OptimizedModule"  # compiled lazily, on first call
    monkeypatch.setattr(pytorch.shutil, "which", lambda name: None)
    assert "C++ compiler" in pytorch.PyTorchRuntime.option_reasons(engine.hardware)["torch_compile"]


def test_changing_only_engine_side_options_keeps_the_prepared_model():
    engine = engine_with(Optimizations())
    pipe = engine.model.pipe
    engine.set_optimizations(Optimizations(result_cache=True, early_stop_threshold=0.01, vae_tiling=True))
    assert engine.model.pipe is pipe and engine.model.options.vae_tiling
    engine.set_optimizations(Optimizations(deepcache_interval=2))
    assert engine.model.pipe is not pipe and "DeepCache every 2" in engine.status()["applied"]


def test_openvino_disables_pytorch_only_boxes_with_a_reason():
    engine = engine_with(Optimizations(token_merging_ratio=0.3, channels_last=True, int8_weights=False),
                         runtime="openvino")
    reasons = engine.option_reasons()
    for name in ("channels_last", "attention_slicing", "torch_compile", "token_merging_ratio"):
        assert "PyTorch runtime" in reasons[name], name
    for name in ("int8_weights", "prompt_cache", "deepcache_interval", "cfg_truncation"):
        assert name not in reasons, name
    result = engine.txt2img({**REQ, "steps": 3})
    notices = " ".join(result.readout.notices)
    assert "Token merging" in notices and "channels_last" in notices
    assert "unet_calls_full" not in result.readout.details and result.readout.details["unet_calls"] == "3 x2"


def test_pytorch_disables_openvino_only_and_cuda_only_boxes():
    cpu_only = replace(hardware.detect(), cuda_devices=())
    reasons = runtimes.runtime_class("pytorch").option_reasons(cpu_only)
    assert reasons["int8_weights"] == "needs the OpenVINO runtime"
    assert "needs CUDA" in reasons["attention"]


# ---------------------------------------------------------------- presets


def test_four_presets_ship_and_load():
    assert {"fastest", "balanced", "quality", "low-memory"} <= set(preset_names())
    fastest, quality = load_preset("fastest"), load_preset("quality")
    assert fastest.defaults.sampler == "LCM" and fastest.defaults.steps < quality.defaults.steps
    assert quality.optimizations.precision == "fp32"
    assert load_preset("low-memory").optimizations.attention_slicing


def test_fastest_preset_adds_the_shipped_lcm_lora_on_shapes_and_says_what_others_need():
    from engine.lora.tags import available

    fastest = load_preset("fastest")
    name, line = fastest.lora.advice("builtin:shapes")
    assert name == "lcm-shapes" and name in available(None) and "<lora:lcm-shapes:1>" in line
    name, line = fastest.lora.advice("runwayml/stable-diffusion-v1-5")
    assert name is None and "Needs an LCM-distilled model" in line
    assert load_preset("quality").lora.advice("builtin:tiny") == (None, "")


def test_preset_round_trips_through_save(tmp_path):
    for name in preset_names():
        preset = load_preset(name)
        copy = preset.model_copy(update={"name": f"copy-{name}"})
        save_preset(copy, tmp_path)
        assert load_preset(f"copy-{name}", tmp_path) == copy
    custom = Preset(name="mine", description='quote " and \\ back', optimizations=Optimizations(
        deepcache_interval=4, early_stop_threshold=0.02, attention="xformers"), defaults={"steps": 9})
    save_preset(custom, tmp_path)
    assert load_preset("mine", tmp_path) == custom
    with pytest.raises(UserError, match="exists"):
        save_preset(custom, tmp_path)
    assert "deepcache_interval = 4" in preset_toml(custom)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "UPPER", "", ".hidden", "x" * 41, "a b"])
def test_save_preset_refuses_bad_names(tmp_path, name):
    with pytest.raises(UserError, match="preset name"):
        save_preset(Preset(name=name), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_preset_applies_to_the_engine():
    engine = engine_with(Optimizations())
    engine.set_optimizations(load_preset("low-memory").optimizations)
    assert engine.status()["applied"] == ["attention slicing"]
    assert "INT8 weights" in engine.not_applied  # PyTorch runtime here
    assert engine.model.options.vae_tiling


def test_the_option_schema_describes_every_field():
    from pydantic import ValidationError

    from engine.options import OPTION_SPECS, RUNTIME_FIELDS

    assert set(OPTION_SPECS) == set(Optimizations.model_fields) == set(LABELS)
    for name, spec in OPTION_SPECS.items():
        assert spec.label and spec.help and spec.default == getattr(DEFAULTS, name)
        assert spec.runtime in (None, "pytorch", "openvino") and (spec.runtime is None or name in RUNTIME_FIELDS)
        if spec.kind in ("int", "float"):  # the UI's ranges are the field's own bounds
            with pytest.raises(ValidationError):
                Optimizations(**{name: spec.maximum + (spec.step or 1)})
            assert Optimizations(**{name: spec.maximum})
    assert OPTION_SPECS["precision"].choices == ("auto", "fp32", "bf16", "fp16")
    assert {"vae_tiling", "result_cache"}.isdisjoint(RUNTIME_FIELDS) and "deepcache_interval" in RUNTIME_FIELDS


# ---------------------------------------------------------------- OneDiff selection (CPU-testable)

GPU = (hardware.CudaDevice(0, "NVIDIA H100", 80 << 30, (9, 0)),)


def cuda_report():
    return replace(hardware.detect(), cuda_devices=GPU)


def test_onediff_is_picked_on_cuda_when_it_and_a_backend_import(monkeypatch):
    from engine.runtimes import onediff

    monkeypatch.setattr(onediff, "_imports", lambda m: m in ("onediff", "onediffx", "nexfort"))
    choice = runtimes.pick(cuda_report(), "auto")
    assert choice.name == "onediff" and "OneDiff" in choice.reason
    assert onediff.onediff_backend() == "nexfort"
    reasons = onediff.OneDiffRuntime.option_reasons(cuda_report())
    assert "OneDiff compiles" in reasons["torch_compile"]


def test_onediff_without_backend_falls_back_to_pytorch_and_says_why(monkeypatch):
    from engine.runtimes import onediff

    monkeypatch.setattr(onediff, "_imports", lambda m: m in ("onediff", "onediffx"))
    choice = runtimes.pick(cuda_report(), "auto")
    assert choice.name == "pytorch" and "backend" in choice.skipped["onediff"]
    monkeypatch.setattr(onediff, "_imports", lambda m: False)
    choice = runtimes.pick(cuda_report(), "auto")
    assert "requirements-cuda.txt" in choice.skipped["onediff"]
    monkeypatch.setattr(onediff, "_imports", lambda m: True)  # installed, but no GPU
    assert "NVIDIA" in onediff.OneDiffRuntime.available(replace(hardware.detect(), cuda_devices=()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_onediff_on_a_gpu_generates():  # pragma: no cover - runs only where a GPU is lent
    reason = runtimes.unavailable_reason("onediff", hardware.detect())
    if reason:
        pytest.skip(reason)
    engine = Engine(runtime="onediff")
    engine.load("builtin:tiny")
    assert engine.txt2img({**REQ, "steps": 4}).images[0].size == (128, 128)


def test_deepcache_starts_fresh_after_an_early_stopped_job():
    from PIL import Image

    image = Image.new("RGB", (128, 128), (200, 40, 40))
    request = {**REQ, "steps": 10, "strength": 0.3}
    engine = engine_with(Optimizations(deepcache_interval=3, early_stop_threshold=0.2))
    stopped = engine.txt2img({**REQ, "steps": 12})
    assert stopped.readout.steps < 12
    engine.set_optimizations(Optimizations(deepcache_interval=3))  # same runtime options: no re-prepare
    after = engine.img2img(request, image)
    fresh = engine_with(Optimizations(deepcache_interval=3)).img2img(request, image)
    assert np.array_equal(pixels(after), pixels(fresh))


def test_readout_says_compiled_then_warm_with_torch_compile(monkeypatch):
    """The readout said "eager (no compile)" with torch.compile ticked; it names the compile at a new shape."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the compile itself is not under test
    engine = engine_with(Optimizations(torch_compile=True))
    if "torch_compile" in engine.option_reasons():
        pytest.skip(engine.option_reasons()["torch_compile"])
    first = engine.txt2img({**REQ, "steps": 2})
    again = engine.txt2img({**REQ, "steps": 2, "seed": 5})
    other = engine.txt2img({**REQ, "steps": 2, "width": 64})
    assert first.readout.shape_cache.startswith("compiled now (")
    assert again.readout.shape_cache == "warm (cache hit)"
    assert other.readout.shape_cache.startswith("compiled now (")


@pytest.fixture(scope="module")
def sdxl_engine_with_sd1_taesd():
    engine = Engine(runtime="pytorch", optimizations=Optimizations(tiny_vae=True), taesd="builtin:taesd")
    engine.load("builtin:tiny-sdxl")
    return engine


def test_a_tiny_autoencoder_for_another_family_is_refused_with_the_reason(sdxl_engine_with_sd1_taesd):
    engine = sdxl_engine_with_sd1_taesd
    assert engine.model.taesd is None
    assert "TAESDXL" in engine.option_reasons()["tiny_vae"] and "sdxl" in engine.option_reasons()["tiny_vae"]
    result = engine.txt2img({**REQ, "steps": 1})
    assert "decoder" not in result.readout.details
    assert any("Tiny autoencoder" in n and "TAESDXL" in n for n in result.readout.notices)
    matching = Engine(runtime="pytorch", optimizations=Optimizations(tiny_vae=True), taesd="builtin:taesdxl")
    matching.load("builtin:tiny-sdxl")
    assert matching.model.taesd is not None and "tiny_vae" not in matching.option_reasons()
