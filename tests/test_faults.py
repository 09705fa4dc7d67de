"""Faults leave the engine usable: out of memory mid-job, a runtime that fails to prepare a model."""
import pytest

from engine import Engine, UserError

REQ = {"prompt": "x", "width": 64, "height": 64, "steps": 6, "seed": 1}


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")])
def test_out_of_memory_mid_job_is_a_clear_message_and_next_job_runs(tiny_engine, error):
    def progress(i, n):
        if i == 3:
            raise error

    with pytest.raises(UserError, match="Out of memory.*low-memory preset"):
        tiny_engine.txt2img(REQ, progress=progress)
    assert not tiny_engine.live.running
    assert tiny_engine.txt2img(REQ).readout.steps == 6


def test_other_errors_are_not_called_out_of_memory(tiny_engine):
    def progress(i, n):
        raise ValueError("something else")

    with pytest.raises(ValueError):
        tiny_engine.txt2img(REQ, progress=progress)
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
    from engine import engine as engine_mod

    engine = Engine(runtime="pytorch", cache_dir=tmp_path)
    engine.load("builtin:tiny")

    def refuse(*args, **kwargs):
        raise ModelLoadError("injected: model files vanished")

    monkeypatch.setattr(engine_mod, "load_model", refuse)
    with pytest.raises(ModelLoadError):
        engine.set_runtime("openvino")
    assert engine.runtime.name == "pytorch" and engine.model.name == "builtin:tiny"
    assert engine.txt2img(REQ).readout.runtime == "pytorch"
