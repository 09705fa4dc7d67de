"""Converted IR on disk, checked before use."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class IRCache:
    """Converted IR on disk: root/identity/variant/part.{xml,bin} + part.json manifest.

    The manifest records sizes and a sampled hash of the .bin; an entry that does not match
    (truncated, overwritten, half-written) is deleted and rebuilt, never fatal.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def files_root(self) -> Path:
        """Where every entry's files live."""
        return self.root / "ir"

    def folder(self, identity: str, variant: str) -> Path:
        return self.files_root / identity / variant

    @staticmethod
    def _fingerprint(path: Path) -> str:
        size = path.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            for i in range(16):  # 16 samples of 64 KiB spread over the file: cheap on GBs
                f.seek(size * i // 16)
                h.update(f.read(1 << 16))
        return h.hexdigest()

    def valid(self, identity: str, variant: str, part: str) -> bool:
        folder = self.folder(identity, variant)
        xml, binf, manifest = folder / f"{part}.xml", folder / f"{part}.bin", folder / f"{part}.json"
        try:
            meta = json.loads(manifest.read_text())
            return (meta["xml_sha256"] == hashlib.sha256(xml.read_bytes()).hexdigest()
                    and meta["bin_fingerprint"] == self._fingerprint(binf))
        except (OSError, ValueError, KeyError):
            return False

    def load(self, core, identity: str, variant: str, part: str):
        folder = self.folder(identity, variant)
        if not self.valid(identity, variant, part):
            self.discard(identity, variant, part)
            return None
        try:
            return core.read_model(str(folder / f"{part}.xml"))
        except Exception as e:  # parse failure despite a matching manifest: rebuild
            log.warning("OpenVINO IR cache entry %s/%s unreadable (%s); rebuilding", folder, part, e)
            self.discard(identity, variant, part)
            return None

    @contextmanager
    def converting(self, identity: str, variant: str, part: str):
        """Held while one process converts a part: another (a second replica on this machine) waits, then finds
        the entry in the cache instead of converting it again."""
        folder = self.folder(identity, variant)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / f".{part}.lock", "a")
        except OSError:  # a read-only cache: nothing to share
            yield
            return
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as e:  # a filesystem without locks (some NFS): convert without sharing
                log.warning("no lock on %s (%s): another process may convert %s too", folder, e, part)
            yield

    def discard(self, identity: str, variant: str, part: str) -> None:
        folder = self.folder(identity, variant)
        for suffix in (".xml", ".bin", ".json"):
            try:
                (folder / f"{part}{suffix}").unlink(missing_ok=True)
            except OSError:  # unreadable or unwritable cache: nothing to discard
                pass

    def save(self, model, identity: str, variant: str, part: str) -> bool:
        """Write atomically (temp folder, then rename); False where the cache is not writable."""
        import openvino as ov

        folder = self.folder(identity, variant)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=folder))
        except OSError as e:
            log.warning("OpenVINO IR cache %s not writable (%s); converting again next start", folder, e)
            return False
        try:
            ov.save_model(model, str(tmp / f"{part}.xml"), compress_to_fp16=False)
            meta = {"xml_sha256": hashlib.sha256((tmp / f"{part}.xml").read_bytes()).hexdigest(),
                    "bin_fingerprint": self._fingerprint(tmp / f"{part}.bin")}
            (tmp / f"{part}.json").write_text(json.dumps(meta))
            for suffix in (".bin", ".xml", ".json"):  # manifest last: it marks the entry complete
                os.replace(tmp / f"{part}{suffix}", folder / f"{part}{suffix}")
            return True
        except OSError as e:
            log.warning("could not write OpenVINO IR cache %s (%s)", folder, e)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
