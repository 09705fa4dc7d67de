"""Whether int8 convolutions are faster than the precision they replace, on this CPU, timed once.

CPU flags do not tell: on a first-generation EPYC (half-rate AVX2) a hybrid-quantized SD 1.5 UNet ran at
0.76x of fp32 per step at 512x512, on Zen 3 at 1.34x. The probe times a small stack of the UNet's
typical convolutions (3x3, 320 channels) compiled both ways with the runtime's precision hint, and keeps
the answer on disk keyed by the machine (CPU model, flags, cores) and the OpenVINO version, so each
machine pays its few seconds once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROBE_VERSION = 1
FASTER_BY = 1.05  # int8 must beat the other precision by this much to be called faster (timing noise)
CHANNELS, SIDE, BATCH, LAYERS = 320, 32, 2, 3  # an SD 1.5 UNet's first block at 256x256, batch 2 (guidance)
ROUNDS = 7


@dataclass(frozen=True)
class Int8ConvProbe:
    speedup: float  # time of the other precision / time in int8 (> 1: int8 faster)
    int8_ms: float
    other_ms: float
    other: str  # the precision hint compared against: "f32" or "bf16"
    cached: bool = False

    @property
    def faster(self) -> bool:
        return self.speedup >= FASTER_BY

    def describe(self) -> str:
        where = "cached probe" if self.cached else "probe"
        return (f"int8 convolutions measured {self.speedup:.2f}x the speed of {self.other} on this CPU "
                f"({where}: {self.int8_ms:.1f} ms against {self.other_ms:.1f} ms)")


def machine_key(cpu, hint: str) -> str:
    """What decides the answer: the CPU's identity and flags, the cores OpenVINO runs on, its version, the hint."""
    import openvino as ov

    parts = [cpu.identity, ov.get_version(), hint, str(PROBE_VERSION)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _conv_stack():
    import torch

    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [torch.nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), torch.nn.SiLU()]
    return torch.nn.Sequential(*layers).eval()


def _median_ms(compiled, sample: np.ndarray) -> float:
    request = compiled.create_infer_request()
    request.infer({0: sample})  # first run allocates
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        request.infer({0: sample})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(core, hint: str) -> Int8ConvProbe:
    """Time the conv stack in int8 (quantized with nncf) and in `hint` precision, alternating."""
    import nncf
    import openvino as ov
    import torch

    rng = np.random.default_rng(0)
    shape = (BATCH, CHANNELS, SIDE, SIDE)
    with torch.no_grad():
        model = ov.convert_model(_conv_stack(), example_input=torch.zeros(shape))
    samples = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    quantized = nncf.quantize(model.clone(), nncf.Dataset(samples), subset_size=len(samples),
                              model_type=nncf.ModelType.TRANSFORMER)
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    other, int8 = core.compile_model(model, "CPU", config), core.compile_model(quantized, "CPU", config)
    other_ms, int8_ms = [], []
    for _ in range(2):  # alternate, so a slower spell of the machine hits both
        other_ms.append(_median_ms(other, samples[0]))
        int8_ms.append(_median_ms(int8, samples[0]))
    o, i = min(other_ms), min(int8_ms)
    return Int8ConvProbe(speedup=o / i, int8_ms=i, other_ms=o, other=hint)


def int8_convolution_probe(core, cpu, hint: str, cache_root: Path) -> Int8ConvProbe:
    """The cached answer for this machine, or a new measurement (saved; an unwritable cache just is not)."""
    path = Path(cache_root) / "probes" / f"int8-conv-{machine_key(cpu, hint)}.json"
    try:
        return Int8ConvProbe(**{**json.loads(path.read_text()), "cached": True})
    except (OSError, ValueError, TypeError):
        pass  # none yet, or damaged: measure again
    start = time.perf_counter()
    probe = measure(core, hint)
    log.info("%s; probe took %.1f s", probe.describe(), time.perf_counter() - start)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in asdict(probe).items() if k != "cached"}))
        tmp.replace(path)
    except OSError:
        pass
    return probe
