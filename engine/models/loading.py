"""Resolve a model source and load it as a diffusers pipeline.

Sources: `builtin:NAME` (built here from a fixed seed), a local diffusers folder, a
single `.safetensors` / `.ckpt` file, or a hub id. The family (sd1, sd2, sdxl) is read
from the files and picks the matching diffusers pipeline class.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from engine.errors import ModelLoadError

SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class ModelSource:
    kind: str  # builtin | folder | file | hub
    value: str  # builtin name, path, or hub id
    text: str  # what the user typed

    @property
    def path(self) -> Path:
        return Path(self.value)


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
    options: Any = None
    prompt_cache: Any = None
    taesd: Any = None
    taesd_name: str | None = None  # which tiny autoencoder, for the result cache's key
    loras: Any = None  # lora.FusedLoras: what is fused into these weights
    vae: str | None = None  # a VAE loaded in place of the model's own (its name as given)
    vae_source: ModelSource | None = None  # where it was loaded from: a reload loads exactly that
    vae_identity: str | None = None

    def __post_init__(self):
        from engine.lora.core import FusedLoras
        from engine.options import Optimizations
        from engine.store.caches import PromptCache

        if self.options is None:
            self.options = Optimizations()
        if self.prompt_cache is None:
            self.prompt_cache = PromptCache()
        if self.loras is None:
            self.loras = FusedLoras()

    def component_identity(self, component: str) -> str | None:
        """Cache identity of one component's weights as they are now (the LoRAs fused into it included)."""
        from engine.lora.core import component_identity

        if component == "vae" and self.vae:
            return self.vae_identity
        return component_identity(self.identity, [(p.lora, p.weight) for p in self.loras.plans], component)

    @property
    def weights_key(self) -> str:
        """Identity of all the weights that run, for the result cache."""
        vae = f"|vae:{self.vae_identity or self.vae}" if self.vae else ""
        return f"{self.identity or self.name}|{self.loras.key()}{vae}"

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"


# ---------------------------------------------------------------- built-in models


def _text_config(vocab_size: int, hidden: int, layers: int, heads: int, inter: int, eos_id: int, bos_id: int,
                 act: str = "quick_gelu", projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=77, hidden_act=act,
        projection_dim=projection_dim or hidden, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def _vae(block_out: tuple[int, ...], layers: int, groups: int, sample_size: int, scaling: float):
    from diffusers import AutoencoderKL

    n = len(block_out)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out, layers_per_block=layers, norm_num_groups=groups,
        sample_size=sample_size, scaling_factor=scaling,
    )


class _Maker:
    """Builds each component from its own seed, on the meta device when it is in `skeleton`.

    Own seeds keep a component's weights the same whether or not the others are built,
    so a runtime's cache made from a full build matches a skeleton build.
    """

    def __init__(self, skeleton: frozenset[str]):
        self.skeleton = skeleton

    def __call__(self, name: str, build: Callable[[], Any]):
        torch.manual_seed(BUILTIN_SEED + sum(map(ord, name)))
        if name in self.skeleton:
            with torch.device("meta"):
                return build()
        return build()


def _build_sd(size: str, skeleton: frozenset[str] = frozenset()):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from engine.text.vocab import load_tokenizer

    make = _Maker(skeleton)
    tokenizer = load_tokenizer()
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if size == "tiny":
        text_config = _text_config(len(tokenizer), 32, 2, 4, 64, eos, bos)
        unet = make("unet", lambda: UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ))
        vae = make("vae", lambda: _vae((16, 32, 32, 32), 1, 16, 256, 0.18215))
    else:  # the SD 1.5 architecture
        text_config = _text_config(49408, 768, 12, 12, 3072, eos, bos)
        unet = make("unet", lambda: UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8))
        vae = make("vae", lambda: _vae((128, 256, 512, 512), 2, 32, 512, 0.18215))
    text_encoder = make("text_encoder", lambda: CLIPTextModel(text_config))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_sdxl(size: str, skeleton: frozenset[str] = frozenset()):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from engine.text.vocab import load_tokenizer

    make = _Maker(skeleton)
    tokenizer = load_tokenizer()
    tokenizer_2 = load_tokenizer()
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if size == "tiny":
        te1 = _text_config(len(tokenizer), 32, 2, 4, 64, eos, bos)
        te2 = _text_config(len(tokenizer), 32, 2, 4, 64, eos, bos, act="gelu", projection_dim=32)
        unet = make("unet", lambda: UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=32,
        ))
        vae = make("vae", lambda: _vae((16, 32, 32, 32), 1, 16, 256, 0.13025))
    else:  # the SDXL base architecture
        te1 = _text_config(49408, 768, 12, 12, 3072, eos, bos)
        te2 = _text_config(49408, 1280, 32, 20, 5120, eos, bos, act="gelu", projection_dim=1280)
        unet = make("unet", lambda: UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ))
        vae = make("vae", lambda: _vae((128, 256, 512, 512), 2, 32, 1024, 0.13025))
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=make("text_encoder", lambda: CLIPTextModel(te1)),
        text_encoder_2=make("text_encoder_2", lambda: CLIPTextModelWithProjection(te2)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


# name -> (family, builder(skeleton), description)
BUILTINS: dict[str, tuple[str, Callable[[frozenset[str]], Any], str]] = {
    "tiny": ("sd1", lambda sk: _build_sd("tiny", sk), "SD 1.x architecture, tiny widths, random weights (tests, demos)"),
    "tiny-sdxl": ("sdxl", lambda sk: _build_sdxl("tiny", sk), "SDXL architecture, tiny widths, random weights (tests)"),
    "sd15": ("sd1", lambda sk: _build_sd("sd15", sk), "SD 1.5 architecture, full size, random weights (benchmarks)"),
    "sdxl": ("sdxl", lambda sk: _build_sdxl("sdxl", sk), "SDXL base architecture, full size, random weights (benchmarks)"),
}
BUILTIN_SEED = 0
# Trained models shipped in assets/ (diffusers folders), addressed as builtin:NAME.
ASSETS_MODELS = Path(__file__).resolve().parents[2] / "assets" / "models"
SHIPPED = {
    "shapes": "SD 1.x pipeline trained here on drawn shapes: draws what the prompt says, 128x128 native (demo)",
}
HEAVY_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def build_builtin(name: str, skeleton: frozenset[str] = frozenset()):
    """Build a built-in pipeline; components named in `skeleton` get no weights (meta device)."""
    family, builder, _ = BUILTINS[name]
    # Fixed seeds without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        pipe = builder(frozenset(skeleton))
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


# ---------------------------------------------------------------- tiny autoencoders (TAESD)

TINY_AUTOENCODERS = {
    "taesd": "TAESD architecture (SD 1.x/2.x latents), random weights (benchmarks)",
    "taesdxl": "TAESDXL architecture (SDXL latents), random weights (benchmarks)",
}


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
        return AutoencoderTiny.from_pretrained(_folder_of(source)).eval()
    except Exception as e:
        if _is_network_error(e):
            raise ModelLoadError(f"Could not download the tiny autoencoder {text!r}: no network, and it is not "
                                 f"in the local cache. Pass a local folder with --taesd.") from e
        raise ModelLoadError(f"Could not load the tiny autoencoder {text!r}: {_one_line(e)}") from e


# ---------------------------------------------------------------- resolving a source


def resolve_source(text: "str | ModelSource", *, models_dir: Path | None = None, allow_any_path: bool = True,
                   allow_hub: bool = True, listed: Callable[[Path | None], list[str]] | None = None) -> ModelSource:
    """Decide what kind of source `text` names, without loading anything.

    A ModelSource (what was loaded before) comes back as it is: a reload never resolves a name again, so it
    cannot land on another folder of that name. With allow_any_path=False (what remote users get) only the
    names `listed(models_dir)` gives (default: the model picker's list) are accepted, by that exact name, and a
    hub id only with allow_hub (the operator's choice); the error is the same whether or not a path exists.
    """
    if isinstance(text, ModelSource):
        return text
    if text is not None and not isinstance(text, (str, Path)):
        raise ModelLoadError(f"A model name must be text, not {type(text).__name__}.")
    text = str(text or "").strip()
    if not text:
        raise ModelLoadError("No model given: use builtin:tiny, a hub id, a diffusers folder or a .safetensors file.")
    if text.startswith("builtin:"):
        name = text.split(":", 1)[1]
        if name in SHIPPED:
            folder = ASSETS_MODELS / name
            if not (folder / "model_index.json").is_file():
                raise ModelLoadError(f"{text} is missing from this checkout ({folder}); "
                                     f"`python -m tools.train_{name}` makes it again.")
            return ModelSource("folder", str(folder), text)
        if name not in BUILTINS:
            raise ModelLoadError(f"Unknown built-in model {text!r}; built-ins are: "
                                 + ", ".join(f"builtin:{n}" for n in [*SHIPPED, *BUILTINS]) + ".")
        return ModelSource("builtin", name, text)

    if not allow_any_path:
        names = listed(models_dir) if listed is not None else [n for n, _ in available_models(models_dir)]
        if text in names and not text.startswith("builtin:"):
            return _local_source(_inside_models_dir(text, models_dir), text)
        if allow_hub and HUB_ID.match(text) and ".." not in text:
            return ModelSource("hub", text, text)
        hub = " or a hub id (owner/name)" if allow_hub else ""
        raise ModelLoadError(f"{text[:200]!r} is not one this server lists (the built-ins and what is in the models "
                             f"folder); pick a name from the list{hub}.")

    path = Path(text).expanduser()
    if path.exists():
        return _local_source(path, text)
    if models_dir is not None and (Path(models_dir) / text).exists():
        return _local_source(Path(models_dir) / text, text)
    looks_like_path = text.startswith(("/", ".", "~")) or text.lower().endswith(SINGLE_FILE_SUFFIXES) or "\\" in text
    if HUB_ID.match(text) and not looks_like_path:
        return ModelSource("hub", text, text)
    raise ModelLoadError(f"Model not found: {text!r} does not exist (expected a diffusers folder, "
                         f"a .safetensors/.ckpt file, a hub id like owner/name, or builtin:tiny).")


def available_models(models_dir: Path | None) -> list[tuple[str, str]]:
    """(name, what it is) for every model a remote user may load by name: the built-ins, then the diffusers
    folders and single-file checkpoints under `models_dir` (named by their path inside it; nothing that
    resolves outside it)."""
    found = [(f"builtin:{n}", SHIPPED[n]) for n in SHIPPED if (ASSETS_MODELS / n / "model_index.json").is_file()]
    found += [(f"builtin:{n}", about) for n, (_, _, about) in BUILTINS.items()]
    if models_dir is None or not Path(models_dir).is_dir():
        return found
    root = Path(models_dir).resolve()
    local = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in ("lora", "taesd", "vae"):
            continue
        if (path.is_dir() and (path / "model_index.json").is_file()) or (
                path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES
                and not any((parent / "model_index.json").is_file() for parent in path.parents if root in parent.parents)):
            real = path.resolve()
            if real == root or root in real.parents:
                local.append((rel.as_posix(), "diffusers folder" if path.is_dir() else "single-file checkpoint"))
    return found + local


VAE_DIR, TAESD_DIR = "vae", "taesd"  # under --models-dir


def _listed(models_dir: Path | None, sub: str, wanted: Callable[[Path], bool]) -> list[str]:
    """Names (paths inside models_dir, e.g. vae/x.safetensors) of what `wanted` accepts under models_dir/sub,
    hidden files and anything that resolves outside models_dir left out."""
    if models_dir is None or not (Path(models_dir) / sub).is_dir():
        return []
    root = Path(models_dir).resolve()
    names = []
    for path in sorted((root / sub).rglob("*")):
        rel = path.relative_to(root)
        real = path.resolve()
        if not any(p.startswith(".") for p in rel.parts) and root in real.parents and wanted(path):
            names.append(rel.as_posix())
    return names


def available_vaes(models_dir: Path | None) -> list[str]:
    """VAEs under <models-dir>/vae: AutoencoderKL folders (config.json) and single files (.safetensors, .pt...)."""
    def wanted(path: Path) -> bool:
        if path.is_dir():
            return (path / "config.json").is_file()
        return path.suffix.lower() in SINGLE_FILE_SUFFIXES and not (path.parent / "config.json").is_file()
    return _listed(models_dir, VAE_DIR, wanted)


def available_tiny_autoencoders(models_dir: Path | None) -> list[str]:
    """The built-in tiny autoencoders, then AutoencoderTiny folders under <models-dir>/taesd."""
    return [f"builtin:{n}" for n in TINY_AUTOENCODERS] + _listed(
        models_dir, TAESD_DIR, lambda p: p.is_dir() and (p / "config.json").is_file())


def load_vae(text: "str | ModelSource", like, *, models_dir: Path | None = None, allow_any_path: bool = True,
             allow_hub: bool = True):
    """(AutoencoderKL, identity) from a diffusers folder, a single file (A1111's .safetensors/.pt VAEs, in LDM or
    diffusers key names, read into `like`'s architecture) or a hub id."""
    from diffusers import AutoencoderKL

    source = resolve_vae(text, models_dir=models_dir, allow_any_path=allow_any_path, allow_hub=allow_hub)
    identity = model_identity(source) or f"hub-{source.value}"
    if source.kind in ("folder", "hub"):
        return _guarded(lambda: AutoencoderKL.from_pretrained(_folder_of(source)).eval(), source), identity
    if source.kind != "file":
        raise ModelLoadError(f"{text!r} is not a VAE: give a file or folder under {VAE_DIR}/, or a hub id.")

    def read():
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = _state_dict(source.path)
        state = state.get("state_dict", state)
        if not any("down_blocks" in k for k in state):  # LDM names (A1111's VAE files): map to diffusers'
            state = convert_ldm_vae_checkpoint(state, dict(like.config))
        vae = AutoencoderKL.from_config(like.config)
        vae.load_state_dict(state, strict=True)
        return vae.eval()

    return _guarded(read, source), identity


def resolve_vae(text: "str | ModelSource", *, models_dir: Path | None = None, allow_any_path: bool = True,
                allow_hub: bool = True) -> ModelSource:
    """A VAE's source: for remote users, a name the VAE picker lists (or a hub id, where allowed)."""
    return resolve_source(text, models_dir=models_dir, allow_any_path=allow_any_path, allow_hub=allow_hub,
                          listed=available_vaes)


def _folder_of(source: ModelSource) -> str:
    """A folder to load a component from: a hub id goes to the hub (or its local cache), never to a folder of that
    name relative to the working directory, which is what from_pretrained would try first."""
    if source.kind != "hub":
        return source.value
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source.value, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:
        if _is_network_error(e):
            raise ModelLoadError(f"Could not download {source.value!r} from the Hugging Face hub: no network "
                                 f"connection, and it is not in the local cache.") from e
        raise ModelLoadError(f"Could not load {source.value!r} from the hub: {_one_line(e)}") from e


def _state_dict(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # a pickle that would run code is refused


def _inside_models_dir(text: str, models_dir: Path | None) -> Path:
    """The real path of a name the lists gave (checked again: the folder may have changed since)."""
    root = Path(models_dir).resolve()
    real = (root / text).resolve()
    if Path(text).is_absolute() or ".." in Path(text).parts or not (real == root or root in real.parents):
        raise ModelLoadError(f"{text[:200]!r} is not one this server lists; pick a name from the list.")
    return real


def _local_source(path: Path, text: str) -> ModelSource:
    path = path.absolute()  # a reload finds the same path whatever the working directory is then
    if path.is_dir():
        return ModelSource("folder", str(path), text)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return ModelSource("file", str(path), text)
    raise ModelLoadError(f"{text!r} is not a model: expected a diffusers folder or a "
                         f"{'/'.join(SINGLE_FILE_SUFFIXES)} file.")


# ---------------------------------------------------------------- family detection


def family_of_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (it has no model_index.json).")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{index} is damaged: {e}") from e
    if "XL" in class_name or (folder / "text_encoder_2").is_dir():
        return "sdxl"
    te_config = folder / "text_encoder" / "config.json"
    try:
        hidden = json.loads(te_config.read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError):
        hidden = None
    return "sd2" if hidden == 1024 else "sd1"


def family_of_keys(keys: set[str] | list[str]) -> str:
    """SD family from the key names of an original-format (LDM) checkpoint."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys) or "model.diffusion_model.label_emb.0.0.weight" in keys:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd1"
    raise ModelLoadError("This file is not a Stable Diffusion checkpoint (no model.diffusion_model weights found).")


def checkpoint_keys(path: Path) -> list[str]:
    """Key names of a single-file checkpoint; pickles only through weights_only=True."""
    if path.suffix.lower() == ".safetensors":
        return list(_safetensors_header(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses code; truncated zips fail here too
        raise ModelLoadError(f"Could not read {path.name} as a weights-only checkpoint: {_one_line(e)}") from e
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path.name} does not hold a state dict.")
    return list(state)


def _safetensors_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path.name} is truncated or not a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 1024 * 1024):
            raise ModelLoadError(f"{path.name} is truncated or not a safetensors file.")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ModelLoadError(f"{path.name} has a damaged safetensors header.") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{path.name} is truncated: it is {size} bytes but its header needs {8 + n + end}.")
    return header


# ---------------------------------------------------------------- identity


def model_identity(source: ModelSource, config_dir: str | Path | None = None) -> str | None:
    """A key that changes when the weights change; None where it cannot be known cheaply (hub ids)."""
    h = hashlib.sha256()
    if source.kind == "builtin":
        _, pipe = build_builtin(source.value, frozenset(HEAVY_COMPONENTS))  # configs only, no weights
        h.update(f"builtin:{source.value}:seed{BUILTIN_SEED}".encode())
        for name in HEAVY_COMPONENTS:
            component = getattr(pipe, name, None)
            if component is not None:
                config = component.config.to_dict() if hasattr(component.config, "to_dict") else dict(component.config)
                # "_"-keys are bookkeeping (e.g. a set of defaults in random order), not architecture.
                config = {k: v for k, v in config.items() if not k.startswith("_")}
                h.update(name.encode() + json.dumps(config, sort_keys=True, default=str).encode())
    elif source.kind == "folder":
        root = source.path.resolve()
        h.update(str(root).encode())
        for path in sorted(root.rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif source.kind == "file":
        st = source.path.stat()
        h.update(f"{source.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{config_dir}".encode())
    else:
        return None
    return f"{source.kind}-{Path(source.value).name[:40]}-{h.hexdigest()[:16]}"


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


# ---------------------------------------------------------------- loading


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

    Without `keep_lora_originals` the weights the LoRAs replace are not kept (a runtime that converts
    them reloads on a LoRA change). `skeleton_for(identity_of)` names the components a runtime already
    has in its cache (identity_of(component) is the component's cache identity, LoRAs included): those
    are built without weights (builtins and folders), so no PyTorch copy is ever made.
    """
    from engine.lora import core as lora

    source = resolve_source(text, models_dir=models_dir, allow_any_path=allow_any_path, allow_hub=allow_hub)
    start = time.perf_counter()
    identity = model_identity(source, config_dir)
    files = [(lora.read(u.name, lora.resolve(u.name, models_dir)), u.weight) for u in loras]
    vae_identity = vae_source = None
    if vae:
        vae_source = resolve_vae(vae, models_dir=models_dir, allow_any_path=allow_any_path,
                                 allow_hub=allow_hub)  # refused before any loading
        vae_identity = model_identity(vae_source) or f"hub-{vae_source.value}"

    def identity_of(component: str) -> str | None:
        if component == "vae" and vae:
            return vae_identity
        return lora.component_identity(identity, files, component)

    skeleton = frozenset()
    if skeleton_for is not None and identity is not None and source.kind in ("builtin", "folder"):
        skeleton = frozenset(skeleton_for(identity_of))
    if source.kind == "builtin":
        family, pipe = build_builtin(source.value, skeleton)
    elif source.kind == "folder":
        family = family_of_folder(source.path)
        parts = _skeleton_from_folder(source.path, skeleton)
        skeleton = frozenset(parts)
        pipe = _guarded(lambda: pipeline_class(family).from_pretrained(
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
        model.loras.fuse(pipe, [lora.plan(pipe, family, u, models_dir) for u in loras], keep_lora_originals)
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
        if _is_network_error(e):
            raise ModelLoadError(
                f"{source.path.name} is a {family} checkpoint, but its diffusers config could not be fetched from "
                f"the hub (no network). Pass --model-config DIR with a diffusers folder of the same architecture."
            ) from e
        raise ModelLoadError(f"Could not load {source.path.name}: {_one_line(e)}") from e


def _load_hub(source: ModelSource):
    from diffusers import DiffusionPipeline

    try:
        # download() fetches (or finds in the hub cache) the hub's files; from_pretrained(hub id) would first
        # load a folder of that name relative to the working directory.
        folder = DiffusionPipeline.download(source.value)
        pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None)
    except Exception as e:
        if _is_network_error(e):
            raise ModelLoadError(f"Could not download {source.value!r} from the Hugging Face hub: no network "
                                 f"connection, and it is not in the local cache.") from e
        raise ModelLoadError(f"Could not load {source.value!r} from the hub: {_one_line(e)}") from e
    name = type(pipe).__name__
    if name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ModelLoadError(f"{source.value!r} is a {name}; only Stable Diffusion 1.x/2.x and SDXL are supported.")
    family = "sdxl" if "XL" in name else ("sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1")
    return pipe, family


def _guarded(load: Callable[[], Any], source: ModelSource):
    try:
        return load()
    except Exception as e:
        raise ModelLoadError(f"Could not load {source.text!r}: {_one_line(e)}") from e


def _is_network_error(e: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        text = str(e).lower()
        if any(s in text for s in ("connection", "offline", "name or service not known", "resolve host",
                                    "cannot reach", "network")):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)
