"""The benchmark's picture and the calibration images come from model.synthetic_images, pixel for pixel as before.

`_old_bench_image` and `_old_calibration_image` are verbatim copies of the two drawing loops as they stood
in bench/prompt.py and export/calibration.py before both moved into one module: the references the
call sites must keep matching (same seeds, same pixels), so sweeps and calibration stay reproducible.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from edgemoe.bench.prompt import synthetic_image as bench_image
from edgemoe.export.calibration import HELD_OUT_KINDS, IMAGE_KINDS
from edgemoe.export.calibration import synthetic_image as calibration_image
from edgemoe.model.synthetic_images import PATTERN_KINDS, pattern_image, shapes_on_gradient


def _old_bench_image(size: tuple[int, int] = (480, 360), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x, y, (1 - x) * (1 - y)], axis=-1) * rng.uniform(0.4, 1.0, size=3)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        box = (x0, y0, x0 + int(rng.integers(30, 160)), y0 + int(rng.integers(30, 160)))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img


def _old_calibration_image(kind: str, seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
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
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = (x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120)))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        return img
    raise ValueError(f"unknown synthetic image kind {kind!r}")


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("size", [(480, 360), (200, 100)])
def test_bench_image_is_unchanged(tmp_path, seed, size) -> None:
    written = bench_image(tmp_path / "sub" / "img.png", size=size, seed=seed)  # the sweep's call site
    expected = _pixels(_old_bench_image(size, seed))
    with Image.open(written) as img:
        np.testing.assert_array_equal(_pixels(img), expected)
    np.testing.assert_array_equal(_pixels(shapes_on_gradient(seed, size)), expected)


@pytest.mark.parametrize("kind", PATTERN_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 3, 1000, 1001])
@pytest.mark.parametrize("size", [(320, 240), (64, 48)])
def test_calibration_images_are_unchanged(kind, seed, size) -> None:
    expected = _pixels(_old_calibration_image(kind, seed, size))
    np.testing.assert_array_equal(_pixels(calibration_image(kind, seed, size)), expected)
    np.testing.assert_array_equal(_pixels(pattern_image(kind, seed, size)), expected)


def test_calibration_kinds_are_patterns() -> None:
    assert set(IMAGE_KINDS + HELD_OUT_KINDS) <= set(PATTERN_KINDS)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown synthetic image kind"):
        pattern_image("plaid", 0)


def test_images_are_not_square_and_deterministic() -> None:
    assert shapes_on_gradient().size == (480, 360) and pattern_image("shapes", 0).size == (320, 240)
    assert shapes_on_gradient(5).tobytes() == shapes_on_gradient(5).tobytes()
    assert shapes_on_gradient(5).tobytes() != shapes_on_gradient(6).tobytes()
