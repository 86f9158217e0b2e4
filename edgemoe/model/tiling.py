"""Tiled images (DeepSeek-VL2's "tile_2d" layout): best tile grid, padded views, pixel tiles, token counts.

Contract (a port of DeepSeek-VL2's `processing_deepseek_vl_v2.py`, checked pixel for pixel in tests):
- `best_resolution((W, H), candidates)`: for each candidate (cw, ch), s = min(cw/W, ch/H), effective
  = min(int(W*s) * int(H*s), W*H), waste = cw*ch - effective; the largest effective wins, ties to the
  least waste, full ties to the first candidate.
- `pad_view(img, (w, h))`: PIL's `ImageOps.pad` with BICUBIC and grey (127, 127, 127): an aspect-preserving
  resize whose long side fits, pasted centred.
- `tile_image(img, tile, candidates, tiled)` -> `TiledImage`: pixels [1 + rows*cols, 3, tile, tile] in
  [-1, 1] (ToTensor then Normalize(0.5, 0.5)), the global view first, then the local tiles row-major;
  `tiled=False` (more than two images in a prompt, as upstream) uses the 1 x 1 layout.
- `image_token_count(grid, rows, cols)` with grid = ceil((tile // patch) / 2) tokens per side after the
  projector's 2 x 2 downsample: grid*(grid+1) global + 1 separator + (grid*rows)*(grid*cols + 1) local
  (210 + 1 + 14*rows*(14*cols + 1) at 384-pixel tiles: 421 for 1 x 1, 1023 for 2 x 2).
numpy and Pillow only: the runtime uses this too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

TILED = "tile_2d"  # the image_aspect_ratio naming this layout
PAD_GREY = (127, 127, 127)  # int(0.5 * 255): upstream pads with the mean colour


@dataclass(frozen=True)
class TiledImage:
    """One image as the vision tower sees it."""

    pixels: np.ndarray  # [1 + rows*cols, 3, T, T] float32, global view first
    rows: int  # local tiles down (upstream's num_height_tiles)
    cols: int  # local tiles across (num_width_tiles)


def best_resolution(size: tuple[int, int], candidates: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The candidate (W, H) that keeps the most of an image of `size` (module docstring)."""
    width, height = size
    best, best_eff, best_waste = candidates[0], -1, math.inf
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), effective, waste
    return best


def pad_view(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`ImageOps.pad(img, size, color=grey)` with BICUBIC resampling."""
    return ImageOps.pad(img, size, method=Image.Resampling.BICUBIC, color=PAD_GREY)


def _normalise(img: Image.Image) -> np.ndarray:
    """HWC uint8 -> CHW float32 in [-1, 1], as ToTensor then Normalize(mean 0.5, std 0.5)."""
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    return ((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)


def tile_image(img: Image.Image, tile: int, candidates: tuple[tuple[int, int], ...], tiled: bool = True) -> TiledImage:
    """The global view and local tiles of an RGB image (module docstring)."""
    img = img.convert("RGB")
    best = best_resolution(img.size, candidates) if tiled else (tile, tile)
    views = [pad_view(img, (tile, tile))]
    local = pad_view(img, best)
    cols, rows = best[0] // tile, best[1] // tile
    for i in range(0, best[1], tile):
        for j in range(0, best[0], tile):
            views.append(local.crop((j, i, j + tile, i + tile)))
    return TiledImage(np.stack([_normalise(v) for v in views]), rows, cols)


def tokens_per_side(tile: int, patch: int) -> int:
    """Image tokens per tile side after the projector's pad-to-even and 2 x 2 downsample."""
    return math.ceil((tile // patch) / 2)


def image_token_count(grid: int, rows: int, cols: int) -> int:
    """Tokens one image occupies in the prompt (module docstring)."""
    return grid * (grid + 1) + 1 + (grid * rows) * (grid * cols + 1)
