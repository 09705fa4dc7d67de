"""Bounded load on localhost: 16 clients x 4 tiny jobs at once against one app process."""
import statistics
import threading
import time

from appserver import running_app
from gradio_client import Client


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_sixteen_clients_four_jobs_each(capsys):
    with running_app("--model", "builtin:tiny", "--no-save", "--queue-size", "24") as (url, proc):
        warm = Client(url, verbose=False)
        for _ in range(3):  # compile the shape and settle the allocator before measuring
            warm.predict("warm", "", 64, 64, 1, 3, 7.0, "Euler", 1, 1, api_name="/txt2img")
        rss_before = rss_bytes(proc.pid)

        outcomes, lock = [], threading.Lock()

        def client_run(i: int):
            client = Client(url, verbose=False)
            jobs = []
            for j in range(4):
                seed = 1000 + 10 * i + j
                jobs.append((seed, time.perf_counter(),
                             client.submit(f"client {i}", "", 64, 64, 1, 3, 7.0, "Euler", seed, 1, api_name="/txt2img")))
            for seed, start, job in jobs:
                try:
                    gallery = job.result(timeout=300)[0]
                    outcome = ("ok", seed, gallery[0]["caption"], time.perf_counter() - start)
                except Exception as e:
                    outcome = ("error", seed, str(e), time.perf_counter() - start)
                with lock:
                    outcomes.append(outcome)

        started = time.perf_counter()
        threads = [threading.Thread(target=client_run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - started

        assert len(outcomes) == 64
        ok = [o for o in outcomes if o[0] == "ok"]
        errors = [o for o in outcomes if o[0] == "error"]
        for _, seed, caption, _ in ok:
            assert caption == f"seed {seed}", "a client got someone else's image"
        for _, _, message, _ in errors:
            assert "queue" in message.lower() and "full" in message.lower(), message
        assert ok, "no job completed"
        assert proc.poll() is None, "the server died"
        assert Client(url, verbose=False).predict("after", "", 64, 64, 1, 2, 7.0, "Euler", 5, 1,
                                                  api_name="/txt2img")[0][0]["caption"] == "seed 5"
        rss_after = rss_bytes(proc.pid)
        assert rss_after <= 1.10 * rss_before, (rss_before, rss_after)

        latencies = sorted(o[3] for o in ok)
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        with capsys.disabled():
            print(f"\nload: {len(ok)} done, {len(errors)} queue-full, {60 * len(ok) / wall:.0f} jobs/min, "
                  f"latency p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s, "
                  f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
