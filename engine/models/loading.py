"""Resolve a model source and load it as a diffusers pipeline.

Sources: `builtin:NAME` (built here from a fixed seed), a local diffusers folder, a
single `.safetensors` / `.ckpt` file, or a hub id. The family (sd1, sd2, sdxl) is read
from the files and picks the matching diffusers pipeline class.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from engine.errors import ModelLoadError, one_line
from engine.lora import files as lora_files
from engine.lora import plan as lora_plan
from engine.lora.fuse import FusedLoras
from engine.lora.plan import component_identity
from engine.lora.tags import resolve as resolve_lora
from engine.models.builtin import build_builtin
from engine.models.families import checkpoint_keys, family_of_folder, family_of_keys
from engine.models.sources import ModelSource, guarded, is_network_error, model_identity, resolve_source
from engine.models.vae import load_vae, resolve_vae
from engine.options import Optimizations
from engine.store.caches import PromptCache
from engine.text import embeddings as text_embeddings
from engine.text.embeddings import EmbeddingSet


@dataclass
class LoadedModel:
    pipe: Any  # a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline
    family: str
    name: str
    source: ModelSource
    load_seconds: float
    scheduler_config: dict = field(default_factory=dict)
    identity: str | None = None  # stable key of the weights, for runtime caches
    skeleton: frozenset[str] = frozenset()  # components loaded without weights (a runtime supplies them)
    derived: dict[str, Any] = field(default_factory=dict)  # task -> pipeline sharing these components
    # Set by the Engine: the options in effect, the prompt-embedding cache, the tiny autoencoder (TAESD).
    options: Optimizations = field(default_factory=Optimizations)
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    taesd: Any = None  # a diffusers AutoencoderTiny
    taesd_name: str | None = None  # which tiny autoencoder, for the result cache's key
    loras: FusedLoras = field(default_factory=FusedLoras)  # what is fused into these weights
    vae: str | None = None  # a VAE loaded in place of the model's own (its name as given)
    vae_source: ModelSource | None = None  # where it was loaded from: a reload loads exactly that
    vae_identity: str | None = None
    embeddings: EmbeddingSet = field(default_factory=EmbeddingSet)  # textual inversions in the token tables

    def component_identity(self, component: str) -> str | None:
        """Cache identity of one component's weights as they are now (the LoRAs fused into it and the embeddings
        in its token table included)."""
        if component == "vae" and self.vae:
            return self.vae_identity
        fused = component_identity(self.identity, [(p.lora, p.weight) for p in self.loras.plans], component)
        return text_embeddings.identity(fused, self.embeddings.key, component)

    @property
    def weights_key(self) -> str:
        """Identity of all the weights that run, for the result cache."""
        vae = f"|vae:{self.vae_identity or self.vae}" if self.vae else ""
        emb = f"|emb:{self.embeddings.key}" if self.embeddings.key else ""
        return f"{self.identity or self.name}|{self.loras.key()}{vae}{emb}"

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    @property
    def is_inpainting(self) -> bool:
        """An inpainting checkpoint: its UNet reads the latents, the mask and the masked picture (9 channels)."""
        return getattr(self.pipe.unet.config, "in_channels", 4) == 9

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"


def _skeleton_from_folder(folder: Path, names: frozenset[str]) -> dict[str, Any]:
    """Weightless components built from the folder's configs, to pass into from_pretrained."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = {}
    with torch.device("meta"):
        for name in names:
            sub = folder / name
            if not (sub / "config.json").is_file():
                continue
            if name == "unet":
                out[name] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sub))
            elif name == "vae":
                out[name] = AutoencoderKL.from_config(AutoencoderKL.load_config(sub))
            elif name == "text_encoder":
                out[name] = CLIPTextModel(CLIPTextConfig.from_pretrained(sub))
            elif name == "text_encoder_2":
                out[name] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(sub))
    return out


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _family_kwargs(family: str) -> dict:
    return {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}


def load_model(text: "str | ModelSource", *, models_dir: Path | None = None, allow_any_path: bool = True,
               allow_hub: bool = True, config_dir: str | Path | None = None,
               skeleton_for: Callable[[Callable[[str], str | None]], frozenset[str]] | None = None,
               loras: tuple = (), keep_lora_originals: bool = True,
               vae: "str | ModelSource | None" = None) -> LoadedModel:
    """Load a model source as a pipeline on CPU in fp32, with `loras` (lora.LoraUse) fused; runtimes move and
    convert it.

    The embeddings in <models-dir>/embeddings that fit go into the text encoders' token tables
    (engine/text/embeddings.py). Without `keep_lora_originals` the weights the LoRAs replace are not kept (a
    runtime that converts them reloads on a LoRA change). `skeleton_for(identity_of)` names the components a runtime already
    has in its cache (identity_of(component) is the component's cache identity, LoRAs included): those
    are built without weights (builtins and folders), so no PyTorch copy is ever made.
    """
    source = resolve_source(text, models_dir=models_dir, allow_any_path=allow_any_path, allow_hub=allow_hub)
    start = time.perf_counter()
    identity = model_identity(source, config_dir)
    files = [(lora_files.read(u.name, resolve_lora(u.name, models_dir)), u.weight) for u in loras]
    folder = text_embeddings.read_folder(models_dir)
    vae_identity = vae_source = None
    if vae:
        vae_source = resolve_vae(vae, models_dir=models_dir, allow_any_path=allow_any_path,
                                 allow_hub=allow_hub)  # refused before any loading
        vae_identity = model_identity(vae_source) or f"hub-{vae_source.value}"

    def identity_of(component: str) -> str | None:
        if component == "vae" and vae:
            return vae_identity
        return text_embeddings.identity(lora_plan.component_identity(identity, files, component), folder.key,
                                        component)

    skeleton = frozenset()
    if skeleton_for is not None and identity is not None and source.kind in ("builtin", "folder"):
        skeleton = frozenset(skeleton_for(identity_of))
    if source.kind == "builtin":
        family, pipe = build_builtin(source.value, skeleton)
    elif source.kind == "folder":
        family = family_of_folder(source.path)
        parts = _skeleton_from_folder(source.path, skeleton)
        skeleton = frozenset(parts)
        pipe = guarded(lambda: pipeline_class(family).from_pretrained(
            source.value, **_family_kwargs(family), **parts), source)
    elif source.kind == "file":
        family = family_of_keys(checkpoint_keys(source.path))
        pipe = _load_single_file(source, family, config_dir)
    else:
        pipe, family = _load_hub(source)
    pipe.set_progress_bar_config(disable=True)
    if vae and "vae" not in skeleton:  # in the skeleton: the runtime has this VAE's converted copy already
        pipe.vae = load_vae(vae_source, pipe.vae, models_dir=models_dir)[0]
    model = LoadedModel(pipe=pipe, family=family, name=source.text, source=source, load_seconds=0.0,
                        scheduler_config=dict(pipe.scheduler.config), identity=identity, skeleton=skeleton,
                        vae=vae_source.text if vae_source else None, vae_source=vae_source,
                        vae_identity=vae_identity)
    if loras:
        model.loras.fuse(pipe, [lora_plan.plan(pipe, family, u, models_dir) for u in loras], keep_lora_originals)
    model.embeddings = text_embeddings.load(models_dir, pipe, family == "sdxl", folder)
    model.load_seconds = time.perf_counter() - start
    return model


def _load_single_file(source: ModelSource, family: str, config_dir) -> Any:
    cls = pipeline_class(family)
    kwargs = _family_kwargs(family)
    if config_dir is not None:
        kwargs["config"] = str(config_dir)
    try:
        return cls.from_single_file(source.value, **kwargs)
    except Exception as e:
        if is_network_error(e):
            raise ModelLoadError(
                f"{source.path.name} is a {family} checkpoint, but its diffusers config could not be fetched from "
                f"the hub (no network). Pass --model-config DIR with a diffusers folder of the same architecture."
            ) from e
        raise ModelLoadError(f"Could not load {source.path.name}: {one_line(e)}") from e


def _load_hub(source: ModelSource):
    from diffusers import DiffusionPipeline

    try:
        # download() fetches (or finds in the hub cache) the hub's files; from_pretrained(hub id) would first
        # load a folder of that name relative to the working directory.
        folder = DiffusionPipeline.download(source.value)
        pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None)
    except Exception as e:
        if is_network_error(e):
            raise ModelLoadError(f"Could not download {source.value!r} from the Hugging Face hub: no network "
                                 f"connection, and it is not in the local cache.") from e
        raise ModelLoadError(f"Could not load {source.value!r} from the hub: {one_line(e)}") from e
    name = type(pipe).__name__
    if name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ModelLoadError(f"{source.value!r} is a {name}; only Stable Diffusion 1.x/2.x and SDXL are supported.")
    family = "sdxl" if "XL" in name else ("sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1")
    return pipe, family
