"""What every task is: a validated request in, a typed output back, its own loop in between."""
from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.lora.tags import parse_prompt, strip_tags
from engine.requests import IMAGE_SLOTS, GenerationRequest, load_image, parse_request
from engine.tasks.context import DenoiseContext
from engine.text.prompts import CHUNK, tokenize


@dataclass
class TaskOutput:
    images: list  # PIL images
    steps_run: int
    steps_planned: int
    details: dict[str, Any] = field(default_factory=dict)  # for the readout: tiles, pass sizes...
    notices: list[str] = field(default_factory=list)
    extra_images: dict[str, list] = field(default_factory=dict)  # e.g. hires fix's base images


class Task(ABC):
    """One generation task. The constructor validates and normalises the request (snapped sizes, a concrete
    seed, the input image read) so a bad request fails before the device is touched; `run` does the work."""

    name: ClassVar[str]
    request_type: ClassVar[type[GenerationRequest]]
    takes_image: ClassVar[bool] = False

    def __init__(self, model, request: GenerationRequest | dict, image: Any = None):
        self.model = model
        if isinstance(request, dict):
            request = parse_request(self.request_type, request)
        self.image = None
        if self.takes_image:
            with IMAGE_SLOTS:  # decoded, then fitted by normalise: a waiting job keeps only what it will use
                self.read_inputs(image)
                request, self.notices = self.normalise(request)
        else:
            request, self.notices = self.normalise(request)
        self.request = request.with_seed()
        self.loras = parse_prompt(self.request.prompt)[1]  # <lora:name:weight> tags; the Engine fuses them
        self.details: dict[str, Any] = {}  # what the Engine did for this job (a LoRA change), for the readout
        self.notices += prompt_notices(model, self.request) + few_step_notices(model, self.request, self.loras)

    def read_inputs(self, image: Any) -> None:
        """Decode what the caller sent into `self.image` (normalise fits it)."""
        self.image = load_image(image)

    @abstractmethod
    def normalise(self, request) -> tuple[GenerationRequest, list[str]]:
        """The request as it will run (sizes snapped to the model's multiple), and what changed."""

    def memory_need(self) -> tuple[int, int, int] | None:
        """(width, height, batch) of the largest UNet pass, for the memory check; None: no check."""
        return None

    @property
    def inputs_key(self) -> str:
        """The input image's identity, for the result cache."""
        if self.image is None:
            return ""
        return f"{self.image.size}:{hashlib.sha256(self.image.tobytes()).hexdigest()}"

    @abstractmethod
    def run(self, runtime, ctx: DenoiseContext) -> TaskOutput:
        """Do the work: numbered steps, progress through `ctx`, stage times on `ctx.timer`."""


def prompt_notices(model, request) -> list[str]:
    """A prompt over 75 tokens is not cut: it is encoded in chunks of 75 (engine/prompts.py). Say how many, since
    each chunk lengthens what the UNet reads (and on OpenVINO a new chunk count is a new shape to compile). A
    prompt the parser cannot take (too long) fails here, before the device is touched."""
    tokenizer, words = model.pipe.tokenizer, model.embeddings.words.get("text_encoder")
    notices = []
    for label, text in (("Prompt", strip_tags(request.prompt)), ("Negative prompt", request.negative_prompt)):
        chunks = tokenize(tokenizer, text, words)
        if len(chunks.tokens) > 1:
            notices.append(f"{label} is {chunks.count} tokens: encoded as {len(chunks.tokens)} chunks of up to "
                           f"{CHUNK} (BREAK starts a new one), as AUTOMATIC1111 does.")
    return notices


DISTILLED = re.compile(r"lcm|turbo|lightning|hyper|tcd|dmd", re.IGNORECASE)


def few_step_notices(model, request, loras) -> list[str]:
    """LCM and TCD draw the right picture only with a model or LoRA distilled for them; say so where neither
    the model's name nor a LoRA's suggests one, instead of returning a wrong picture silently."""
    if request.sampler not in ("LCM", "TCD") or DISTILLED.search(model.name) \
            or any(DISTILLED.search(u.name) for u in loras):
        return []
    return [f"The {request.sampler} sampler needs an LCM/TCD-distilled model or LoRA; {model.name} does not look "
            f"like one and no such LoRA is in the prompt, so expect a wrong picture. Add one with <lora:NAME:1>."]
