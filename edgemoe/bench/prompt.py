"""The request every run of a sweep answers: a question, an image, and the prompt length they make.

Contract: `synthetic_image(path)` writes a deterministic, non-square RGB picture (a gradient with a
few shapes: no file, no network needed) so sweeps are reproducible without user data.
`estimate_prompt_tokens(bundle, question)` is the spliced prompt length the runtime will see: the
family's template tokenized with the bundle's own tokenizer, with the image marker replaced by the
tower's feature count. It is what sizes the KV cache in the physical limit when a run does not
report its own `prompt_tokens`; None when the bundle's tokenizer cannot be read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgemoe.bundle import Bundle
from edgemoe.errors import EdgeMoEError
from edgemoe.model.synthetic_images import shapes_on_gradient

log = logging.getLogger(__name__)

DEFAULT_QUESTION = "Describe this image in detail."
TOKENIZER_DIR = "tokenizer"


def synthetic_image(path: Path, size: tuple[int, int] = (480, 360), seed: int = 0) -> Path:
    """A gradient with six shapes (`shapes_on_gradient`), written as PNG to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes_on_gradient(seed, size).save(path)
    return path


def image_tokens(bundle: Bundle, image_size: tuple[int, int] | None = None) -> int:
    """Prompt rows of one image: the tower's features (576 for CLIP-L/14-336 with select_feature
    'patch'); for tiled layouts, the grid an image of `image_size` (W, H) gets (1 x 1 without one)."""
    from edgemoe.model.summary import image_token_count
    from edgemoe.model.tiling import TILED, best_resolution

    cfg, vision = bundle.manifest.model_config(), bundle.manifest.vision_config()
    grid = (1, 1)
    if cfg.image_aspect_ratio == TILED and image_size is not None:
        w, h = best_resolution(image_size, cfg.candidate_resolutions)
        grid = (h // vision.image_size, w // vision.image_size)
    return image_token_count(cfg, vision, grid)


def estimate_prompt_tokens(bundle: Bundle, question: str, image_size: tuple[int, int] | None = None) -> int | None:
    """Spliced prompt length for `question` about one image of `image_size` (module docstring)."""
    from edgemoe.model.prompt import IMAGE_TOKEN_INDEX, Conversation
    from edgemoe.model.tokenizer import load_tokenizer

    family = bundle.manifest.model.get("family", "")
    try:
        tokenizer = load_tokenizer(bundle.root / TOKENIZER_DIR, family)
        ids = Conversation.for_family(family).add_user(question, image=True).encode(tokenizer)
        return len(ids) - ids.count(IMAGE_TOKEN_INDEX) + image_tokens(bundle, image_size)
    except (EdgeMoEError, OSError, KeyError, ValueError) as exc:
        log.warning("cannot estimate the prompt length from %s: %s", bundle.root, exc)
        return None
