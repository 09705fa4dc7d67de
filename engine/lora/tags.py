"""LoRA names and AUTOMATIC1111's `<lora:name:weight>` prompt syntax; which files a prompt may name (under
<models-dir>/lora and the built-in assets/lora, nothing outside them)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "assets" / "lora"


SUFFIX = ".safetensors"


MAX_LORAS = 8


MAX_WEIGHT = 4.0


TAG = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>", re.IGNORECASE)


BAD_NAME = re.compile(r"[:<>\\]|^[~\s]|\s$")  # what a <lora:name:w> tag cannot carry


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
