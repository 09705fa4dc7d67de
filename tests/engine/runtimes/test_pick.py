import builtins
import logging
from dataclasses import replace
from importlib.machinery import ModuleSpec

import pytest

from engine import runtimes
from engine.errors import RuntimeUnavailable
from engine.options import Optimizations
from engine.runtimes.pytorch import PyTorchRuntime
from engine.system import hardware

SPR = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_int8 amx_tile
processor\t: 1
flags\t\t: ignored second copy
"""
ZEN3 = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n"


def test_parse_cpuinfo_intel_amx():
    cpu = hardware.parse_cpuinfo(SPR, 2)
    assert cpu.vendor == "Intel" and "8480" in cpu.model
    assert cpu.avx512 and cpu.avx512_bf16 and cpu.amx_bf16 and cpu.amx_int8 and cpu.has_fast_bf16


def test_parse_cpuinfo_amd_avx2_only():
    cpu = hardware.parse_cpuinfo(ZEN3, 2)
    assert cpu.vendor == "AMD" and cpu.avx2 and not cpu.avx512 and not cpu.has_fast_bf16


def test_detect_reports_this_machine():
    report = hardware.detect()
    assert report.ram_total_bytes > 0 and report.cpu.logical_cores >= 1
    lines = str(report).splitlines()
    assert lines[0].startswith("CPU: ") and lines[1].startswith("RAM: ")
    cuda = [line for line in lines if line.startswith("CUDA")]
    if report.cuda_devices:
        assert cuda[0].startswith(f"CUDA 0: {report.cuda_devices[0].name}") and len(cuda) == len(report.cuda_devices)
    else:
        assert cuda == ["CUDA: none"]


def fake(cpu_text=ZEN3, cuda=(), ov=(), ov_version=None):
    return hardware.HardwareReport(cpu=hardware.parse_cpuinfo(cpu_text, 2), ram_total_bytes=8 << 30,
                                   cuda_devices=cuda, openvino_devices=ov, openvino_version=ov_version,
                                   torch_version="x")


GPU = (hardware.CudaDevice(0, "NVIDIA H100", 80 << 30, (9, 0)),)


def test_pick_cpu_without_openvino_installed_falls_back_to_pytorch_and_says_why():
    choice = runtimes.pick(fake(ov=("CPU",)), "auto")  # no openvino_version: not installed
    assert choice.name == "pytorch"
    assert "not installed" in choice.skipped["openvino"]


def test_pick_cpu_with_openvino_chooses_openvino():
    choice = runtimes.pick(fake(ov=("CPU",), ov_version="2025.0.0"), "auto")
    assert choice.name == "openvino" and "OpenVINO" in choice.reason and not choice.skipped


def test_pick_on_this_machine_chooses_openvino_where_it_has_a_cpu_device():
    report = hardware.detect()
    if report.has_cuda:
        pytest.skip("this machine has a CUDA GPU, which the picker prefers")
    try:
        import openvino as ov

        devices = ov.Core().available_devices
    except Exception as e:
        pytest.skip(f"OpenVINO does not run here ({type(e).__name__}: {e})")
    if "CPU" not in devices:
        pytest.skip(f"OpenVINO finds no CPU device here (only {devices})")
    assert runtimes.pick(report).name == "openvino"


@pytest.fixture
def openvino_does_not_import(monkeypatch):
    """openvino is found (installed here or not) and its import fails as a missing shared library would."""
    real_import, real_find_spec = builtins.__import__, hardware.importlib.util.find_spec

    def fail_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("libopenvino.so.2026: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fail_openvino)
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name, *a: ModuleSpec(name, None)
                        if name == "openvino" else real_find_spec(name, *a))


def test_openvino_that_does_not_import_is_not_called_not_installed(openvino_does_not_import, caplog):
    from engine.runtimes.openvino import OpenVINORuntime

    with caplog.at_level(logging.WARNING, logger="engine.system.hardware"):
        report = hardware.detect()
    assert report.openvino_version is None
    why = OpenVINORuntime.available(report)
    assert "does not import" in why and "ImportError: libopenvino.so.2026: cannot open shared object file" in why
    assert "not installed" not in why and "does not import" in str(report)
    assert any(r.exc_info and "libopenvino.so.2026" in str(r.exc_info[1]) for r in caplog.records)  # the traceback
    if not report.has_cuda:
        assert "libopenvino.so.2026" in runtimes.pick(report).skipped["openvino"]


def test_openvino_not_installed_says_so(monkeypatch):
    from engine.runtimes.openvino import OpenVINORuntime

    real_find_spec = hardware.importlib.util.find_spec
    monkeypatch.setattr(hardware.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real_find_spec(name, *a))
    report = hardware.detect()
    assert report.openvino_version is None and report.openvino_error is None
    assert "not installed" in OpenVINORuntime.available(report) and "OpenVINO: not installed" in str(report)


@pytest.mark.parametrize("present, chosen, why", [
    ({"onediff", "onediffx", "nexfort"}, "onediff", None),
    ({"onediff", "onediffx"}, "pytorch", "no OneDiff backend"),
    (set(), "pytorch", "not installed"),
])
def test_pick_cuda_prefers_onediff_then_pytorch(monkeypatch, present, chosen, why):
    from engine.runtimes import onediff

    monkeypatch.setattr(onediff, "_imports", lambda module: module in present)
    choice = runtimes.pick(fake(cuda=GPU), "auto")
    assert choice.name == chosen and "CUDA" in choice.reason
    if why:
        assert why in choice.skipped["onediff"]
    else:
        assert "OneDiff" in choice.reason and "onediff" not in choice.skipped


def test_pick_explicit_unavailable_runtime_is_a_clear_error():
    with pytest.raises(RuntimeUnavailable, match="onediff"):
        runtimes.pick(fake(), "onediff")
    with pytest.raises(RuntimeUnavailable, match="Unknown runtime"):
        runtimes.pick(fake(), "tensorrt")


def test_pytorch_precision_per_hardware():
    assert PyTorchRuntime(fake(), Optimizations()).precision == "fp32"
    assert PyTorchRuntime(fake(SPR), Optimizations()).precision == "bf16"
    assert PyTorchRuntime(fake(SPR), Optimizations(precision="fp32")).precision == "fp32"
    gpu = PyTorchRuntime(fake(cuda=GPU), Optimizations())
    assert gpu.device == "cuda" and gpu.precision == "fp16"
    with pytest.raises(RuntimeUnavailable, match="fp16 needs a GPU"):
        PyTorchRuntime(fake(), Optimizations(precision="fp16"))


def test_bf16_autocast_runs_on_cpu(tiny_engine):
    import torch

    cpu_only = replace(tiny_engine.hardware, cuda_devices=(), mps_available=False)  # whatever GPU the host has
    rt = PyTorchRuntime(cpu_only, Optimizations(precision="bf16"))
    assert rt.device == "cpu"
    with rt.inference_context():
        x = torch.ones(4, 4) @ torch.ones(4, 4)
    assert x.dtype == torch.bfloat16
