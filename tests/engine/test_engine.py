import numpy as np
import pytest

from engine import Engine, ModelLoadError, UserError
from engine.samplers import SAMPLER_NAMES


def gen(engine, **kw):
    request = {"prompt": "a red circle on a blue background", "width": 128, "height": 128, "steps": 4, "seed": 7}
    request.update(kw)
    return engine.txt2img(request)


def test_same_seed_same_image(tiny_engine):
    a, b = gen(tiny_engine), gen(tiny_engine)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    c = gen(tiny_engine, seed=8)
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_batch_image_i_uses_seed_plus_i(tiny_engine):
    batch = gen(tiny_engine, batch_size=2, seed=100)
    assert batch.seeds == [100, 101] and len(batch.images) == 2
    single = gen(tiny_engine, seed=101)
    assert np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(single.images[0], dtype=int)).max() <= 2


def test_size_is_snapped_and_reported(tiny_engine):
    r = gen(tiny_engine, width=130, height=100)
    assert r.images[0].size == (128, 104)
    assert r.parameters["width"] == 128 and r.parameters["height"] == 104
    assert any("130" in n for n in r.notices) and any("100" in n for n in r.readout.notices)


def test_random_seed_is_reported_and_repeats(tiny_engine):
    r = gen(tiny_engine, seed=-1)
    assert r.parameters["seed"] >= 0 and r.seeds == [r.parameters["seed"]]
    again = gen(tiny_engine, seed=r.parameters["seed"])
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(again.images[0]))


def test_readout_fields_are_plausible(tiny_engine):
    r = gen(tiny_engine, steps=5)
    ro = r.readout
    assert set(ro.stages_s) == {"text_encoding", "denoising", "vae_decode"}
    assert all(s > 0 for s in ro.stages_s.values())
    assert sum(ro.stages_s.values()) <= ro.total_s + 1e-3
    assert ro.steps == 5 and ro.it_per_s == pytest.approx(5 / ro.stages_s["denoising"])
    assert 50 << 20 < ro.peak_rss_bytes < 20 << 30
    assert (ro.peak_vram_allocated_bytes is None) == (not ro.device.startswith("cuda"))
    assert ro.runtime == "pytorch" and ro.precision in ("fp32", "bf16", "fp16") and ro.model == "builtin:tiny"
    text = ro.summary()
    assert "it/s" in text and "GiB" in text


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_generates(tiny_engine, sampler):
    r = gen(tiny_engine, sampler=sampler, steps=3)
    assert r.images[0].size == (128, 128) and r.parameters["sampler"] == sampler


def test_progress_callback_reports_each_step(tiny_engine):
    seen = []
    tiny_engine.txt2img({"width": 64, "height": 64, "steps": 6, "seed": 1}, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(1, 7)]


def test_stop_ends_the_job_early(tiny_engine):
    def progress(i, n):
        if i == 2:
            tiny_engine.stop()

    r = tiny_engine.txt2img({"width": 64, "height": 64, "steps": 30, "seed": 1}, progress=progress)
    assert r.readout.steps == 2 and any("Stopped after 2 of 30" in n for n in r.notices)
    assert len(r.images) == 1
    assert gen(tiny_engine).readout.steps == 4  # the next job runs in full


@pytest.mark.parametrize("bad", [{"width": 0}, {"width": 100000}, {"steps": 0}, {"steps": 10000},
                                 {"sampler": "unknown"}])
def test_bad_requests_leave_engine_usable(tiny_engine, bad):
    with pytest.raises(UserError):
        tiny_engine.txt2img({"prompt": "x", **bad})
    assert gen(tiny_engine).images[0].size == (128, 128)


def test_empty_prompt_is_allowed(tiny_engine):
    assert gen(tiny_engine, prompt="", negative_prompt="").images


def test_missing_model_path_is_clear_and_keeps_old_model(tiny_engine):
    with pytest.raises(ModelLoadError, match="does not exist"):
        tiny_engine.load("/no/such/model.safetensors")
    assert tiny_engine.model.name == "builtin:tiny"
    assert gen(tiny_engine).images


def test_hub_id_offline_fails_with_one_sentence(tiny_engine, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        tiny_engine.load("someone/some-sd-model")
    assert "no network" in str(e.value) and "\n" not in str(e.value)
    assert e.value.__cause__ is not None  # the log keeps what the hub client said
    assert tiny_engine.model.name == "builtin:tiny"


def test_no_model_loaded_is_a_clear_error():
    engine = Engine(runtime="pytorch")
    with pytest.raises(UserError, match="No model is loaded"):
        engine.txt2img({"prompt": "x"})


def test_sdxl_family_generates():
    engine = Engine(runtime="pytorch")
    model = engine.load("builtin:tiny-sdxl")
    assert model.family == "sdxl" and type(model.pipe).__name__ == "StableDiffusionXLPipeline"
    r = engine.txt2img({"prompt": "a star", "negative_prompt": "blur", "width": 96, "height": 64, "steps": 3, "seed": 2})
    assert r.images[0].size == (96, 64)


def test_long_prompt_is_encoded_in_chunks_with_a_notice(tiny_engine):
    r = gen(tiny_engine, prompt=" ".join(["zebra"] * 60))
    assert any("300 tokens: encoded as 4 chunks of up to 75" in n for n in r.notices)  # "zebra" is 5 tokens
    assert not any("tokens" in n for n in gen(tiny_engine, prompt="a red circle").notices)


def test_batch_that_cannot_fit_in_memory_is_refused_before_work(tiny_engine, monkeypatch):
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=50 << 20))
    live_before, steps = tiny_engine.live(), []
    with pytest.raises(UserError, match="GiB RAM is free: lower the size or batch size"):
        tiny_engine.txt2img({"prompt": "x", "width": 2048, "height": 2048, "batch_size": 8, "steps": 1},
                            progress=lambda i, n: steps.append(i))
    assert steps == [] and tiny_engine.live() is live_before  # refused before the job started
    monkeypatch.undo()
    assert gen(tiny_engine).images
