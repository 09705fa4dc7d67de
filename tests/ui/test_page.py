"""The UI through gradio_client, against a real app process on a free localhost port."""
import json
import re
import urllib.request
from pathlib import Path

import pytest
from appserver import running_app
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def presets_dir(tmp_path_factory):
    import shutil

    from engine.options import PRESETS_DIR

    path = tmp_path_factory.mktemp("presets")
    for f in PRESETS_DIR.glob("*.toml"):
        shutil.copy(f, path)
    return path


@pytest.fixture(scope="module")
def app(outputs, presets_dir):
    with running_app("--model", "builtin:tiny", "--outputs-dir", str(outputs), "--presets-dir",
                     str(presets_dir)) as (url, _proc):
        yield url


@pytest.fixture(scope="module")
def client(app):
    return Client(app, verbose=False)


def txt2img(client, **kw):
    args = {"prompt": "a red circle", "negative_prompt": "", "width": 256, "height": 256, "batch_count": 1,
            "steps": 10, "guidance": 7.0, "sampler": "Euler", "seed": 5, "batch_size": 1}
    args.update(kw)
    return client.predict(**args, api_name="/txt2img")


def test_api_parameters_are_named_after_the_request_fields(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = {api: [p["parameter_name"] for p in e["parameters"]] for api, e in endpoints.items()}
    common = ["steps", "guidance", "sampler", "seed", "batch_size"]
    # styles, then the schedule type, come last, so clients sending the older positional arguments still work
    assert names["/txt2img"] == ["prompt", "negative_prompt", "width", "height", "batch_count", *common, "styles",
                                 "schedule"]
    assert names["/tiled_upscale"] == ["image", "prompt", "negative_prompt", "factor", "strength", "tile_size",
                                       "tile_overlap", *common, "styles", "schedule"]
    assert names["/load_model"] == ["model", "vae"]
    assert names["/set_runtime"] == ["runtime"] and names["/warmup"] == ["sizes", "tasks", "guidance"]
    from engine.options import OPTION_SPECS

    assert names["/set_optimizations"] == list(OPTION_SPECS)
    assert names["/save_preset"] == ["name", "steps", "guidance", "sampler", *OPTION_SPECS, "schedule"]
    assert names["/compare"] == ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "sampler", "seed",
                                 "axis", "value_1", "value_2", "value_3", "value_4", "warm_up", "styles", "schedule"]


def test_txt2img_returns_image_of_requested_size_and_readout(client):
    gallery, readout, params, history = txt2img(client, width=256, height=192)
    assert len(gallery) == 1
    with Image.open(gallery[0]["image"]) as im:
        assert im.size == (256, 192)
    assert gallery[0]["caption"] == "seed 5"
    for needle in ("Total", "Text encoding", "Denoising", "Vae decode", "it/s", "Peak RAM", "GiB", "Peak VRAM",
                   "Precision", "Shape"):
        assert needle in readout, needle
    runtime, device = re.search(r"\| Runtime \| (\S+) on (\S+) \|", readout).groups()
    if device.startswith("cuda"):
        assert re.search(r"\| Peak VRAM \| [\d.]+ GiB alloc", readout)
    else:  # the auto runtime on a CPU is OpenVINO, and there is no VRAM to report
        assert runtime == "openvino" and "| Peak VRAM | n/a (CPU) |" in readout
    assert params["seed"] == 5 and params["width"] == 256 and params["height"] == 192


def test_batch_of_two_gets_two_seeds(client):
    gallery, readout, params, history = txt2img(client, batch_size=2, batch_count=2, seed=40, steps=3,
                                                width=128, height=128)
    assert [g["caption"] for g in gallery] == ["seed 40", "seed 41", "seed 42", "seed 43"]
    assert history["data"][0][1] == "txt2img" and history["data"][0][3] == 4


def test_bad_input_is_one_clear_message_and_app_keeps_working(client):
    with pytest.raises(AppError) as e:
        txt2img(client, sampler="Euler", steps=10, width=0)
    assert "64" in str(e.value)
    with pytest.raises(AppError) as e:
        client.predict("/etc/passwd", api_name="/load_model")
    assert "absolute" in str(e.value) or "models folder" in str(e.value)
    with pytest.raises(AppError) as e:
        client.predict("someone/not-here", api_name="/load_model")
    assert "not one this server lists" in str(e.value)  # a hub id: only with --allow-hub-ids
    gallery, *_ = txt2img(client, steps=3, width=128, height=128)
    assert len(gallery) == 1


def make_png(tmp_path, w, h, name="in.png"):
    import numpy as np

    path = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


COMMON = {"steps": 4, "guidance": 7.0, "sampler": "Euler", "seed": 11, "batch": 1}


def test_img2img_tab(client, tmp_path):
    from gradio_client import handle_file

    gallery, readout, params, _ = client.predict(
        handle_file(make_png(tmp_path, 160, 96)), "a blue square", "", 0.5, "crop and resize", 128, 64, False,
        *COMMON.values(), api_name="/img2img")
    with Image.open(gallery[0]["image"]) as im:
        assert im.size == (128, 64)
    assert "Ran 2 of 4 steps" in readout and "Total" in readout and params["strength"] == 0.5


def test_img2img_without_image_is_a_clear_error(client):
    with pytest.raises(AppError, match="No image"):
        client.predict(None, "x", "", 0.5, "resize", 0, 0, False, *COMMON.values(), api_name="/img2img")


def test_hires_fix_tab_returns_base_and_final(client):
    gallery, readout, params, _ = client.predict("a star", "", 64, 64, 2.0, "latent (bicubic)", 0.5, 0, False,
                                              *COMMON.values(), api_name="/hires_fix")
    sizes = []
    for g in gallery:
        with Image.open(g["image"]) as im:
            sizes.append(im.size)
    assert sizes == [(64, 64), (128, 128)]
    assert "Hires denoising" in readout and "Base denoising" in readout


def test_tiled_upscale_tab(client, tmp_path):
    from gradio_client import handle_file

    gallery, readout, params, _ = client.predict(
        handle_file(make_png(tmp_path, 150, 100)), "", "", 2.0, 0.4, 128, 32, *{**COMMON, "batch": 2}.values(),
        api_name="/tiled_upscale")
    assert [g["caption"] for g in gallery] == ["seed 11", "seed 12"]  # the batch size slider reaches the engine
    with Image.open(gallery[0]["image"]) as im:
        assert im.size == (304, 200)  # 300x200 snapped to multiples of 8
    assert "tiles of 128" in readout and "snapped" in readout and params["batch_size"] == 2


def test_png_info_reads_saved_parameters(client, outputs):
    from gradio_client import handle_file

    txt2img(client, prompt="a blue star, small", seed=77, steps=3, width=128, height=128)
    saved = sorted(outputs.rglob("*-77.png"))
    assert saved, "the image was not saved"
    text, fields = client.predict(handle_file(str(saved[-1])), api_name="/png_info")
    assert "a blue star, small" in text and "Seed: 77" in text
    assert fields["seed"] == 77 and fields["width"] == 128 and fields["prompt"] == "a blue star, small"


def test_engine_tab_reads_the_runtime_decisions_afresh(client):
    """What the runtime decides as jobs run (OpenVINO's threads, at its first compile) shows when the tab opens."""
    txt2img(client, width=64, height=64, steps=2)
    summary = client.predict(api_name="/engine_summary")
    assert summary.startswith("**Runtime:**") and "builtin:tiny" in summary
    if "openvino on cpu" in summary:
        assert "One image at a time on" in summary and "one after another" in summary


def test_live_stream_updates_before_the_final_image(client):
    job = client.submit("a red circle", "", 256, 256, 1, 30, 7.0, "Euler", 3, 1, api_name="/txt2img")
    updates = list(job)  # every (gallery, readout, parameters, history) the handler yielded, in order
    final = updates[-1]
    assert final == job.outputs()[-1] and final[0] and "Total" in final[1]
    live = [i for i, u in enumerate(updates[:-1]) if isinstance(u[1], str) and re.search(r"step \d+ of 30", u[1])]
    assert live, f"no live line before the final result: {[u[1] for u in updates]}"
    assert "Total" not in updates[live[0]][1] and "RAM" in updates[live[0]][1]


def test_engine_tab_reports_and_switches_runtime(client):
    import torch

    info, message, *_ = client.predict("pytorch", api_name="/set_runtime")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what PyTorch takes here
    assert f"pytorch on {device}" in info and "Now using **pytorch**" in message
    gallery, readout, *_ = txt2img(client, steps=2, width=64, height=64)
    assert len(gallery) == 1 and f"pytorch on {device}" in readout


def option_values(client, preset, prompt=""):
    about, *rest = client.predict(preset, prompt, api_name="/preset")
    boxes = [v["value"] if isinstance(v, dict) and "value" in v else v for v in rest[:-5]]  # gr.update dicts
    return about, boxes, (*rest[-5:-2], rest[-1])  # steps, guidance, sampler, schedule type


def test_preset_dropdown_sets_boxes_and_sampler(client):
    from engine.options import Optimizations, load_preset

    about, values, (steps, guidance, sampler, schedule) = option_values(client, "fastest")
    fastest = load_preset("fastest")
    assert "LCM" in about and (steps, guidance, sampler, schedule) == (4, 1.0, "LCM", "Automatic")
    *_, (_, _, sampler, schedule) = option_values(client, "quality")
    assert (sampler, schedule) == ("DPM++ 2M", "Karras")  # its file says "DPM++ 2M Karras"
    assert "Needs an LCM-distilled model" in about  # builtin:tiny has no LCM-LoRA listed: said, not a silent bad picture
    assert dict(zip(Optimizations.model_fields, values)) == fastest.optimizations.model_dump()


def test_save_as_preset_writes_a_toml_and_refuses_bad_names(client, presets_dir):
    from engine.options import Optimizations, load_preset

    _, values, _ = option_values(client, "low-memory")
    client.predict("my-low", 12, 5.5, "Euler", *values, "Exponential", api_name="/save_preset")
    saved = load_preset("my-low", presets_dir)
    assert saved.optimizations == Optimizations(**dict(zip(Optimizations.model_fields, values)))
    assert (saved.defaults.steps, saved.defaults.sampler, saved.defaults.schedule) == (12, "Euler", "Exponential")
    with pytest.raises(AppError, match="preset name"):
        client.predict("../escape", 12, 5.5, "Euler", *values, "Automatic", api_name="/save_preset")
    assert not (presets_dir.parent / "escape.toml").exists()


def page_components(app) -> dict:
    """The page as first served (the app started on the auto runtime), by elem_id."""
    config = json.load(urllib.request.urlopen(app + "config"))
    return {c["props"]["elem_id"]: c for c in config["components"] if c.get("props", {}).get("elem_id")}


def test_option_controls_follow_the_option_schema(app):
    from engine.options import OPTION_SPECS

    components = page_components(app)
    for name, spec in OPTION_SPECS.items():
        component = components[f"opt-{name}"]
        props = component["props"]
        assert component["type"] == {"bool": "checkbox", "choice": "dropdown"}.get(spec.kind, "slider"), name
        assert props["label"] == spec.label
        assert props["info"] == spec.help or props["info"].startswith("Unavailable: "), name
        if spec.kind == "choice":
            assert [value for _, value in props["choices"]] == list(spec.choices)
        if spec.kind in ("int", "float"):
            assert (props["minimum"], props["maximum"], props["step"]) == (spec.minimum, spec.maximum, spec.step)


def test_warmup_reports_each_size(client):
    report = client.predict("64x64, 128x64", ["txt2img"], 1.0, api_name="/warmup")
    assert "| 64x64 |" in report and "| 128x64 |" in report
    with pytest.raises(AppError, match="at least one task"):
        client.predict("64x64", [], 7.0, api_name="/warmup")


def test_boxes_the_runtime_cannot_use_are_disabled_with_the_reason(app, client):
    props = {elem_id: c["props"] for elem_id, c in page_components(app).items()}
    tome, int8 = props["opt-token_merging_ratio"], props["opt-int8_weights"]
    if tome.get("interactive") is False:
        assert "PyTorch runtime" in tome["info"] and int8.get("interactive") is not False
    else:
        assert int8["interactive"] is False and "OpenVINO runtime" in int8["info"]
    assert props["opt-prompt_cache"].get("interactive") is not False
    assert "--taesd" in props["opt-tiny_vae"]["info"]


def test_a_user_error_is_one_line_on_the_page_and_its_cause_stays_in_the_log(caplog):
    from engine import ModelLoadError
    from ui.running import user_facing

    try:
        try:
            raise ConnectionError("name or service not known: huggingface.co")
        except ConnectionError as cause:
            raise ModelLoadError("Could not download 'a/b': no network.") from cause
    except ModelLoadError as e:
        error = e
    with caplog.at_level("WARNING"):
        shown = user_facing(error, "Loading the model")
    assert shown.message == "Could not download 'a/b': no network."
    record = next(r for r in caplog.records if "Loading the model" in r.getMessage())
    assert record.exc_info[1] is error and isinstance(record.exc_info[1].__cause__, ConnectionError)


def test_compare_tab_streams_columns_and_returns_the_grid_table_and_parameters(client, outputs):
    job = client.submit("a red circle", "", 256, 256, 20, 7.0, "Euler", 9, "steps", "8", "", "16", "12", True,
                        api_name="/compare")  # long enough (about 2 s) to stream a few live lines
    updates = list(job)
    grid, table, params, history = job.outputs()[-1]
    with Image.open(grid) as im:
        assert im.width > 3 * 256
    assert [c["label"] for c in params["columns"]] == ["steps: 8", "steps: 16", "steps: 12"]
    assert [c["psnr"] for c in params["columns"]][0] == "reference" and params["columns"][1]["psnr"].endswith(" dB")
    assert "| steps: 16 |" in table and "PSNR vs first" in table and "GiB" in table
    assert params["saved"].startswith(str(outputs)) and Path(params["saved"]).is_file()
    assert any(isinstance(u[1], str) and "Column" in u[1] for u in updates[:-1])  # live progress before the grid
    with pytest.raises(AppError, match="not a whole number"):
        client.predict("x", "", 64, 64, 20, 7.0, "Euler", 9, "steps", "ten", "", "", "", True, api_name="/compare")
