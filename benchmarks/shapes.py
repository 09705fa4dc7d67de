"""builtin:shapes at its native size: seconds for a 20-step txt2img, per runtime, side by side.

    python -m benchmarks.shapes --repeats 5

Each runtime gets one warm-up job (OpenVINO compiles the shape there), then `repeats` timed
jobs; the median end-to-end seconds (text encoding + denoising + VAE decode) are printed
and written as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runtimes", default="pytorch,openvino")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from engine import Engine

    out = {"model": "builtin:shapes", "steps": args.steps, "runtimes": {}}
    for name in args.runtimes.split(","):
        engine = Engine(runtime=name, outputs_dir=None)
        engine.preview_every = 0
        model = engine.load("builtin:shapes")
        size = model.native_size
        request = {"prompt": "a red circle on a blue background", "width": size, "height": size,
                   "steps": args.steps, "guidance": 7.0, "sampler": "Euler", "seed": 1}
        engine.txt2img(request)  # warm-up
        times = [engine.txt2img({**request, "seed": 2 + i}).readout.total_s for i in range(args.repeats)]
        out["runtimes"][name] = {"size": size, "median_s": statistics.median(times), "times_s": times,
                                 "precision": engine.runtime.precision}
        print(f"{name}: {size}x{size}, {args.steps} steps: median {statistics.median(times):.3f} s "
              f"({', '.join(f'{t:.3f}' for t in times)})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
