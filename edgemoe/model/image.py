"""Image loading and preprocessing: a file (or a PIL image, or a uint8 array) -> float32 pixel values [3, H, W].

Contract: a file, or encoded bytes (`decode_image`: what a server receives), decodes to RGB with the
same checks. The output equals, value for value, what MoE-LLaVA feeds its vision tower: upstream's
`expand2square` (pad to a square with the processor's mean colour, for `image_aspect_ratio == "pad"`)
followed by transformers' slow, PIL-based `CLIPImageProcessor` (resize the shortest edge with PIL,
centre-crop) or `SiglipImageProcessor` (resize to a fixed square), both then rescaling and
normalising. The dtype path is theirs too: resizing happens on uint8 in PIL, rescaling in float64
then cast to float32, normalising in float32. Pillow and numpy only; no torch, no transformers.

Every input a user can get wrong (missing, a directory, not an image, truncated, too many pixels)
raises an `ImageError` with a one-line message. Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` is
left alone, so a cut-off file fails instead of decoding to grey.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgemoe.errors import ConfigError, ImageError
from edgemoe.model.tiling import TILED, tile_image
from edgemoe.model.towers import ImageProcessorConfig

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

# Checked from the header before any pixel is decoded; Pillow's own Image.MAX_IMAGE_PIXELS guard
# (about 89 Mpx) applies as well, its warning turned into an error.
DEFAULT_MAX_PIXELS = 64_000_000

# Upstream pads only for "pad"; LLaVA's default "square" sends the image straight to the processor.
ASPECTS = ("pad", "square")


@dataclass(frozen=True)
class ImageInput:
    """What the vision graph takes for one image: views [T, 3, S, S] and, for tiled layouts, the grid."""

    pixels: np.ndarray  # float32 [T, 3, S, S]; T = 1 for single-view layouts
    grid: tuple[int, int] | None = None  # (rows, cols) of local tiles after the global view; None: one view

    @property
    def tiled(self) -> bool:
        return self.grid is not None


def prepare_image(source: ImageSource, processor: ImageProcessorConfig, aspect: str = "pad",
                  candidates: tuple[tuple[int, int], ...] = (), tiled: bool = True) -> ImageInput:
    """One image as the bundle's layout wants it: `preprocess_image` for pad/square, the tile_2d views
    (best grid among `candidates`, or only 1 x 1 when `tiled` is False) for DeepSeek-VL2."""
    if aspect != TILED:
        return ImageInput(preprocess_image(source, processor, aspect)[None])
    if not candidates:
        raise ConfigError("a tile_2d layout needs candidate_resolutions")
    views = tile_image(as_image(source), processor.size, candidates, tiled=tiled)
    return ImageInput(views.pixels, (views.rows, views.cols))


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert an image file to RGB (upstream: `Image.open(p).convert("RGB")`)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image")
    return _decode(path, str(path), max_pixels)


def decode_image(data: bytes, name: str = "image", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An encoded image (PNG, JPEG, WebP, ... bytes) as RGB, with `load_image`'s checks."""
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(fp: Any, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as img:
                _check_pixels(img, max_pixels, name)
                img.load()  # decode now: a truncated file fails here, not later in resize
                return img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name} is too large to decode safely: {_one_line(exc)}") from None
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image Pillow can read") from None
        except (OSError, SyntaxError, EOFError, ValueError) as exc:
            raise ImageError(f"{name} is truncated or corrupt: {_one_line(exc)}") from None


def image_key(source: ImageSource) -> tuple[Any, ...]:
    """What identifies an image's pixels, to reuse its encoding: a file's path, size and mtime; a
    PIL image's or array's content digest."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).resolve()
        try:
            stat = path.stat()
        except OSError:
            return ("path", str(path))
        return ("path", str(path), stat.st_size, stat.st_mtime_ns)
    if isinstance(source, Image.Image):
        return ("pixels", source.mode, source.size, hashlib.blake2b(source.tobytes(), digest_size=16).digest())
    array = np.ascontiguousarray(source)
    return ("array", array.shape, str(array.dtype), hashlib.blake2b(array.data, digest_size=16).digest())


def as_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any accepted input as an RGB PIL image: a path (see `load_image`), a PIL image or a uint8 array."""
    if isinstance(source, (str, os.PathLike)):
        return load_image(source, max_pixels=max_pixels)
    if isinstance(source, np.ndarray):
        source = _from_array(source)
    if not isinstance(source, Image.Image):
        raise ImageError(f"expected a path, a PIL image or a numpy array, got {type(source).__name__}")
    if min(source.size) == 0:
        raise ImageError(f"image is empty ({source.width}x{source.height})")
    _check_pixels(source, max_pixels, "image")
    return source if source.mode == "RGB" else source.convert("RGB")


def expand_to_square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Upstream's `expand2square`: centre `img` on a square canvas of its longer side filled with `background`."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(img, ((side - width) // 2, 0) if width < height else (0, (side - height) // 2))
    return canvas


def preprocess_image(source: ImageSource, processor: ImageProcessorConfig, aspect: str = "pad") -> np.ndarray:
    """Pixel values float32 [3, H, W] for one image, as upstream computes them (see module docstring)."""
    if aspect not in ASPECTS:
        raise ConfigError(f"image_aspect_ratio {aspect!r} is not supported (expected one of {', '.join(ASPECTS)})")
    img = as_image(source)
    if aspect == "pad":
        # pad_color is int(mean * 255), truncated, because that is what upstream's expand2square is given.
        img = expand_to_square(img, processor.pad_color)
    pixels = np.asarray(img.resize(_resized_size(img.size, processor), resample=processor.resample))  # [H, W, 3] u8
    if processor.do_center_crop:
        pixels = _center_crop(pixels, processor.crop_size)
    # HF's rescale: upcast to float64, scale, cast to float32; normalise then stays in float32.
    scaled = (pixels.astype(np.float64) * processor.rescale_factor).astype(np.float32)
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))  # [3, H, W]


def _resized_size(size: tuple[int, int], processor: ImageProcessorConfig) -> tuple[int, int]:
    """(width, height) after resizing, with HF's `get_resize_output_image_size` arithmetic."""
    if processor.kind == "siglip":
        return processor.size, processor.size
    width, height = size
    short, long = min(width, height), max(width, height)
    new_long = int(processor.size * long / short)  # float division then truncation, as HF (and torchvision)
    return (processor.size, new_long) if width <= height else (new_long, processor.size)


def _center_crop(pixels: np.ndarray, crop: int) -> np.ndarray:
    """HF's `center_crop`: offset (n - crop) // 2; a side shorter than `crop` is zero-padded, centred with ceil."""
    height, width = pixels.shape[:2]
    short = [max(0, crop - n) for n in (height, width)]
    if any(short):
        pixels = np.pad(pixels, [((s + 1) // 2, s // 2) for s in short] + [(0, 0)])
    top, left = (pixels.shape[0] - crop) // 2, (pixels.shape[1] - crop) // 2
    return pixels[top : top + crop, left : left + crop]


def _from_array(array: np.ndarray) -> Image.Image:
    """A uint8 [H, W] or [H, W, C] array (C in 1, 3, 4) as a PIL image."""
    ok_shape = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if array.dtype != np.uint8 or not ok_shape:
        raise ImageError(
            f"expected a uint8 array [H, W] or [H, W, C] with C in 1, 3, 4; got {array.dtype} {array.shape}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))


def _check_pixels(img: Image.Image, max_pixels: int, name: str) -> None:
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise ImageError(
            f"{name} is {img.width}x{img.height} = {pixels:,} pixels, over the limit of {max_pixels:,} "
            "(a decompression bomb?); pass a larger max_pixels if it is genuine"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
