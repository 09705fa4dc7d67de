"""Saving images to the outputs folder: PNG with parameters text, atomic, never overwriting; and the atomic
text write the styles and presets files use."""
from __future__ import annotations

import os
import re
import stat
import tempfile
from datetime import datetime
from pathlib import Path

from PIL import Image, PngImagePlugin

TMP_PREFIX = ".partial-"


def write_text_atomically(path: Path, text: str, *, overwrite: bool = True) -> None:
    """`text` into a temp file beside `path`, flushed to disk, then renamed into place: a reader never sees half
    a file. The file keeps the permissions it had (a new one gets the umask's). overwrite=False never replaces a
    file, even one made at the same moment (FileExistsError)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails where the name exists
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links
            if path.exists():
                raise FileExistsError(path) from None
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def clean_partials(folder: Path) -> None:
    """Remove temp files a killed process left behind."""
    for day in folder.glob("*"):
        for tmp in (day.glob(f"{TMP_PREFIX}*") if day.is_dir() else []):
            tmp.unlink(missing_ok=True)


def save_png(image: Image.Image, parameters_text: str, folder: Path, seed: int) -> Path:
    """Write `folder/YYYY-MM-DD/NNNNN-SEED.png` with a "parameters" text chunk.

    The image goes to a temp file first, then is hard-linked to a name that does not exist
    yet (link never replaces), so a crash leaves no half-written .png and two jobs never share a name.
    """
    day = Path(folder) / datetime.now().strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    info = parameters_info(parameters_text)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".png", dir=day)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        number = _next_number(day)
        while True:
            target = day / f"{number:05d}-{seed}.png"
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                number += 1
    finally:
        tmp.unlink(missing_ok=True)


def parameters_info(parameters_text: str) -> PngImagePlugin.PngInfo:
    """The PNG text chunk A1111 and this app read parameters from."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text)
    return info


def _next_number(day: Path) -> int:
    numbers = [int(m.group(1)) for p in day.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    return max(numbers, default=0) + 1


def read_parameters(image: Image.Image) -> str | None:
    return (getattr(image, "text", None) or {}).get("parameters") or image.info.get("parameters")
