"""Each optimization alone, and each preset, on the SD 1.5 architecture, side by side in one run.

    python -m benchmarks.optimizations --size 256 --steps 10 --json OUT.json
    python -m benchmarks.optimizations --size 512 --only presets --presets fastest,quality --json OUT.json

One process, one model (builtin:sd15, random weights, fixed seed), one request (prompt, seed,
size). Each optimization is toggled alone on the runtime that owns it, against that runtime's
baseline (the defaults: no optimization ticked). Presets run with their own sampler, steps
and guidance; their speed-up is against the `quality` preset. Before each measured job a
1-step job at the same size warms the shape (OpenVINO compiles per shape), so compile time
is not counted; caches are measured on their second use (the first fills them).

peak_rss_bytes is the peak RSS of this process during the measured job (it includes the
weights the process holds). psnr_db compares the image with the baseline image for the same
seed: with random weights it shows how far an optimization moves the output, not beauty.
Writes JSON, a markdown table and a PNG bar chart beside the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from engine.compare.run import psnr

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background"

# name -> (runtime, options, request overrides, how to measure)
OPTIMIZATIONS = {
    "pytorch_channels_last": ("pytorch", {"channels_last": True}, {}, "plain"),
    "pytorch_attention_slicing": ("pytorch", {"attention_slicing": True}, {}, "plain"),
    "pytorch_token_merging_0.5": ("pytorch", {"token_merging_ratio": 0.5}, {}, "plain"),
    "pytorch_deepcache_3": ("pytorch", {"deepcache_interval": 3}, {}, "plain"),
    "pytorch_torch_compile": ("pytorch", {"torch_compile": True}, {}, "plain"),
    "openvino_int8_weights": ("openvino", {"int8_weights": True}, {}, "plain"),
    "openvino_int8_convolutions": ("openvino", {"int8_convolutions": True}, {}, "plain"),
    "openvino_tiny_vae": ("openvino", {"tiny_vae": True}, {}, "plain"),
    "openvino_prompt_cache": ("openvino", {"prompt_cache": True}, {}, "second_seed"),
    "openvino_result_cache": ("openvino", {"result_cache": True}, {}, "repeat"),
    "openvino_early_stop_0.02": ("openvino", {"early_stop_threshold": 0.02}, {}, "plain"),
    "openvino_vae_tiling": ("openvino", {"vae_tiling": True}, {}, "plain"),
    "openvino_lcm_4_steps": ("openvino", {}, {"sampler": "LCM", "steps": 4, "guidance": 1.0}, "plain"),
}
BASE_OPTIONS = {"prompt_cache": False}  # the baseline has every box off


def psnr_db(a, b) -> float | None:
    """None where the sizes differ or the images are identical (infinite PSNR)."""
    if a.size != b.size:
        return None
    db = psnr(a, b)
    return None if math.isinf(db) else db


class Bench:
    def __init__(self, size: int, steps: int, cache_dir: Path | None, taesd: str):
        from engine import Engine

        self.size, self.steps = size, steps
        self.engine = Engine(runtime="pytorch", cache_dir=cache_dir, taesd=taesd, outputs_dir=None)
        self.engine.preview_every = 0
        self.runtime = None
        self.loaded = False

    def request(self, **over) -> dict:
        return {"prompt": PROMPT, "negative_prompt": "", "width": self.size, "height": self.size,
                "steps": self.steps, "guidance": 7.0, "sampler": "DPM++ 2M Karras", "seed": 1, **over}

    def configure(self, runtime: str, options: dict | None = None, preset=None) -> None:
        """Options alone must all act (else the row is wrong); a preset's inapplicable ones drop, as in the app."""
        from engine.options import Optimizations

        opts = preset if preset is not None else Optimizations(**{**BASE_OPTIONS, **options})
        if runtime != self.runtime:
            self.engine.set_runtime(runtime, opts)
            self.runtime = runtime
            if not self.loaded:
                self.engine.load("builtin:sd15")
                self.loaded = True
        else:
            self.engine.set_optimizations(opts)
        not_applied = self.engine.not_applied
        if not_applied and preset is None:
            raise RuntimeError(f"{runtime} {options}: not applied here: {not_applied}")

    def run(self, request: dict, how: str = "plain") -> tuple[dict, object]:
        engine = self.engine
        start = time.perf_counter()
        engine.txt2img({**request, "steps": 1, "seed": 12345})  # warm the shape (compile), not counted
        warm_s = time.perf_counter() - start
        # "second_seed": the warm-up (same prompt, other seed) filled the prompt cache; this job reuses it.
        if how == "repeat":  # the result cache is filled by a first identical job
            engine.txt2img(request)
        result = engine.txt2img(request)
        r = result.readout
        return {"end_to_end_s": r.total_s, "stages_s": r.stages_s, "steps_run": r.steps,
                "peak_rss_bytes": r.peak_rss_bytes, "warmup_s": warm_s, "precision": r.precision,
                "details": {k: v for k, v in r.details.items() if isinstance(v, (int, float, str))},
                "notices": r.notices}, result.images[0]


def chart(rows: list[tuple[str, float]], path: Path, title: str) -> None:
    """Horizontal bars of speed-up (PIL only; 1.0 marked)."""
    from PIL import Image, ImageDraw

    width, bar_h, left = 900, 26, 300
    height = 50 + bar_h * len(rows) + 30
    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    pen.text((10, 10), title, fill="black")
    cap = 15.0  # a cache hit is thousands of times faster; cut its bar so the others stay readable
    top = min(max([s for _, s in rows] + [1.0]), cap) * 1.1
    scale = (width - left - 110) / top
    for i, (name, speedup) in enumerate(rows):
        y = 40 + i * bar_h
        pen.text((10, y + 6), name, fill="black")
        colour = (46, 125, 50) if speedup >= 1 else (198, 40, 40)
        shown = min(speedup, cap)
        pen.rectangle([left, y + 3, left + max(1, shown * scale), y + bar_h - 5], fill=colour)
        label = f"{speedup:.2f}x" if speedup < 1000 else f"{speedup:.0f}x"
        pen.text((left + shown * scale + 6, y + 6), label + (" (bar cut)" if speedup > cap else ""), fill="black")
    x1 = left + scale
    pen.line([x1, 35, x1, height - 25], fill=(90, 90, 90), width=1)
    pen.text((x1 - 10, height - 22), "1.0x", fill="black")
    image.save(path)


def markdown(out: dict) -> str:
    gib = 1024**3
    lines = [f"# Optimizations at {out['size']}x{out['size']}, builtin:sd15, {out['steps']} steps "
             f"(presets use their own steps)", "",
             f"Machine: {out['machine']}", "",
             "| name | runtime | end-to-end s | speed-up | peak RSS GiB | PSNR dB vs baseline | steps run |",
             "|---|---|---|---|---|---|---|"]
    for group in ("baselines", "optimizations", "presets"):
        for name, r in out.get(group, {}).items():
            if "skipped" in r:
                lines.append(f"| {name} | {r.get('runtime', '')} | skipped: {r['skipped']} | | | | |")
                continue
            psnr = r.get("psnr_db")
            psnr_text = f"{psnr:.1f}" if psnr is not None else "identical"
            lines.append(f"| {name} | {r['runtime']} | {r['end_to_end_s']:.2f} | {r.get('speedup', 1.0):.2f}x | "
                         f"{r['peak_rss_bytes'] / gib:.2f} | {psnr_text} | {r['steps_run']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--only", choices=("optimizations", "presets"), default=None)
    p.add_argument("--names", default=None, help="comma-separated optimization names to run (default: all)")
    p.add_argument("--presets", default="fastest,balanced,quality,low-memory")
    p.add_argument("--skip", default="", help="comma-separated names to skip (e.g. pytorch_torch_compile)")
    p.add_argument("--taesd", default="builtin:taesd")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--chart-only", action="store_true", help="redraw the chart and table from an existing --json")
    args = p.parse_args(argv)
    if args.chart_only:
        out = json.loads(args.json.read_text())
        draw_outputs(out, args.json)
        return 0

    from engine import runtimes
    from engine.options import load_preset

    bench = Bench(args.size, args.steps, args.cache_dir, args.taesd)
    out = {"size": args.size, "steps": args.steps, "model": "builtin:sd15", "taesd": args.taesd,
           "machine": str(bench.engine.hardware).splitlines()[0], "baselines": {}, "optimizations": {},
           "presets": {}}
    skip = set(filter(None, args.skip.split(",")))

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        args.json.with_suffix(".md").write_text(markdown(out))

    if args.only != "presets":
        names = args.names.split(",") if args.names else list(OPTIMIZATIONS)
        baseline_images = {}
        for name in names:
            runtime, options, over, how = OPTIMIZATIONS[name]
            if runtime not in out["baselines"]:
                try:
                    bench.configure(runtime, {})
                    row, image = bench.run(bench.request())
                except Exception as e:  # this runtime's rows are skipped, the rest still run
                    out["baselines"][runtime] = {"runtime": runtime, "skipped": f"{type(e).__name__}: {e}"[:300]}
                    log(f"baseline {runtime}: failed: {e}")
                    save()
                    continue
                out["baselines"][runtime] = {"runtime": runtime, **row, "speedup": 1.0, "psnr_db": None}
                baseline_images[runtime] = image
                log(f"baseline {runtime}: {row['end_to_end_s']:.2f} s")
                save()
            if runtime not in baseline_images:
                out["optimizations"][name] = {"runtime": runtime, "skipped": "its runtime's baseline failed"}
                continue
            if name in skip:
                out["optimizations"][name] = {"runtime": runtime, "skipped": "--skip"}
                continue
            try:
                bench.configure(runtime, options)
                row, image = bench.run(bench.request(**over), how)
            except Exception as e:  # one failing option is a row, not a failed run
                out["optimizations"][name] = {"runtime": runtime, "skipped": f"{type(e).__name__}: {e}"[:300]}
                log(f"{name}: failed: {e}")
                save()
                continue
            base = out["baselines"][runtime]
            row.update(runtime=runtime, options=options, request=over,
                       speedup=base["end_to_end_s"] / row["end_to_end_s"],
                       psnr_db=psnr_db(image, baseline_images[runtime]))
            out["optimizations"][name] = row
            log(f"{name}: {row['end_to_end_s']:.2f} s, {row['speedup']:.2f}x, PSNR {row['psnr_db']}")
            save()

    if args.only != "optimizations":
        wanted = [n for n in args.presets.split(",") if n]
        order = ["quality"] + [n for n in wanted if n != "quality"]  # the reference first
        images = {}
        for name in order:
            preset = load_preset(name)
            runtime = runtimes.pick(bench.engine.hardware, "auto").name  # what the app would use here
            opts = preset.optimizations.model_dump()
            bench.configure(runtime, preset=preset.optimizations)  # the row says which options were dropped
            d = preset.defaults
            request = bench.request(**{k: v for k, v in (("sampler", d.sampler), ("steps", d.steps),
                                                          ("guidance", d.guidance)) if v is not None})
            try:
                row, image = bench.run(request)
            except Exception as e:
                out["presets"][name] = {"runtime": runtime, "skipped": f"{type(e).__name__}: {e}"[:300]}
                log(f"preset {name}: failed: {e}")
                save()
                continue
            images[name] = image
            row.update(runtime=runtime, options=opts, not_applied=bench.engine.not_applied,
                       request={k: request[k] for k in ("sampler", "steps", "guidance")})
            out["presets"][name] = row
            log(f"preset {name}: {row['end_to_end_s']:.2f} s ({bench.engine.not_applied or 'all applied'})")
            save()
        ref = out["presets"].get("quality", {})
        for name, row in out["presets"].items():
            if name in images and "quality" in images:
                row["speedup"] = ref["end_to_end_s"] / row["end_to_end_s"]
                row["psnr_db"] = psnr_db(images[name], images["quality"])
        save()

    save()
    draw_outputs(out, args.json)
    print(markdown(out))
    return 0


def draw_outputs(out: dict, json_path: Path) -> None:
    rows = [(f"{name} ({r['runtime']})", r["speedup"]) for name, r in out["optimizations"].items() if "speedup" in r]
    rows += [(f"preset {name}", r["speedup"]) for name, r in out["presets"].items() if "speedup" in r]
    if rows:
        chart(rows, json_path.with_suffix(".png"),
              f"Speed-up, builtin:sd15 {out['size']}x{out['size']} (optimizations vs their runtime's baseline; "
              f"presets vs quality)")
    json_path.with_suffix(".md").write_text(markdown(out))


if __name__ == "__main__":
    raise SystemExit(main())
