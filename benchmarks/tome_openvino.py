"""Can token merging (tomesd) live in a converted OpenVINO graph? One UNet step, SD 1.5 architecture.

    python -m benchmarks.tome_openvino --size 256 --ratio 0.5 --json benchmarks/results/tome-openvino.json

tomesd picks which tokens merge from the features at run time (a gather/scatter over similarity
indices) but sizes those index tensors from the input shape in Python, so a trace holds only for the
shape it was traced at: the UNet is converted at the job's own static shape. Times one UNet call at
batch 2 (guidance) with and without the patch, compiled alike, alternating, and compares the outputs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def convert(unet, example):
    import openvino as ov

    from engine.runtimes.openvino.convert import _UNetWrap

    wrap = _UNetWrap(unet, False, False).eval()
    with torch.no_grad():
        model = ov.convert_model(wrap, example_input=example)
    model.reshape({name: list(t.shape) for name, t in example.items()})
    return model


def time_ms(compiled, inputs, rounds: int) -> list[float]:
    request = compiled.create_infer_request()
    request.infer(inputs)
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        request.infer(inputs)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    import openvino as ov
    import tomesd

    from engine.models import load_model

    out = {"size": args.size, "ratio": args.ratio}
    pipe = load_model("builtin:sd15").pipe
    lat = args.size // 8
    g = torch.Generator().manual_seed(0)
    example = {"sample": torch.randn(2, 4, lat, lat, generator=g), "timestep": torch.tensor([500.0]),
               "encoder_hidden_states": torch.randn(2, 77, 768, generator=g)}
    inputs = {k: v.numpy() for k, v in example.items()}
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    start = time.perf_counter()
    plain = core.compile_model(convert(pipe.unet, example), "CPU", config)
    out["plain_convert_compile_s"] = time.perf_counter() - start
    tomesd.apply_patch(pipe.unet, ratio=args.ratio, use_rand=False)
    try:
        start = time.perf_counter()
        merged = core.compile_model(convert(pipe.unet, example), "CPU", config)
        out["tome_convert_compile_s"] = time.perf_counter() - start
    except Exception as e:  # the measured reason, if it cannot convert
        out["tome_error"] = f"{type(e).__name__}: {e}"[:500]
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(out)
        return 0
    times = {"plain": [], "tome": []}
    for _ in range(2):  # alternate: a slow spell of the machine hits both
        times["plain"] += time_ms(plain, inputs, args.rounds)
        times["tome"] += time_ms(merged, inputs, args.rounds)
    a, b = plain(inputs)[0], merged(inputs)[0]
    with torch.no_grad():
        eager = pipe.unet(example["sample"], example["timestep"], example["encoder_hidden_states"]).sample.numpy()
    out.update({k + "_ms": statistics.median(v) for k, v in times.items()}, times_ms=times)
    out["speedup"] = out["plain_ms"] / out["tome_ms"]
    peak = float(np.abs(a).max())
    out["output_psnr_db"] = float(10 * np.log10(peak ** 2 / np.mean((a - b) ** 2)))
    out["openvino_tome_vs_eager_tome_max_abs"] = float(np.abs(b - eager).max())
    out["machine"] = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "times_ms"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
