"""A conversation's images as prompt rows: each prepared and projected once while it stays asked about.

Contract: `ImageEncoder(bundle, trunk, prompt_cache, memory_budgeted)`; `features(images)` returns each
image's projected rows [N_i, H] (None for no images), encoding only those not already held and
forgetting the ones no longer in the list. An image's rows come from the prompt cache when it has
them (keyed by the prepared pixels, `runtime.prompt_cache`), else from the vision tower (and are then
saved there). Under a memory budget the tower leaves the process after encoding (`close_vision`),
and the live budget, once the caller attaches one (`live`), is told when it closes and before it
reopens, so the expert cache makes room for it. `encode_s` is the seconds spent encoding, all told;
`vision_bytes` what closing the tower gave back (measured).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgemoe.bundle import Bundle
from edgemoe.model.image import ImageInput, ImageSource, image_key, prepare_image
from edgemoe.runtime.live_budget import LiveBudget, close_vision
from edgemoe.runtime.prompt_cache import PromptCache, pixels_digest
from edgemoe.runtime.trunk import Trunk


class ImageEncoder:
    """Images -> prompt rows, through the prompt cache or the vision tower (module docstring)."""

    def __init__(self, bundle: Bundle, trunk: Trunk, prompt_cache: PromptCache | None, memory_budgeted: bool) -> None:
        self.bundle, self.trunk, self.prompt_cache = bundle, trunk, prompt_cache
        self.memory_budgeted = memory_budgeted
        self.config = bundle.manifest.model_config()
        self.live: LiveBudget | None = None  # the plan kept true as the conversation grows
        self.encode_s = 0.0
        self.vision_bytes = 0
        self._rows: dict[tuple[Any, ...], np.ndarray] = {}  # (image_key, tiled) -> projected rows

    def features(self, images: list[ImageSource]) -> list[np.ndarray] | None:
        """Each image's projected rows [N_i, H], in order; None without images."""
        if not images:
            return None
        manifest = self.bundle.manifest
        aspect = manifest.processor.get("image_aspect_ratio", self.config.image_aspect_ratio)
        tiled = len(images) <= 2  # upstream tiles one or two images, more go in as one view each
        keys = [(image_key(source), tiled) for source in images]
        missing = [(key, source) for key, source in zip(keys, images) if key not in self._rows]
        start = time.monotonic()
        for key, source in missing:
            self._rows[key] = self._encode(prepare_image(source, manifest.processor_config(), aspect,
                                                         self.config.candidate_resolutions, tiled))
        self.encode_s += time.monotonic() - start
        if missing and self.memory_budgeted:  # the tower leaves the process until the next image
            self.vision_bytes = max(self.vision_bytes, close_vision(self.trunk))
            if self.live is not None:
                self.live.vision_closed(self.vision_bytes)
        self._rows = {key: self._rows[key] for key in keys}  # forget images no longer asked about
        return [self._rows[key] for key in keys]

    def _encode(self, image: ImageInput) -> np.ndarray:
        """One prepared image's projected rows: from the prompt cache when it has them, else the tower's."""
        if self.prompt_cache is None:
            return self._run_tower(image)
        key = pixels_digest(image)
        rows = self.prompt_cache.features(key)
        if rows is None:
            rows = self._run_tower(image)
            self.prompt_cache.save_features(key, rows)
        return rows

    def _run_tower(self, image: ImageInput) -> np.ndarray:
        if self.live is not None and not self.trunk.vision_resident:
            self.live.vision_reopening()
        return self.trunk.encode_image(image)
