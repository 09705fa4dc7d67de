"""PyTorch vs OpenVINO on the SD 1.5 architecture, side by side in one run.

    python -m benchmarks.runtimes --size 512 --json OUT.json

UNet step times are measured in this process on the same weights (builtin:sd15, fixed
seed), one configuration after another. End-to-end time and peak RSS come from a fresh
child process per configuration, started by this run (peak RSS of a process that did
other work first would mean nothing). The OpenVINO INT8 child starts from the IR cache
this run filled, so no PyTorch copy of the UNet is ever built in it.

The compute floor is the UNet's FLOPs (torch.utils.flop_counter, batch 2 for guidance)
divided by the best matmul throughput this CPU reaches in the same run. Writes JSON and a
markdown table beside it, and prints the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# int8: INT8 weights; int8h: INT8 weights and convolutions (hybrid quantization)
CONFIGS = ("pytorch_fp32", "pytorch_bf16", "openvino_bf16", "openvino_int8", "openvino_int8h")


def engine_args(config: str) -> dict:
    from engine.options import Optimizations

    runtime, kind = config.split("_")
    return {"runtime": runtime,
            "optimizations": Optimizations(precision="fp32" if kind == "fp32" else "bf16",
                                           int8_weights=kind == "int8", int8_convolutions=kind == "int8h")}


def unet_inputs(unet_config, size: int, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    return (torch.randn(batch, unet_config.in_channels, lat, lat, generator=g), torch.tensor(999.0),
            torch.randn(batch, 77, unet_config.cross_attention_dim, generator=g))


def time_calls(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm: first call compiles / allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def unet_flops(size: int) -> int:
    """FLOPs of one UNet call at batch 2, counted on the meta device (no weights, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.models.loading import build_builtin

    _, pipe = build_builtin("sd15", frozenset({"unet", "vae", "text_encoder"}))
    sample, t, ehs = (x.to("meta") for x in unet_inputs(pipe.unet.config, size))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pipe.unet(sample, t, ehs, return_dict=False)
    return int(counter.get_total_flops())


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, windows: int = 3,
                  fast_bf16: bool = False) -> float:
    """Best of several timed windows: the floor should use what the CPU can reach, not a noisy average."""
    if dtype == torch.bfloat16 and not fast_bf16:
        n = min(n, 1024)  # emulated bf16 takes seconds per call; a smaller matrix measures the same rate
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.matmul(a, b)
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def auto_choice(hw, cache_dir: Path) -> str:
    """What `--runtime auto` with default options runs on this machine: the runtime, its precision and why."""
    from engine import runtimes
    from engine.options import Optimizations

    choice = runtimes.pick(hw, "auto")
    runtime = choice.cls(hw, Optimizations(), cache_dir)
    return f"{choice.name} {runtime.precision} ({choice.reason}; {'; '.join(runtime.decisions)})"


def run_child(config: str, size: int, steps: int, cache_dir: str) -> dict:
    """Fresh process: start, load, generate one image; report its own peak RSS."""
    start = time.perf_counter()
    from engine import Engine
    from engine.system.devices import PeakMemory

    with PeakMemory("cpu") as rss:
        engine = Engine(cache_dir=Path(cache_dir), **engine_args(config))
        model = engine.load("builtin:sd15")
        result = engine.txt2img({"prompt": "a red circle on a blue background", "width": size, "height": size,
                                 "steps": steps, "guidance": 7.0, "seed": 1, "sampler": "Euler"})
    import psutil

    return {"config": config, "startup_to_first_image_s": time.perf_counter() - start,
            "end_to_end_s": result.readout.total_s, "stages_s": result.readout.stages_s,
            "peak_rss_bytes": max(rss.peak_rss_bytes, psutil.Process().memory_info().rss),
            "skeleton": sorted(model.skeleton), "precision": result.readout.precision,
            "shape_cache": result.readout.shape_cache, "conversions": engine.runtime.__dict__.get("conversions", [])}


def child(config: str, size: int, steps: int, cache_dir: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runtimes", "--child", config, "--size", str(size),
                           "--steps", str(steps), "--cache-dir", cache_dir], cwd=ROOT, capture_output=True,
                          text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{config} child failed:\n{proc.stderr[-3000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image side (512, or 256 for a quick run)")
    p.add_argument("--json", default=None, help="where to write results (default benchmarks/results/runtimes-SIZE.json)")
    p.add_argument("--repeats", type=int, default=3, help="timed UNet calls per configuration")
    p.add_argument("--steps", type=int, default=20, help="steps of the end-to-end generation")
    p.add_argument("--configs", default=",".join(CONFIGS), help="subset to run")
    p.add_argument("--e2e", default="pytorch_fp32,openvino_bf16,openvino_int8",
                   help="configurations whose end-to-end run and peak RSS are measured in a child process")
    p.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "results" / "cache"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args.child, args.size, args.steps, args.cache_dir)), flush=True)
        return 0

    from engine.models.loading import LoadedModel, load_model, pipeline_class
    from engine.runtimes import runtime_class
    from engine.system import hardware

    configs = [c for c in args.configs.split(",") if c]
    out_json = Path(args.json or ROOT / "benchmarks" / "results" / f"runtimes-{args.size}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    hw = hardware.detect()
    print(hw, flush=True)
    auto = auto_choice(hw, Path(args.cache_dir))
    print(f"auto picks: {auto}", flush=True)
    results: dict = {"size": args.size, "batch_for_guidance": 2, "hardware": str(hw), "cpu": hw.cpu.describe(),
                     "auto": auto, "unet_step_s": {},
                     "unet_step_all_s": {}, "precision_actual": {}, "conversion_s": {}, "peak_rss_bytes": {},
                     "end_to_end_s": {}, "startup_to_first_image_s": {}, "children": {}, "skipped": {}}

    flops = unet_flops(args.size)
    # AMX reaches its peak only on large tiles: try a bigger matrix too where bf16 is in hardware.
    sizes = (2048, 4096) if hw.cpu.has_fast_bf16 else (2048,)
    gflops = {"bf16": max(matmul_gflops(torch.bfloat16, n, fast_bf16=hw.cpu.has_fast_bf16) for n in sizes),
              "fp32": max(matmul_gflops(torch.float32, n) for n in sizes)}
    best = max(gflops.values())
    results.update(unet_flops=flops, matmul_gflops=gflops, compute_floor_s=flops / (best * 1e9),
                   compute_floor_bf16_s=flops / (gflops["bf16"] * 1e9))
    print(f"UNet {flops / 1e12:.2f} TFLOP per step; matmul bf16 {gflops['bf16']:.0f} GFLOP/s, "
          f"fp32 {gflops['fp32']:.0f} GFLOP/s; floor {results['compute_floor_s']:.2f} s", flush=True)

    base = load_model("builtin:sd15")
    sample, t, ehs = unet_inputs(base.pipe.unet.config, args.size)
    for config in configs:
        if config == "pytorch_bf16" and not hw.cpu.has_fast_bf16:
            # Without AVX512-BF16/AMX, PyTorch's bf16 kernels are emulated: measured above at
            # matmul_gflops["bf16"], a step would take hours at 512. Record the bound, not a guess.
            results["skipped"][config] = (
                f"this CPU has no hardware bf16; bf16 matmul runs at {gflops['bf16']:.1f} GFLOP/s here, "
                f"so one UNet step would take at least {results['compute_floor_bf16_s']:.0f} s")
            print(f"{config}: skipped ({results['skipped'][config]})", flush=True)
            continue
        kw = engine_args(config)
        runtime = runtime_class(kw["runtime"])(hw, kw["optimizations"], Path(args.cache_dir))
        # A pipeline of its own sharing the same weights, so the runtime can swap components.
        parts = dict(base.pipe.components)
        if base.family != "sdxl":
            parts["requires_safety_checker"] = False
        pipe = pipeline_class(base.family)(**parts)
        model = LoadedModel(pipe=pipe, family=base.family, name=base.name, source=base.source, load_seconds=0,
                            scheduler_config=base.scheduler_config, identity=base.identity)
        start = time.perf_counter()
        runtime.prepare(model)
        results["conversion_s"][config] = time.perf_counter() - start
        unet = model.pipe.unet

        def step(unet=unet, runtime=runtime):
            with runtime.inference_context():
                return unet(sample, t, ehs, return_dict=False)[0]

        median, all_times = time_calls(step, args.repeats)
        results["unet_step_s"][config] = median
        results["unet_step_all_s"][config] = all_times
        results["precision_actual"][config] = runtime.precision
        print(f"{config}: {median:.3f} s/step ({runtime.precision}); prepare {results['conversion_s'][config]:.1f} s",
              flush=True)
        out_json.write_text(json.dumps(results, indent=2))  # partial results survive a run cut short
        del model, pipe, unet, runtime

    del base
    for config in [c for c in args.e2e.split(",") if c]:
        r = child(config, args.size, args.steps, args.cache_dir)
        results["children"][config] = r
        results["peak_rss_bytes"][config] = r["peak_rss_bytes"]
        results["end_to_end_s"][config] = r["end_to_end_s"]
        results["startup_to_first_image_s"][config] = r["startup_to_first_image_s"]
        print(f"{config}: end-to-end {r['end_to_end_s']:.1f} s, start-up to first image "
              f"{r['startup_to_first_image_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"weights not built in PyTorch: {r['skeleton']}", flush=True)
        out_json.write_text(json.dumps(results, indent=2))

    s = results["unet_step_s"]
    ratios = {}
    for ov in ("openvino_bf16", "openvino_int8", "openvino_int8h"):
        for pt in ("pytorch_fp32", "pytorch_bf16"):
            if ov in s and pt in s:
                ratios[f"{pt}/{ov}"] = s[pt] / s[ov]
        if ov in s:
            ratios[f"{ov}/compute_floor"] = s[ov] / results["compute_floor_s"]
    results["ratios"] = ratios
    out_json.write_text(json.dumps(results, indent=2))
    out_json.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return 0


def markdown(r: dict) -> str:
    gib = 2**30
    lines = [f"## Runtimes, SD 1.5 architecture, {r['size']}x{r['size']}, UNet batch 2", "",
             f"CPU: {r.get('cpu', r['hardware'].splitlines()[0])}", "", f"`--runtime auto` picks: {r.get('auto', '?')}", "",
             "| configuration | precision run | UNet s/step | vs floor | end-to-end s | start-up to image s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for c, step in r["unet_step_s"].items():
        e2e = r["end_to_end_s"].get(c)
        st = r["startup_to_first_image_s"].get(c)
        rss = r["peak_rss_bytes"].get(c)
        lines.append(f"| {c} | {r['precision_actual'][c]} | {step:.3f} | {step / r['compute_floor_s']:.2f}x | "
                     f"{'' if e2e is None else f'{e2e:.1f}'} | {'' if st is None else f'{st:.1f}'} | "
                     f"{'' if rss is None else f'{rss / gib:.2f}'} |")
    lines += ["", f"Compute floor {r['compute_floor_s']:.3f} s = {r['unet_flops'] / 1e12:.2f} TFLOP / "
                  f"{max(r['matmul_gflops'].values()):.0f} GFLOP/s (matmul bf16 {r['matmul_gflops']['bf16']:.0f}, "
                  f"fp32 {r['matmul_gflops']['fp32']:.0f} GFLOP/s in this run)", "", "Ratios:"]
    lines += [f"- {k}: {v:.2f}" for k, v in r["ratios"].items()]
    lines += [f"- {k} skipped: {v}" for k, v in r.get("skipped", {}).items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
