"""Compare (engine/compare.py) through the Engine on builtin:tiny: columns, PSNR, the grid PNG, restoring the setup."""
import math
import threading

import pytest
from PIL import Image

from engine import UserError
from engine.compare.run import compare
from engine.store.metadata import parse_parameters
from engine.store.outputs import read_parameters

REQUEST = {"prompt": "a red circle", "negative_prompt": "", "width": 64, "height": 64, "seed": 7, "steps": 4,
           "sampler": "Euler", "guidance": 7.0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engine import Engine

    engine = Engine(runtime="pytorch", outputs_dir=tmp_path_factory.mktemp("outputs"))
    engine.load("builtin:tiny")
    return engine


@pytest.fixture()
def presets(tmp_path):
    """The shipped presets, and one whose LoRA for builtin:tiny does not exist (a column that fails)."""
    import shutil

    from engine.options import PRESETS_DIR

    for f in PRESETS_DIR.glob("*.toml"):
        shutil.copy(f, tmp_path)
    (tmp_path / "broken-lora.toml").write_text('[lora.by_model]\n"builtin:tiny" = "no-such-lora"\n')
    return tmp_path


def setup_of(engine):
    return engine.runtime.name, engine.runtime.optimizations, engine.runtime_wish, engine.optimizations


def test_four_step_counts_give_four_images_and_psnr_against_the_first(engine):
    before = setup_of(engine)
    seen = []
    c = compare(engine, {**REQUEST, "seed": -1, "batch_size": 3}, "steps", ["4", 2, " ", 4, "8"], progress=seen.append)
    assert [col.label for col in c.columns] == ["steps: 4", "steps: 2", "steps: 4", "steps: 8"]  # blanks: no column
    assert all(col.image is not None and col.image.size == (64, 64) for col in c.columns)
    assert [col.result.readout.steps for col in c.columns] == [4, 2, 4, 8]
    assert len({col.result.seeds[0] for col in c.columns}) == 1 and c.request.seed >= 0  # -1 resolved once
    assert [col.psnr_text for col in c.columns][:1] == ["reference"]
    assert math.isfinite(c.columns[1].psnr) and c.columns[1].psnr_text.endswith(" dB")
    assert math.isinf(c.columns[2].psnr) and c.columns[2].psnr_text == "identical"  # same request as column 1
    assert all(col.total_s > 0 and col.summary()["peak_ram_gib"] > 0 for col in c.columns)
    assert {p.column for p in seen if p.phase == "running"} == {1, 2, 3, 4} and seen[-1].phase == "restoring"
    assert setup_of(engine) == before
    assert c.grid.width > 4 * 64 and c.grid.height > 64


def test_four_samplers(engine):
    jobs = len(engine.history)
    c = compare(engine, REQUEST, "sampler", ["euler", "Euler a", "DDIM", "UniPC"], warm_up=False)
    assert len(engine.history) - jobs == 4 and all(col.setup_s < 1 for col in c.columns)
    assert [col.label for col in c.columns] == ["sampler: Euler", "sampler: Euler a", "sampler: DDIM",
                                                "sampler: UniPC"]
    assert [col.request.sampler for col in c.columns] == ["Euler", "Euler a", "DDIM", "UniPC"]
    assert all(col.image is not None and col.error is None for col in c.columns)
    assert c.columns[0].reference and all(math.isfinite(col.psnr) for col in c.columns[1:])


def test_the_grid_png_is_saved_with_its_parameters(engine):
    before, jobs = set(engine.outputs_dir.rglob("*.png")), len(engine.history)
    c = compare(engine, REQUEST, "steps", [2, 3])
    assert c.saved_path and c.saved_path.endswith("-7.png")
    saved = {str(p) for p in set(engine.outputs_dir.rglob("*.png")) - before}
    assert saved == {c.saved_path, *(col.result.saved_paths[0] for col in c.columns)}  # warm-up steps are not saved
    assert len(engine.history) - jobs == 4 and engine.history[1]["steps"] == 1  # each column's warm-up step, then it
    with Image.open(c.saved_path) as saved:
        assert saved.size == c.grid.size
        fields = parse_parameters(read_parameters(saved))
    assert fields["prompt"] == "a red circle" and fields["seed"] == 7 and fields["task"] == "compare"
    assert (fields["width"], fields["height"], fields["model"]) == (64, 64, "builtin:tiny")
    assert fields["Compare"] == "steps"
    assert fields["Column 1"].startswith("2; ") and "PSNR reference" in fields["Column 1"]
    assert fields["Column 2"].startswith("3; ") and "3 steps" in fields["Column 2"] and "dB" in fields["Column 2"]
    assert c.parameters["columns"][1]["psnr_db"] == round(c.columns[1].psnr, 2)


def test_a_preset_column_applies_it_and_the_setup_is_restored(engine, presets):
    before = setup_of(engine)
    applied = {}

    def progress(p):
        if p.phase == "running":
            applied[p.label] = list(engine.runtime.applied)

    c = compare(engine, REQUEST, "preset", ["quality", "fastest"], presets_dir=presets, progress=progress)
    quality, fastest = c.columns
    assert (quality.request.steps, quality.request.sampler, quality.request.schedule) == (30, "DPM++ 2M", "Karras")
    assert (fastest.request.steps, fastest.request.sampler, fastest.request.guidance) == (4, "LCM", 1.0)
    assert applied == {"preset: quality": [], "preset: fastest": ["token merging 0.3", "DeepCache every 2"]}
    assert any("Needs an LCM-distilled model" in n for n in fastest.notices)  # tiny has no LCM-LoRA listed
    assert quality.result.readout.precision == "fp32"
    assert setup_of(engine) == before and not engine.runtime.applied


def test_a_failing_column_shows_its_message_and_the_others_run(engine, presets):
    before = setup_of(engine)
    c = compare(engine, REQUEST, "preset", ["broken-lora", "balanced"], presets_dir=presets)
    broken, balanced = c.columns
    assert broken.image is None and "no-such-lora" in broken.error and "\n" not in broken.error
    assert balanced.image is not None and balanced.reference  # the first column with an image is the reference
    assert "no-such-lora" in c.parameters_text and setup_of(engine) == before
    assert engine.txt2img({**REQUEST, "steps": 1}).images  # the engine still serves
    only = compare(engine, REQUEST, "preset", ["broken-lora"], presets_dir=presets)
    assert only.columns[0].psnr_text == "n/a" and only.grid.width > 64 and only.saved_path  # a grid of the message


@pytest.mark.parametrize("axis, values, message", [
    ("size", ["64"], "Unknown comparison axis"),
    ("steps", ["", None], "at least one value"),
    ("steps", [1, 2, 3, 4, 5], "at most 4"),
    ("steps", ["ten"], "not a whole number"),
    ("steps", [2.5], "not a whole number"),
    ("steps", [0], "between 1 and 150"),
    ("sampler", ["Euler", "Heun 9000"], "Unknown sampler"),
    ("preset", ["no-such-preset"], "Unknown preset"),
    ("runtime", ["tensorrt"], "Unknown runtime"),
])
def test_a_bad_value_is_one_clear_error_before_anything_runs(engine, axis, values, message):
    jobs = len(engine.history)
    with pytest.raises(UserError, match=message):
        compare(engine, REQUEST, axis, values)
    assert len(engine.history) == jobs


def test_a_runtime_that_cannot_run_here_is_refused(engine):
    from engine.runtimes import unavailable_reason

    if unavailable_reason("onediff", engine.hardware) is None:
        pytest.skip("OneDiff runs here")
    with pytest.raises(UserError, match="cannot run here"):
        compare(engine, REQUEST, "runtime", ["pytorch", "onediff"])


def test_stop_ends_the_running_column_and_skips_the_rest(engine):
    stop = threading.Event()

    def progress(p):
        if p.column == 2 and p.phase == "running" and p.step >= 2:
            stop.set()

    c = compare(engine, {**REQUEST, "steps": 20}, "steps", [3, 20, 5, 6], progress=progress, stop=stop)
    first, second, *rest = c.columns
    assert first.result.readout.steps == 3 and not first.stopped
    assert second.stopped and 2 <= second.result.readout.steps < 20
    assert all(col.result is None and col.error == "Not run: stopped." for col in rest)


@pytest.mark.slow
def test_runtime_columns_switch_and_the_runtime_is_restored(engine):
    from engine.runtimes import unavailable_reason

    if unavailable_reason("openvino", engine.hardware):
        pytest.skip("OpenVINO does not run here")
    before = setup_of(engine)
    c = compare(engine, REQUEST, "runtime", ["openvino", "pytorch"])
    assert [col.result.readout.runtime for col in c.columns] == ["openvino", "pytorch"]
    assert c.columns[0].result.readout.shape_cache == "warm (cache hit)"  # compiled in the warm-up, not timed
    assert c.columns[1].psnr > 20  # the same model on two runtimes: close, not necessarily identical
    assert setup_of(engine) == before
