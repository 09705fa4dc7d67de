"""Tile grids and feathered blending, for tiled upscale and tiled VAE decode.

Tiles are all the same size (what a compiled static-shape model wants); the last row and
column are moved back to end exactly on the edge, so any output size works. Where tiles
overlap, weights ramp linearly across the overlap, so no seam shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    x: int
    y: int
    width: int
    height: int


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # last tile flush with the edge
    return sorted(set(starts))


def grid(width: int, height: int, tile: int, overlap: int) -> list[Tile]:
    """Tiles covering width x height; a side shorter than `tile` gets one tile of its own length."""
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError("tile must be positive and overlap in [0, tile)")
    tw, th = min(tile, width), min(tile, height)
    return [Tile(x, y, tw, th) for y in _starts(height, th, overlap) for x in _starts(width, tw, overlap)]


def feather_weights(tile: Tile, width: int, height: int, overlap: int) -> np.ndarray:
    """(h, w) weights: a linear ramp over `overlap` pixels on every side that borders another tile."""
    def ramp(n: int, at_start: bool, at_end: bool) -> np.ndarray:
        w = np.ones(n, dtype=np.float32)
        k = min(overlap, n // 2)
        if k > 0:
            edge = (np.arange(k, dtype=np.float32) + 0.5) / k  # never exactly 0: every pixel keeps some weight
            if not at_start:
                w[:k] = np.minimum(w[:k], edge)
            if not at_end:
                w[n - k:] = np.minimum(w[n - k:], edge[::-1])
        return w

    wx = ramp(tile.width, tile.x == 0, tile.x + tile.width >= width)
    wy = ramp(tile.height, tile.y == 0, tile.y + tile.height >= height)
    return np.outer(wy, wx)


class Blender:
    """Accumulates weighted tiles into an (H, W, C) float32 canvas; memory is the canvas only."""

    def __init__(self, width: int, height: int, channels: int, overlap: int):
        self.width, self.height, self.overlap = width, height, overlap
        self.sum = np.zeros((height, width, channels), dtype=np.float32)
        self.weight = np.zeros((height, width, 1), dtype=np.float32)

    def add(self, tile: Tile, pixels: np.ndarray) -> None:
        w = feather_weights(tile, self.width, self.height, self.overlap)[..., None]
        ys, xs = slice(tile.y, tile.y + tile.height), slice(tile.x, tile.x + tile.width)
        self.sum[ys, xs] += pixels.astype(np.float32) * w
        self.weight[ys, xs] += w

    def result(self) -> np.ndarray:
        return self.sum / np.maximum(self.weight, 1e-8)
