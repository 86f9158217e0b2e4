"""Image loading and preprocessing against upstream: a literal copy of MoE-LLaVA's expand2square and
transformers 4.57's slow (PIL-based, torchvision-free) CLIP/SigLIP image processors, built from the
tower directories `write_tower_directory` writes. Every bad input must be a one-line ImageError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from edgemoe.errors import ConfigError, ImageError
from edgemoe.model.image import as_image, expand_to_square, load_image, preprocess_image
from edgemoe.model.towers import (
    BUILTIN_TOWERS,
    CLIP_L14_336,
    SIGLIP_SO400M_384,
    ImageProcessorConfig,
    write_tower_directory,
)

CLIP = BUILTIN_TOWERS[CLIP_L14_336][1]
SIGLIP = BUILTIN_TOWERS[SIGLIP_SO400M_384][1]
TOL = 1e-6


def upstream_expand2square(pil_img, background_color):
    """Verbatim from PKU-YuanGroup/MoE-LLaVA moellava/mm_utils.py."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _noise(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode if mode != "P" else "RGB"]
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    img = Image.fromarray(pixels[:, :, 0] if bands == 1 else pixels, mode="RGB" if mode == "P" else mode)
    return img.quantize(64) if mode == "P" else img


IMAGES = {
    "landscape": _noise("RGB", 500, 300, 0),
    "portrait": _noise("RGB", 211, 403, 1),
    "square": _noise("RGB", 400, 400, 2),
    "tiny": _noise("RGB", 7, 3, 3),
    "rgba": _noise("RGBA", 120, 90, 4),
    "gray": _noise("L", 90, 151, 5),
    "palette": _noise("P", 160, 100, 6),
    "cmyk": _noise("CMYK", 50, 71, 7),
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """HF's slow processors, read from the tower directories we write (so the writer is checked too)."""
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor
    from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

    root = tmp_path_factory.mktemp("towers")
    out = {}
    for name, cls in ((CLIP_L14_336, CLIPImageProcessor), (SIGLIP_SO400M_384, SiglipImageProcessor)):
        vision, processor = BUILTIN_TOWERS[name]
        write_tower_directory(root / processor.kind, vision, processor)
        out[processor.kind] = cls.from_pretrained(root / processor.kind)
    return out


def upstream(img: Image.Image, hf_processor, pad: bool) -> np.ndarray:
    """MoE-LLaVA's path: Image.open(...).convert('RGB') -> expand2square(mean colour) -> HF processor."""
    img = img.convert("RGB")
    if pad:
        img = upstream_expand2square(img, tuple(int(x * 255) for x in hf_processor.image_mean))
    # channels_last stated, as HF guesses channels-first for a 3-pixel-high image
    return hf_processor(img, input_data_format="channels_last")["pixel_values"][0]


def _assert_matches(ours: np.ndarray, ref: np.ndarray, side: int) -> float:
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    assert ours.shape == ref.shape == (3, side, side)
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL
    return diff


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("aspect", ["pad", "square"])
@pytest.mark.parametrize("processor", [CLIP, SIGLIP], ids=["clip", "siglip"])
def test_preprocess_matches_upstream(hf, name, aspect, processor):
    img = IMAGES[name]
    ref = upstream(img, hf[processor.kind], pad=aspect == "pad")
    _assert_matches(preprocess_image(img, processor, aspect=aspect), ref, processor.crop_size)


def test_hf_reads_our_tower_configs_as_builtin(hf):
    clip, siglip = hf["clip"], hf["siglip"]
    assert clip.size == {"shortest_edge": 336} and clip.crop_size == {"height": 336, "width": 336}
    assert siglip.size == {"height": 384, "width": 384}
    for ours, theirs in ((CLIP, clip), (SIGLIP, siglip)):
        assert tuple(theirs.image_mean) == ours.image_mean and tuple(theirs.image_std) == ours.image_std
        assert theirs.resample == ours.resample and theirs.rescale_factor == ours.rescale_factor


def test_pad_colours():
    # int(mean * 255) truncates: CLIP's 0.4578275 * 255 = 116.75 becomes 116, not 117
    assert CLIP.pad_color == (122, 116, 104)
    assert SIGLIP.pad_color == (127, 127, 127)


def test_crop_larger_than_resize_pads_with_zeros_like_hf(hf):
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    odd = ImageProcessorConfig("clip", 20, 31, 3, 1 / 255, CLIP.image_mean, CLIP.image_std, True)
    theirs = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 31, "width": 31}, resample=3,
                                image_mean=list(CLIP.image_mean), image_std=list(CLIP.image_std))
    for img in (IMAGES["landscape"], IMAGES["portrait"], IMAGES["tiny"]):
        _assert_matches(preprocess_image(img, odd, aspect="square"), upstream(img, theirs, pad=False), 31)


@pytest.mark.parametrize("name", IMAGES)
def test_expand_to_square_is_upstreams(name):
    img = IMAGES[name].convert("RGB")
    ours, theirs = expand_to_square(img, CLIP.pad_color), upstream_expand2square(img, CLIP.pad_color)
    assert ours.mode == "RGB" and ours.size == theirs.size == (max(img.size),) * 2
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_expand_to_square_places_image_centred():
    out = np.asarray(expand_to_square(Image.new("RGB", (4, 1), (255, 255, 255)), (1, 2, 3)))
    assert out[:, :, 0].tolist() == [[1] * 4, [255] * 4, [1] * 4, [1] * 4]  # row offset (4 - 1) // 2 = 1
    out = np.asarray(expand_to_square(Image.new("RGB", (2, 5), (255, 255, 255)), (1, 2, 3)))
    assert out[0, :, 0].tolist() == [1, 255, 255, 1, 1]  # column offset (5 - 2) // 2 = 1


@pytest.mark.parametrize("name,fmt", [("landscape", "PNG"), ("palette", "PNG"), ("rgba", "PNG"),
                                      ("gray", "JPEG"), ("cmyk", "JPEG")])
def test_files_load_like_upstream(hf, tmp_path, name, fmt):
    path = tmp_path / f"{name}.{fmt.lower()}"
    IMAGES[name].save(path, fmt)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(path).convert("RGB")))
    ref = upstream(Image.open(path), hf["clip"], pad=True)
    _assert_matches(preprocess_image(path, CLIP, aspect="pad"), ref, 336)
    _assert_matches(preprocess_image(str(path), CLIP), ref, 336)


def test_arrays_and_pil_images_are_accepted():
    rgb = IMAGES["portrait"]
    expected = preprocess_image(rgb, SIGLIP)
    assert np.array_equal(preprocess_image(np.asarray(rgb), SIGLIP), expected)
    gray = np.asarray(IMAGES["gray"])
    assert as_image(gray).mode == "RGB"
    assert np.array_equal(np.asarray(as_image(gray[:, :, None])), np.asarray(IMAGES["gray"].convert("RGB")))
    rgba = np.asarray(IMAGES["rgba"])
    assert np.array_equal(np.asarray(as_image(rgba)), rgba[:, :, :3])  # alpha dropped, as convert('RGB') does


# --- bad inputs --------------------------------------------------------------------------------------


def _png_1bit(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit greyscale PNG; zlib makes a 20000x20000 one a few tens of KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, packer = b"\x00" * (1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _raises(source, match: str, **kwargs) -> str:
    with pytest.raises(ImageError, match=match) as info:
        as_image(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_png_writer_makes_valid_images(tmp_path):
    img = load_image(_png_1bit(tmp_path / "small.png", 33, 9))
    assert img.size == (33, 9) and not np.asarray(img).any()


def test_missing_file_and_directory(tmp_path):
    _raises(tmp_path / "nope.png", r"^image not found: .*nope\.png$")
    _raises(tmp_path, r"is a directory, not an image$")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am text\n")
    _raises(path, r"notes\.png is not an image Pillow can read$")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    _raises(empty, r"empty\.jpg is not an image Pillow can read$")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    whole = tmp_path / f"whole.{fmt.lower()}"
    IMAGES["landscape"].save(whole, fmt)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _raises(cut, r"cut\.\w+ is truncated or corrupt: image file is truncated")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        preprocess_image(cut, CLIP)


def test_decompression_bombs(tmp_path):
    # 400 Mpx: over twice Image.MAX_IMAGE_PIXELS, so Pillow itself refuses it at open
    huge = _png_1bit(tmp_path / "bomb.png", 20000, 20000)
    assert huge.stat().st_size < 100_000
    _raises(huge, r"bomb\.png is too large to decode safely: .*decompression bomb")
    # 100 Mpx: Pillow only warns; the warning must still stop it, even with our own limit lifted
    warned = _png_1bit(tmp_path / "warn.png", 10000, 10000)
    _raises(warned, r"warn\.png is too large to decode safely", max_pixels=10**9)
    # our limit, read from the header: 100 Mpx is over the 64 Mpx default, 33x9 over an explicit 200
    assert Image.MAX_IMAGE_PIXELS > 64_000_000
    small = _png_1bit(tmp_path / "small.png", 33, 9)
    assert "33x9 = 297 pixels, over the limit of 200" in _raises(small, "decompression bomb", max_pixels=200)


def test_header_limit_applies_before_pillows(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's guard off: ours must still hold
    path = _png_1bit(tmp_path / "big.png", 9000, 8000)
    _raises(path, r"big\.png is 9000x8000 = 72,000,000 pixels, over the limit of 64,000,000")


def test_bad_in_memory_inputs():
    _raises(np.zeros((4, 4, 3), dtype=np.float32), r"expected a uint8 array .* got float32 \(4, 4, 3\)$")
    _raises(np.zeros((4, 4, 2), dtype=np.uint8), r"got uint8 \(4, 4, 2\)$")
    _raises(np.zeros((0, 4, 3), dtype=np.uint8), r"image is empty \(4x0\)")
    _raises(42, r"expected a path, a PIL image or a numpy array, got int")
    with pytest.raises(ConfigError, match="image_aspect_ratio 'anyres' is not supported"):
        preprocess_image(IMAGES["square"], CLIP, aspect="anyres")
