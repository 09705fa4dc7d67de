"""The result cache: an identical request (model, parameters, seed, options) returns the images it made before.
On disk (it survives a restart), or in memory without a folder."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

from engine.jobs.results import GenerationResult
from engine.store.caches import LRU
from engine.store.outputs import TMP_PREFIX  # one name for a write in progress, cleaned at start
from engine.system.telemetry import Readout

log = logging.getLogger(__name__)
DEFAULT_RESULTS_BYTES = 1 << 30


def result_key(model_key: str, task: str, runtime: str, precision: str, request: dict, options: dict) -> str:
    """Everything that decides the pixels of a result, as one string."""
    return json.dumps({"model": model_key, "task": task, "runtime": runtime, "precision": precision,
                       "request": request, "options": options}, sort_keys=True, default=str)


class MemoryResultCache:
    """Results of this process only: the last `max_items`, kept as they were returned."""

    def __init__(self, max_items: int = 32):
        self._lru = LRU(max_items)

    def get(self, key: str) -> dict | None:
        return self._lru.get(key)

    def put(self, key: str, result, when: str) -> None:
        images = [im.copy() for im in result.images]
        self._lru.put(key, {"result": result, "images": images, "time": when})

    def clear(self) -> None:
        self._lru.clear()


class DiskResultCache:
    """Results on disk, so an identical request after a restart returns at once.

    One folder per key (named by its SHA-256): the images as PNG files and meta.json with the result, the full
    key and each file's SHA-256. An entry is written under a temp name and renamed into place, so a crash never
    leaves a half-written entry under a real name; one that does not check out (unreadable, another key, a file
    missing or changed) is deleted and reported as a miss, so the job runs and writes it again. Bounded by bytes:
    the least recently used entries go first (a hit touches meta.json, so the order survives a restart).
    """

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_RESULTS_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # digest -> bytes, least recently used first
        self.hits = self.misses = self.rebuilt = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._scan()
        except OSError as e:  # an unwritable folder: every put fails quietly and every get misses
            log.warning("result cache folder %s unusable: %s", self.folder, e)

    def _scan(self) -> None:
        entries = []
        for path in self.folder.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)  # a write a killed process left behind
            elif path.is_dir():
                meta = path / "meta.json"
                used = meta.stat().st_mtime if meta.is_file() else 0.0
                entries.append((used, path.name, sum(f.stat().st_size for f in path.iterdir() if f.is_file())))
        for _, digest, size in sorted(entries):
            self._sizes[digest] = size

    @staticmethod
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict | None:
        digest = self.digest(key)
        with self._lock:
            if digest not in self._sizes:
                self.misses += 1
                return None
            try:
                entry = self._read(self.folder / digest, key)
            except Exception as e:  # anything wrong with an entry: drop it, run the job, write it again
                log.warning("result cache entry %s damaged (%s: %s); it will be rebuilt", digest[:12],
                            type(e).__name__, e)
                self._remove(digest)
                self.misses += 1
                self.rebuilt += 1
                return None
            self._sizes.move_to_end(digest)
            os.utime(self.folder / digest / "meta.json")
            self.hits += 1
            return entry

    def _read(self, path: Path, key: str) -> dict:
        from PIL import Image

        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta["key"] != key:
            raise ValueError("the entry holds another request")

        def image(name: str):
            data = (path / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["files"][name]:
                raise ValueError(f"{name} changed since it was written")
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")

        r = meta["result"]
        images = [image(n) for n in r["images"]]
        extra = {k: [image(n) for n in names] for k, names in r["extra_images"].items()}
        result = GenerationResult(images=images, seeds=r["seeds"], parameters=r["parameters"],
                                  readout=Readout(**r["readout"]), notices=r["notices"], extra_images=extra,
                                  saved_paths=r["saved_paths"], infotexts=r["infotexts"])
        return {"result": result, "images": images, "time": meta["time"]}

    def put(self, key: str, result, when: str) -> None:
        digest = self.digest(key)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.folder))
        except OSError as e:
            log.warning("result cache not written: %s", e)
            return
        try:
            files: dict[str, str] = {}

            def write(name: str, image) -> str:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
                (tmp / name).write_bytes(data)
                files[name] = hashlib.sha256(data).hexdigest()
                return name

            images = [write(f"{i}.png", im) for i, im in enumerate(result.images)]
            extra = {k: [write(f"{k}-{i}.png", im) for i, im in enumerate(ims)]
                     for k, ims in result.extra_images.items()}
            record = {"images": images, "extra_images": extra, "seeds": result.seeds,
                      "parameters": result.parameters, "readout": asdict(result.readout), "notices": result.notices,
                      "saved_paths": result.saved_paths, "infotexts": result.infotexts}
            meta = {"key": key, "time": when, "files": files, "result": record}
            (tmp / "meta.json").write_text(json.dumps(meta, default=list), encoding="utf-8")
            size = sum(f.stat().st_size for f in tmp.iterdir())
            if size > self.max_bytes:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            with self._lock:
                self._remove(digest)
                os.rename(tmp, self.folder / digest)
                self._sizes[digest] = size
                self._evict()
        except (OSError, TypeError, ValueError) as e:
            log.warning("result cache not written: %s", e)
            shutil.rmtree(tmp, ignore_errors=True)

    def _evict(self) -> None:
        while self._sizes and sum(self._sizes.values()) > self.max_bytes:
            self._remove(next(iter(self._sizes)))

    def _remove(self, digest: str) -> None:
        self._sizes.pop(digest, None)
        shutil.rmtree(self.folder / digest, ignore_errors=True)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._sizes)

    def clear(self) -> None:
        with self._lock:
            for digest in list(self._sizes):
                self._remove(digest)
