"""Calibration data: prompts in the family's conversation template plus images, embedded as the model sees them.

Contract: `calibration_set(tokenizer, family, ...)` returns a `CalibrationSet`: a few text prompts and
image prompts, each rendered with the family's template (`Conversation`) and tokenized the upstream way
(`tokenize_with_image`, -200 where the image goes). Images are synthetic by default: deterministic
gradients, shapes, stripes and noise (`edgemoe.model.synthetic_images`: no file, no network),
preprocessed exactly as at inference (`preprocess_image`). `held_out=True` gives different built-in prompts and images of
other kinds and seeds, which tests use to check that a budget met on calibration generalises. User
data replaces the built-ins: `images_dir` (every image file in it) and `prompts_file` (one text prompt
per line). `embed_samples(ckpt, cset)` then runs the images through the reference vision tower and
projector and splices them with the prompt's token embeddings: the model input, [L, H] per sample,
plus the positions whose logits are compared (the text positions; see `EmbeddedSample`).

The default set is small on purpose (2 images x 1 question + 4 text prompts, about 1,400 tokens at
full size with 576 image tokens per image) so that `--precision auto` on a 2.9B model finishes in tens
of minutes on two cores; image tokens are kept whole unless `max_image_tokens` caps them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemoe.errors import EdgeMoEError
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.image import ImageInput, prepare_image
from edgemoe.model.prompt import IMAGE_TOKEN_INDEX, Conversation
from edgemoe.model.synthetic_images import pattern_image as synthetic_image
from edgemoe.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TEXT_PROMPTS = (
    "What are three things to check before riding a bicycle in the rain?",
    "Explain in two sentences why the sky looks blue on a clear afternoon.",
    "Write a short note reminding a friend to bring apples, bread and a red umbrella.",
    "How many legs do a cat, a bird and a spider have together? Answer step by step.",
)
IMAGE_PROMPTS = ("Describe this image in detail: the colours, the shapes and where they are.",)
HELD_OUT_TEXT = (
    "Give two reasons why a kitchen window might be left open on a warm morning.",
    "Summarise what engineers measure every hour in a weather station.",
    "Which is heavier, a kilogram of stones or a kilogram of feathers? Explain.",
)
HELD_OUT_IMAGE = ("What objects do you see in the picture, and what colour is each one?",)
IMAGE_KINDS = ("gradient", "shapes")
HELD_OUT_KINDS = ("stripes", "noise")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class CalibrationSample:
    """One prompt: ids with at most one IMAGE_TOKEN_INDEX marker, and its image's pixel values."""

    name: str
    ids: tuple[int, ...]
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)  # [3, S, S] or tiles [T, 3, S, S]
    grid: tuple[int, int] | None = None  # tiled layouts: (rows, cols) of local tiles after the global view

    @property
    def views(self) -> np.ndarray | None:
        """The vision graph's input [T, 3, S, S] (T = 1 for single-view layouts)."""
        if self.pixels is None:
            return None
        return self.pixels if self.grid is not None else self.pixels[None]

    @classmethod
    def with_image(cls, name: str, ids: tuple[int, ...], image: ImageInput) -> "CalibrationSample":
        return cls(name, ids, image.pixels if image.tiled else image.pixels[0], image.grid)


@dataclass(frozen=True)
class CalibrationSet:
    samples: tuple[CalibrationSample, ...]
    source: str  # "built-in", "built-in held-out", or what the user gave

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the calibration data."""
        images = sum(s.pixels is not None for s in self.samples)
        return {"source": self.source, "samples": len(self.samples), "image_samples": images,
                "text_tokens": sum(len(s.ids) - (IMAGE_TOKEN_INDEX in s.ids) for s in self.samples),
                "names": [s.name for s in self.samples]}


# -- building the set ---------------------------------------------------------------------------

def _ids(tokenizer: Tokenizer, family: str, text: str, image: bool) -> tuple[int, ...]:
    return tuple(Conversation.for_family(family).add_user(text, image=image).encode(tokenizer))


def _user_images(directory: Path) -> list[tuple[str, Image.Image | Path]]:
    if not directory.is_dir():
        raise EdgeMoEError(f"--calibration-images {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EdgeMoEError(f"--calibration-images {directory} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [(p.name, p) for p in files]


def _user_prompts(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeMoEError(f"cannot read --calibration-prompts {path}: {exc}") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise EdgeMoEError(f"--calibration-prompts {path} holds no prompts (one per line)")
    return prompts


def calibration_set(tokenizer: Tokenizer, family: str, processor: Any, aspect: str = "pad", *,
                    held_out: bool = False, images_dir: Path | None = None, prompts_file: Path | None = None,
                    num_images: int | None = None, num_text: int | None = None,
                    candidates: tuple[tuple[int, int], ...] = ()) -> CalibrationSet:
    """The calibration (or held-out) prompts and images; see the module docstring.

    `num_images` / `num_text` truncate the built-in lists (tests use smaller or larger sets)."""
    text = list(HELD_OUT_TEXT if held_out else TEXT_PROMPTS)
    question = (HELD_OUT_IMAGE if held_out else IMAGE_PROMPTS)[0]
    kinds = HELD_OUT_KINDS if held_out else IMAGE_KINDS
    seed0 = 1000 if held_out else 0
    images: list[tuple[str, Image.Image | Path]] = [(f"{k}{seed0 + i}", synthetic_image(k, seed0 + i))
                                                     for i, k in enumerate(kinds)]
    source = "built-in held-out" if held_out else "built-in"
    if images_dir is not None:
        images, source = _user_images(Path(images_dir)), f"images from {images_dir}"
    if prompts_file is not None:
        text = _user_prompts(Path(prompts_file))
        source += f", prompts from {prompts_file}"
    images = images[:num_images] if num_images is not None else images
    text = text[:num_text] if num_text is not None else text
    samples = [CalibrationSample.with_image(f"image:{name}", _ids(tokenizer, family, question, True),
                                            prepare_image(img, processor, aspect, candidates)) for name, img in images]
    samples += [CalibrationSample(f"text:{i}", _ids(tokenizer, family, t, False)) for i, t in enumerate(text)]
    if not samples:
        raise EdgeMoEError("the calibration set is empty")
    return CalibrationSet(tuple(samples), source)


# -- embedding ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbeddedSample:
    """One sample as the decoder's input: embeds [L, H] fp32 and the positions whose logits count.

    Compared positions are the text positions: logits at image positions predict nothing a user sees,
    and 576 of them per image would swamp the metric; image tokens still shape every text position
    after them through attention, and every expert sees them (they are routed like any token)."""

    name: str
    embeds: np.ndarray  # [L, H]
    compare: np.ndarray  # int64 [P] positions into embeds

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])


def _cap(features: np.ndarray, cap: int | None) -> np.ndarray:
    """Keep `cap` image tokens evenly spaced (all of them when cap is None or larger)."""
    if cap is None or features.shape[0] <= cap:
        return features
    keep = np.linspace(0, features.shape[0] - 1, cap).round().astype(np.int64)
    return features[keep]


def image_features(ckpt: Checkpoint, cset: CalibrationSet) -> dict[str, np.ndarray]:
    """Projected features [N, H] per image sample, from the reference tower and projector (then freed)."""
    import torch

    from edgemoe.export import components

    pending = [s for s in cset.samples if s.pixels is not None]
    if not pending:
        return {}
    out = {}
    with torch.inference_mode():
        tower = components.vision_tower(ckpt)
        feats = {s.name: tower(torch.from_numpy(s.views)) for s in pending}  # [T, N', Hv]
        del tower
        proj = components.projector(ckpt)
        for s in pending:
            y = proj(feats.pop(s.name))  # [T, n, H]
            out[s.name] = (proj.arrange(y, *s.grid) if s.grid is not None else y[0]).numpy()
    return out


def embed_samples(ckpt: Checkpoint, cset: CalibrationSet, max_image_tokens: int | None = None
                  ) -> list[EmbeddedSample]:
    """Every sample spliced into decoder input embeddings (module docstring)."""
    from edgemoe.export import components

    feats = {k: _cap(v, max_image_tokens) for k, v in image_features(ckpt, cset).items()}
    text_ids = np.concatenate([np.asarray([i for i in s.ids if i != IMAGE_TOKEN_INDEX], np.int64)
                               for s in cset.samples])
    rows = components.embed_rows(ckpt, text_ids)  # reads the embedding table once for all samples
    out, start = [], 0
    for s in cset.samples:
        n_text = sum(i != IMAGE_TOKEN_INDEX for i in s.ids)
        text, start = rows[start:start + n_text], start + n_text
        out.append(_splice(s, text, feats.get(s.name)))
    return out


def _splice(s: CalibrationSample, text: np.ndarray, feats: np.ndarray | None) -> EmbeddedSample:
    ids = list(s.ids)
    if IMAGE_TOKEN_INDEX not in ids:
        return EmbeddedSample(s.name, text, np.arange(len(ids), dtype=np.int64))
    if feats is None:
        raise EdgeMoEError(f"calibration sample {s.name} has an image marker but no image")
    at = ids.index(IMAGE_TOKEN_INDEX)
    embeds = np.concatenate([text[:at], feats.astype(np.float32), text[at:]])
    n = feats.shape[0]
    compare = np.concatenate([np.arange(at), np.arange(at + n, len(embeds))]).astype(np.int64)
    return EmbeddedSample(s.name, np.ascontiguousarray(embeds), compare)
