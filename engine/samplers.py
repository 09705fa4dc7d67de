"""Samplers and schedule types as AUTOMATIC1111 1.9+ names them, made from diffusers' schedulers.

A sampler is the solver (Euler, DPM++ 2M, ...); a schedule type is the list of noise levels (sigmas) it steps
through. The sigma schedules follow A1111's formulas (modules/sd_schedulers.py and k-diffusion's get_sigmas_*) on
the model's own noise levels; a diffusers scheduler is made to step through exactly those (its Karras hook is
handed our list). "Automatic" is the sampler's own default, as in A1111 (Karras for DPM++ 2M, Exponential for the
SDE multistep samplers, the model's uniform schedule otherwise). The timestep samplers (DDIM, PLMS, DDPM, LCM, TCD)
take no schedule type: asking for one is refused with the reason, never silently replaced.

Names of before the split ("DPM++ 2M Karras", and our "Euler trailing") still parse, into the pair.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.errors import UserError

AUTOMATIC = "Automatic"
# A1111's labels, in its order, and its ids (the API's /schedulers "name").
SCHEDULES: dict[str, str] = {
    "Automatic": "automatic", "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
    "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform", "KL Optimal": "kl_optimal",
    "Align Your Steps": "align_your_steps", "Simple": "simple", "Normal": "normal", "DDIM": "ddim", "Beta": "beta",
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULES)
DEFAULT_RHO = {"Karras": 7.0, "Polyexponential": 1.0}
BETA_ALPHA = BETA_BETA = 0.6  # A1111's defaults for the Beta schedule (beta_dist_alpha / beta_dist_beta)


@dataclass(frozen=True)
class Sampler:
    scheduler_class: str  # diffusers
    config: dict = field(default_factory=dict)
    automatic: str = "Uniform"  # what Automatic means for it, as A1111's sampler options say
    takes_schedule: bool = True  # False: steps through the model's timesteps (Automatic only)
    discard_penultimate: bool = False  # A1111's discard_next_to_last_sigma
    aliases: tuple[str, ...] = ()
    about: str = ""


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
SAMPLERS: dict[str, Sampler] = {
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler", _DPMPP, "Karras", aliases=("k_dpmpp_2m",)),
    "DPM++ SDE": Sampler("DPMSolverSDEScheduler", {}, "Karras", aliases=("k_dpmpp_sde",)),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", _SDE, "Exponential", aliases=("k_dpmpp_2m_sde",)),
    "DPM++ 2M SDE Heun": Sampler("DPMSolverMultistepScheduler", {**_SDE, "solver_type": "heun"}, "Exponential",
                                 aliases=("k_dpmpp_2m_sde_heun",)),
    "DPM++ 2S a": Sampler("DPMSolverSinglestepScheduler", {**_SDE, "lower_order_final": True}, "Karras",
                          aliases=("k_dpmpp_2s_a",),
                          about="diffusers' stochastic single-step DPM-Solver++(2S): noise is added each step "
                                "as in an SDE rather than k-diffusion's ancestral step"),
    "DPM++ 3M SDE": Sampler("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3}, "Exponential",
                            discard_penultimate=True, aliases=("k_dpmpp_3m_sde",)),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral")),
    "Euler": Sampler("EulerDiscreteScheduler", aliases=("k_euler",)),
    "LMS": Sampler("LMSDiscreteScheduler", aliases=("k_lms",)),
    "Heun": Sampler("HeunDiscreteScheduler", aliases=("k_heun",)),
    "DPM2": Sampler("KDPM2DiscreteScheduler", {}, "Karras", discard_penultimate=True, aliases=("k_dpm_2",)),
    "DPM2 a": Sampler("KDPM2AncestralDiscreteScheduler", {}, "Karras", discard_penultimate=True,
                      aliases=("k_dpm_2_a",)),
    # UniPC steps through sigmas in diffusers: it takes every schedule type; Automatic is its own spacing.
    "UniPC": Sampler("UniPCMultistepScheduler", {}, AUTOMATIC),
    # SD latents are not in [-1, 1]: DDIM's default clip_sample=True would clip them (real SD configs say False).
    "DDIM": Sampler("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, takes_schedule=False),
    "PLMS": Sampler("PNDMScheduler", {"skip_prk_steps": True}, takes_schedule=False),
    "DDPM": Sampler("DDPMScheduler", {"clip_sample": False}, takes_schedule=False),
    # Few-step samplers for distilled models and LoRAs (LCM, TCD).
    "LCM": Sampler("LCMScheduler", takes_schedule=False),
    "TCD": Sampler("TCDScheduler", takes_schedule=False),
}
# A1111 samplers with no diffusers scheduler: named, with the reason, so a request for one gets it.
UNAVAILABLE: dict[str, str] = {
    "DPM fast": "k-diffusion's adaptive-order DPM-Solver has no diffusers scheduler",
    "DPM adaptive": "k-diffusion's adaptive-step DPM-Solver has no diffusers scheduler",
    "Restart": "the Restart sampler has no diffusers scheduler",
    "DDIM CFG++": "CFG++ changes the guidance inside the step; diffusers' DDIM has no such mode",
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
DEFAULT_SAMPLER = "DPM++ 2M"
DEFAULT_SCHEDULE = AUTOMATIC
# Our names of before A1111's split: few-step "trailing" spacing starts at t=999, as SGM Uniform does.
_LEGACY_SUFFIXES = {"trailing": "SGM Uniform"}


def _key(text: str) -> str:
    return " ".join(str(text).replace("_", " ").split()).lower()


_SAMPLER_KEYS = {_key(n): n for n in SAMPLERS} | {_key(a): n for n, s in SAMPLERS.items() for a in s.aliases}
_SCHEDULE_KEYS = {_key(label): label for label in SCHEDULES} | {_key(i): label for label, i in SCHEDULES.items()} \
    | {"sgmuniform": "SGM Uniform"}


def canonical_schedule(name: str | None) -> str:
    if name is None or not str(name).strip():
        return AUTOMATIC
    label = _SCHEDULE_KEYS.get(_key(name))
    if label is None:
        raise UserError(f"Unknown schedule type {name!r}; choose one of: {', '.join(SCHEDULE_NAMES)}.")
    return label


def _split(name: str) -> tuple[str, str | None]:
    """(sampler, schedule named in the name or None): 'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras')."""
    key = _key(name)
    if key in _SAMPLER_KEYS:
        return _SAMPLER_KEYS[key], None
    for suffix, label in [(_key(s), s) for s in SCHEDULES if s != AUTOMATIC] + list(_LEGACY_SUFFIXES.items()):
        head = key.removesuffix(" " + suffix)
        if head != key and head in _SAMPLER_KEYS:
            return _SAMPLER_KEYS[head], label
    if key.endswith(" ka") and key[:-3] in _SAMPLER_KEYS:  # A1111's old aliases: k_dpmpp_2m_ka
        return _SAMPLER_KEYS[key[:-3]], "Karras"
    for known, why in UNAVAILABLE.items():
        if key == _key(known):
            raise UserError(f"The {known} sampler is not available here: {why}. "
                            f"Samplers: {', '.join(SAMPLER_NAMES)}.")
    raise UserError(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}.")


def parse_sampler(name: str, schedule: str | None = None) -> tuple[str, str]:
    """(sampler, schedule type) by their canonical names, or a UserError saying why the pair cannot run.
    A schedule in the sampler's name ('DPM++ 2M Karras') counts when `schedule` is empty or Automatic."""
    sampler, named = _split(name)
    wanted = canonical_schedule(schedule)
    if named is not None and wanted not in (AUTOMATIC, named):
        raise UserError(f"Sampler {name!r} names the {named} schedule but the schedule type is {wanted}; "
                        f"choose the sampler {sampler!r} with one schedule type.")
    wanted = named or wanted
    if not SAMPLERS[sampler].takes_schedule and wanted != AUTOMATIC:
        raise UserError(f"The {sampler} sampler steps through the model's own timesteps and takes no schedule "
                        f"type ({wanted} asked): use Automatic, or a sampler such as Euler or DPM++ 2M.")
    return sampler, wanted


def with_sampler_pair(data: Any) -> Any:
    """A pydantic before-validator's data with 'DPM++ 2M Karras' (PNG info, presets, clients of before A1111 1.9)
    split into "sampler" and "schedule"; left as it is where they do not parse (the field validators say why)."""
    if isinstance(data, dict) and isinstance(data.get("sampler"), str):
        try:
            sampler, schedule = parse_sampler(data["sampler"], data.get("schedule"))
        except UserError:
            return data
        data = {**data, "sampler": sampler, "schedule": schedule}
    return data


def canonical_sampler(name: str) -> str:
    """The sampler's canonical name; a name with a schedule in it keeps it ('DPM++ 2M Karras')."""
    return sampler_label(*parse_sampler(name))


def sampler_label(sampler: str, schedule: str) -> str:
    """One name for the pair, as A1111 named them before the split: 'DPM++ 2M Karras', 'Euler a'."""
    return sampler if schedule == AUTOMATIC else f"{sampler} {schedule}"


def schedules_for(sampler: str) -> tuple[str, ...]:
    return SCHEDULE_NAMES if SAMPLERS[_split(sampler)[0]].takes_schedule else (AUTOMATIC,)


def effective_schedule(sampler: str, schedule: str) -> str:
    """What Automatic stands for with this sampler (itself for the timestep samplers and UniPC)."""
    spec = SAMPLERS[sampler]
    if not spec.takes_schedule:
        return AUTOMATIC
    return spec.automatic if schedule == AUTOMATIC else schedule


# -- the sigma schedules, as A1111 computes them


class NoiseLevels:
    """The model's discrete noise levels and k-diffusion's conversions between a (fractional) timestep and a
    sigma: log-linear interpolation between neighbouring levels (k_diffusion.external.DiscreteSchedule)."""

    def __init__(self, alphas_cumprod):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        self.sigmas = ((1 - acp) / acp) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def t_to_sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigma_to_t(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)


# Align Your Steps' 10-step lists (NVIDIA's published values, as A1111 has them).
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def _with_zero(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _schedule(label: str, n: int, levels: NoiseLevels, sdxl: bool) -> torch.Tensor:
    lo, hi = levels.sigma_min, levels.sigma_max
    if label == "Uniform":
        return _with_zero(levels.t_to_sigma(torch.linspace(len(levels.sigmas) - 1, 0, n)))
    if label == "Karras":
        rho = DEFAULT_RHO["Karras"]
        ramp = torch.linspace(0, 1, n)
        return _with_zero((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)
    if label == "Exponential":
        return _with_zero(torch.linspace(math.log(hi), math.log(lo), n).exp())
    if label == "Polyexponential":
        ramp = torch.linspace(1, 0, n) ** DEFAULT_RHO["Polyexponential"]
        return _with_zero(torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)))
    if label in ("SGM Uniform", "Normal"):
        start, end = levels.sigma_to_t(torch.tensor(hi)), levels.sigma_to_t(torch.tensor(lo))
        ts = torch.linspace(float(start), float(end), n + 1)[:-1] if label == "SGM Uniform" \
            else torch.linspace(float(start), float(end), n)
        return _with_zero(torch.stack([levels.t_to_sigma(t) for t in ts]))
    if label == "KL Optimal":  # ends at sigma_min, not zero, as A1111's does
        a_min, a_max = torch.arctan(torch.tensor(lo)), torch.arctan(torch.tensor(hi))
        i = torch.arange(n + 1)
        return torch.tan(i / n * a_min + (1.0 - i / n) * a_max).float()
    if label == "Align Your Steps":
        table = AYS_SDXL if sdxl else AYS_SD15
        if n == len(table):
            return _with_zero(table)
        xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
        return _with_zero(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy())
    if label == "Simple":
        step = len(levels.sigmas) / n
        return _with_zero([float(levels.sigmas[-(1 + int(x * step))]) for x in range(n)])
    if label == "DDIM":
        stride = max(len(levels.sigmas) // n, 1)
        return _with_zero([float(levels.sigmas[x]) for x in range(1, len(levels.sigmas), stride)][::-1])
    if label == "Beta":
        from scipy import stats

        ts = [stats.beta.ppf(x, BETA_ALPHA, BETA_BETA) for x in 1 - np.linspace(0, 1, n)]
        return _with_zero([lo + x * (hi - lo) for x in ts])
    raise ValueError(f"no sigma formula for {label!r}")


def schedule_sigmas(schedule: str, steps: int, alphas_cumprod, *, sdxl: bool = False,
                    discard_penultimate: bool = False) -> torch.Tensor:
    """The noise levels A1111 samples `steps` steps through (the last one the end, 0 except for KL Optimal)."""
    levels = NoiseLevels(alphas_cumprod)
    sigmas = _schedule(schedule, steps + 1 if discard_penultimate else steps, levels, sdxl)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard_penultimate else sigmas


# -- diffusers schedulers that step through them


def _step_through(scheduler, sigmas_for) -> None:
    """Make `scheduler.set_timesteps(n)` use sigmas_for(n). Schedulers with a Karras option build their whole
    state (Heun's and DPM2's doubled steps, DPM-Solver's lambdas) from what _convert_to_karras returns, so it is
    handed our list; the others get their sigmas and timesteps replaced after the fact."""
    original, hooked = scheduler.set_timesteps, "use_karras_sigmas" in scheduler.config
    levels = None if hooked else NoiseLevels(scheduler.alphas_cumprod)

    def set_timesteps(num_inference_steps=None, device=None, **kwargs):
        sigmas = sigmas_for(int(num_inference_steps))
        if hooked:
            scheduler._convert_to_karras = lambda in_sigmas, num_inference_steps=None: sigmas[:-1].double().numpy()
            original(num_inference_steps, device=device, **kwargs)
        else:
            original(num_inference_steps, device=device, **kwargs)
            scheduler.sigmas = sigmas.clone()
            scheduler.timesteps = levels.sigma_to_t(sigmas[:-1]).to(device=device)
        if float(sigmas[-1]) != 0.0 and float(scheduler.sigmas[-2]) != 0.0:
            scheduler.sigmas[-1] = sigmas[-1]  # KL Optimal ends at sigma_min; diffusers appended a zero

    scheduler.set_timesteps = set_timesteps


MODEL_SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing")


def make_scheduler(name: str, base_config, schedule: str | None = None, *, sdxl: bool = False,
                   seed: int | None = None):
    """A fresh scheduler of the named kind on the model's own noise schedule (betas, prediction type), stepping
    through the schedule type's sigmas."""
    import diffusers

    sampler, schedule = parse_sampler(name, schedule)
    spec = SAMPLERS[sampler]
    overrides = dict(spec.config)
    if spec.scheduler_class == "DPMSolverSDEScheduler":
        if seed is not None:
            overrides["noise_sampler_seed"] = seed  # its Brownian tree is seeded by itself, not by the generator
        # torchsde warns on every step that float32 sigma_min is a hair below its interval's start
        warnings.filterwarnings("ignore", message="Should have", module="torchsde")
    label = effective_schedule(sampler, schedule)
    config = dict(base_config)
    if label != AUTOMATIC:  # none of the model's own sigma options: the Karras hook _step_through hands ours to
        config = {k: v for k, v in config.items() if k not in MODEL_SIGMA_OPTIONS}
        overrides["use_karras_sigmas"] = True
    try:
        cls = getattr(diffusers, spec.scheduler_class)
    except (AttributeError, ImportError) as e:  # a scheduler whose extra package is missing
        raise UserError(f"The {sampler} sampler cannot be made here: {e}") from None
    scheduler = cls.from_config(config, **overrides)
    if label != AUTOMATIC:
        _step_through(scheduler, lambda n: schedule_sigmas(label, n, scheduler.alphas_cumprod, sdxl=sdxl,
                                                           discard_penultimate=spec.discard_penultimate))
    return scheduler
