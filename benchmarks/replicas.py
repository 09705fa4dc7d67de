"""Images per minute with the engine in the app's process, on 1 Ray Serve replica and on 2, through the page's
own endpoint, in one run.

    python -m benchmarks.replicas --json benchmarks/results/replicas-shapes.json

For each configuration app.py is started (the same model, runtime, size and steps), one untimed job warms it,
then `--jobs` txt2img jobs are sent from `--clients` concurrent gradio_client clients; images per minute is
jobs over the wall time from the first request to the last image. Each replica gets its share of the cores
(--replica-cpus default: cores / replicas, as many threads). Start-up (Ray, replicas loading the model) is
reported apart: it is paid once per server, not per image.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.api import ROOT, start_app

CONFIGS = {"in-process": [], "1 replica": ["--replicas", "1"], "2 replicas": ["--replicas", "2"]}


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_config(name: str, extra: list[str], a, port: int) -> dict:
    from gradio_client import Client

    log = Path(tempfile.mkdtemp()) / f"app-{port}.log"
    cache = ["--cache-dir", a.cache_dir] if a.cache_dir else []
    started = time.perf_counter()
    proc = start_app(port, log, "--model", a.model, "--runtime", a.runtime, *cache, *extra, timeout_s=900)
    startup_s = time.perf_counter() - started
    url = f"http://127.0.0.1:{port}/"
    request = {"negative_prompt": "", "width": a.size, "height": a.size, "batch_count": 1, "steps": a.steps,
               "guidance": 7.0, "sampler": a.sampler, "batch_size": 1}
    try:
        Client(url, verbose=False).predict(prompt=a.prompt, seed=1, **request, api_name="/txt2img")  # warm
        jobs_s, replicas, errors = [], {}, []

        def client_run(which: int) -> None:
            client = Client(url, verbose=False)
            for seed in range(100 + which, 100 + a.jobs, a.clients):
                try:
                    _, readout, _, _ = client.predict(prompt=a.prompt, seed=seed, **request, api_name="/txt2img")
                except Exception as e:
                    errors.append(str(e))
                    continue
                rows = dict(line.split("|")[1:3] for line in readout.splitlines() if line.count("|") >= 3)
                rows = {k.strip(): v.strip() for k, v in rows.items()}
                jobs_s.append(float(rows.get("Total", "0").strip("*").split()[0]))
                where = rows.get("Replica", "in-process").split()[0]
                replicas[where] = replicas.get(where, 0) + 1

        start = time.perf_counter()
        threads = [threading.Thread(target=client_run, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        stop_app(proc)
    done = len(jobs_s)
    return {"config": name, "flags": extra, "startup_s": round(startup_s, 1), "jobs": done, "errors": errors,
            "wall_s": round(wall, 2), "images_per_min": round(60 * done / wall, 2),
            "job_s_median": round(statistics.median(jobs_s), 3) if jobs_s else None, "jobs_per_replica": replicas}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:shapes")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--prompt", default="a red circle on a blue background")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="DPM++ 2M Karras")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma separated: " + ", ".join(CONFIGS))
    ap.add_argument("--cache-dir", default=None, help="converted models (a model converted before starts sooner)")
    ap.add_argument("--port", type=int, default=7931)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from engine.system.hardware import detect

    hw = detect()
    rows = []
    for i, name in enumerate(n.strip() for n in a.configs.split(",")):
        row = run_config(name, CONFIGS[name], a, a.port + i)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["images_per_min"] or None
    for row in rows:
        row["vs_first"] = round(row["images_per_min"] / base, 2) if base else None
    report = {"command": "python -m benchmarks.replicas " + " ".join(argv or sys.argv[1:]),
              "machine": f"{hw.cpu.model} ({hw.cpu.logical_cores} logical cores, family/model/stepping "
                         f"{hw.cpu.generation}), {platform.machine()}", "when": time.strftime("%Y-%m-%d %H:%M"),
              "model": a.model, "runtime": a.runtime, "size": a.size, "steps": a.steps, "jobs": a.jobs,
              "clients": a.clients, "rows": rows}
    print(f"{'config':<12} {'img/min':>8} {'x first':>8} {'job s':>7} {'start s':>8}  per replica")
    for row in rows:
        print(f"{row['config']:<12} {row['images_per_min']:>8} {row['vs_first']:>8} {row['job_s_median']:>7} "
              f"{row['startup_s']:>8}  {row['jobs_per_replica']}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
