"""An in-memory LRU, the prompt-embedding cache on it, and where caches are kept on disk."""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
# Where converted models (OpenVINO IR) and, by default, the result cache are kept.
DEFAULT_CACHE_DIR = Path(os.environ.get("FASTSD_CACHE_DIR", Path.home() / ".cache" / "fast-sd"))
DEFAULT_RESULTS_DIR = DEFAULT_CACHE_DIR / "results"


class LRU:
    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class PromptCache(LRU):
    """Text-encoder outputs for one image, keyed by (model, prompt, negative prompt, clip skip, guidance on).

    Stored at batch 1 on the CPU-side device they were made on; `expand` repeats them for a batch,
    as diffusers' encode_prompt does for num_images_per_prompt.
    """

    def __init__(self, max_items: int = 64):
        super().__init__(max_items)

    @staticmethod
    def key(model_key: str, prompt: str, negative: str, clip_skip: int | None, cfg: bool) -> tuple:
        return (model_key, prompt, negative, clip_skip, cfg)

    @staticmethod
    def expand(kwargs: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        if batch == 1:
            return dict(kwargs)
        return {k: v.repeat(batch, *([1] * (v.dim() - 1))) for k, v in kwargs.items()}
