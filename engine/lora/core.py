"""LoRA: the files (under <models-dir>/lora and the built-in assets/lora), AUTOMATIC1111's `<lora:name:weight>`
prompt syntax, the two file formats people have, and fusing into a pipeline's weights.

Formats: kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`/`lora_te2_*` for SDXL, `.lora_down`,
`.lora_up`, `.alpha`; SDXL files name the UNet's blocks the sgm way, `input_blocks_4_1_...`, mapped here) and
diffusers / PEFT (`unet.<module>.lora_A/lora_B`, `.lora.down/.lora.up`, `.lora_linear_layer.*`,
`<attn>.processor.to_q_lora.*`). Each layer is matched by name to a Linear or Conv2d of the pipeline and fused
as W + weight * (alpha / rank) * up @ down. The weights a LoRA touched are kept and written back exactly when
the set changes, so no rounding accumulates. Fusing keeps one code path for every runtime: PyTorch runs the
fused weights, OpenVINO converts them (its IR cache is keyed by the LoRA set, see `component_identity`).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError
from engine.system.tensors import full_precision

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "assets" / "lora"
SUFFIX = ".safetensors"
MAX_LORAS = 8
MAX_WEIGHT = 4.0
TAG = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>", re.IGNORECASE)
COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
              "lora_te2_": "text_encoder_2"}
UNSUPPORTED = ("hada_", "lokr_", "lora_mid", "dora_scale", "lora_magnitude_vector", ".diff")
BAD_NAME = re.compile(r"[:<>\\]|^[~\s]|\s$")  # what a <lora:name:w> tag cannot carry


# ---------------------------------------------------------------- names and prompt syntax


@dataclass(frozen=True)
class LoraUse:
    name: str
    weight: float = 1.0

    @property
    def tag(self) -> str:
        return f"<lora:{self.name}:{self.weight:g}>"


def parse_prompt(prompt: str) -> tuple[str, tuple[LoraUse, ...]]:
    """'a cat <lora:x:0.8>' -> ('a cat', (LoraUse('x', 0.8),)). The text the encoder sees has no tags;
    a name given twice keeps its last weight; weight 0 drops it."""
    uses: dict[str, float] = {}
    for match in TAG.finditer(prompt or ""):
        name, weight_text = match.group(1).strip(), match.group(2)
        if not name:
            raise UserError("A <lora:...> tag has no name; write <lora:NAME:0.8>.")
        try:
            weight = 1.0 if weight_text is None or not weight_text.strip() else float(weight_text)
        except ValueError:
            raise UserError(f"<lora:{name}:{weight_text}>: the weight must be a number, e.g. 0.8.") from None
        if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
            raise UserError(f"<lora:{name}:{weight_text}>: the weight must be between {-MAX_WEIGHT:g} and "
                            f"{MAX_WEIGHT:g}.")
        uses.pop(name, None)
        uses[name] = weight
    if len(uses) > MAX_LORAS:
        raise UserError(f"{len(uses)} LoRAs in one prompt; the limit is {MAX_LORAS}.")
    text = TAG.sub(" ", prompt or "")
    text = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"[ \t]+", " ", text)).strip(" ,")
    return text, tuple(LoraUse(n, w) for n, w in uses.items() if w != 0)


def strip_tags(prompt: str) -> str:
    return parse_prompt(prompt)[0] if prompt and "<" in prompt else prompt


def with_tag(prompt: str, name: str, weight: float) -> str:
    """The prompt with this LoRA's tag added, or its weight changed where the tag is already there."""
    use = LoraUse(name, weight)
    for match in TAG.finditer(prompt or ""):
        if match.group(1).strip() == name:
            return prompt[:match.start()] + use.tag + prompt[match.end():]
    return f"{(prompt or '').rstrip()} {use.tag}".strip()


def without_tags(prompt: str, names: set[str]) -> str:
    """The prompt with the tags of these LoRAs taken out (spacing tidied as the encoder would see it)."""
    out = TAG.sub(lambda m: "" if m.group(1).strip() in names else m.group(0), prompt or "")
    return re.sub(r"[ \t]{2,}", " ", out).strip()


def folders(models_dir: Path | None) -> list[Path]:
    """Where LoRAs are looked up, in order: the user's <models-dir>/lora, then the built-in ones."""
    return ([Path(models_dir) / "lora"] if models_dir else []) + [BUILTIN_DIR]


def available(models_dir: Path | None) -> list[str]:
    """Names (path below a LoRA folder, without .safetensors) a prompt or picker may use."""
    names: list[str] = []
    for folder in folders(models_dir):
        if folder.is_dir():
            for path in sorted(folder.rglob(f"*{SUFFIX}")):
                name = path.relative_to(folder).with_suffix("").as_posix()
                if name not in names and not BAD_NAME.search(name) and _inside(path, folder):
                    names.append(name)
    return names


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def resolve(name: str, models_dir: Path | None) -> Path:
    """A LoRA name -> its file, refusing names that leave the LoRA folders."""
    clean = name.strip().removesuffix(SUFFIX)
    if not clean or clean.startswith(("/", "\\", "~")) or "\\" in clean or ".." in Path(clean).parts \
            or ":" in clean:
        raise UserError(f"LoRA {name!r}: give a name from the LoRA folder (e.g. lcm-shapes), not a path.")
    for folder in folders(models_dir):
        path = folder / f"{clean}{SUFFIX}"
        if path.is_file():
            if not _inside(path, folder):
                raise UserError(f"LoRA {name!r} points outside the LoRA folder; it is not loaded.")
            return path
    known = available(models_dir)
    hint = f" Known: {', '.join(known[:12])}." if known else ""
    where = " or ".join(str(f) for f in folders(models_dir))
    raise UserError(f"LoRA {name!r} not found in {where}.{hint}")


# ---------------------------------------------------------------- reading


@dataclass
class LoraLayer:
    component: str  # unet | text_encoder | text_encoder_2
    key: str  # module name: dotted (diffusers), or underscored (kohya) until matched
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha / self.rank) if self.alpha else 1.0


@dataclass
class LoraFile:
    name: str
    path: Path
    digest: str  # sha256 of the file's bytes: a changed file is a new LoRA, a copy is the same one
    layers: list[LoraLayer]
    kind: str  # kohya | diffusers

    @property
    def components(self) -> set[str]:
        return {layer.component for layer in self.layers}

    @property
    def family(self) -> str | None:
        """sd1 / sd2 / sdxl from what the layers show (a second text encoder, the cross-attention width)."""
        if any(layer.component == "text_encoder_2" for layer in self.layers):
            return "sdxl"
        for layer in self.layers:
            if layer.component == "unet" and re.search(r"attn2[._]to_k$", layer.key):
                return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(int(layer.down.shape[1]))
        return None


_cache: dict[str, LoraFile] = {}


def _stat_key(name: str, path: Path) -> str:
    st = path.stat()
    return f"{name}:{path}:{st.st_size}:{st.st_mtime_ns}"


def read(name: str, path: Path) -> LoraFile:
    """Parse a LoRA file (kept while its size and mtime stay); a damaged or foreign file is one clear error."""
    key = _stat_key(name, path)
    if key in _cache:
        return _cache[key]
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    try:
        data = path.read_bytes()
        state = load_bytes(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"LoRA {name!r}: the file cannot be read as safetensors ({str(e)[:120]}).") from e
    digest = hashlib.sha256(data).hexdigest()[:16]
    del data
    odd = sorted({u for u in UNSUPPORTED for k in state if u in k})
    if odd:
        raise UserError(f"LoRA {name!r} is a LyCORIS/DoRA variant ({', '.join(odd)} keys); only plain LoRA "
                        f"(down/up matrices) is supported.")
    if any(k.startswith(tuple(COMPONENTS)) for k in state):
        layers, kind = _kohya_layers(state), "kohya"
    else:
        layers, kind = _diffusers_layers(state, _peft_alpha(metadata)), "diffusers"
    if not layers:
        raise UserError(f"LoRA {name!r}: none of its {len(state)} tensors is a LoRA layer (expected kohya "
                        f"lora_unet_*/lora_te_* or diffusers unet.*/text_encoder.* down/up pairs).")
    lora = LoraFile(name, path, digest, layers, kind)
    if len(_cache) >= MAX_LORAS:  # a prompt's worth of files in memory; the fused weights are what runs
        _cache.pop(next(iter(_cache)))
    _cache[key] = lora
    return lora


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The header's __metadata__ (safetensors: 8-byte little-endian length, then a JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    return header.get("__metadata__") or {}


def is_stale(lora: LoraFile, models_dir: Path | None) -> bool:
    """Whether the file behind a fused LoRA has changed (or gone) since it was read."""
    try:
        return read(lora.name, resolve(lora.name, models_dir)).digest != lora.digest
    except UserError:
        return True


def _kohya_layers(state: dict[str, torch.Tensor]) -> list[LoraLayer]:
    layers = []
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        prefix = next((p for p in COMPONENTS if stem.startswith(p)), None)
        up = state.get(f"{stem}.lora_up.weight")
        if prefix is None or up is None:
            continue
        alpha = state.get(f"{stem}.alpha")
        layers.append(LoraLayer(COMPONENTS[prefix], stem[len(prefix):], state[key], up,
                                float(alpha) if alpha is not None else None))
    return layers


_DIFFUSERS_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
                    ("_lora.down.weight", "_lora.up.weight"))


def _diffusers_layers(state: dict[str, torch.Tensor], alpha_of: Any) -> list[LoraLayer]:
    layers = []
    for key in state:
        pair = next((p for p in _DIFFUSERS_PAIRS if key.endswith(p[0])), None)
        if pair is None or key.replace(pair[0], pair[1]) not in state:
            continue
        stem = key[: -len(pair[0])]
        component, _, module = stem.partition(".")
        if component not in ("unet", "text_encoder", "text_encoder_2"):
            component, module = "unet", stem.removeprefix("base_model.model.")
        # attention processors' names: attn1.processor.to_q_lora -> attn1.to_q, to_out_lora -> to_out.0
        module = re.sub(r"\.(?:processor\.)?(to_[qkv])$", r".\1", module)
        module = re.sub(r"\.(?:processor\.)?to_out$", ".to_out.0", module)
        if component.startswith("text_encoder"):  # the same processor names on CLIP's attention
            module = re.sub(r"\.to_([qkv])$", r".\1_proj", module)
            module = re.sub(r"\.to_out(\.0)?$", ".out_proj", module)
        alpha = state.get(f"{stem}.alpha")
        alpha = float(alpha) if alpha is not None else alpha_of(component, int(state[key].shape[0]))
        layers.append(LoraLayer(component, module, state[key], state[key.replace(pair[0], pair[1])], alpha))
    return layers


def _peft_alpha(metadata: dict[str, str]):
    """PEFT keeps lora_alpha in the safetensors metadata (diffusers' `lora_adapter_metadata`); without it the
    scale is 1, as diffusers assumes."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        config = {}

    def alpha_of(component: str, rank: int) -> float | None:
        if not isinstance(config, dict):
            return None
        nested = config.get(component)
        entry = nested if isinstance(nested, dict) else {k.partition(".")[2]: v for k, v in config.items()
                                                          if k.startswith(component + ".")} or config
        alpha = entry.get("lora_alpha")  # diffusers writes {"unet.lora_alpha": ..., "unet.r": ...}
        if not isinstance(alpha, (int, float)):
            return None
        # rsLoRA scales by alpha / sqrt(rank): the alpha that gives that scale as alpha / rank
        return float(alpha) * rank ** 0.5 if entry.get("use_rslora") else float(alpha)
    return alpha_of


# ---------------------------------------------------------------- matching to a pipeline


def _targets(module: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """Linear/Conv2d layers by dotted and by underscored name (kohya writes names with '_' for '.'). Also under
    `text_model.` (CLIP's layers sat there before transformers 5, and LoRA files name them so) and without
    torch.compile's `_orig_mod.`."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            plain = name.removeprefix("_orig_mod.")
            for alias in (plain, "text_model." + plain):
                out.setdefault(alias, (name, m))
                out.setdefault(alias.replace(".", "_"), (name, m))
    return out


def _sgm_names(unet) -> dict[str, str]:
    """kohya's SDXL block names (the sgm UNet's) -> diffusers' block names, underscored, from the UNet's layout."""
    names = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
             "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
             "label_emb_0_2": "add_embedding_linear_2", "middle_block_0": "mid_block_resnets_0",
             "middle_block_1": "mid_block_attentions_0", "middle_block_2": "mid_block_resnets_1"}
    i = 1
    for b, block in enumerate(unet.down_blocks):
        for k in range(len(block.resnets)):
            names[f"input_blocks_{i}_0"] = f"down_blocks_{b}_resnets_{k}"
            names[f"input_blocks_{i}_1"] = f"down_blocks_{b}_attentions_{k}"
            i += 1
        if block.downsamplers:
            names[f"input_blocks_{i}_0_op"] = f"down_blocks_{b}_downsamplers_0_conv"
            i += 1
    i = 0
    for b, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for k in range(len(block.resnets)):
            names[f"output_blocks_{i}_0"] = f"up_blocks_{b}_resnets_{k}"
            if has_attention:
                names[f"output_blocks_{i}_1"] = f"up_blocks_{b}_attentions_{k}"
            if k == len(block.resnets) - 1 and block.upsamplers:
                names[f"output_blocks_{i}_{2 if has_attention else 1}_conv"] = f"up_blocks_{b}_upsamplers_0_conv"
            i += 1
    return names


_RESNET_PARTS = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
                 ("skip_connection", "conv_shortcut"))


def _from_sgm(key: str, sgm: dict[str, str]) -> str | None:
    for old in sorted(sgm, key=len, reverse=True):
        if key == old or key.startswith(old + "_"):
            key = sgm[old] + key[len(old):]
            for a, b in _RESNET_PARTS:
                key = key.replace(a, b)
            return key
    return None


@dataclass
class LoraPlan:
    """One LoRA matched to one pipeline: which layer goes where, and what did not match."""

    lora: LoraFile
    weight: float
    pairs: list[tuple[str, str, LoraLayer]] = field(default_factory=list)  # (component, module name, layer)
    unmatched: int = 0

    @property
    def components(self) -> set[str]:
        return {c for c, _, _ in self.pairs}

    @property
    def summary(self) -> str:
        total = len(self.pairs) + self.unmatched
        return f"{self.lora.name} x{self.weight:g} ({len(self.pairs)} of {total} layers)"


def plan(pipe, family: str | None, use: LoraUse, models_dir: Path | None) -> LoraPlan:
    """Read `use`'s file and match its layers to `pipe`; UserError for a LoRA that cannot apply here."""
    lora = read(use.name, resolve(use.name, models_dir))
    got = lora.family
    if got and family in ("sd1", "sd2", "sdxl") and got != family:
        label = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
        raise UserError(f"LoRA {use.name!r} is for {label[got]} models; the loaded model is {label[family]}. "
                        f"Choose a LoRA made for it.")
    result = LoraPlan(lora, use.weight)
    targets: dict[str, dict] = {}
    sgm = None
    for layer in lora.layers:
        component = getattr(pipe, layer.component, None)
        if component is None or not isinstance(component, torch.nn.Module):
            result.unmatched += 1
            continue
        table = targets.setdefault(layer.component, _targets(component))
        hit = table.get(layer.key)
        if hit is None and layer.component == "unet" and lora.kind == "kohya":
            sgm = sgm if sgm is not None else _sgm_names(component)
            mapped = _from_sgm(layer.key, sgm)
            hit = table.get(mapped) if mapped else None
        if hit is None:
            result.unmatched += 1
            continue
        name, module = hit
        w = module.weight
        if layer.up.shape[0] != w.shape[0] or layer.down[0].numel() != w[0].numel() \
                or layer.up[0].numel() != layer.down.shape[0]:
            raise UserError(f"LoRA {use.name!r}: layer {name} of the {layer.component} is "
                            f"{layer.up.shape[0]}x{layer.down[0].numel()} in the LoRA but {w.shape[0]}x"
                            f"{w[0].numel()} in the model: the LoRA was made for another model.")
        result.pairs.append((layer.component, name, layer))
    if not result.pairs:
        raise UserError(f"LoRA {use.name!r}: none of its {len(lora.layers)} layers matches a layer of this "
                        f"model (0 matched); it was made for another kind of model.")
    return result


def component_identity(identity: str | None, loras: list[tuple[LoraFile, float]], component: str) -> str | None:
    """The cache identity of a component with these (LoRA, weight)s fused: the model's own where none touches it."""
    touching = [(f, w) for f, w in loras if component in f.components]
    if identity is None or not touching:
        return identity
    text = ";".join(f"{f.digest}:{w!r}" for f, w in touching)
    return f"{identity}-lora-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------- fusing


class FusedLoras:
    """The LoRAs fused into one pipeline's weights, and the original weights they replaced."""

    def __init__(self):
        self.plans: list[LoraPlan] = []
        self._saved: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def uses(self) -> tuple[LoraUse, ...]:
        return tuple(LoraUse(p.lora.name, p.weight) for p in self.plans)

    def key(self, component: str | None = None) -> str:
        """What the fused set is, for caches: all of it, or only what touches `component`."""
        plans = [p for p in self.plans if component is None or component in p.components]
        return ";".join(f"{p.lora.name}@{p.lora.digest}:{p.weight!r}" for p in plans)

    def restore(self, pipe) -> None:
        with torch.no_grad():
            for (component, name), weight in self._saved.items():
                module = getattr(pipe, component).get_submodule(name)
                module.weight.copy_(weight.to(module.weight.device))
        self._saved.clear()
        self.plans = []

    def fuse(self, pipe, plans: list[LoraPlan], keep_originals: bool = True) -> float:
        """Replace what is fused with `plans`; seconds taken. Weights on the meta device (a runtime holds
        them compiled) are skipped: the runtime's cache entry for this set is used instead. Without
        `keep_originals` (a runtime that converts the weights and reloads on change) nothing is kept, and
        restore() cannot undo it. A failure part-way puts the original weights back."""
        start = time.perf_counter()
        self.restore(pipe)
        try:
            with torch.no_grad():
                for p in plans:
                    for component, name, layer in p.pairs:
                        weight = getattr(pipe, component).get_submodule(name).weight
                        if weight.is_meta:
                            continue
                        if keep_originals:
                            self._saved.setdefault((component, name), weight.detach().to("cpu", copy=True))
                        weight.add_(delta(layer, p.weight, weight.shape).to(weight.device, weight.dtype))
        except BaseException:
            self.restore(pipe)
            raise
        self.plans = list(plans)
        return time.perf_counter() - start

    def stale(self, models_dir: Path | None) -> bool:
        return any(is_stale(p.lora, models_dir) for p in self.plans)


def delta(layer: LoraLayer, weight: float, shape: torch.Size) -> torch.Tensor:
    """weight * (alpha/rank) * up @ down, shaped as the layer's weight (Linear, or Conv2d of any kernel)."""
    up = layer.up.float().reshape(layer.up.shape[0], -1)
    down = layer.down.float().reshape(layer.down.shape[0], -1)
    with full_precision():  # fused into fp32 weights: a bf16 product under autocast would round the delta
        return ((up @ down) * (weight * layer.scale)).reshape(shape)
