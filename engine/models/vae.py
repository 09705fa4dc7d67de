"""A VAE loaded in place of a model's own: a diffusers folder, an A1111 single file, or a hub id."""
from __future__ import annotations

from pathlib import Path

from engine.errors import ModelLoadError
from engine.models.sources import (VAE_DIR, ModelSource, available_vaes, folder_of, guarded, model_identity,
                                   read_state_dict, resolve_source)


def load_vae(text: "str | ModelSource", like, *, models_dir: Path | None = None, allow_any_path: bool = True,
             allow_hub: bool = True):
    """(AutoencoderKL, identity) from a diffusers folder, a single file (A1111's .safetensors/.pt VAEs, in LDM or
    diffusers key names, read into `like`'s architecture) or a hub id."""
    from diffusers import AutoencoderKL

    source = resolve_vae(text, models_dir=models_dir, allow_any_path=allow_any_path, allow_hub=allow_hub)
    identity = model_identity(source) or f"hub-{source.value}"
    if source.kind in ("folder", "hub"):
        return guarded(lambda: AutoencoderKL.from_pretrained(folder_of(source)).eval(), source), identity
    if source.kind != "file":
        raise ModelLoadError(f"{text!r} is not a VAE: give a file or folder under {VAE_DIR}/, or a hub id.")

    def read():
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = read_state_dict(source.path)
        state = state.get("state_dict", state)
        if not any("down_blocks" in k for k in state):  # LDM names (A1111's VAE files): map to diffusers'
            state = convert_ldm_vae_checkpoint(state, dict(like.config))
        vae = AutoencoderKL.from_config(like.config)
        vae.load_state_dict(state, strict=True)
        return vae.eval()

    return guarded(read, source), identity


def resolve_vae(text: "str | ModelSource", *, models_dir: Path | None = None, allow_any_path: bool = True,
                allow_hub: bool = True) -> ModelSource:
    """A VAE's source: for remote users, a name the VAE picker lists (or a hub id, where allowed)."""
    return resolve_source(text, models_dir=models_dir, allow_any_path=allow_any_path, allow_hub=allow_hub,
                          listed=available_vaes)
