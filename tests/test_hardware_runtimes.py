from dataclasses import replace

import pytest

from engine import hardware, runtimes
from engine.errors import RuntimeUnavailable
from engine.options import Optimizations
from engine.runtimes.pytorch import PyTorchRuntime

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
    text = str(report)
    assert "CPU:" in text and "RAM:" in text and "CUDA" in text


def fake(cpu_text=ZEN3, cuda=(), ov=()):
    return hardware.HardwareReport(cpu=hardware.parse_cpuinfo(cpu_text, 2), ram_total_bytes=8 << 30,
                                   cuda_devices=cuda, openvino_devices=ov, torch_version="x")


GPU = (hardware.CudaDevice(0, "NVIDIA H100", 80 << 30, (9, 0)),)


def test_pick_cpu_falls_back_to_pytorch_and_says_why():
    choice = runtimes.pick(fake(ov=("CPU",)), "auto")
    assert choice.name == "pytorch"
    assert "openvino" in choice.skipped and choice.skipped["openvino"]


def test_pick_cuda_prefers_onediff_then_pytorch():
    choice = runtimes.pick(fake(cuda=GPU), "auto")
    assert choice.name == "pytorch" and "CUDA" in choice.reason and "onediff" in choice.skipped


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

    rt = PyTorchRuntime(replace(tiny_engine.hardware), Optimizations(precision="bf16"))
    with rt.inference_context():
        x = torch.ones(4, 4) @ torch.ones(4, 4)
    assert x.dtype == torch.bfloat16
