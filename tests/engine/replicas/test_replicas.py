"""Engine replicas on Ray Serve behind the UI (engine/serve.py): a local Ray instance on this machine with two CPU
replicas of builtin:shapes, driven through the UI's own endpoint by several clients at once; then one replica's
process killed mid-job. Ray Serve is installed by `make test` (requirements-serve.txt): these tests never skip."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from appserver import ROOT, running_app
from gradio_client import Client
from PIL import Image

from engine.store.metadata import parse_parameters
from engine.store.outputs import TMP_PREFIX, read_parameters

PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
           "a green triangle on a white background", "a blue circle on a yellow background"]
STEPS, SIZE = 6, 128


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replica_outputs")


@pytest.fixture(scope="module")
def app(outputs, tmp_path_factory):
    presets = tmp_path_factory.mktemp("replica_presets")
    (presets / "cached.toml").write_text("[optimizations]\nresult_cache = true\n")
    with running_app("--model", "builtin:shapes", "--runtime", "pytorch", "--replicas", "2", "--presets-dir",
                     str(presets), "--preset", "cached", "--outputs-dir", str(outputs), timeout_s=400) as (url, proc):
        yield url, proc


def replica_processes() -> dict[int, str]:
    """pid -> process title of Ray Serve's replica workers of our application."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:fastsd:Replica" in title:
            found[p.info["pid"]] = title
    return found


def txt2img(client: Client, prompt: str, seed: int, steps: int = STEPS):
    return client.predict(prompt=prompt, negative_prompt="", width=SIZE, height=SIZE, batch_count=1, steps=steps,
                          guidance=7.0, sampler="Euler", seed=seed, batch_size=1, api_name="/txt2img")


def replica_of(readout: str) -> str:
    row = next(line for line in readout.splitlines() if line.startswith("| Replica |"))
    return row.split("|")[2].strip()


def saved_pngs(outputs: Path) -> list[Path]:
    return sorted(outputs.rglob("*.png"))


def test_sixteen_jobs_from_four_clients_use_both_replicas_and_save_each_image_once(app, outputs):
    url, _ = app
    jobs = [(PROMPTS[i % 4], 1000 + i) for i in range(16)]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def client_run(which: int) -> None:
        try:
            client = Client(url, verbose=False)
            for prompt, seed in jobs[which::4]:
                results[seed] = (prompt, txt2img(client, prompt, seed))
        except BaseException as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=client_run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == 16
    replicas = Counter(replica_of(readout) for _, (_, readout, _, _) in results.values())
    assert len(replicas) == 2, replicas  # both replicas ran jobs
    # Each image saved once, by the front, whole (no partial files), with its own seed and prompt.
    pngs = saved_pngs(outputs)
    assert len(pngs) == 16, pngs
    assert not list(outputs.rglob(f"{TMP_PREFIX}*"))
    saved = {}
    for path in pngs:
        with Image.open(path) as image:
            params = parse_parameters(read_parameters(image))
            saved[int(params["seed"])] = (params["prompt"], np.asarray(image.convert("RGB"), dtype=np.float32))
    assert sorted(saved) == sorted(results)
    # Correct pictures: the same request on an engine in this process gives the same image (threads differ, so
    # the sums may round differently: within 1 level of 255 on average).
    from engine import Engine

    local = Engine(runtime="pytorch", preview_every=0)
    local.load("builtin:shapes")
    for seed, (prompt, (gallery, _, params, _)) in sorted(results.items())[::5]:
        assert params["seed"] == seed and params["prompt"] == prompt
        want = local.txt2img({"prompt": prompt, "width": SIZE, "height": SIZE, "steps": STEPS, "guidance": 7.0,
                              "sampler": "Euler", "seed": seed})
        saved_prompt, got = saved[seed]
        assert saved_prompt == prompt and got.shape == (SIZE, SIZE, 3)
        assert np.abs(got - np.asarray(want.images[0], dtype=np.float32)).mean() < 1.0, seed


def test_readout_and_engine_tab_say_where_jobs_ran(app):
    url, _ = app
    client = Client(url, verbose=False)
    _, readout, _, _ = txt2img(client, PROMPTS[0], 7)
    assert "pid" in replica_of(readout)
    # The Engine tab's summary (its initial value is in the page's config): how many replicas, on what.
    with urllib.request.urlopen(url + "config", timeout=30) as response:
        config = json.load(response)
    texts = [str(c.get("props", {}).get("value", "")) for c in config["components"]]
    assert any("2 Ray Serve replicas" in text and "pytorch" in text for text in texts)
    # What only a restart changes is shown but not offered: the option boxes, the runtime switch.
    options = [c["props"] for c in config["components"] if str(c["props"].get("elem_id", "")).startswith("opt-")]
    assert options and all(p["interactive"] is False and "every replica" in p["info"] for p in options)
    buttons = {c["props"].get("value"): c["props"].get("interactive") for c in config["components"]
               if c["type"] == "button"}
    assert buttons["Use this runtime"] is False and buttons["Warm up"] is False and buttons["Load model"] is False


def test_the_front_keeps_one_result_cache_for_all_replicas(app, outputs):
    url, _ = app
    client = Client(url, verbose=False)
    before = len(saved_pngs(outputs))
    first = txt2img(client, PROMPTS[3], 4242)
    second = txt2img(client, PROMPTS[3], 4242)  # the same request: whichever replica is free, the front answers
    assert "Replica" in first[1] and "result cache hit" in second[1], second[1]
    assert len(saved_pngs(outputs)) == before + 1  # the hit is not saved again


def test_what_replicas_cannot_change_is_refused_in_one_line(app):
    url, _ = app
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="not available with --replicas"):
        client.predict("pytorch", api_name="/set_runtime")


def test_previews_and_stop_reach_the_job_on_its_replica(app):
    url, _ = app
    client = Client(url, verbose=False)
    job = client.submit(prompt=PROMPTS[2], negative_prompt="", width=SIZE, height=SIZE, batch_count=1, steps=150,
                        guidance=7.0, sampler="Euler", seed=77, batch_size=1, api_name="/txt2img")
    deadline = time.monotonic() + 120
    while not any("on replica" in str(out[1]) for out in job.outputs() if len(out) > 1):
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    deadline = time.monotonic() + 60  # previews come from the replica too, every 2 steps
    while not any("preview, step" in str(out[0]) for out in job.outputs() if out):
        assert time.monotonic() < deadline, "no preview reached the page"
        time.sleep(0.2)
    Client(url, verbose=False).predict(api_name="/stop")
    _, readout, _, _ = job.result(timeout=120)
    assert re.search(r"Stopped after \d+ of 150 steps", readout), readout


def test_a_replica_killed_mid_job_is_replaced_and_no_job_is_lost(app, outputs):
    url, proc = app
    before = replica_processes()
    assert len(before) == 2, before
    done_before = len(saved_pngs(outputs))
    clients = [Client(url, verbose=False) for _ in range(2)]
    # Two long jobs, one on each replica; kill one replica once both are past their first steps.
    # Long enough (150 steps, 2 images) that the kill lands well inside the job.
    running = [c.submit(prompt=PROMPTS[i], negative_prompt="", width=SIZE, height=SIZE, batch_count=1, steps=150,
                        guidance=7.0, sampler="Euler", seed=500 + i, batch_size=2, api_name="/txt2img")
               for i, c in enumerate(clients)]
    # The live line each job streams names its replica: "... on replica ID (pid N on HOST)".
    deadline, pids = time.monotonic() + 120, {}
    while time.monotonic() < deadline and len(pids) < 2:
        for i, job in enumerate(running):
            lines = [str(out[1]) for out in job.outputs() if len(out) > 1]
            found = [re.search(r"on replica \S+ \(pid (\d+)", line) for line in lines]
            if any(found):
                pids[i] = int([m for m in found if m][-1].group(1))
        time.sleep(0.2)
    assert len(pids) == 2 and len(set(pids.values())) == 2, f"the two jobs did not both start: {pids}"
    victim = pids[0]
    assert victim in before
    os.kill(victim, signal.SIGKILL)
    outcomes = []
    for job in running:
        try:
            _, readout, params, _ = job.result(timeout=300)
            outcomes.append(("image", readout))
        except Exception as e:  # a clear message is allowed too, never a hang
            outcomes.append(("error", str(e)))
    (killed_kind, killed_text), (other_kind, other_text) = outcomes
    assert other_kind == "image" and "Retried" not in other_text, other_text
    # The killed replica's job ran again on the other one (after the job there): its images, once.
    assert killed_kind == "image", killed_text
    assert re.search(r"Retried: \S+ \(pid %d on .*\) stopped mid-job" % victim, killed_text), killed_text
    assert str(pids[1]) in replica_of(killed_text)
    # Every image that came back was saved once (2 per job); nothing half-written.
    assert len(saved_pngs(outputs)) == done_before + 4
    assert not list(outputs.rglob(f"{TMP_PREFIX}*"))
    # The server keeps serving, and Serve brings up a replacement replica.
    _, readout, _, _ = txt2img(clients[0], PROMPTS[1], 42)
    assert "Replica" in readout
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = replica_processes()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(1)
    else:
        pytest.fail(f"no replacement replica came up: {replica_processes()}")
    assert proc.poll() is None


def test_ray_client_addresses_are_refused_with_the_way_that_works():
    from engine import UserError
    from engine.replicas.pool import ReplicaConfig, ReplicaPool

    with pytest.raises(UserError, match="--ray-address auto"):
        ReplicaPool(ReplicaConfig(), 2, address="ray://head:10001").start()


def test_the_flag_says_what_to_install_without_ray(monkeypatch, capsys):
    import app as app_module
    from engine.replicas import pool as serve

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    assert "requirements-serve.txt" in serve.ray_missing()
    assert app_module.main(["--replicas", "2", "--model", "builtin:tiny", "--no-save"]) == 2
    assert "requirements-serve.txt" in capsys.readouterr().err


def test_the_documented_serve_configs_deploy_what_they_say():
    """docs/ray/*.yaml parse as Ray Serve configs, and their application builds with the options they name."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from engine.replicas.replica import build_app

    root = ROOT / "docs" / "ray"
    plain = yaml.safe_load((root / "serve-config.yaml").read_text())
    service = yaml.safe_load((root / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    for config in (plain, yaml.safe_load(service["spec"]["serveConfigV2"])):
        schema = ServeDeploySchema.model_validate(config)
        (app,) = schema.applications
        assert app.import_path == "engine.replicas.replica:build_app" and app.route_prefix is None
        deployment = build_app(app.args)._bound_deployment
        assert deployment.ray_actor_options["num_gpus"] == 1
        assert deployment._deployment_config.max_ongoing_requests == 1
        assert deployment._deployment_config.autoscaling_config.max_replicas == 100
    with pytest.raises(TypeError):  # a misspelt field fails at deploy, before any replica starts
        build_app({"config": {"modle": "x"}})
