"""Saved outputs, PNG parameters, live status, stop."""
import threading

import pytest
from PIL import Image

from engine import Engine
from engine.store.metadata import parse_parameters
from engine.store.outputs import read_parameters, save_png


def test_saved_png_parses_back_to_the_same_request(tmp_path):
    engine = Engine(runtime="pytorch", outputs_dir=tmp_path)
    engine.load("builtin:tiny")
    request = {"prompt": "a green triangle, top left", "negative_prompt": "noise", "width": 96, "height": 64,
               "steps": 3, "guidance": 6.5, "sampler": "Euler a", "seed": 99, "batch_size": 2}
    result = engine.txt2img(request)
    assert len(result.saved_paths) == 2 and "save" in result.readout.stages_s
    for path, seed in zip(result.saved_paths, (99, 100)):
        with Image.open(path) as image:
            back = parse_parameters(read_parameters(image))
        for key in ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "sampler"):
            assert back[key] == request[key], key
        assert back["seed"] == seed and back["model"] == "builtin:tiny"
    # and the parsed parameters make the same image again
    again = engine.txt2img({k: back[k] for k in ("prompt", "negative_prompt", "width", "height", "steps", "guidance",
                                                 "sampler", "seed")})
    import numpy as np

    # batch vs single image: same noise, kernels may round differently by a level or two
    diff = np.abs(np.asarray(again.images[0], dtype=int) - np.asarray(result.images[1], dtype=int))
    assert diff.max() <= 3


def test_no_two_saves_share_a_name(tmp_path):
    image = Image.new("RGB", (16, 16), "red")
    paths, errors = [], []

    def worker():
        try:
            for _ in range(10):
                paths.append(save_png(image, "x\nSteps: 1", tmp_path, seed=5))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(paths) == 40 and len(set(paths)) == 40
    assert len(list(tmp_path.rglob("*.png"))) == 40


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    image = Image.new("RGB", (64, 64), "blue")
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        save_png(image, "x", tmp_path, seed=1)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_stop_from_another_thread_ends_a_50_step_job_within_two_steps(tiny_engine):
    box, fifth = {}, threading.Event()

    def progress(i, n):
        if i == 5:
            fifth.set()

    thread = threading.Thread(target=lambda: box.update(
        r=tiny_engine.txt2img({"width": 256, "height": 256, "steps": 50, "seed": 1}, progress=progress)))
    thread.start()
    assert fifth.wait(120), "the job never reached step 5"
    tiny_engine.stop()
    seen_at_stop = tiny_engine.live().step
    thread.join(120)
    assert not thread.is_alive()
    r = box["r"]
    assert 5 <= r.readout.steps <= seen_at_stop + 2 and r.images
    assert any(f"Stopped after {r.readout.steps} of 50" in n for n in r.notices)


def test_live_status_and_preview_during_a_job(tiny_engine):
    seen = []

    def progress(i, n):
        live = tiny_engine.live()
        seen.append((live.running, live.step, live.total, live.preview is not None))

    tiny_engine.txt2img({"width": 128, "height": 128, "steps": 6, "seed": 1}, progress=progress)
    assert all(running for running, *_ in seen)
    assert [s for _, s, _, _ in seen] == list(range(1, 7)) and seen[-1][2] == 6
    assert any(has_preview for *_, has_preview in seen)
    assert tiny_engine.live().preview.size == (128, 128) and not tiny_engine.live().running
    assert tiny_engine.history[0]["task"] == "txt2img"
