"""Textual-inversion embeddings as AUTOMATIC1111 has them: files in <models-dir>/embeddings, each a name that a
prompt writes as a word and that stands for the file's n learned vectors.

How they run: the vectors of every embedding that fits the model are appended to its text encoders' token tables
(ids past the vocabulary), and the prompt tokenizer writes the name as those ids (`prompts.Words`). So one code
path serves every runtime: PyTorch reads the extended table, OpenVINO converts it into the text encoder's IR,
whose cache key (`identity`) changes with the set, so a cached IR never serves an old table.

Files: `.safetensors`, and `.pt`/`.bin` read with torch.load(weights_only=True) only (one that needs pickle is
skipped). Layouts: A1111's `{"string_to_param": {"*": [n, w]}}`, `{"emb_params": [n, w]}`, one tensor
(diffusers' `{token: [n, w]}`), SDXL's `{"clip_l": [n, 768], "clip_g": [n, 1280]}`. A file that cannot be used
is skipped with a one-line reason (logged, and in `skipped`); nothing outside the folder is read.
"""
from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.text.prompts import CHUNK, Words, text_encoders

log = logging.getLogger(__name__)

FOLDER = "embeddings"  # under --models-dir
SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_BYTES = 32 * 2**20  # real ones are KBs (a .pt with its optimizer state, a few MB)
MAX_FILES = 1000
MAX_VECTORS = CHUNK  # an embedding stays inside one 75-token chunk
NAME = re.compile(r"^[\w.+-]+$")  # a name a prompt can write as one word
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class EmbeddingFile:
    name: str
    digest: str  # of the file's bytes: a changed file is a new embedding
    tensors: dict[str, torch.Tensor]  # "" (one tensor) or "clip_l" and "clip_g"; float32 [n, width]
    info: dict[str, Any] = field(default_factory=dict)  # step, sd_checkpoint, sd_checkpoint_name (A1111's .pt)

    @property
    def vectors(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    @property
    def shape(self) -> int:
        return sum(int(t.shape[1]) for t in self.tensors.values())  # A1111: clip_l + clip_g widths for SDXL


@dataclass(frozen=True)
class Skip:
    reason: str
    file: EmbeddingFile | None = None  # None where it could not be read


class Unusable(Exception):
    """A file that is not an embedding we can use; its message is the reason."""


_cache: dict[tuple, EmbeddingFile | Unusable] = {}  # by path, size and mtime: a file is parsed once
_said: set[tuple[str, str]] = set()  # (name, reason) already logged: a folder is read again before each job


def _tensor(value: Any, what: str) -> torch.Tensor:
    if not torch.is_tensor(value) or not value.is_floating_point() or value.dim() not in (1, 2):
        raise Unusable(f"{what} is not a 1- or 2-D float tensor")
    value = value.detach().to("cpu", torch.float32).reshape(-1, value.shape[-1]).contiguous()
    if not 1 <= value.shape[0] <= MAX_VECTORS:
        raise Unusable(f"{value.shape[0]} vectors; at most {MAX_VECTORS} fit in a prompt chunk")
    if not torch.isfinite(value).all():
        raise Unusable("its vectors hold NaN or infinite values")
    return value


def _layout(data: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The vectors of one of the known layouts, and A1111's training details where the file has them."""
    if torch.is_tensor(data):
        return {"": _tensor(data, "the tensor")}, {}
    if not isinstance(data, dict):
        raise Unusable(f"holds a {type(data).__name__}, not a dict of tensors")
    info = {k: data.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")
            if isinstance(data.get(k), (int, str))}
    if "clip_l" in data or "clip_g" in data:
        if not ("clip_l" in data and "clip_g" in data):
            raise Unusable("has only one of clip_l / clip_g (SDXL embeddings need both)")
        l, g = _tensor(data["clip_l"], "clip_l"), _tensor(data["clip_g"], "clip_g")
        if l.shape[0] != g.shape[0]:
            raise Unusable(f"clip_l has {l.shape[0]} vectors and clip_g {g.shape[0]}")
        return {"clip_l": l, "clip_g": g}, info
    params = data.get("string_to_param")
    if isinstance(params, dict):
        if len(params) != 1:
            raise Unusable(f"string_to_param has {len(params)} entries, not one")
        return {"": _tensor(next(iter(params.values())), "string_to_param")}, info
    if "emb_params" in data:
        return {"": _tensor(data["emb_params"], "emb_params")}, info
    tensors = [v for v in data.values() if torch.is_tensor(v)]
    if len(data) == 1 and len(tensors) == 1:  # diffusers: {token: tensor}
        return {"": _tensor(tensors[0], "its tensor")}, info
    raise Unusable(f"{len(data)} entries, none of string_to_param / emb_params / clip_l+clip_g, and not one tensor")


def read_file(name: str, path: Path, data: bytes) -> EmbeddingFile:
    """Parse one file's bytes; Unusable with the reason where it is not an embedding we can use."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as load_bytes

        try:
            state = load_bytes(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise Unusable(f"cannot be read as safetensors ({str(e)[:100]})") from e
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise Unusable("needs pickle to load (only weights-only .pt/.bin files are read)") from e
        except Exception as e:  # a damaged file: torch raises many kinds
            raise Unusable(f"cannot be read ({type(e).__name__}: {str(e)[:100]})") from e
    tensors, info = _layout(state)
    return EmbeddingFile(name, hashlib.sha256(data).hexdigest()[:16], tensors, info)


@dataclass
class Folder:
    """What <models-dir>/embeddings holds: the readable embeddings and why the others are skipped."""

    files: list[EmbeddingFile] = field(default_factory=list)
    skipped: dict[str, Skip] = field(default_factory=dict)
    signature: tuple = ()  # each file's path, size and mtime: `stale` compares it

    @property
    def key(self) -> str:
        """Changes when any readable embedding changes; "" with none (the model's identities stay its own)."""
        if not self.files:
            return ""
        text = ";".join(f"{f.name}:{f.digest}" for f in self.files)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _candidates(models_dir: Path | None) -> tuple[Path | None, list[Path]]:
    folder = Path(models_dir) / FOLDER if models_dir else None
    if folder is None or not folder.is_dir():
        return folder, []
    paths = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.suffix.lower() in SUFFIXES and not any(p.startswith(".") for p in rel.parts):
            paths.append(path)
    return folder, paths


def _signature(paths: list[Path]) -> tuple:
    out = []
    for path in paths[:MAX_FILES + 1]:
        try:
            st = path.stat()
            out.append((str(path), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(path), -1, -1))
    return tuple(out)


def signature(models_dir: Path | None) -> tuple:
    """The folder's files by path, size and mtime (stat only: cheap enough to ask before every job)."""
    return _signature(_candidates(models_dir)[1])


def read_folder(models_dir: Path | None) -> Folder:
    """Every embedding file under <models-dir>/embeddings (sub-folders too; named by file stem, as A1111 does)."""
    folder, paths = _candidates(models_dir)
    out = Folder(signature=_signature(paths))
    if folder is None:
        return out
    real = folder.resolve()
    seen: dict[str, str] = {}  # lower-case name -> the file that has it
    for i, path in enumerate(paths):
        name = path.stem
        rel = path.relative_to(folder).as_posix()
        if i >= MAX_FILES:
            _skip(out.skipped, name, f"and {len(paths) - i - 1} more not read: the folder holds over {MAX_FILES} files")
            break
        try:
            if not path.resolve().is_relative_to(real):
                raise Unusable("points outside the embeddings folder")
            if not path.is_file():
                continue
            st = path.stat()
            if not 0 < st.st_size <= MAX_BYTES:
                raise Unusable(f"is {st.st_size} bytes; an embedding file is 1 byte to {MAX_BYTES // 2**20} MB")
            if not NAME.match(name):
                raise Unusable("its name is not one word a prompt can write (letters, digits, _ - . +)")
            if name.lower() in seen:
                _skip(out.skipped, rel, f"has the same name as {seen[name.lower()]}")
                continue
            key = (str(path), st.st_size, st.st_mtime_ns)
            got = _cache.get(key)
            if got is None:
                try:
                    with path.open("rb") as f:
                        data = f.read(MAX_BYTES + 1)
                    if len(data) > MAX_BYTES:
                        raise Unusable(f"is over {MAX_BYTES // 2**20} MB")
                    got = read_file(name, path, data)
                except Unusable as e:
                    got = e
                if len(_cache) >= 2 * MAX_FILES:
                    _cache.clear()
                _cache[key] = got
            if isinstance(got, Unusable):
                raise got
            seen[name.lower()] = rel
            out.files.append(got)
        except (Unusable, OSError) as e:
            _skip(out.skipped, name, f"{rel} {e}" if isinstance(e, Unusable) else f"{rel} cannot be read ({e})")
    return out


def _skip(skipped: dict[str, Skip], name: str, reason: str, file: EmbeddingFile | None = None) -> None:
    if (name, reason) not in _said:
        if len(_said) > 4 * MAX_FILES:
            _said.clear()
        _said.add((name, reason))
        log.warning("embedding %s skipped: %s", name, reason)
    skipped.setdefault(name, Skip(reason, file))


def _widths(pipe, sdxl: bool) -> list[tuple[str, int]]:
    """(component, token-vector width) of each text encoder, read off its config (an OpenVINO stand-in too)."""
    found, _ = text_encoders(pipe, sdxl)
    return [(name, int(enc.config.hidden_size)) for name, _, enc in found]


def _vectors_for(file: EmbeddingFile, widths: list[tuple[str, int]]) -> dict[str, torch.Tensor] | str:
    """{component: its vectors}, or why the embedding does not fit these encoders."""
    have = " + ".join(f"{k or 'one tensor'} {t.shape[1]} wide" for k, t in file.tensors.items())
    want = " + ".join(str(w) for _, w in widths)
    names = [c for c, _ in widths]
    if "" in file.tensors and len(widths) == 1:
        chosen = {names[0]: file.tensors[""]}
    elif "clip_l" in file.tensors and names == list(TEXT_ENCODERS):
        chosen = {"text_encoder": file.tensors["clip_l"], "text_encoder_2": file.tensors["clip_g"]}
    else:
        return f"made for another kind of model ({have}); this model's text encoder takes {want}"
    if any(int(chosen[c].shape[1]) != w for c, w in widths):
        return f"made for another model ({have}); this model's text encoder takes {want}"
    return chosen


@dataclass
class EmbeddingSet:
    """The embeddings a loaded model has in its token tables, and those it skipped."""

    key: str = ""  # Folder.key of what was read
    signature: tuple = ()
    loaded: dict[str, EmbeddingFile] = field(default_factory=dict)
    skipped: dict[str, Skip] = field(default_factory=dict)
    words: dict[str, Words] = field(default_factory=dict)  # component -> the names its tokenizer knows
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # component -> the rows past its vocabulary

    def stale(self, models_dir: Path | None) -> bool:
        """Whether the folder changed since it was read (a file added, removed or rewritten)."""
        return signature(models_dir) != self.signature

    def a1111(self, reasons: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
        """AUTOMATIC1111's /sdapi/v1/embeddings answer; with `reasons`, each skipped one says why."""
        def entry(file: EmbeddingFile | None) -> dict[str, Any]:
            info = file.info if file else {}
            return {"step": info.get("step"), "sd_checkpoint": info.get("sd_checkpoint"),
                    "sd_checkpoint_name": info.get("sd_checkpoint_name"),
                    "shape": file.shape if file else None, "vectors": file.vectors if file else None}
        skipped = {n: {**entry(s.file), **({"reason": s.reason} if reasons else {})} for n, s in self.skipped.items()}
        return {"loaded": {n: entry(f) for n, f in self.loaded.items()}, "skipped": skipped}


def plan(folder: Folder, pipe, sdxl: bool) -> EmbeddingSet:
    """Which of the folder's embeddings fit this pipeline's text encoders, and the token ids each gets."""
    widths = _widths(pipe, sdxl)
    out = EmbeddingSet(folder.key, folder.signature, skipped=dict(folder.skipped))
    rows: dict[str, list[torch.Tensor]] = {c: [] for c, _ in widths}
    ids: dict[str, dict[str, tuple[int, ...]]] = {c: {} for c, _ in widths}
    encoders = {name: enc for name, _, enc in text_encoders(pipe, sdxl)[0]}
    for file in folder.files:
        chosen = _vectors_for(file, widths)
        if isinstance(chosen, str):
            _skip(out.skipped, file.name, chosen, file)
            continue
        for component, vectors in chosen.items():
            start = int(encoders[component].config.vocab_size) + sum(len(r) for r in rows[component])
            ids[component][file.name.lower()] = tuple(range(start, start + len(vectors)))
            rows[component].append(vectors)
        out.loaded[file.name] = file
    out.words = {c: Words(ids[c]) for c in ids if ids[c]}
    out.rows = {c: torch.cat(r) for c, r in rows.items() if r}
    return out


def install(pipe, sdxl: bool, embeddings: EmbeddingSet) -> None:
    """Make each text encoder's token table its vocabulary plus `embeddings`' rows (in place: a refresh on PyTorch
    calls this again). A weightless encoder (its converted copy is cached, with these rows) is left alone."""
    for name, tokenizer, encoder in text_encoders(pipe, sdxl)[0]:
        table = encoder.get_input_embeddings() if isinstance(encoder, torch.nn.Module) else None
        if table is None or table.weight.is_meta:
            continue
        base, rows = int(encoder.config.vocab_size), embeddings.rows.get(name)
        if rows is None and table.num_embeddings == base:
            continue
        weight = table.weight.data[:base]
        weight = weight.clone() if rows is None else torch.cat([weight, rows.to(weight.device, weight.dtype)])
        table.weight = torch.nn.Parameter(weight, requires_grad=False)
        table.num_embeddings = int(weight.shape[0])
        model = getattr(encoder, "text_model", encoder)  # transformers < 5 nests it; 5 only WithProjection
        eos = getattr(tokenizer, "eos_token_id", None)
        if rows is not None and getattr(model, "eos_token_id", None) == 2 and eos == base - 1:
            # Old CLIP configs find the end of the prompt as the largest id, which would now be an embedding's;
            # where the end token is the vocabulary's last id, looking for it is the same answer.
            model.eos_token_id = eos


def load(models_dir: Path | None, pipe, sdxl: bool, folder: Folder | None = None) -> EmbeddingSet:
    """Read the folder (or take `folder`, read before), fit its embeddings to `pipe` and install them."""
    embeddings = plan(folder if folder is not None else read_folder(models_dir), pipe, sdxl)
    install(pipe, sdxl, embeddings)
    if embeddings.loaded:
        log.info("embeddings: %s", ", ".join(embeddings.loaded))
    return embeddings


def identity(identity: str | None, key: str, component: str) -> str | None:
    """The cache identity of a text encoder whose table holds the embeddings `key` names."""
    if identity is None or not key or component not in TEXT_ENCODERS:
        return identity
    return f"{identity}-emb-{key}"
