"""Command line: parse flags, build the Engine, build the UI, launch."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

WARMUP_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_warmup(text: str | None) -> list[tuple[int, int]]:
    """'512x512,768x512' -> [(512, 512), (768, 512)]."""
    if not text:
        return []
    shapes = []
    for part in text.split(","):
        m = WARMUP_RE.match(part)
        if not m:
            raise argparse.ArgumentTypeError(f"--warmup: {part.strip()!r} is not WIDTHxHEIGHT (e.g. 512x512)")
        shapes.append((int(m.group(1)), int(m.group(2))))
    return shapes


def parse_auth(values: list[str] | None) -> list[tuple[str, str]] | None:
    if not values:
        return None
    pairs = []
    for value in values:
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            raise argparse.ArgumentTypeError(f"--auth expects user:password, got {value!r}")
        pairs.append((user, password))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fast Stable Diffusion web UI: picks the runtime for your hardware "
                                            "and shows time and memory beside every image.")
    p.add_argument("--model", default="builtin:tiny",
                   help="builtin:tiny|builtin:sd15|builtin:sdxl, a hub id (owner/name), a diffusers folder, "
                        "or a .safetensors/.ckpt file (default: %(default)s)")
    p.add_argument("--model-config", default=None,
                   help="diffusers folder whose configs a single-file checkpoint should use (needed offline)")
    p.add_argument("--models-dir", default="models", help="folder the UI may load models from (default: %(default)s)")
    p.add_argument("--runtime", default="auto", choices=["auto", "pytorch", "openvino", "onediff"],
                   help="runtime to use; auto picks from the hardware (default: %(default)s)")
    p.add_argument("--preset", default=None, help="preset name from presets/*.toml (e.g. balanced, quality)")
    p.add_argument("--warmup", default=None, help="shapes to prepare ahead, e.g. 512x512,768x512")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    p.add_argument("--auth", action="append", metavar="USER:PASS", help="require a login; repeatable")
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait for the device (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        warmup = parse_warmup(args.warmup)
        auth = parse_auth(args.auth)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from engine import Engine, UserError
    from engine.options import load_preset

    defaults = {}
    optimizations = None
    try:
        if args.preset:
            preset = load_preset(args.preset)
            optimizations = preset.optimizations
            defaults = preset.defaults.model_dump(exclude_none=True)
        engine = Engine(runtime=args.runtime, optimizations=optimizations, models_dir=Path(args.models_dir))
        print(engine.hardware, flush=True)
        print(f"Runtime: {engine.runtime.describe()} — {engine.choice.reason}", flush=True)
        model = engine.load(args.model, config_dir=args.model_config)
        print(f"Model: {model.name} ({model.family}) loaded in {model.load_seconds:.1f} s", flush=True)
        if warmup:
            for r in engine.warmup(warmup):
                state = "compiled" if r.compiled else "nothing to compile (eager runtime)"
                print(f"Warm-up {r.width}x{r.height}: {state}, {r.seconds:.1f} s", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ui import build_ui
    from ui.app_ui import launch_kwargs

    defaults.setdefault("width", model.native_size)
    defaults.setdefault("height", model.native_size)
    demo = build_ui(engine, defaults)
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                show_error=True, **launch_kwargs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
