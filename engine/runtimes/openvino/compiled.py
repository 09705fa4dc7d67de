"""Compiled models per (part, input shapes): an LRU that makes room before a compile, frees a part's
scratch when another part takes over, and drops the IR pages a compile read."""
from __future__ import annotations

import gc
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from engine.runtimes.base import CompileEvent
from engine.system import devices

log = logging.getLogger(__name__)

RESERVE_BYTES = 1 << 30  # memory left free for activations and the rest of the process


def precision_name(hint) -> str:
    """Our name for a compiled model's INFERENCE_PRECISION_HINT. It is an ov.Type, whose str() is
    "<Type: 'bfloat16'>"; to_string() gives the short name ("bf16", "f16", "f32")."""
    short = hint.to_string() if hasattr(hint, "to_string") else str(hint).lower()
    return {"bf16": "bf16", "f16": "fp16"}.get(short, "fp32")


class CompiledModels:
    """At most `max_shapes` compiled shapes per part, least recently used dropped first."""

    def __init__(self, core, config: Callable[[], dict], mapped_root: Path, events: list[CompileEvent],
                 max_shapes: int = 4):
        self.core, self._config, self.mapped_root, self.events = core, config, mapped_root, events
        self.max_shapes = max_shapes
        self.entries: OrderedDict[tuple, Any] = OrderedDict()  # (part, ((input, shape), ...)) -> compiled model
        self.cost: dict[str, int] = {}  # part -> RSS one compile of it added
        self.precision: dict[str, str] = {}  # part -> what its last compile runs in

    def clear(self) -> None:
        self.entries.clear()
        self.precision.clear()

    def get(self, part: str, ir, shapes: dict[str, tuple[int, ...]]):
        key = (part, tuple(sorted((k, tuple(v)) for k, v in shapes.items())))
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit
        self._make_room(part)
        compiled = self.entries[key] = self._compile(part, ir, key[1])
        same_part = [k for k in self.entries if k[0] == part]
        for old in same_part[:-self.max_shapes]:  # oldest first
            del self.entries[old]
        return compiled

    def _compile(self, part: str, ir, shape: tuple):
        start = time.perf_counter()
        rss_before = devices.process_rss_bytes()
        model = ir.clone()
        model.reshape({name: list(dims) for name, dims in shape})
        compiled = self.core.compile_model(model, "CPU", self._config())
        del model
        drop_mapped_pages(self.mapped_root)  # the IR pages the compile read; the compiled model has its own
        seconds = time.perf_counter() - start
        self.cost[part] = max(self.cost.get(part, 0), devices.process_rss_bytes() - rss_before)
        self.events.append(CompileEvent(part, shape, seconds))
        log.info("compiled %s for %s in %.2f s", part, dict(shape), seconds)
        self.precision[part] = precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        return compiled

    def _make_room(self, part: str) -> None:
        """Each compiled shape holds its own copy of the weights (measured: about 5 GiB for an
        INT8 SD 1.5 UNet on this plugin); drop the least recently used shapes before a compile
        that would not fit in the memory that is left."""
        need = self.cost.get(part, 0) * 1.1 + RESERVE_BYTES
        while self.entries and devices.free_bytes("cpu") < need:
            old, _ = self.entries.popitem(last=False)
            gc.collect()
            log.info("evicted compiled %s for %s to make room", old[0], dict(old[1]))

    def release_scratch(self, part: str | None) -> None:
        """Free the intermediate buffers of `part`'s compiled models when another part takes over.

        Each compiled model keeps its activation buffers between calls; the UNet's are about
        1 GiB at 512x512 with guidance, and would otherwise still be held while the VAE decodes
        (measured: peak 4.66 -> 3.60 GiB for an SD 1.5 image). They are allocated again on the
        part's next call, which costs far less than one UNet step."""
        for (name, _), compiled in self.entries.items():
            if name == part:
                try:
                    compiled.release_memory()
                except (AttributeError, RuntimeError):  # older OpenVINO, or a request still running
                    pass


def drop_mapped_pages(folder: Path) -> int:
    """Take this process's resident pages of read-only file mappings under `folder` out of its RSS.

    OpenVINO memory-maps an IR's .bin and reads all of it while compiling. The compiled model
    keeps its own (repacked) weights, yet the mapping stays, and its pages stay counted in RSS:
    0.8 GiB for an INT8 SD 1.5 UNet (measured: compiled 1.83 -> 1.03 GiB, first inference
    faults back 0.02 GiB). MADV_DONTNEED on a mapping that cannot be written drops nothing but
    the process's page-table entries: the file stays in the kernel's page cache, and a page that
    is read again faults back in. Linux only; elsewhere a no-op. Returns the bytes advised."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    prefix = str(Path(folder).resolve()) + os.sep
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except (OSError, AttributeError):
        return 0
    advised = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "w" in fields[1] or not fields[5].strip().startswith(prefix):
            continue  # only read-only mappings: no page of them can hold a change that would be lost
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(start, end - start, 4) == 0:  # MADV_DONTNEED
            advised += end - start
    return advised

