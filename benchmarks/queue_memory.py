"""Peak RSS of the app with its API queue full of the largest inputs it accepts.

Starts app.py (builtin:tiny, --queue-size N), sends N+1 img2img requests at once, each carrying an image just
under the decoded-size limit (engine.requests.MAX_IMAGE_BYTES; flat colour, so the body is small), and samples the
process's RSS until all have answered. Jobs are 1 step at 64x64: what is measured is the inputs held while
they wait, not the generation.

    python -m benchmarks.queue_memory --queue-size 16
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def largest_png() -> tuple[str, tuple[int, int]]:
    from PIL import Image

    from engine.requests import MAX_IMAGE_BYTES

    side = int((MAX_IMAGE_BYTES // 4) ** 0.5)  # RGB decodes to 4 bytes a pixel in Pillow
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (180, 40, 40)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode(), (side, side)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queue-size", type=int, default=16)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import psutil
    from appserver import running_app

    image, size = largest_png()
    body = json.dumps({"prompt": "x", "init_images": [image], "steps": 1, "width": 64, "height": 64}).encode()
    with running_app("--runtime", "pytorch", "--model", "builtin:tiny", "--no-save",
                     "--queue-size", str(args.queue_size)) as (url, proc):
        process = psutil.Process(proc.pid)
        idle = process.memory_info().rss
        statuses, peak, done = [], [idle], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        def send():
            req = urllib.request.Request(url + "sdapi/v1/img2img", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        senders = [threading.Thread(target=send) for _ in range(args.queue_size + 1)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        done.set()
        sampler.join()
        after = process.memory_info().rss
    gib = 2**30
    print(json.dumps({"image": f"{size[0]}x{size[1]} RGB", "body_bytes": len(body), "requests": len(statuses),
                      "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
                      "rss_idle_gib": round(idle / gib, 2), "rss_peak_gib": round(peak[0] / gib, 2),
                      "rss_after_gib": round(after / gib, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
