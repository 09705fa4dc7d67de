"""What the A1111-compatible API costs beside the job itself, and beside the page's own (Gradio) endpoint.

    python -m benchmarks.api --json benchmarks/results/api.json

Starts app.py (builtin:shapes, 128x128, 20 steps, the runtime the engine picks here) and sends the same
txt2img, on a new seed each round, alternately through /sdapi/v1/txt2img (webuiapi, a real A1111 client)
and through the page's /txt2img (gradio_client). Per request: wall time at the client, and the job's own
end-to-end time from the readout; the difference is what the HTTP path adds (encoding the PNGs, JSON,
the queue). Medians over the rounds, the same server, one run.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUEST = {"prompt": "a red circle on a blue background", "negative_prompt": "", "width": 128, "height": 128,
           "steps": 20, "guidance": 7.0, "sampler": "DPM++ 2M Karras", "batch_size": 1}


def start_app(port: int, log: Path, *args: str, timeout_s: float = 300) -> subprocess.Popen:
    """app.py on `port` (not saving images, with `args`), once its page answers; its output goes to `log`."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--no-save", *args],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("the app did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--port", type=int, default=7911)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import webuiapi
    from gradio_client import Client

    log = Path(tempfile.mkdtemp()) / "app.log"
    proc = start_app(args.port, log)
    try:
        url = f"http://127.0.0.1:{args.port}/"
        api = webuiapi.WebUIApi(baseurl=url + "sdapi/v1")
        page = Client(url, verbose=False)
        r = REQUEST
        rows = {"api": [], "page": []}
        for i in range(args.rounds + 1):  # round 0 warms both paths (compiles the shape once)
            start = time.perf_counter()
            out = api.txt2img(prompt=r["prompt"], width=r["width"], height=r["height"], steps=r["steps"],
                              cfg_scale=r["guidance"], sampler_name=r["sampler"], seed=1000 + i)
            wall = time.perf_counter() - start
            api_job = out.info["fast_sd"]["readout"]["total_s"]
            start = time.perf_counter()
            page_out = page.predict(**{**r, "batch_count": 1, "seed": 2000 + i}, api_name="/txt2img")
            page_wall = time.perf_counter() - start
            m = re.search(r"Total[^0-9]*([0-9.]+) s", page_out[1])
            page_job = float(m.group(1)) if m else float("nan")
            if i:
                rows["api"].append((wall, api_job))
                rows["page"].append((page_wall, page_job))
            print(f"round {i}: api {wall:.3f} s (job {api_job:.3f}), page {page_wall:.3f} s (job {page_job:.3f})",
                  flush=True)
        runtime = out.info["fast_sd"]["readout"]["runtime"]
    finally:
        proc.terminate()
        proc.wait(30)
    result = {"request": REQUEST, "rounds": args.rounds, "runtime": runtime, "cpu": _cpu()}
    for path, pairs in rows.items():
        walls, jobs = [w for w, _ in pairs], [j for _, j in pairs]
        result[path] = {"median_wall_s": round(statistics.median(walls), 4),
                        "median_job_s": round(statistics.median(jobs), 4),
                        "median_overhead_s": round(statistics.median(w - j for w, j in pairs), 4)}
    result["api_wall_over_page_wall"] = round(result["api"]["median_wall_s"] / result["page"]["median_wall_s"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cpu() -> str:
    """'AMD EPYC (family 25 model 1), 2 cores': the model name alone does not tell EPYC generations apart."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    import os

    return (f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}), {os.cpu_count()} cores")


if __name__ == "__main__":
    sys.exit(main())
