"""Tiny autoencoders (TAESD, TAESDXL): loading one, which latents it decodes, and the Engine's slot for one."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import ModelLoadError, one_line
from engine.models.builtin import BUILTIN_SEED, TINY_AUTOENCODERS
from engine.models.sources import available_tiny_autoencoders, folder_of, is_network_error, resolve_source

if TYPE_CHECKING:
    from engine.models.loading import LoadedModel


def tiny_autoencoder_family(text: str, latent_channels: int = 4) -> str:
    """Which models' latents a tiny autoencoder decodes: "sdxl" (TAESDXL) or "sd1" (TAESD, SD 1.x/2.x).

    TAESD and TAESDXL share one architecture and config; only the name tells them apart
    (builtin:taesdxl, madebyollin/taesdxl, a folder named like taesdxl), so a name with "xl" is TAESDXL."""
    if latent_channels != 4:
        return f"{latent_channels}-channel latents"
    return "sdxl" if "xl" in Path(text.replace("builtin:", "")).name.lower() else "sd1"


def tiny_autoencoder_mismatch(family: str, model: "LoadedModel") -> str | None:
    """Why a tiny autoencoder of `family` cannot decode `model`'s latents, or None when it can."""
    wanted = "sdxl" if model.is_sdxl else "sd1"
    if family == wanted:
        return None
    names = {"sdxl": "TAESDXL (SDXL latents)", "sd1": "TAESD (SD 1.x/2.x latents)"}
    return (f"the tiny autoencoder is {names.get(family, family)} and this model is {model.family}: it needs "
            f"{names[wanted]}, or its colours come out wrong")


def load_tiny_autoencoder(text: str, *, models_dir: Path | None = None, allow_any_path: bool = True,
                          allow_hub: bool = True):
    """An AutoencoderTiny from builtin:taesd[xl], a local diffusers folder, or a hub id (e.g. madebyollin/taesd)."""
    from diffusers import AutoencoderTiny

    if text is not None and not isinstance(text, str):
        raise ModelLoadError(f"A tiny autoencoder name must be text, not {type(text).__name__}.")
    text = (text or "").strip()
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        if name not in TINY_AUTOENCODERS:
            raise ModelLoadError(f"Unknown built-in tiny autoencoder {text!r}; built-ins are: "
                                 + ", ".join(f"builtin:{n}" for n in TINY_AUTOENCODERS) + ".")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED + sum(map(ord, name)))
            return AutoencoderTiny().eval()
    source = resolve_source(text, models_dir=models_dir, allow_any_path=allow_any_path, allow_hub=allow_hub,
                            listed=available_tiny_autoencoders)
    if source.kind == "file":
        raise ModelLoadError(f"{text!r}: a tiny autoencoder must be a diffusers folder or hub id, not a single file.")
    try:
        return AutoencoderTiny.from_pretrained(folder_of(source)).eval()
    except Exception as e:
        if is_network_error(e):
            raise ModelLoadError(f"Could not download the tiny autoencoder {text!r}: no network, and it is not "
                                 f"in the local cache. Pass a local folder with --taesd.") from e
        raise ModelLoadError(f"Could not load the tiny autoencoder {text!r}: {one_line(e)}") from e


@dataclass(frozen=True)
class TinyAutoencoderSlot:
    """The tiny autoencoder the user picked (or none): the module, the latents it decodes, its name as given."""

    module: Any = None  # diffusers AutoencoderTiny
    family: str | None = None
    name: str | None = None

    @classmethod
    def of(cls, text: str | None, models_dir: Path | None, **allowed) -> "TinyAutoencoderSlot":
        """Loaded from `text` (None or "": an empty slot); `allowed`: load_tiny_autoencoder's path rules."""
        if not text:
            return cls()
        module = load_tiny_autoencoder(text, models_dir=models_dir, **allowed)
        return cls(module, tiny_autoencoder_family(text, module.config.latent_channels), text)

    def why_not(self, model: "LoadedModel | None") -> str | None:
        """Why the tiny autoencoder option cannot act with `model`, or None when it can."""
        if self.module is None:
            return "needs a tiny autoencoder: pick one on the Engine tab or start with --taesd PATH"
        return tiny_autoencoder_mismatch(self.family, model) if model is not None else None

    def give(self, model: "LoadedModel", device, usable: bool) -> None:
        """Hand it to `model` (on `device`) where it can act, else take it away."""
        model.taesd = self.module.to(device) if usable and self.module is not None else None
        model.taesd_name = self.name if model.taesd is not None else None
