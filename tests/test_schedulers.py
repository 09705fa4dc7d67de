import pytest

from engine.errors import UserError
from engine.models import SD_SCHEDULER_CONFIG
from engine.schedulers import SAMPLER_NAMES, canonical_sampler, make_scheduler

EXPECTED = {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "DDIM", "LCM"}


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
    from engine.models import SD_SCHEDULER_CONFIG
    from engine.schedulers import make_scheduler

    assert make_scheduler("DDIM", SD_SCHEDULER_CONFIG).config.clip_sample is False
