"""Draw a captioned grid of builtin:shapes results (assets/shapes-grid.png, shown in the README).

    python -m tools.shapes_grid --out assets/shapes-grid.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a blue star on a yellow background",
    "a small white circle in the top left corner on a purple background",
    "a large orange square on a green background",
    "a red circle and a yellow star on a blue background",
    "a purple triangle at the bottom on a white background",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("assets/shapes-grid.png"))
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    from engine import Engine

    engine = Engine(runtime="pytorch", outputs_dir=None)
    engine.preview_every = 0
    engine.load("builtin:shapes")
    cell, caption_w = 128, 330
    grid = Image.new("RGB", (caption_w + cell * args.seeds, cell * len(PROMPTS)), "white")
    pen = ImageDraw.Draw(grid)
    for row, prompt in enumerate(PROMPTS):
        result = engine.txt2img({"prompt": prompt, "width": cell, "height": cell, "steps": args.steps,
                                 "guidance": 7.0, "sampler": "DPM++ 2M Karras", "seed": 1, "batch_size": args.seeds})
        words, lines = prompt.split(), [""]
        for w in words:
            if len(lines[-1]) + len(w) > 40:
                lines.append("")
            lines[-1] += ("" if not lines[-1] else " ") + w
        pen.multiline_text((8, row * cell + 40), "\n".join(lines), fill="black", spacing=4)
        for col, image in enumerate(result.images):
            grid.paste(image, (caption_w + col * cell, row * cell))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(PROMPTS)} prompts x seeds 1..{args.seeds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
