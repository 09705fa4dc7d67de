"""Where a model comes from: what a name resolves to (a built-in, a folder or file, a hub id), what the pickers
list under the models folder (what a remote user may name), and a source's identity."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.errors import ModelLoadError, one_line
from engine.models.builtin import (ASSETS_MODELS, BUILTIN_SEED, BUILTINS, HEAVY_COMPONENTS, SHIPPED, TINY_AUTOENCODERS,
                                   build_builtin)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    kind: str  # builtin | folder | file | hub
    value: str  # builtin name, path, or hub id
    text: str  # what the user typed

    @property
    def path(self) -> Path:
        return Path(self.value)


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
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in ("lora", "taesd", "vae", "embeddings"):
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


def folder_of(source: ModelSource) -> str:
    """A folder to load a component from: a hub id goes to the hub (or its local cache), never to a folder of that
    name relative to the working directory, which is what from_pretrained would try first."""
    if source.kind != "hub":
        return source.value
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source.value, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:
        if is_network_error(e):
            raise ModelLoadError(f"Could not download {source.value!r} from the Hugging Face hub: no network "
                                 f"connection, and it is not in the local cache.") from e
        raise ModelLoadError(f"Could not load {source.value!r} from the hub: {one_line(e)}") from e


def read_state_dict(path: Path) -> dict:
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


def guarded(load: Callable[[], Any], source: ModelSource):
    try:
        return load()
    except Exception as e:
        raise ModelLoadError(f"Could not load {source.text!r}: {one_line(e)}") from e


def is_network_error(e: BaseException) -> bool:
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


def title_of(source: ModelSource, models_dir: Path | None) -> str:
    """How the lists name a loaded model: a path inside the models folder relative to it, else what was typed."""
    if source.kind in ("folder", "file") and models_dir is not None and not source.text.startswith("builtin:"):
        try:
            return source.path.resolve().relative_to(Path(models_dir).resolve()).as_posix()
        except (ValueError, OSError):
            pass
    return source.text
