"""Samplers and schedule types against AUTOMATIC1111's: each schedule's sigmas equal A1111's formula, each
scheduler steps through them, every pair draws a finite picture, and what cannot run is refused with its reason."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from engine.errors import UserError
from engine.models.builtin import SD_SCHEDULER_CONFIG
from engine.requests import Txt2ImgRequest
from engine.samplers import (AUTOMATIC, SAMPLER_NAMES, SAMPLERS, SCHEDULE_NAMES, canonical_sampler,
                             effective_schedule, make_scheduler, parse_sampler, schedule_sigmas, schedules_for)

ISSUE_SAMPLERS = {"Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
                  "DPM++ 2M SDE", "DPM++ 3M SDE", "DDIM", "DDPM", "PLMS", "UniPC", "LCM", "TCD"}
ISSUE_SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")


# -- A1111's formulas, written as A1111 (modules/sd_schedulers.py) and k-diffusion (sampling.get_sigmas_*,
# external.DiscreteSchedule) write them: a reference that shares no code with engine/samplers.py.

class KDiscrete:
    def __init__(self, alphas_cumprod):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = (low - log_sigma) / (low - high)
        w = w.clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    def get_sigmas(self, n=None):
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n)
        return torch.cat([self.t_to_sigma(t), t.new_zeros([1])])


def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_exponential(n, sigma_min, sigma_max):
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0):
    ramp = torch.linspace(1, 0, n) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def a1111_sigmas(label, n, inner, sdxl=False):
    sigma_min, sigma_max = inner.sigmas[0].item(), inner.sigmas[-1].item()
    if label == "Uniform":
        return inner.get_sigmas(n)
    if label == "Karras":
        return get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0)
    if label == "Exponential":
        return get_sigmas_exponential(n, sigma_min, sigma_max)
    if label == "Polyexponential":
        return get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0)
    if label == "SGM Uniform":
        start, end = inner.sigma_to_t(torch.tensor(sigma_max)), inner.sigma_to_t(torch.tensor(sigma_min))
        return torch.FloatTensor([inner.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]] + [0.0])
    if label == "KL Optimal":
        alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
        step_indices = torch.arange(n + 1)
        return torch.tan(step_indices / n * alpha_min + (1.0 - step_indices / n) * alpha_max)
    if label == "Align Your Steps":
        sigmas = ([14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029] if sdxl else
                  [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029])
        if n != len(sigmas):
            xs, ys = np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1])
            sigmas = np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy(), [0.0])
        else:
            sigmas.append(0.0)
        return torch.FloatTensor(sigmas)
    if label == "Simple":
        ss = len(inner.sigmas) / n
        return torch.FloatTensor([float(inner.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if label == "Normal":
        start, end = inner.sigma_to_t(torch.tensor(sigma_max)), inner.sigma_to_t(torch.tensor(sigma_min))
        return torch.FloatTensor([inner.t_to_sigma(ts) for ts in torch.linspace(start, end, n)] + [0.0])
    if label == "DDIM":
        sigs, ss, x = [], max(len(inner.sigmas) // n, 1), 1
        while x < len(inner.sigmas):
            sigs += [float(inner.sigmas[x])]
            x += ss
        return torch.FloatTensor(sigs[::-1] + [0.0])
    if label == "Beta":
        timesteps = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return torch.FloatTensor([sigma_min + (x * (sigma_max - sigma_min)) for x in timesteps] + [0.0])
    raise AssertionError(label)


def a1111_get_sigmas(label, steps, inner, discard_next_to_last_sigma=False, sdxl=False):
    """KDiffusionSampler.get_sigmas: one more step, then drop the next-to-last sigma, for DPM2 and 3M SDE."""
    sigmas = a1111_sigmas(label, steps + 1 if discard_next_to_last_sigma else steps, inner, sdxl)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard_next_to_last_sigma else sigmas


def _scheduler_acp():
    return make_scheduler("Euler", SD_SCHEDULER_CONFIG).alphas_cumprod


def test_the_issue_lists_are_all_here():
    assert ISSUE_SAMPLERS <= set(SAMPLER_NAMES)
    assert SCHEDULE_NAMES == ISSUE_SCHEDULES


@pytest.mark.parametrize("steps", [1, 4, 10, 11, 25])
@pytest.mark.parametrize("label", [s for s in ISSUE_SCHEDULES if s != AUTOMATIC])
@pytest.mark.parametrize("sdxl", [False, True])
def test_each_schedule_equals_a1111s_formula(label, steps, sdxl):
    if label == "KL Optimal" and steps == 1:
        pass  # A1111's formula is defined for one step too
    acp = _scheduler_acp()
    ours = schedule_sigmas(label, steps, acp, sdxl=sdxl)
    theirs = a1111_sigmas(label, steps, KDiscrete(acp), sdxl=sdxl)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", ["Karras", "Exponential", "Uniform", "KL Optimal"])
def test_discarding_the_penultimate_sigma_as_a1111_does(label):
    acp = _scheduler_acp()
    torch.testing.assert_close(schedule_sigmas(label, 8, acp, discard_penultimate=True),
                               a1111_get_sigmas(label, 8, KDiscrete(acp), discard_next_to_last_sigma=True).float())


PAIRS = [(s, sch) for s in SAMPLER_NAMES for sch in schedules_for(s)]


@pytest.mark.parametrize("sampler,schedule", PAIRS)
def test_each_scheduler_steps_through_a1111s_sigmas(sampler, schedule):
    """The diffusers scheduler we make steps through exactly the sigmas A1111's sampler would (Heun and DPM2 visit
    each twice); Automatic is the sampler's own default, as A1111's sampler options say."""
    label = effective_schedule(sampler, schedule)
    s = make_scheduler(sampler, SD_SCHEDULER_CONFIG, schedule, seed=1)
    s.set_timesteps(10)
    assert s.config.beta_schedule == "scaled_linear"
    if label == AUTOMATIC:  # a timestep sampler (or UniPC's own spacing): diffusers' own steps
        assert len(s.timesteps) >= 10
        return
    want = a1111_get_sigmas(label, 10, KDiscrete(s.alphas_cumprod), SAMPLERS[sampler].discard_penultimate).float()
    got = torch.unique_consecutive(s.sigmas.float())
    if label == "KL Optimal" and sampler in ("DPM2", "DPM2 a"):
        want[-1] = 0.0  # DPM2's doubled last step ends at zero in diffusers; A1111's ends at sigma_min
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.all(s.timesteps[:-1] >= s.timesteps[1:] - 1), "timesteps go down (DPM2 a rounds half of them)"


def test_automatic_is_the_samplers_a1111_default():
    assert effective_schedule("DPM++ 2M", AUTOMATIC) == "Karras"
    assert effective_schedule("DPM++ 2M SDE", AUTOMATIC) == "Exponential"
    assert effective_schedule("Euler a", AUTOMATIC) == "Uniform"
    assert effective_schedule("DDIM", AUTOMATIC) == AUTOMATIC


@pytest.mark.parametrize("name,pair", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")), ("dpm++ 2m  karras", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")), ("Euler a", ("Euler a", AUTOMATIC)),
    ("k_dpmpp_2m_ka", ("DPM++ 2M", "Karras")), ("k_euler_a", ("Euler a", AUTOMATIC)),
    ("Euler trailing", ("Euler", "SGM Uniform")), ("DPM++ 2M SGM Uniform", ("DPM++ 2M", "SGM Uniform")),
])
def test_names_of_before_the_split_still_load(name, pair):
    assert parse_sampler(name) == pair
    r = Txt2ImgRequest(sampler=name)
    assert (r.sampler, r.schedule) == pair


@pytest.mark.parametrize("schedule", ["karras", "Karras", "sgm_uniform", "SGMUniform", "align_your_steps", "normal"])
def test_schedule_ids_and_labels_both_parse(schedule):
    assert parse_sampler("Euler", schedule)[1] in SCHEDULE_NAMES


def test_what_cannot_run_is_refused_with_its_reason():
    with pytest.raises(UserError, match="takes no schedule type"):
        parse_sampler("DDIM", "Karras")
    with pytest.raises(UserError, match="names the Karras schedule but the schedule type is Exponential"):
        parse_sampler("DPM++ 2M Karras", "Exponential")
    with pytest.raises(UserError, match="DPM fast sampler is not available here: .*no diffusers"):
        parse_sampler("DPM fast")
    with pytest.raises(UserError, match="Unknown schedule type"):
        parse_sampler("Euler", "Cosine")
    with pytest.raises(UserError, match="Unknown sampler"):
        canonical_sampler("nope")
    with pytest.raises(ValueError, match="schedule\n.*The DDIM sampler .* takes no schedule type"):
        Txt2ImgRequest(sampler="DDIM", schedule="Karras")


def test_ddim_does_not_clip_sd_latents():
    assert make_scheduler("DDIM", SD_SCHEDULER_CONFIG).config.clip_sample is False


@pytest.mark.parametrize("name", ["TCD", "Euler trailing", "DPM++ 2M SGM Uniform", "LCM"])
def test_few_step_samplers_start_from_pure_noise(name):
    """Distilled models expect their first step at t=999; SD's own "leading" spacing starts at 751 for 4 steps."""
    s = make_scheduler(name, SD_SCHEDULER_CONFIG)
    s.set_timesteps(4)
    assert round(float(s.timesteps[0])) == 999
    leading = make_scheduler("DDIM", SD_SCHEDULER_CONFIG)
    leading.set_timesteps(4)
    assert int(leading.timesteps[0]) < 999


def test_the_sde_sampler_repeats_from_its_seed():
    a, b = (make_scheduler("DPM++ SDE", SD_SCHEDULER_CONFIG, seed=7) for _ in range(2))
    assert a.config.noise_sampler_seed == b.config.noise_sampler_seed == 7


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_and_schedule_type_draws_a_finite_picture(tiny_engine, sampler):
    """Every pair this server lists, on the tiny model: finite latents that decode to a picture."""
    model = tiny_engine.loadout.model
    pipe, hidden = model.pipe, model.pipe.text_encoder.config.hidden_size
    embeds = torch.randn(1, 77, hidden, generator=torch.Generator().manual_seed(0))
    for schedule in schedules_for(sampler):
        pipe.scheduler = make_scheduler(sampler, model.scheduler_config, schedule, seed=1)
        latents = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_inference_steps=2, guidance_scale=2.0,
                       width=64, height=64, output_type="latent", generator=torch.Generator().manual_seed(1)).images
        assert torch.isfinite(latents).all() and latents.std() > 0, (sampler, schedule)


@pytest.mark.parametrize("sampler,schedule", [("DPM++ 2M", "Automatic"), ("Euler a", "Align Your Steps"),
                                              ("DPM++ SDE", "Beta"), ("DDIM", "Automatic")])
def test_a_job_names_its_sampler_and_schedule(tiny_engine, sampler, schedule):
    result = tiny_engine.txt2img({"prompt": "x", "width": 64, "height": 64, "steps": 3, "guidance": 2.0,
                                  "sampler": sampler, "schedule": schedule, "seed": 1})
    pixels = np.asarray(result.images[0], dtype=np.float32)
    assert np.isfinite(pixels).all() and pixels.std() > 0
    assert (result.parameters["sampler"], result.parameters["schedule"]) == (sampler, schedule)
