"""Faults leave the engine usable: out of memory mid-job, a runtime that fails to prepare a model."""
import pytest

from engine import Engine, UserError

REQ = {"prompt": "x", "width": 64, "height": 64, "steps": 6, "seed": 1}


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")])
def test_out_of_memory_mid_job_is_a_clear_message_and_next_job_runs(tiny_engine, error):
    def progress(i, n):
        if i == 3:
            raise error

    with pytest.raises(UserError, match="Out of memory.*low-memory preset") as e:
        tiny_engine.txt2img(REQ, progress=progress)
    assert e.value.__cause__ is error  # one line for the user; the log keeps the cause
    assert tiny_engine.txt2img(REQ).readout.steps == 6


def test_other_errors_are_not_called_out_of_memory_nor_retried(tiny_engine):
    calls = []

    def progress(i, n):
        calls.append(i)
        raise ValueError("something else")

    with pytest.raises(ValueError, match="something else"):
        tiny_engine.txt2img(REQ, progress=progress)
    assert calls == [1] and tiny_engine.runtime.name == "pytorch"  # an eager runtime is not swapped for itself
    assert tiny_engine.txt2img(REQ).images


def test_runtime_that_fails_to_compile_falls_back_to_pytorch(tmp_path, monkeypatch):
    from engine.runtimes.openvino import OpenVINORuntime

    def broken(self, model):
        raise RuntimeError("injected compile failure")

    monkeypatch.setattr(OpenVINORuntime, "prepare", broken)
    engine = Engine(runtime="openvino", cache_dir=tmp_path)
    engine.load("builtin:tiny")
    assert engine.runtime.name == "pytorch"
    assert "injected compile failure" in engine.choice.reason and "openvino" in engine.status()["skipped"]
    assert engine.txt2img(REQ).readout.runtime == "pytorch"


def test_failed_runtime_switch_keeps_the_old_runtime_and_model(tmp_path, monkeypatch):
    from engine import ModelLoadError
    from engine import loadout as engine_mod

    engine = Engine(runtime="pytorch", cache_dir=tmp_path)
    engine.load("builtin:tiny")

    def refuse(*args, **kwargs):
        raise ModelLoadError("injected: model files vanished")

    monkeypatch.setattr(engine_mod, "load_model", refuse)
    with pytest.raises(ModelLoadError):
        engine.set_runtime("openvino")
    assert engine.runtime.name == "pytorch" and engine.model.name == "builtin:tiny"
    assert engine.txt2img(REQ).readout.runtime == "pytorch"


def test_failed_load_whose_fallback_also_fails_keeps_the_old_model_on_its_runtime(tiny_ov_cache, monkeypatch):
    from engine import ModelLoadError
    from engine import loadout as engine_mod
    from engine.runtimes.openvino import OpenVINORuntime

    engine = Engine(runtime="openvino", cache_dir=tiny_ov_cache)
    engine.load("builtin:tiny")
    before = engine.txt2img(REQ).images[0].tobytes()
    real_load, calls = engine_mod.load_model, []

    def load_once(*args, **kwargs):  # the OpenVINO attempt loads; the PyTorch fallback's load fails
        calls.append(1)
        if len(calls) > 1:
            raise ModelLoadError("injected: model files vanished")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(OpenVINORuntime, "prepare", lambda self, model: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(engine_mod, "load_model", load_once)
    with pytest.raises(ModelLoadError):
        engine.load("builtin:tiny-sdxl")
    assert engine.runtime.name == "openvino" and engine.model.name == "builtin:tiny"
    assert engine.txt2img(REQ).images[0].tobytes() == before


def test_runtime_that_fails_at_its_first_job_falls_back_once_and_keeps_serving(tiny_ov_cache, monkeypatch):
    """A lazily compiling runtime (OpenVINO compiles a shape at its first run) that breaks there."""
    from engine.runtimes.openvino import OpenVINORuntime

    engine = Engine(runtime="openvino", cache_dir=tiny_ov_cache)
    engine.load("builtin:tiny")
    monkeypatch.setattr(OpenVINORuntime, "infer", lambda self, part, inputs: (_ for _ in ()).throw(
        RuntimeError("injected: compile of this shape failed")))
    result = engine.txt2img(REQ)
    assert result.readout.runtime == "pytorch" and result.images
    assert "openvino failed at its first run" in result.notices[0] and "injected" in result.notices[0]
    assert "openvino" in engine.status()["skipped"]
    assert engine.txt2img({**REQ, "seed": 2}).readout.runtime == "pytorch"


def test_torch_compile_that_fails_at_its_first_job_runs_eager(monkeypatch):
    import torch

    from engine.options import Optimizations

    class Broken(torch.nn.Module):  # what a compile that fails at its first call looks like from outside
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.config, self.dtype, self.device = unet.config, unet.dtype, unet.device

        def forward(self, *args, **kwargs):
            raise RuntimeError("injected: inductor failed")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Broken(module))
    engine = Engine(runtime="pytorch", optimizations=Optimizations(torch_compile=True))
    engine.load("builtin:tiny")
    if "torch_compile" in engine.option_reasons():
        pytest.skip(engine.option_reasons()["torch_compile"])
    assert engine.runtime.compiles
    result = engine.txt2img(REQ)
    assert "torch.compile failed at its first run" in result.notices[0] and result.images
    assert not engine.runtime.optimizations.torch_compile and "torch.compile" not in engine.status()["applied"]
    assert engine.txt2img(REQ).readout.shape_cache == "eager (no compile)"



def test_first_job_fallback_whose_reload_fails_keeps_the_old_model_on_its_runtime(tiny_ov_cache, monkeypatch):
    from engine import ModelLoadError
    from engine import loadout as engine_mod
    from engine.runtimes.openvino import OpenVINORuntime

    engine = Engine(runtime="openvino", cache_dir=tiny_ov_cache)
    engine.load("builtin:tiny")
    with monkeypatch.context() as patch:
        patch.setattr(OpenVINORuntime, "infer", lambda self, part, inputs: (_ for _ in ()).throw(
            RuntimeError("injected: compile of this shape failed")))
        patch.setattr(engine_mod, "load_model", lambda *a, **k: (_ for _ in ()).throw(
            ModelLoadError("injected: model files vanished")))
        with pytest.raises(ModelLoadError):
            engine.txt2img(REQ)
    assert engine.runtime.name == "openvino" and engine.model.name == "builtin:tiny"
    assert engine.txt2img(REQ).readout.runtime == "openvino"
