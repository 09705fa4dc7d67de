"""Less work per image on OpenVINO: DeepCache, CFG truncation, INT8 convolutions and the `balanced` preset,
each against plain OpenVINO at the same precision, side by side in one run.

    python -m benchmarks.cpu_savings speed --size 512 --steps 20 --json benchmarks/results/cpu-savings-512.json
    python -m benchmarks.cpu_savings quality --json benchmarks/results/cpu-savings-shapes.json

speed: builtin:sd15 (random weights, fixed seed), one request (CFG 7.5), one process. Before each timed
job `Engine.warmup` compiles every graph the configuration runs at that size (full, shallow and batch-1
UNets), so compile time is not counted and the readout must say "warm". UNet s is the denoising stage.
PSNR is against the plain image of the same seed (random weights: how far an option moves the output).

quality: the builtin:shapes colour test (6 prompts x 8 seeds = 48 pictures, 128x128, 20 steps) with each
option and with `balanced`, beside the plain score; an option that loses more than 5 points stays out of
`balanced`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from engine.compare.run import psnr

PROMPT = "a red circle on a blue background"
CONFIGS = {  # name -> options (on OpenVINO, prompt cache off); "balanced" reads presets/balanced.toml
    "plain": {},
    "deepcache_3": {"deepcache_interval": 3},
    "deepcache_3_from_0.4": {"deepcache_interval": 3, "deepcache_start": 0.4},
    "cfg_truncation_0.5": {"cfg_truncation": 0.5},
    "int8_convolutions": {"int8_convolutions": "on"},
    "balanced": None,
}


def options_for(name: str):
    from engine.options import Optimizations, load_preset

    if CONFIGS[name] is None:
        return load_preset(name).optimizations.model_copy(update={"prompt_cache": False, "result_cache": False})
    return Optimizations(**{"prompt_cache": False, **CONFIGS[name]})


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def speed(args, out: dict, save) -> None:
    from engine import Engine

    engine = Engine(runtime="openvino", cache_dir=args.cache_dir, outputs_dir=None)
    engine.preview_every = 0
    out["machine"] = str(engine.hardware).splitlines()[0]
    request = {"prompt": PROMPT, "negative_prompt": "", "width": args.size, "height": args.size, "steps": args.steps,
               "guidance": 7.5, "sampler": "DPM++ 2M Karras", "seed": 1}
    images, rows = {}, out.setdefault("rows", {})
    for name in args.names.split(","):
        start = time.perf_counter()
        engine.set_optimizations(options_for(name))
        if engine.model is None:
            engine.load("builtin:sd15")
        engine.warmup([(args.size, args.size)], guidance=request["guidance"])
        setup_s = time.perf_counter() - start
        result = engine.txt2img(request)
        r = result.readout
        images[name] = result.images[0]
        rows[name] = {"end_to_end_s": r.total_s, "unet_s": r.stages_s.get("denoising", 0.0), "stages_s": r.stages_s,
                      "setup_s": setup_s, "shape_cache": r.shape_cache, "precision": r.precision,
                      "unet_calls": r.details.get("unet_calls", ""), "decisions": engine.status()["decisions"],
                      "options": engine.model.options.model_dump(exclude_defaults=True)}
        if "plain" in rows and "plain" in images:
            base = rows["plain"]
            rows[name].update(speedup=base["end_to_end_s"] / r.total_s, unet_speedup=base["unet_s"] / rows[name]["unet_s"],
                              psnr_db=None if name == "plain" else round(psnr(result.images[0], images["plain"]), 2))
        log(f"{name}: {r.total_s:.1f} s end to end, UNet {rows[name]['unet_s']:.1f} s, {r.shape_cache}, "
            f"{rows[name].get('speedup', 1):.2f}x, calls {rows[name]['unet_calls']}")
        save()


def quality(args, out: dict, save) -> None:
    from engine import Engine
    from tools.shapes_score import PROMPTS, SEEDS, colours_right, prompt_text

    engine = Engine(runtime="openvino", cache_dir=args.cache_dir, outputs_dir=None)
    engine.preview_every = 0
    out["machine"] = str(engine.hardware).splitlines()[0]
    plain, rows = None, out.setdefault("rows", {})
    for name in args.names.split(","):
        engine.set_optimizations(options_for(name))
        if engine.model is None:
            engine.load("builtin:shapes")
        images, seconds = {}, 0.0
        for p in PROMPTS:
            result = engine.txt2img({"prompt": prompt_text(*p), "width": 128, "height": 128, "seed": 100,
                                     "batch_size": SEEDS, "steps": args.steps, "guidance": 7.0,
                                     "sampler": "DPM++ 2M Karras"})
            images[p], seconds = result.images, seconds + result.readout.total_s
        score = sum(colours_right(im, p[0], p[2]) for p, ims in images.items() for im in ims)
        plain = plain or images
        db = [psnr(a, b) for p in PROMPTS for a, b in zip(images[p], plain[p])]
        finite = [d for d in db if np.isfinite(d)]
        rows[name] = {"colours": score, "of": len(PROMPTS) * SEEDS, "seconds": round(seconds, 2),
                      "psnr_to_plain_db": round(float(np.mean(finite)), 2) if finite else None,
                      "options": engine.model.options.model_dump(exclude_defaults=True)}
        log(f"{name}: colours {score}/{len(PROMPTS) * SEEDS}, PSNR to plain {rows[name]['psnr_to_plain_db']}, "
            f"{seconds:.1f} s")
        save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("speed", "quality"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--names", default=",".join(CONFIGS))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    out = {"part": args.part, "size": args.size if args.part == "speed" else 128, "steps": args.steps,
           "command": "python -m benchmarks.cpu_savings " + " ".join(argv or __import__("sys").argv[1:])}

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")

    (speed if args.part == "speed" else quality)(args, out, save)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
