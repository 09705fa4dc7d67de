"""Sampler names as users know them (A1111 style) -> diffusers scheduler configs."""
from __future__ import annotations

from engine.errors import UserError

# name -> (diffusers scheduler class name, config overrides); diffusers imports only when one is made.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    # SD latents are not in [-1, 1]: DDIM's default clip_sample=True would clip them (real SD configs say False).
    "DDIM": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "LCM": ("LCMScheduler", {}),
    # Few-step samplers for distilled models and LoRAs (LCM, TCD, SD-Turbo, Lightning, Hyper-SD). "Trailing"
    # spacing starts at t=999, the pure-noise end these models are distilled from (leading starts lower).
    "TCD": ("TCDScheduler", {}),
    "Euler trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "Euler a trailing": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "DPM++ 2M trailing": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                          "use_karras_sigmas": False, "timestep_spacing": "trailing"}),
}

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
DEFAULT_SAMPLER = "DPM++ 2M Karras"


def canonical_sampler(name: str) -> str:
    """Accept any capitalisation / spacing of a known name; anything else is a clear error."""
    wanted = " ".join(str(name).split()).lower()
    for known in SAMPLERS:
        if known.lower() == wanted:
            return known
    raise UserError(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}.")


def make_scheduler(name: str, base_config):
    """A fresh scheduler of the named kind, keeping the model's own noise schedule (betas, prediction type)."""
    import diffusers

    class_name, overrides = SAMPLERS[canonical_sampler(name)]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)
