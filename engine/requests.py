"""Typed, validated generation requests.

Validation happens here, before any work starts; every bad field gets one clear line.
Sizes are snapped to the model's multiple (the VAE scale factor) and the snap is reported.
"""
from __future__ import annotations

import random
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError
from .schedulers import DEFAULT_SAMPLER, canonical_sampler

MIN_SIZE = 64
MAX_SIZE = 2048
MAX_STEPS = 150
MAX_BATCH = 8
MAX_SEED = 2**32 - 1


class GenerationRequest(BaseModel):
    """Fields shared by every task."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance: float = Field(7.0, ge=0.0, le=30.0)
    sampler: str = DEFAULT_SAMPLER
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        try:
            return canonical_sampler(value)
        except UserError as e:
            raise ValueError(str(e)) from None

    def with_seed(self):
        """Resolve seed -1 to a concrete random seed, so the result can report (and repeat) it."""
        if self.seed >= 0:
            return self
        return self.model_copy(update={"seed": random.SystemRandom().randint(0, MAX_SEED)})


class Txt2ImgRequest(GenerationRequest):
    width: int = Field(512, ge=MIN_SIZE, le=MAX_SIZE)
    height: int = Field(512, ge=MIN_SIZE, le=MAX_SIZE)

    def snapped(self, multiple: int) -> tuple["Txt2ImgRequest", list[str]]:
        """Round width/height to the model's multiple; the notices say what changed."""
        notices = []
        update = {}
        for name in ("width", "height"):
            value = getattr(self, name)
            snapped = snap_size(value, multiple)
            if snapped != value:
                update[name] = snapped
                notices.append(f"{name} {value} was snapped to {snapped} (a multiple of {multiple}).")
        return (self.model_copy(update=update) if update else self), notices


def snap_size(value: int, multiple: int) -> int:
    """Nearest multiple (ties go up), never below one multiple."""
    return max(multiple, int((value + multiple / 2) // multiple) * multiple)


_R = TypeVar("_R", bound=BaseModel)


def parse_request(cls: type[_R], data: dict[str, Any]) -> _R:
    """Build a request from untrusted input; a bad field becomes one readable sentence."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise UserError(describe_validation_error(e, data)) from None


def describe_validation_error(error: ValidationError, data: dict[str, Any] | None = None) -> str:
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        got = ""
        if data is not None and err["loc"] and err["loc"][0] in data:
            got = f" (got {data[err['loc'][0]]!r})"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "is not a known field"
        lines.append(f"{field}: {msg}{got}")
    return "Invalid request: " + "; ".join(lines)
