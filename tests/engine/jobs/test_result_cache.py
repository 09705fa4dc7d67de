"""The result cache on disk: a hit after a restart, damaged entries rebuilt, bounded by bytes (LRU)."""
import json

import numpy as np
import pytest

from engine import Engine
from engine.jobs.result_cache import DiskResultCache
from engine.options import Optimizations

REQ = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 1, "seed": 8}


def started(folder, max_bytes=1 << 30, outputs=None):
    """A fresh Engine, as after a restart: nothing shared with the last one but the folder."""
    engine = Engine(runtime="pytorch", optimizations=Optimizations(result_cache=True), outputs_dir=outputs,
                    result_cache_dir=folder, result_cache_bytes=max_bytes)
    engine.load("builtin:tiny")
    return engine


def hit(result) -> bool:
    return "result cache hit" in result.readout.shape_cache


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    return folder, started(folder, outputs=tmp_path_factory.mktemp("out")).hires_fix({**REQ, "factor": 1.5})


@pytest.fixture(scope="module")
def restarted(first):
    return started(first[0])


def test_a_hit_after_a_restart_returns_the_same_result(first, restarted):
    folder, before = first
    after = restarted.hires_fix({**REQ, "factor": 1.5})
    assert hit(after) and after.readout.steps == 0
    assert np.array_equal(np.asarray(after.images[0]), np.asarray(before.images[0]))
    assert np.array_equal(np.asarray(after.extra_images["base"][0]), np.asarray(before.extra_images["base"][0]))
    assert after.infotexts == before.infotexts and after.saved_paths == before.saved_paths
    assert not hit(restarted.hires_fix({**REQ, "factor": 1.5, "seed": 9}))  # keyed as before: seed counts


@pytest.mark.parametrize("damage", ["image", "meta", "missing"])
def test_a_damaged_entry_is_rebuilt_never_served(first, restarted, damage):
    folder, before = first
    cache = restarted.records.result_cache
    entry = next(p.parent for p in folder.glob("*/meta.json")
                 if json.loads(p.read_text())["result"]["parameters"]["seed"] == 8)
    if damage == "image":
        data = bytearray((entry / "0.png").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (entry / "0.png").write_bytes(bytes(data))
    elif damage == "meta":
        (entry / "meta.json").write_text('{"key": "half-writ', encoding="utf-8")
    else:
        (entry / "base-0.png").unlink()
    rebuilt = cache.rebuilt
    again = restarted.hires_fix({**REQ, "factor": 1.5})
    assert not hit(again) and cache.rebuilt == rebuilt + 1  # the job ran
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(before.images[0]))
    assert hit(restarted.hires_fix({**REQ, "factor": 1.5}))  # and wrote the entry again


def test_bounded_by_bytes_least_recently_used_first(tmp_path, restarted):
    result = restarted.txt2img({**REQ, "seed": 3})
    probe = DiskResultCache(tmp_path / "probe")
    probe.put("probe", result, "now")
    limit = int(probe.bytes * 2.5)  # room for two entries
    cache = DiskResultCache(tmp_path / "lru", limit)
    cache.put("a", result, "t1")
    cache.put("b", result, "t2")
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", result, "t3")  # a third entry: b goes
    assert cache.get("b") is None and len(cache) == 2 and cache.bytes <= limit
    after = DiskResultCache(tmp_path / "lru", limit)  # the order survived the restart: a goes before c
    after.put("d", result, "t4")
    assert after.get("a") is None and after.get("c") is not None and after.get("d") is not None
    entry = after.get("d")["result"]
    assert entry.seeds == result.seeds and np.array_equal(np.asarray(entry.images[0]), np.asarray(result.images[0]))
    assert not [p for p in (tmp_path / "lru").iterdir() if p.name.startswith(".partial-")]
