"""Command line: parse flags, build the Engine, build the UI, launch."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SHARE_USER = "fastsd"


def read_auth_file(path: str) -> list[str]:
    """user:password per line; blank lines and # comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"--auth-file: cannot read {path}: {e.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def share_auth(auth: list[tuple[str, str]] | None, share: bool, no_auth: bool) -> tuple[list | None, str | None]:
    """A public link is never open by default: without --auth it gets a random password."""
    if not share or auth or no_auth:
        return auth, None
    import secrets

    password = secrets.token_urlsafe(12)
    return [(SHARE_USER, password)], password


EXAMPLE_PROMPT = "a red circle on a blue background"  # builtin:shapes draws this well


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


def cli_specs():
    from engine.options import OPTION_SPECS

    return [spec for spec in OPTION_SPECS.values() if spec.cli]


def runtime_name(name: str) -> str:
    from engine.options import RUNTIME_NAMES

    return RUNTIME_NAMES.get(name, name)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option marked cli=True in engine/options.py; a given flag overrides the preset."""
    for spec in cli_specs():
        about = spec.help + (f" ({runtime_name(spec.runtime)} runtime)" if spec.runtime else "")
        if spec.kind == "bool":
            parser.add_argument(spec.flag, dest=spec.name, action="store_true", help=about + "; overrides the preset")
        elif spec.kind == "choice":
            # A bare choice flag means "on" where "on" is a choice (--int8-convolutions, as when it was a switch).
            const = {"nargs": "?", "const": "on"} if "on" in spec.choices else {}
            parser.add_argument(spec.flag, dest=spec.name, default=None, choices=list(spec.choices),
                                help=about + "; overrides the preset", **const)
        else:
            number = int if spec.kind == "int" else float
            parser.add_argument(spec.flag, dest=spec.name, default=None, type=number, metavar=spec.kind.upper(),
                                help=f"{about} ({spec.minimum:g} to {spec.maximum:g}); overrides the preset")


def option_overrides(args: argparse.Namespace) -> dict:
    """The option flags given (an unset store_true is False: not given, so the preset's value stays)."""
    return {spec.name: getattr(args, spec.name) for spec in cli_specs()
            if getattr(args, spec.name) not in (None, False)}


def results_dir(args: argparse.Namespace) -> Path | None:
    """The result cache's folder: --result-cache-dir, else results/ beside the converted models; None: memory."""
    from engine.store.caches import DEFAULT_RESULTS_DIR

    if args.result_cache_dir:
        return None if args.result_cache_dir.lower() == "none" else Path(args.result_cache_dir)
    return Path(args.cache_dir) / "results" if args.cache_dir else DEFAULT_RESULTS_DIR


def build_parser() -> argparse.ArgumentParser:
    from engine.jobs.result_cache import DEFAULT_RESULTS_BYTES
    from engine.runtimes import CHOICES
    from engine.text.styles import STYLES_FILE

    p = argparse.ArgumentParser(description="Fast Stable Diffusion web UI: picks the runtime for your hardware "
                                            "and shows time and memory beside every image.")
    p.add_argument("--model", default="builtin:shapes",
                   help="builtin:shapes (trained demo) | builtin:tiny|sd15|sdxl (random weights), a hub id "
                        "(owner/name), a diffusers folder, "
                        "or a .safetensors/.ckpt file (default: %(default)s)")
    p.add_argument("--model-config", default=None,
                   help="diffusers folder whose configs a single-file checkpoint should use (needed offline)")
    p.add_argument("--models-dir", default="models", help="folder the UI may load models from (default: %(default)s)")
    p.add_argument("--runtime", default="auto", choices=list(CHOICES),
                   help="runtime to use; auto picks from the hardware (default: %(default)s)")
    p.add_argument("--preset", default=None, help="preset name from presets/*.toml (e.g. balanced, quality)")
    p.add_argument("--presets-dir", default=None,
                   help="folder of preset .toml files; 'Save as preset' writes there (default: presets/)")
    p.add_argument("--taesd", default=None,
                   help="tiny autoencoder for fast decodes and previews: a diffusers AutoencoderTiny folder, a hub id "
                        "(madebyollin/taesd), or builtin:taesd (random weights, for benchmarks)")
    p.add_argument("--styles", default=str(STYLES_FILE),
                   help="prompt styles in AUTOMATIC1111's styles.csv format; 'Save as style' writes there "
                        "(default: presets/styles.csv)")
    p.add_argument("--warmup", default=None, help="shapes to prepare ahead, e.g. 512x512,768x512")
    p.add_argument("--warmup-tasks", default="txt2img",
                   help="what the warmed shapes are for, comma separated: txt2img, img2img, hires_fix, tiled_upscale "
                        "(default: %(default)s); the preset's guidance decides the UNet batch")
    add_option_flags(p)
    p.add_argument("--cache-dir", default=None,
                   help="where converted models and compiled blobs are kept (default ~/.cache/fast-sd)")
    p.add_argument("--result-cache-dir", default=None,
                   help="where the result cache (when the option is on) keeps results across restarts; 'none' keeps "
                        "them in memory only (default: results/ in the cache dir)")
    p.add_argument("--result-cache-mb", type=int, default=DEFAULT_RESULTS_BYTES >> 20,
                   help="result cache size on disk in MiB; the least recently used go first (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another name this server answers to (a reverse proxy's, a LAN name); '.example.com' allows "
                        "its subdomains, '*' turns the Host check off. Repeatable. Loopback names, the --host address "
                        "and the share link are always allowed")
    p.add_argument("--allow-hub-ids", action="store_true",
                   help="let users of the page and the API load Hugging Face hub ids (owner/name) they type; without "
                        "it they may load only the built-ins and what is under --models-dir (the pickers' lists)")
    p.add_argument("--max-upload-mb", type=int, default=50,
                   help="largest file the page accepts as an upload, in MB (default: %(default)s)")
    p.add_argument("--no-api", action="store_true",
                   help="do not serve the AUTOMATIC1111-compatible API under /sdapi/v1 (served by default)")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    p.add_argument("--auth", action="append", metavar="USER:PASS", help="require a login; repeatable")
    p.add_argument("--auth-file", default=None, help="file with user:password lines")
    p.add_argument("--share-no-auth", action="store_true",
                   help="with --share, serve the public link WITHOUT a password (not recommended)")
    p.add_argument("--outputs-dir", default="outputs",
                   help="where every image is saved with its parameters (default: %(default)s)")
    p.add_argument("--no-save", action="store_true", help="do not save images to the outputs folder")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                   help="debug also logs the cause (traceback) behind a one-line error (default: %(default)s)")
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait for the device (default: %(default)s)")
    ray = p.add_argument_group("replicas on Ray Serve (needs: pip install -r requirements-serve.txt)")
    ray.add_argument("--replicas", type=int, default=0, metavar="N",
                     help="run jobs on N engine replicas on Ray Serve (a local Ray instance, or --ray-address); each "
                          "loads the model, prepares the runtime and warms the --warmup shapes once (default: 0, "
                          "jobs run in this process)")
    ray.add_argument("--ray-address", default=None,
                     help="join the Ray cluster this machine is a node of (auto, or HEAD:6379) instead of starting a "
                          "local one (Ray Client's ray:// cannot stream progress: refused)")
    ray.add_argument("--replica-cpus", type=float, default=None,
                     help="CPU cores per replica; a CPU replica uses that many threads (default: this machine's "
                          "cores split between the replicas, or 1 beside a GPU)")
    ray.add_argument("--replica-gpus", type=float, default=None,
                     help="GPUs per replica (default: 1 where this machine has CUDA, else 0)")
    ray.add_argument("--serve-app", default=None, metavar="NAME",
                     help="use the replicas of an application already deployed on the cluster (a RayService, "
                          "`serve deploy`) instead of deploying --replicas of our own")
    return p


def replica_pool(args, hardware, optimizations, warmup, guidance: float):
    """The ReplicaPool --replicas / --serve-app ask for (not started), its share of CPU and GPU per replica."""
    from engine.replicas.pool import ReplicaConfig, ReplicaPool

    replicas = args.replicas or 1
    gpus = args.replica_gpus if args.replica_gpus is not None else (1.0 if hardware.has_cuda else 0.0)
    cores = hardware.cpu.logical_cores
    cpus = args.replica_cpus if args.replica_cpus is not None else (1.0 if gpus else max(1, cores // replicas))
    config = ReplicaConfig(
        model=args.model, model_config=args.model_config, runtime=args.runtime,
        optimizations=(optimizations.model_dump() if optimizations is not None else {}),
        models_dir=args.models_dir, cache_dir=args.cache_dir, taesd=args.taesd, warmup=tuple(warmup),
        warmup_tasks=tuple(t.strip() for t in args.warmup_tasks.split(",") if t.strip()), guidance=guidance,
        threads=None if gpus else max(1, int(cpus)))
    return ReplicaPool(config, replicas, address=args.ray_address, cpus=cpus, gpus=gpus,
                       app=args.serve_app or "fastsd", deploy=not args.serve_app)


def load_and_warm(args, engine, warmup, guidance: float):
    """The Engine's model, loaded and warmed up for the sizes --warmup names."""
    s = engine.status()
    print(f"Runtime: {s['runtime']} on {s['device']} ({s['precision']}) — {s['reason']}", flush=True)
    for label, why in engine.not_applied.items():
        print(f"Not applied: {label} ({why})", flush=True)
    model = engine.load(args.model, config_dir=args.model_config)
    print(f"Model: {model.name} ({model.family}) loaded in {model.load_seconds:.1f} s", flush=True)
    if warmup:
        tasks = tuple(t.strip() for t in args.warmup_tasks.split(",") if t.strip())
        for r in engine.warmup(warmup, guidance=guidance, tasks=tasks):
            print(f"Warm-up {r.width}x{r.height}: {r.state}, {r.seconds:.1f} s", flush=True)
    return model


def start_replicas(args, hardware, engine_args: dict, warmup, guidance: float):
    """The replicas started, and the front that sends them the jobs (its own model on eager PyTorch on the CPU,
    to check requests: the GPUs are the replicas')."""
    from dataclasses import replace

    from engine import UserError
    from engine.replicas.front import ReplicaEngine

    pool = replica_pool(args, hardware, engine_args["optimizations"], warmup, guidance)
    print("Starting the replicas on Ray Serve (each loads the model, prepares its runtime and warms up)…", flush=True)
    pool.start()
    try:
        if pool.info.get("source", args.model) != args.model:  # --serve-app: deployed with their own model
            raise UserError(f"The replicas run {pool.info.get('source')}, this front was given {args.model}: start "
                            f"it with --model {pool.info.get('source')} (and its --model-config), so requests "
                            f"are checked against the model that runs them.")
        front = replace(hardware, cuda_devices=(), mps_available=False)
        engine = ReplicaEngine(pool, args.model, args.model_config, hardware=front, **engine_args)
    except BaseException:
        pool.shutdown()
        raise
    print(f"Replicas: {pool.describe()}; runtime {pool.name} ({pool.precision})", flush=True)
    return engine


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from engine import Engine, UserError
    from engine.options import PRESETS_DIR, Optimizations, load_preset
    from engine.requests import parse_sizes
    from engine.system.hardware import detect

    try:
        warmup = parse_sizes(args.warmup) if args.warmup else []
        auth = parse_auth((args.auth or []) + (read_auth_file(args.auth_file) if args.auth_file else []))
    except (argparse.ArgumentTypeError, UserError) as e:
        parser.error(str(e))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    defaults = {}
    optimizations, engine = None, None
    presets_dir = Path(args.presets_dir) if args.presets_dir else PRESETS_DIR
    try:
        if args.preset:
            preset = load_preset(args.preset, presets_dir)
            optimizations = preset.optimizations
            defaults = {**preset.defaults.model_dump(exclude_none=True), "preset": preset.name,
                        "styles": list(preset.styles)}
        overrides = option_overrides(args)
        if overrides:
            optimizations = (optimizations or Optimizations()).model_copy(update=overrides)
        replicas = bool(args.replicas or args.serve_app)
        if replicas:
            from engine.replicas.pool import ray_missing

            if missing := ray_missing():
                raise UserError(f"--replicas needs Ray Serve: {missing}")
        hardware = detect()
        engine_args = dict(optimizations=optimizations, models_dir=Path(args.models_dir),
                           cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                           outputs_dir=None if args.no_save else Path(args.outputs_dir), taesd=args.taesd,
                           styles_file=Path(args.styles), result_cache_dir=results_dir(args),
                           result_cache_bytes=args.result_cache_mb << 20, remote_hub=args.allow_hub_ids)
        print(hardware, flush=True)
        if replicas:
            engine = start_replicas(args, hardware, engine_args, warmup, defaults.get("guidance", 7.0))
            model = engine.model
        else:
            engine = Engine(hardware=hardware, runtime=args.runtime, **engine_args)
            model = load_and_warm(args, engine, warmup, defaults.get("guidance", 7.0))
    except UserError as e:
        logging.getLogger("app").debug("start-up failed", exc_info=e)  # the cause, for --log-level debug
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return launch_ui(args, engine, model, defaults, presets_dir, auth)
    finally:  # however serving ends (Ctrl-C, SIGTERM, a port in use): leave nothing deployed
        engine.close()


def launch_ui(args, engine, model, defaults: dict, presets_dir: Path, auth) -> int:
    """Build the page and the API around the engine, serve until stopped."""
    from ui import after_launch, build_ui, launch_kwargs, server_kwargs

    defaults.setdefault("prompt", EXAMPLE_PROMPT)
    if model.name == "builtin:shapes":
        # Automatic is Karras with DPM++ 2M (as tests/test_shapes_model.py measures it); a client that names only
        # another sampler gets that sampler's own schedule
        defaults.setdefault("sampler", "DPM++ 2M")
    defaults.setdefault("width", model.native_size)
    defaults.setdefault("height", model.native_size)
    demo = build_ui(engine, defaults, presets_dir=presets_dir)
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    app_kwargs, hosts = server_kwargs(engine, args.host, args.allowed_host, api=not args.no_api,
                                      queue_size=args.queue_size)
    auth, generated = share_auth(auth, args.share, args.share_no_auth)
    if args.share and args.share_no_auth and not auth:
        print("WARNING: --share-no-auth: anyone with the public link can use this machine.", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                show_error=True, prevent_thread_lock=True, max_file_size=f"{args.max_upload_mb}mb",
                allowed_paths=[] if engine.outputs_dir is None else [str(engine.outputs_dir)], app_kwargs=app_kwargs,
                **launch_kwargs())
    after_launch(demo, hosts)
    print(f"Answers to: {hosts}" + ("" if args.no_api else f"; A1111 API at {demo.local_url.rstrip('/')}/sdapi/v1"),
          flush=True)
    if args.share:
        if demo.share_url:
            print(f"Public link: {demo.share_url}", flush=True)
        else:
            print("No public link could be made (the share server could not be reached); serving locally only.",
                  flush=True)
        if generated:
            print(f"Login for the public link: user {SHARE_USER}, password {generated}", flush=True)
    demo.block_thread()
    return 0


def _exit_on_sigterm() -> None:
    """SIGTERM ends the process through Python's exit path, so a local Ray instance is shut down with it."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    _exit_on_sigterm()
    sys.exit(main())
