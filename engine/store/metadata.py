"""Generation parameters into PNG text and back, in the widely used A1111 "parameters" format:

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model: builtin:tiny
"""
from __future__ import annotations

import json
import re
from typing import Any

# our field -> label in the last line
LABELS = {
    "steps": "Steps", "sampler": "Sampler", "guidance": "CFG scale", "seed": "Seed", "size": "Size",
    "model": "Model", "strength": "Denoising strength", "factor": "Upscale factor", "upscaler": "Hires upscaler",
    "hires_strength": "Hires denoising strength", "hires_steps": "Hires steps", "task": "Task",
    "runtime": "Runtime", "tile_size": "Tile size", "tile_overlap": "Tile overlap", "resize_mode": "Resize mode",
    "styles": "Styles array",  # A1111's label: a JSON list, so names may hold commas
}
# options that change the picture, written where they are on
OPTION_LABELS = {"cfg_truncation": "CFG truncation", "deepcache_interval": "DeepCache interval",
                 "deepcache_start": "DeepCache from",
                 "token_merging_ratio": "Token merging ratio"}
LABELS.update(OPTION_LABELS)
INTS = {"steps", "seed", "hires_steps", "tile_size", "tile_overlap", "deepcache_interval"}
FLOATS = {"guidance", "strength", "factor", "hires_strength", "cfg_truncation", "deepcache_start", "token_merging_ratio"}
PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)')


def format_value(value: Any) -> str:
    """A value for the last line, quoted where it holds a comma, colon or quote."""
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if "," in text or ":" in text or '"' in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def format_parameters(params: dict[str, Any]) -> str:
    """The request (plus model/task) as the three-part text."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = dict(params)
    if "width" in fields and "height" in fields and fields["width"] and fields["height"]:
        fields["size"] = f"{fields['width']}x{fields['height']}"
    if fields.get("styles"):
        fields["styles"] = json.dumps(list(fields["styles"]), ensure_ascii=False)
    pairs = [f"{LABELS[k]}: {format_value(fields[k])}" for k in LABELS if fields.get(k) not in (None, "", (), [])]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """The text back into request fields (unknown labels are kept under their own names)."""
    lines = (text or "").strip().split("\n")
    last = lines[-1] if lines and PAIR.match(lines[-1]) and "Steps:" in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": "\n".join(negative_lines).strip()}
    by_label = {v: k for k, v in LABELS.items()}
    for label, raw in PAIR.findall(last):
        label, raw = label.strip(), raw.strip()
        if raw.startswith('"') and raw.endswith('"'):
            raw = re.sub(r'\\(.)', r"\1", raw[1:-1])
        key = by_label.get(label, label)
        if key == "size":
            w, _, h = raw.partition("x")
            if w.isdigit() and h.isdigit():
                out["width"], out["height"] = int(w), int(h)
            continue
        if key == "styles":
            try:
                styles = json.loads(raw)
            except ValueError:
                styles = None
            if isinstance(styles, list) and all(isinstance(s, str) for s in styles):
                out[key] = styles
                continue
        try:
            out[key] = int(raw) if key in INTS else float(raw) if key in FLOATS else raw
        except ValueError:
            out[key] = raw
    return out
