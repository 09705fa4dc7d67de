"""LoRA and few-step generation, measured in one run.

    python -m benchmarks.lora --json benchmarks/results/lora.json            # all three parts
    python -m benchmarks.lora --parts quality,presets                        # builtin:shapes only (minutes)

1. quality: builtin:shapes at guidance 1 with the LCM sampler, with the shipped lcm-shapes LoRA and without,
   at 1 and 4 steps: the colour test (48 pictures) and the mean PSNR of each picture against the teacher's
   (DDIM, 30 steps, CFG 7) picture of the same prompt and seed.
2. presets: the `fastest` preset (with its LoRA) against `quality` on builtin:shapes, on the runtime the
   engine picks: end-to-end seconds per 48 pictures (median job of 6 prompts x 8 pictures) and colour score.
3. switch: builtin:sd15 on OpenVINO with a rank-16 LoRA made here (every attention projection): what a LoRA
   change costs the first time (fuse + convert) and from the IR cache, beside the PyTorch in-place fuse.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tools.shapes_score import PROMPTS, SEEDS, colours_right, prompt_text, psnr

SIZE = 128
TEACHER = {"sampler": "DDIM", "steps": 30, "guidance": 7.0}


def shapes_engine(runtime: str, optimizations=None):
    from engine import Engine

    engine = Engine(runtime=runtime, optimizations=optimizations, outputs_dir=None)
    engine.preview_every = 0
    engine.load("builtin:shapes")
    return engine


def run_prompts(engine, suffix: str, **request) -> tuple[dict, list[float]]:
    """{prompt: images} and the seconds of each job (one job of SEEDS pictures per prompt)."""
    images, seconds = {}, []
    for p in PROMPTS:
        result = engine.txt2img({"prompt": prompt_text(*p) + suffix, "width": SIZE, "height": SIZE, "seed": 100,
                                 "batch_size": SEEDS, **request})
        images[p] = result.images
        seconds.append(result.readout.total_s)
    return images, seconds


def colour_score(images: dict) -> int:
    return sum(colours_right(im, p[0], p[2]) for p, ims in images.items() for im in ims)


def quality(out: dict) -> None:
    engine = shapes_engine("pytorch")
    teacher, _ = run_prompts(engine, "", **TEACHER)
    out["teacher"] = {**TEACHER, "colours": f"{colour_score(teacher)}/48"}
    print(f"teacher {TEACHER}: colours {out['teacher']['colours']}", flush=True)
    for lora in ("", " <lora:lcm-shapes:1>"):
        for steps in (1, 4):
            images, _ = run_prompts(engine, lora, sampler="LCM", steps=steps, guidance=1.0)
            db = [psnr(a, b) for p in PROMPTS for a, b in zip(images[p], teacher[p])]
            name = f"{'lcm-shapes' if lora else 'no LoRA'}, {steps} step{'s' if steps > 1 else ''}"
            out[name] = {"colours": f"{colour_score(images)}/48", "psnr_to_teacher_db": round(float(np.mean(db)), 2)}
            print(f"{name}: colours {out[name]['colours']}, PSNR to teacher {np.mean(db):.2f} dB", flush=True)


def presets(out: dict) -> None:
    from engine.options import load_preset

    rows = {}
    for name in ("quality", "fastest"):
        preset = load_preset(name)
        # The timed pass repeats the warm pass's requests: no result cache, or it would time cache hits.
        engine = shapes_engine("auto", preset.optimizations.model_copy(update={"result_cache": False}))
        lora_name, _ = preset.lora.advice("builtin:shapes")
        suffix = f" <lora:{lora_name}:1>" if lora_name else ""
        d = preset.defaults
        run_prompts(engine, suffix, sampler=d.sampler, steps=d.steps, guidance=d.guidance)  # warm: compile, fuse
        images, seconds = run_prompts(engine, suffix, sampler=d.sampler, steps=d.steps, guidance=d.guidance)
        rows[name] = {"runtime": engine.runtime.name, "precision": engine.runtime.precision,
                      "sampler": d.sampler, "steps": d.steps, "guidance": d.guidance, "lora": lora_name,
                      "job_s_median": round(statistics.median(seconds), 3), "colours": f"{colour_score(images)}/48"}
        print(f"{name}: {rows[name]}", flush=True)
    rows["speedup_fastest_vs_quality"] = round(rows["quality"]["job_s_median"] / rows["fastest"]["job_s_median"], 2)
    print(f"fastest is {rows['speedup_fastest_vs_quality']}x quality, end to end", flush=True)
    out.update(rows)


def make_rank16_lora(path: Path) -> int:
    """A kohya-format rank-16 LoRA on every attention projection of builtin:sd15's UNet (random, small)."""
    import torch
    from safetensors.torch import save_file

    from engine.models.loading import load_model

    unet = load_model("builtin:sd15").pipe.unet
    g, state = torch.Generator().manual_seed(0), {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and ".attn" in name:
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn((16, m.in_features), generator=g) * 0.01
            state[f"{key}.lora_up.weight"] = torch.randn((m.out_features, 16), generator=g) * 0.01
            state[f"{key}.alpha"] = torch.tensor(16.0)
    save_file(state, str(path))
    return len(state) // 3


def switch(out: dict) -> None:
    from engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "lora").mkdir()
        layers = make_rank16_lora(root / "lora" / "r16.safetensors")
        out["layers"] = layers
        request = {"prompt": "a photo", "width": 256, "height": 256, "steps": 1, "guidance": 1.0, "seed": 1,
                   "sampler": "Euler"}
        tagged = {**request, "prompt": "a photo <lora:r16:0.8>"}
        for runtime in ("pytorch", "openvino"):
            engine = Engine(runtime=runtime, models_dir=root, cache_dir=root / "cache", outputs_dir=None)
            engine.preview_every = 0
            start = time.perf_counter()
            engine.load("builtin:sd15")
            first = engine.txt2img(request)  # the plain model, compiled
            row = {"load_s": round(time.perf_counter() - start, 1), "plain_job_s": round(first.readout.total_s, 2)}
            for label, req in (("lora_first", tagged), ("back_to_plain", request), ("lora_again", tagged)):
                start = time.perf_counter()
                result = engine.txt2img(req)
                row[label] = {"change": result.readout.details.get("lora_change"),
                              "wall_s": round(time.perf_counter() - start, 1),
                              "job_s": round(result.readout.total_s, 2)}
            out[runtime] = row
            print(f"{runtime}: {json.dumps(row)}", flush=True)
            del engine


def cpu_family_model() -> str:
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


PARTS = {"quality": quality, "presets": presets, "switch": switch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from engine.system.hardware import detect

    hw = detect()
    out: dict = {"cpu": f"{hw.cpu.model} ({cpu_family_model()})", "cores": hw.cpu.logical_cores,
                 "time": time.strftime("%Y-%m-%d %H:%M")}
    for part in args.parts.split(","):
        out[part] = {}
        PARTS[part](out[part])
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
