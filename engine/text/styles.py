"""Prompt styles in AUTOMATIC1111's styles.csv format: `name,prompt,negative_prompt`, one style a row.

A style's text goes where its `{prompt}` placeholder is, or is appended after ", " when it has none (the same
for the negative prompt). Several styles apply in the order chosen. The job runs, and its PNG records, the
expanded prompt with the style names (`Styles array`); `extract` takes the styles back out, so PNG info sends
the prompt the user typed plus the styles, and running it again expands to the same text.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError
from engine.requests import parse_request
from engine.store.outputs import write_text_atomically

log = logging.getLogger(__name__)
STYLES_FILE = Path(__file__).resolve().parents[2] / "presets" / "styles.csv"
FIELDS = ("name", "prompt", "negative_prompt")
PLACEHOLDER = "{prompt}"
MAX_STYLES = 16  # per request
MAX_NAME = 100
MAX_TEXT = 20_000  # a style's prompt or negative prompt: the prompt limit, well under csv's field limit


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge(style_text: str, prompt: str) -> str:
    """One style's text applied to a prompt: into its {prompt}, else appended after ", " (empty parts left out)."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def unmerge(style_text: str, expanded: str) -> str | None:
    """The prompt that `merge(style_text, prompt)` turned into `expanded`, or None when it cannot have."""
    if PLACEHOLDER in style_text:
        pieces = [re.escape(piece) for piece in style_text.split(PLACEHOLDER)]
        # the prompt fills every placeholder alike: the first captures it, the others must repeat it
        pattern = pieces[0] + "(?P<p>.*)" + pieces[1] + "".join("(?P=p)" + piece for piece in pieces[2:])
        match = re.fullmatch(pattern, expanded, re.DOTALL)
        return match.group("p") if match else None
    text = style_text.strip()
    if not text:
        return expanded
    if expanded.strip() == text:
        return ""
    if expanded.endswith(", " + text):
        return expanded[:-len(text) - 2]
    return None


class Styles:
    """The styles file: read again when it changes on disk, written whole (temp file, then rename) on save.

    A save is one read-modify-write under this object's lock and an flock on a lock file beside the styles file
    (replicas or a second app may share it). What is written is read back first: a save the reader could not
    read is refused. A file that cannot be read is never written over, and the styles last read stay listed."""

    def __init__(self, path: Path | None = STYLES_FILE):
        self.path = Path(path) if path else None
        self._lock = threading.RLock()
        self._stamp: tuple | None = None
        self._styles: dict[str, Style] = {}
        self.error: str | None = None  # why the file could not be read, shown where styles are picked

    def _load(self) -> dict[str, Style]:
        with self._lock:
            if self.path is None:
                return {}
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                self._styles, self._stamp, self.error = {}, None, None
                return self._styles
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                try:
                    self._styles = parse_csv(self.path.read_text(encoding="utf-8-sig"))
                    self.error = None
                except (OSError, UnicodeDecodeError, csv.Error) as e:
                    log.warning("styles file %s unreadable: %s", self.path, e)
                    # the styles read before stay listed: a damaged file does not empty the page
                    self.error = f"{self.path.name} could not be read ({type(e).__name__}: {str(e)[:120]})"
                self._stamp = stamp
            return self._styles

    def names(self) -> list[str]:
        return list(self._load())

    def get(self, name: str) -> Style:
        styles = self._load()
        if name not in styles:
            known = ", ".join(styles) or "none"
            why = f" ({self.error})" if self.error else ""
            raise UserError(f"Unknown style {name!r}; styles are: {known}.{why}")
        return styles[name]

    def applied(self, request_type, request):
        """`request` (a dict or a request of `request_type`) with its styles expanded into the prompt pair; the
        style names stay, for the PNG."""
        if isinstance(request, dict):
            request = parse_request(request_type, request)
        if not request.styles:
            return request
        prompt, negative = self.expand(request.prompt, request.negative_prompt, request.styles)
        return request.model_copy(update={"prompt": prompt, "negative_prompt": negative})

    def expand(self, prompt: str, negative: str, names) -> tuple[str, str]:
        """The prompt pair with these styles applied, in order."""
        names = list(names or ())
        if len(names) > MAX_STYLES:
            raise UserError(f"{len(names)} styles chosen; the limit is {MAX_STYLES}.")
        for name in names:
            style = self.get(name)
            prompt, negative = merge(style.prompt, prompt), merge(style.negative_prompt, negative)
        return prompt, negative

    def extract(self, prompt: str, negative: str, names) -> tuple[str, str] | None:
        """The prompt pair before these styles were applied, or None when the styles (as they are in the file now)
        could not have produced it."""
        styles = self._load()
        for name in reversed(list(names or ())):
            style = styles.get(name)
            if style is None:
                return None
            prompt, negative = unmerge(style.prompt, prompt), unmerge(style.negative_prompt, negative)
            if prompt is None or negative is None:
                return None
        return prompt, negative

    def save(self, name: str, prompt: str, negative: str) -> Style:
        """Add a style, or replace the one of that name (as A1111 does)."""
        name = (name or "").strip()
        prompt, negative = prompt or "", negative or ""
        if not name or len(name) > MAX_NAME or any(c in name for c in "\r\n"):
            raise UserError(f"A style needs a name of 1-{MAX_NAME} characters on one line.")
        if not prompt.strip() and not negative.strip():
            raise UserError("The prompt and negative prompt are both empty: there is nothing to save as a style.")
        for what, text in (("name", name), ("prompt", prompt), ("negative prompt", negative)):
            if len(text) > MAX_TEXT:
                raise UserError(f"The style's {what} is {len(text)} characters; the limit is {MAX_TEXT}.")
            if not _encodable(text):
                raise UserError(f"The style's {what} has text that is not valid Unicode (a lone surrogate).")
        if self.path is None:
            raise UserError("No styles file is set (--styles FILE), so styles cannot be saved.")
        style = Style(name, prompt, negative)
        with self._lock, self._file_lock():
            self._stamp = None  # read what is on disk now: another process may have saved since
            styles = dict(self._load())
            if self.error:
                raise UserError(f"Not saved: {self.error}; fix or move it first, so its styles are not lost.")
            styles[name] = style
            text = to_csv(styles.values())
            try:  # never write what the reader cannot read back (the reader trims a field's leading spaces)
                back = parse_csv(text)
                if set(back) != set(styles) or any(
                        (back[n].prompt.strip(), back[n].negative_prompt.strip())
                        != (s.prompt.strip(), s.negative_prompt.strip()) for n, s in styles.items()):
                    raise csv.Error("the rows do not read back as written")
            except csv.Error as e:
                raise UserError(f"Not saved: the styles file would not read back ({e}).") from None
            write_text_atomically(self.path, text)  # permissions kept
            st = self.path.stat()
            self._styles, self._stamp, self.error = styles, (st.st_mtime_ns, st.st_size), None
        return style

    @contextlib.contextmanager
    def _file_lock(self):
        """An exclusive flock on `.NAME.lock` beside the file, held for the read-modify-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with open(lock_path, "a") as lock:
            try:
                import fcntl
            except ImportError:  # Windows: the threading lock alone
                yield
                return
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_csv(text: str) -> dict[str, Style]:
    """A1111's styles.csv: a header naming the columns, then rows; extra columns ignored, missing ones empty."""
    styles = {}
    for row in csv.DictReader(io.StringIO(text), skipinitialspace=True):
        name = (row.get("name") or "").strip()
        if name:
            styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


def to_csv(styles) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    for s in styles:
        writer.writerow((s.name, s.prompt, s.negative_prompt))
    return out.getvalue()
