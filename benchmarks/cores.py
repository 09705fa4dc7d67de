"""Does OpenVINO use every core for one image, and do parallel infer requests give more images per minute?

    python -m benchmarks.cores --size 512 --json OUT.json

On builtin:sd15's UNet (batch 2: one image with guidance), converted by the engine's own OpenVINO
runtime, in one process, one configuration after another:
- threads: INFERENCE_NUM_THREADS pinned to 2, 4, 8... up to the logical cores (one pass);
- then round after round, side by side: one image on the LATENCY hint as the engine compiles it (the
  threads and streams OpenVINO picks) and the same with every core named; several images (batch
  count > 1) one request after another (what the engine does), against 2 and 4 requests in flight
  (THROUGHPUT hint with that many streams), and against one request at UNet batch 4 (two images per
  call, what batch size does);
- the int8-convolution probe, where nncf imports.
Precisions: the one the engine picks on this CPU and fp32. Writes JSON and prints ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.runtimes import ROOT, time_calls


def unet_feed(config, size: int, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"sample": (batch, config.in_channels, size // 8, size // 8), "timestep": (1,),
              "encoder_hidden_states": (batch, 77, config.cross_attention_dim)}
    return {k: (rng.standard_normal(s) * (999 if k == "timestep" else 1)).astype(np.float32) for k, s in shapes.items()}


def compile_unet(core, ir, feed, config):
    model = ir.clone()
    model.reshape({k: list(v.shape) for k, v in feed.items()})
    start = time.perf_counter()
    compiled = core.compile_model(model, "CPU", config)
    return compiled, time.perf_counter() - start


def props(compiled) -> dict:
    out = {}
    for p in ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "OPTIMAL_NUMBER_OF_INFER_REQUESTS", "INFERENCE_PRECISION_HINT"):
        try:
            v = compiled.get_property(p)
            out[p] = v.to_string() if hasattr(v, "to_string") else (v if isinstance(v, (int, str)) else str(v))
        except RuntimeError:
            pass
    return out


def latency(compiled, feed, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls on one infer request, after a first call that allocates."""
    request = compiled.create_infer_request()
    return time_calls(lambda: request.infer(feed), repeats)[1]


def throughput(compiled, feed, in_flight: int, calls: int) -> float:
    """Calls per second with `in_flight` requests kept busy (AsyncInferQueue), after one warm round."""
    import openvino as ov

    queue = ov.AsyncInferQueue(compiled, in_flight)
    for _ in range(in_flight):
        queue.start_async(feed)
    queue.wait_all()
    start = time.perf_counter()
    for _ in range(calls):
        queue.start_async(feed)
    queue.wait_all()
    return calls / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=12, help="UNet calls per throughput measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache-dir", default=str(ROOT / ".bench-cache"))
    p.add_argument("--precisions", default="auto,fp32")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import openvino as ov

    from engine.models.loading import load_model
    from engine.options import Optimizations
    from engine.runtimes.openvino.runtime import OpenVINORuntime
    from engine.system import hardware

    hw = hardware.detect()
    physical = psutil.cpu_count(logical=False) or hw.cpu.logical_cores
    print(hw, f"\nphysical cores: {physical}", flush=True)
    out_json = Path(args.json or ROOT / "benchmarks" / "results" / f"cores-{args.size}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": args.model, "size": args.size, "hardware": str(hw), "physical_cores": physical,
                     "logical_cores": hw.cpu.logical_cores, "openvino": ov.get_version(), "precisions": {}}
    model = load_model(args.model)
    unet_config = model.pipe.unet.config
    for wish in [w for w in args.precisions.split(",") if w]:
        runtime = OpenVINORuntime(hw, Optimizations(precision=wish), Path(args.cache_dir))
        start = time.perf_counter()
        runtime.prepare(model if wish == args.precisions.split(",")[0] else load_model(args.model))
        prep = time.perf_counter() - start
        ir, core, base = runtime._irs["unet"], runtime.core, runtime._config()
        base.pop("CACHE_DIR", None)  # time compiles honestly; no blob cache
        hint = base["INFERENCE_PRECISION_HINT"]
        r: dict = {"hint": hint, "prepare_s": prep, "one_image": {}, "threads": {}}
        results["precisions"][wish] = r
        feed2, feed4 = unet_feed(unet_config, args.size, 2), unet_feed(unet_config, args.size, 4)

        # Threads pinned: does the time keep falling up to every core? (informative; one pass)
        n, counts = 2, []
        while n < hw.cpu.logical_cores:
            counts.append(n)
            n *= 2
        for n in sorted(set(counts + [physical, hw.cpu.logical_cores])):
            c, _ = compile_unet(core, ir, feed2, {**base, "INFERENCE_NUM_THREADS": n})
            t = latency(c, feed2, max(2, args.repeats - 2))
            r["threads"][n] = {"s_per_call": statistics.median(t), "chosen": props(c)}
            print(f"[{hint}] {n} threads: {statistics.median(t):.3f} s/call", flush=True)
            del c

        # Side by side, round after round (this machine's speed drifts): the engine's own config, the same
        # with every core named, and for several images (one image = one batch-2 call): one request after
        # another, 2 or 4 in flight, or one request at UNet batch 4 (batch size 2).
        configs = {"engine": (feed2, base),
                   "engine_all_threads": (feed2, {**base, "INFERENCE_NUM_THREADS": hw.cpu.logical_cores}),
                   "parallel_2": (feed2, {**base, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}),
                   "parallel_4": (feed2, {**base, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 4}),
                   "unet_batch_4": (feed4, base)}
        compiled = {}
        for name, (feed, config) in configs.items():
            compiled[name], secs = compile_unet(core, ir, feed, config)
            r["one_image"][name] = {"config": config, "chosen": props(compiled[name]), "compile_s": secs}
        rounds: dict[str, list[float]] = {}  # name -> images per minute, one per round
        for k in range(args.rounds):
            for name in ("engine", "engine_all_threads"):
                t = statistics.median(latency(compiled[name], feed2, args.repeats))
                rounds.setdefault(f"{name}_s_per_call", []).append(t)
            rounds.setdefault("sequential", []).append(60 * throughput(compiled["engine"], feed2, 1, args.calls))
            for streams in (2, 4):
                rounds.setdefault(f"parallel_{streams}", []).append(
                    60 * throughput(compiled[f"parallel_{streams}"], feed2, streams, args.calls))
            t = statistics.median(latency(compiled["unet_batch_4"], feed4, max(2, args.repeats // 2)))
            rounds.setdefault("unet_batch_4", []).append(60 * 2 / t)
            print(f"[{hint}] round {k + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in rounds.items()), flush=True)
        med = {n: statistics.median(v) for n, v in rounds.items()}
        r["rounds"], r["median"] = rounds, med
        r["ratios"] = {"engine/engine_all_threads (s per call)": med["engine_s_per_call"] / med["engine_all_threads_s_per_call"],
                       **{f"{n}/sequential (images per min)": med[n] / med["sequential"]
                          for n in ("parallel_2", "parallel_4", "unet_batch_4")}}
        for n, v in r["ratios"].items():
            print(f"[{hint}] {n}: {v:.2f}", flush=True)
        del compiled
        out_json.write_text(json.dumps(results, indent=2, default=str))
        del runtime

    try:
        from engine.runtimes.openvino.probe import measure

        for hint in sorted({v["hint"] for v in results["precisions"].values()}):
            probe = measure(ov.Core(), hint)
            results.setdefault("int8_probe", {})[hint] = {"speedup": probe.speedup, "int8_ms": probe.int8_ms,
                                                           "other_ms": probe.other_ms}
            print(f"int8 probe vs {hint}: {probe.describe()}", flush=True)
    except ImportError as e:
        results["int8_probe"] = f"not run: {e}"
    out_json.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
