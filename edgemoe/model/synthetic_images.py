"""Deterministic synthetic RGB images (gradients, shapes, stripes, noise): test pictures with no file or network.

Contract: every image is a function of its arguments alone (a numpy `default_rng(seed)` drives every
random choice), so the same seed gives the same pixels on every machine. The images are not square, so
an image processor's padding runs as it does on photos. `pattern_image(kind, seed)` draws one of
`PATTERN_KINDS` (the exporter's calibration images); `shapes_on_gradient(seed)` is a tinted gradient with
six shapes (the benchmark's default picture). Both draw their shapes with `draw_shapes`. numpy and PIL
only: the runtime imports this module.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PATTERN_KINDS = ("gradient", "noise", "stripes", "shapes")


def draw_shapes(img: Image.Image, rng: np.random.Generator, count: int, margin: int,
                extent: tuple[int, int]) -> Image.Image:
    """Draw `count` filled ellipses or rectangles on `img` in place and return it.

    Each shape's corner lies at least `margin` pixels from the right and bottom edges; its width and
    height are drawn from [extent[0], extent[1]); its colour and kind (ellipse or rectangle) are random."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        x0, y0 = int(rng.integers(0, w - margin)), int(rng.integers(0, h - margin))
        box = (x0, y0, x0 + int(rng.integers(*extent)), y0 + int(rng.integers(*extent)))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def shapes_on_gradient(seed: int = 0, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A three-channel gradient, tinted at random, with six shapes on it."""
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x, y, (1 - x) * (1 - y)], axis=-1) * rng.uniform(0.4, 1.0, size=3)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    return draw_shapes(img, rng, count=6, margin=60, extent=(30, 160))


def pattern_image(kind: str, seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """One image of `kind` (one of PATTERN_KINDS); ValueError for any other kind."""
    rng = np.random.default_rng(seed)
    w, h = size
    if kind == "gradient":
        x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
        c = rng.uniform(0.2, 1.0, size=3)
        rgb = np.stack([x * c[0], y * c[1], (1 - x) * (1 - y) * c[2]], axis=-1)
        return Image.fromarray((rgb * 255).astype(np.uint8))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    if kind == "stripes":
        x = np.arange(w)[None, :, None] + np.arange(h)[:, None, None] * rng.uniform(0.2, 1.5)
        period = rng.integers(8, 24)
        colours = rng.integers(0, 256, size=(2, 3))
        rgb = np.where((x // period) % 2 == 0, colours[0], colours[1]).astype(np.uint8)
        return Image.fromarray(np.broadcast_to(rgb, (h, w, 3)).copy())
    if kind == "shapes":
        img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(180, 256, size=3)))
        return draw_shapes(img, rng, count=6, margin=40, extent=(20, 120))
    raise ValueError(f"unknown synthetic image kind {kind!r}")
