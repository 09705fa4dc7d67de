"""Generation parameters into PNG text and back, as AUTOMATIC1111 writes them (processing.create_infotext) and
reads them (infotext_utils.parse_generation_parameters):

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, Model: tiny, ...

A1111's keys in A1111's order (Size is the first pass's; a hires fix adds Denoising strength, Hires upscale, Hires
steps, Hires upscaler), then ours (Task, Runtime, tiling and option values), then Version. A value with a comma,
colon or newline is a JSON string, as A1111 quotes it. Texts written by A1111 and by earlier versions of this app
(with "Upscale factor", "DPM++ 2M Karras") read back into request fields.
"""
from __future__ import annotations

import json
import re
from typing import Any

from engine.requests import hires_upscaler_named
from engine.samplers import AUTOMATIC, parse_sampler

VERSION = "fast-sd"  # the "Version" the text names; A1111 writes its own release there

# our field -> A1111's label, in A1111's order; "strength" and "hires_strength" are both its "Denoising strength"
LABELS = {
    "steps": "Steps", "sampler": "Sampler", "schedule": "Schedule type", "guidance": "CFG scale", "seed": "Seed",
    "size": "Size", "model_hash": "Model hash", "model": "Model", "strength": "Denoising strength",
    "hires_strength": "Denoising strength", "token_merging_ratio": "Token merging ratio",
    "factor": "Hires upscale", "hires_steps": "Hires steps", "upscaler": "Hires upscaler",
    "mask_blur": "Mask blur", "inpaint_area": "Inpaint area", "only_masked_padding": "Masked area padding",
    "masked_content": "Masked content", "invert_mask": "Mask mode",
    "lora_hashes": "Lora hashes", "styles": "Styles array",  # A1111's label: a JSON list, names may hold commas
    # ours, after A1111's
    "task": "Task", "runtime": "Runtime", "tile_size": "Tile size", "tile_overlap": "Tile overlap",
    "resize_mode": "Resize mode",
}
# options that change the picture, written where they are on
OPTION_LABELS = {"cfg_truncation": "CFG truncation", "deepcache_interval": "DeepCache interval",
                 "deepcache_start": "DeepCache from"}
LABELS.update(OPTION_LABELS)
# labels earlier versions of this app wrote
OLD_LABELS = {"Upscale factor": "factor", "Hires denoising strength": "hires_strength"}
INTS = {"steps", "seed", "hires_steps", "tile_size", "tile_overlap", "deepcache_interval", "mask_blur",
        "only_masked_padding"}
INPAINT_FIELDS = ("mask_blur", "inpaint_area", "only_masked_padding", "masked_content", "invert_mask")
# A1111's words for the inpaint values it writes (it leaves out "Whole picture" and "Inpaint masked")
INPAINT_WORDS = {("inpaint_area", "only masked"): "Only masked", ("invert_mask", True): "Inpaint not masked"}
FLOATS = {"guidance", "strength", "factor", "hires_strength", "cfg_truncation", "deepcache_start",
          "token_merging_ratio"}
# A1111's re_param: a label may hold spaces, '-' and '/'; a quoted value may hold anything escaped
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")
HIRES_UPSCALER_LABELS = {"latent (bicubic)": "Latent (bicubic)", "latent (nearest-exact)": "Latent (nearest-exact)",
                         "Lanczos": "Lanczos"}


def format_value(value: Any) -> str:
    """A value for the last line: JSON-quoted where it holds a comma, colon or newline (A1111's quote())."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _written(params: dict[str, Any]) -> dict[str, Any]:
    """The fields as A1111 would state them for this job."""
    fields = dict(params)
    if fields.get("width") and fields.get("height"):
        fields["size"] = f"{fields['width']}x{fields['height']}"
    if fields.get("styles"):
        fields["styles"] = json.dumps(list(fields["styles"]), ensure_ascii=False)
    if fields.get("task") == "hires_fix":
        fields.pop("strength", None)
        if not fields.get("hires_steps"):
            fields.pop("hires_steps", None)  # A1111 leaves it out when the second pass takes the first's count
        if fields.get("upscaler") in HIRES_UPSCALER_LABELS:
            fields["upscaler"] = HIRES_UPSCALER_LABELS[fields["upscaler"]]
    else:
        for name in ("factor", "hires_steps", "upscaler", "hires_strength"):
            fields.pop(name, None)
        if fields.get("task") not in ("img2img", "inpaint"):
            fields.pop("resize_mode", None)
    if fields.get("task") == "inpaint":
        for name in ("inpaint_area", "invert_mask"):
            fields[name] = INPAINT_WORDS.get((name, fields.get(name)))
        if fields["inpaint_area"] is None:
            fields.pop("only_masked_padding", None)
    else:
        for name in INPAINT_FIELDS:
            fields.pop(name, None)
    if "schedule" in fields and not fields["schedule"]:
        fields["schedule"] = AUTOMATIC
    return fields


def format_parameters(params: dict[str, Any]) -> str:
    """The request (plus model/task) as A1111's three-part text."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = _written(params)
    pairs, seen = [], set()
    for key, label in LABELS.items():
        value = fields.get(key)
        if value in (None, "", (), []) or label in seen:
            continue
        seen.add(label)
        pairs.append(f"{label}: {format_value(value)}")
    pairs.append(f"Version: {VERSION}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _unquote(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        try:
            return str(json.loads(raw))
        except ValueError:
            return re.sub(r'\\(.)', r"\1", raw[1:-1])
    return raw


def parse_parameters(text: str) -> dict[str, Any]:
    """The text back into request fields (unknown labels are kept under their own names). "Denoising strength"
    is the hires pass's where the text has "Hires upscale"; a combined sampler name splits into the pair."""
    lines = (text or "").strip().split("\n")
    last = lines[-1] if lines and len(PAIR.findall(lines[-1])) >= 3 else ""
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip(),
                           "negative_prompt": "\n".join(negative_lines).strip()}
    pairs = {label.strip(): _unquote(raw) for label, raw in PAIR.findall(last)}
    hires = "Hires upscale" in pairs or "Upscale factor" in pairs
    by_label = {v: k for k, v in LABELS.items() if k != "strength"} | OLD_LABELS
    for label, raw in pairs.items():
        key = by_label.get(label, label)
        if key == "hires_strength" and label == "Denoising strength" and not hires:
            key = "strength"
        if key == "size":
            match = SIZE.match(raw)
            if match:
                out["width"], out["height"] = int(match[1]), int(match[2])
            continue
        if key == "styles":
            try:
                styles = json.loads(raw)
            except ValueError:
                styles = None
            if isinstance(styles, list) and all(isinstance(s, str) for s in styles):
                out[key] = styles
            continue
        if key == "upscaler":
            out[key] = hires_upscaler_named(raw) or raw
            continue
        if key in ("inpaint_area", "invert_mask"):
            out[key] = {"Only masked": "only masked", "Whole picture": "whole picture", "Inpaint not masked": True,
                        "Inpaint masked": False}.get(raw, raw)
            continue
        try:
            out[key] = int(raw) if key in INTS else float(raw) if key in FLOATS else raw
        except ValueError:
            out[key] = raw
    if hires and "task" not in out:
        out["task"] = "hires_fix"
    if isinstance(out.get("sampler"), str):
        try:
            out["sampler"], out["schedule"] = parse_sampler(out["sampler"], out.get("schedule"))
        except Exception:  # a sampler this server lacks: kept as written; the request says why
            pass
    return out
