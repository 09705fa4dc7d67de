"""The option schema: Optimizations (one field per UI control) and presets from presets/*.toml.

Each field carries its own metadata (label, help, owning runtime, whether the runtime applies it, a
command-line flag); `OPTION_SPECS` reads it once, and the UI controls, the CLI flags, the runtimes'
"needs runtime X" reasons and the presets are all built from that one table.
"""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from engine.errors import UserError
from engine.requests import describe_validation_error
from engine.samplers import parse_sampler, with_sampler_pair
from engine.store.outputs import write_text_atomically

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Attention = Literal["sdpa", "xformers"]
Int8Convolutions = Literal["off", "auto", "on"]


def option(default, label: str, help: str, *, runtime: str | None = None, prepares: bool = False, cli: bool = False,
           step: float | None = None, **bounds):
    """A field with its UI/CLI metadata. runtime: the one runtime that can act on it (None: every runtime);
    prepares: the runtime applies it when it prepares the model, so a change re-prepares the model."""
    extra = {"label": label, "help": help, "runtime": runtime, "prepares": prepares, "cli": cli, "step": step}
    return Field(default, json_schema_extra=extra, **bounds)


class Optimizations(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    precision: Precision = option(
        "auto", "Precision", "auto: fp16 on CUDA, bf16 on CPUs with hardware bf16 (AVX512-BF16/AMX), else fp32",
        prepares=True, cli=True)
    int8_weights: bool = option(
        False, "INT8 weights", "weights compressed to int8 (nncf): less memory", runtime="openvino", prepares=True,
        cli=True)
    # Weight-only int8 convolutions are unpacked to f32 when OpenVINO compiles them; quantized ones stay int8.
    # Whether they are faster depends on the CPU (slower on first-generation EPYC, faster on Zen 3), which its
    # flags do not tell: "auto" asks a probe timed once per machine (runtimes/openvino/probe.py).
    int8_convolutions: Int8Convolutions = option(
        "off", "INT8 convolutions (hybrid quantization)",
        "int8 weights, and convolutions run in int8 (calibrated once): least memory. auto: only where a probe "
        "timed on this CPU finds them faster than the precision they replace", runtime="openvino",
        prepares=True, cli=True)
    # Off by default: measured on SD 1.5 (fp32 UNet), importing a blob saves ~2 s of compile but peaks at
    # 9.8 GiB RSS against 6.6 GiB compiling from the IR.
    compiled_blob_cache: bool = option(
        False, "Compiled-blob cache", "keep OpenVINO's compiled graphs on disk: ~2 s faster compiles, ~3 GiB more peak RAM (SD 1.5)",
        runtime="openvino", prepares=True, cli=True)

    channels_last: bool = option(False, "channels_last memory format", "NHWC memory layout for convolutions",
                                 runtime="pytorch", prepares=True)
    attention: Attention = option("sdpa", "Attention backend", "SDPA (PyTorch's fused attention) or xformers",
                                  runtime="pytorch", prepares=True)
    attention_slicing: bool = option(False, "Attention slicing", "attention in slices: less memory, a little slower",
                                     runtime="pytorch", prepares=True)
    torch_compile: bool = option(False, "torch.compile", "compile the UNet (the first run at a size is slow)",
                                 runtime="pytorch", prepares=True)
    token_merging_ratio: float = option(
        0.0, "Token merging ratio (tomesd)", "merge similar tokens in self-attention; changes the image slightly",
        runtime="pytorch", prepares=True, step=0.05, ge=0.0, le=0.75)
    deepcache_interval: int = option(
        0, "DeepCache interval (full UNet every N steps)", "full UNet every N steps, shallow ones between; 0 = off",
        prepares=True, step=1, ge=0, le=10)
    deepcache_start: float = option(
        0.0, "DeepCache from (fraction of steps)",
        "the first fraction of each pass's steps run the full UNet, where the picture's layout forms; reuse after",
        prepares=True, step=0.05, ge=0.0, le=0.9)
    cfg_truncation: float = option(
        1.0, "CFG truncation: guidance for the first fraction of steps",
        "after this fraction of the steps the UNet runs once per step (batch 1, conditional only); 1 = every step",
        cli=True, step=0.05, ge=0.1, le=1.0)

    vae_slicing: bool = option(True, "VAE slicing", "decode a batch one image at a time (lower peak memory)")
    vae_tiling: bool = option(False, "VAE tiling", "decode large images in 512 px tiles")
    tiny_vae: bool = option(False, "Tiny autoencoder (TAESD)",
                            "decode and preview with TAESD: much faster, slightly softer")
    prompt_cache: bool = option(True, "Prompt-embedding cache", "reuse text-encoder outputs for a prompt seen before")
    result_cache: bool = option(False, "Result cache",
                                "an identical request (model, parameters, seed) returns its saved image")
    early_stop_threshold: float = option(
        0.0, "Early stop threshold", "end when the latents change less than this per step; 0 = off",
        step=0.0025, ge=0.0, le=0.5)

    @field_validator("int8_convolutions", mode="before")
    @classmethod
    def _int8_convolutions_bool(cls, value):
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value  # older presets

    @property
    def deepcache(self) -> bool:
        return self.deepcache_interval > 1

    @property
    def cfg_truncated(self) -> bool:
        return self.cfg_truncation < 1.0


@dataclass(frozen=True)
class OptionSpec:
    """What the UI, the CLI and the runtimes need to know about one option."""

    name: str
    label: str
    help: str
    default: Any
    kind: str  # "bool", "choice", "int" or "float"
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    runtime: str | None = None
    prepares: bool = False
    cli: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _spec(name: str, info) -> OptionSpec:
    extra = dict(info.json_schema_extra)
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower(), None) for m in info.metadata}  # Ge(ge=0)...
    choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is Literal else ()
    kind = "choice" if choices else {bool: "bool", int: "int", float: "float"}[info.annotation]
    return OptionSpec(name=name, label=extra["label"], help=extra["help"], default=info.default, kind=kind,
                      choices=choices, minimum=bounds.get("Ge"), maximum=bounds.get("Le"), step=extra["step"],
                      runtime=extra["runtime"], prepares=extra["prepares"], cli=extra["cli"])


OPTION_SPECS: dict[str, OptionSpec] = {name: _spec(name, info) for name, info in Optimizations.model_fields.items()}
LABELS = {name: spec.label for name, spec in OPTION_SPECS.items()}
# Options a runtime applies when it prepares the model; changing them re-prepares it.
RUNTIME_FIELDS = frozenset(name for name, spec in OPTION_SPECS.items() if spec.prepares)
DEFAULTS = Optimizations()


RUNTIME_NAMES = {"pytorch": "PyTorch", "openvino": "OpenVINO"}  # as users read them


def owned_elsewhere(runtime: str) -> dict[str, str]:
    """Options that belong to another runtime than `runtime` -> "needs the X runtime"."""
    return {name: f"needs the {RUNTIME_NAMES[spec.runtime]} runtime" for name, spec in OPTION_SPECS.items()
            if spec.runtime is not None and spec.runtime != runtime}


def is_on(opts: Optimizations, name: str) -> bool:
    """Whether the option asks for something beyond the default (what an unavailable box would drop)."""
    return getattr(opts, name) != getattr(DEFAULTS, name)


def effective(wanted: Optimizations, reasons: dict[str, str]) -> tuple[Optimizations, dict[str, str]]:
    """`wanted` minus what cannot act here (reset to its default), and {label: reason} for each one dropped."""
    dropped = {name: why for name, why in reasons.items() if is_on(wanted, name)}
    kept = wanted.model_copy(update={name: getattr(DEFAULTS, name) for name in dropped})
    return kept, {LABELS[name]: why for name, why in dropped.items()}


class GenerationDefaults(BaseModel):
    """What a preset pre-fills in the UI; a request still states its own values."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    sampler: str | None = None
    schedule: str | None = None  # with the sampler; a combined name ('DPM++ 2M Karras') splits into the pair
    steps: int | None = None
    guidance: float | None = None

    _sampler_pair = model_validator(mode="before")(classmethod(lambda cls, data: with_sampler_pair(data)))

    @field_validator("sampler", "schedule")
    @classmethod
    def _known(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        try:
            pair = parse_sampler(value) if info.field_name == "sampler" else parse_sampler(
                info.data.get("sampler") or "Euler", value)
        except UserError as e:
            raise ValueError(str(e)) from None
        return pair[0] if info.field_name == "sampler" else pair[1]


class PresetLora(BaseModel):
    """What a few-step preset needs to draw the right picture, and the LoRA it adds on models it knows."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    needs: str = ""  # shown where the loaded model has no LoRA listed below
    by_model: dict[str, str] = {}  # model name (as loaded) -> LoRA name, added to the prompt at weight 1

    def advice(self, model_name: str | None) -> tuple[str | None, str]:
        """(LoRA to add for this model or None, a line for the user)."""
        name = self.by_model.get(model_name or "")
        if name:
            return name, f"Adds `<lora:{name}:1>` to the txt2img prompt: the distilled LoRA made for {model_name}."
        if not self.needs:
            return None, ""
        return None, (f"**Needs {self.needs}.** {model_name or 'This model'} has none listed: without one the "
                      f"picture will be wrong. Add it with the LoRA picker (or `<lora:NAME:1>` in the prompt).")


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    description: str = ""
    optimizations: Optimizations = Optimizations()
    defaults: GenerationDefaults = GenerationDefaults()
    lora: PresetLora = PresetLora()
    styles: tuple[str, ...] = ()  # names in the styles file, chosen in the generation tabs with the preset


def preset_names(directory: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def _check_name(name: str) -> str:
    name = (name or "").strip()
    if not PRESET_NAME.match(name):
        raise UserError(f"Invalid preset name {name!r}: use 1-40 lower-case letters, digits, '-' or '_'.")
    return name


def load_preset(name: str, directory: Path = PRESETS_DIR) -> Preset:
    name = _check_name(name)
    path = directory / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"Unknown preset {name!r}; presets are: {', '.join(preset_names(directory)) or 'none'}.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return Preset.model_validate({"name": name, **data})
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"Preset {name!r} is not valid TOML: {e}") from e
    except ValidationError as e:
        raise UserError(f"Preset {name!r}: {describe_validation_error(e)}") from e


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def preset_toml(preset: Preset) -> str:
    lines = [f"description = {_toml_value(preset.description)}"]
    if preset.styles:
        lines.append(f"styles = {_toml_value(preset.styles)}")
    lines += ["", "[optimizations]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in preset.optimizations.model_dump().items()]
    defaults = preset.defaults.model_dump(exclude_none=True)
    if defaults:
        lines += ["", "[defaults]"] + [f"{k} = {_toml_value(v)}" for k, v in defaults.items()]
    if preset.lora.needs:
        lines += ["", "[lora]", f"needs = {_toml_value(preset.lora.needs)}"]
    if preset.lora.by_model:
        lines += ["", "[lora.by_model]"] + [f"{_toml_value(k)} = {_toml_value(v)}"
                                            for k, v in preset.lora.by_model.items()]
    return "\n".join(lines) + "\n"


def save_preset(preset: Preset, directory: Path = PRESETS_DIR, overwrite: bool = False) -> Path:
    """Write presets/NAME.toml (name validated: no paths); refuses to replace a preset unless asked. What is
    written is read back first, and a new preset never replaces one saved at the same moment."""
    name = _check_name(preset.name)
    preset = preset.model_copy(update={"name": name})
    text = preset_toml(preset)
    try:
        if Preset.model_validate({"name": name, **tomllib.loads(text)}) != preset:
            raise ValueError("it reads back differently")
    except (tomllib.TOMLDecodeError, ValidationError, ValueError) as e:
        raise UserError(f"Preset {name!r} not saved: it would not read back ({str(e)[:200]}).") from None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    if path.exists() and not overwrite:
        raise UserError(f"A preset named {name!r} exists already; pick another name.")
    try:  # a new preset never replaces one saved at the same moment
        write_text_atomically(path, text, overwrite=overwrite)
    except FileExistsError:
        raise UserError(f"A preset named {name!r} exists already; pick another name.") from None
    return path


def preset_loras(presets_dir: Path, model_name: str | None) -> set[str]:
    """LoRAs the presets add on this model (picking another preset takes out the ones a preset added)."""
    names = set()
    for name in preset_names(presets_dir):
        try:
            names.add(load_preset(name, presets_dir).lora.by_model.get(model_name or ""))
        except UserError:  # a broken preset file says so when it is picked
            pass
    return names - {None}
