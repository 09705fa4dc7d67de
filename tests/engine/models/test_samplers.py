import pytest

from engine.errors import UserError
from engine.models.builtin import SD_SCHEDULER_CONFIG
from engine.samplers import SAMPLER_NAMES, canonical_sampler, make_scheduler

EXPECTED = {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "DDIM", "LCM", "TCD", "Euler trailing",
            "DPM++ 2M trailing"}


def test_all_issue_samplers_exist():
    assert EXPECTED <= set(SAMPLER_NAMES)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_each_sampler_builds_and_keeps_the_noise_schedule(name):
    s = make_scheduler(name, SD_SCHEDULER_CONFIG)
    s.set_timesteps(10)
    assert len(s.timesteps) == 10
    assert s.config.beta_schedule == "scaled_linear"


def test_karras_differs_from_plain():
    assert make_scheduler("DPM++ 2M Karras", SD_SCHEDULER_CONFIG).config.use_karras_sigmas is True
    assert make_scheduler("DPM++ 2M", SD_SCHEDULER_CONFIG).config.use_karras_sigmas is False


def test_unknown_sampler():
    with pytest.raises(UserError, match="Unknown sampler"):
        canonical_sampler("nope")


def test_ddim_does_not_clip_sd_latents():
    from engine.models.builtin import SD_SCHEDULER_CONFIG
    from engine.samplers import make_scheduler

    assert make_scheduler("DDIM", SD_SCHEDULER_CONFIG).config.clip_sample is False


@pytest.mark.parametrize("name", ["TCD", "Euler trailing", "Euler a trailing", "DPM++ 2M trailing", "LCM"])
def test_few_step_samplers_start_from_pure_noise(name):
    """Distilled models expect their first step at t=999; SD's own "leading" spacing starts at 751 for 4 steps."""
    s = make_scheduler(name, SD_SCHEDULER_CONFIG)
    s.set_timesteps(4)
    assert int(s.timesteps[0]) == 999
    leading = make_scheduler("Euler", SD_SCHEDULER_CONFIG)
    leading.set_timesteps(4)
    assert int(leading.timesteps[0]) < 999


@pytest.mark.parametrize("name", ["TCD", "Euler trailing", "DPM++ 2M trailing"])
def test_few_step_samplers_run_a_job(tiny_engine, name):
    result = tiny_engine.txt2img({"prompt": "x", "width": 64, "height": 64, "steps": 2, "guidance": 1.0,
                                  "sampler": name, "seed": 1})
    assert result.readout.steps == 2 and result.parameters["sampler"] == name
