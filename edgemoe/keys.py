"""Typed identities shared by the exporter, the bundle, the cache and the benchmarks.

Contract: an expert is named by `ExpertKey(layer, expert)` everywhere (cache keys, manifest entries,
stats, bench output), never by a bare tuple or a path string. Its text form `L{layer}/E{expert}` is
also its place in a bundle (`experts/L{layer}/E{expert}.onnx`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TEXT = re.compile(r"^L(\d+)/E(\d+)$")


@dataclass(frozen=True, order=True)
class ExpertKey:
    """One expert of one MoE decoder layer."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"L{self.layer}/E{self.expert}"

    @classmethod
    def parse(cls, text: str) -> "ExpertKey":
        match = _TEXT.match(text)
        if match is None:
            raise ValueError(f"not an expert key: {text!r} (expected L<layer>/E<expert>)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def canonical_prefix(self) -> str:
        """Prefix of this expert's tensors in the canonical checkpoint naming."""
        return f"layers.{self.layer}.experts.{self.expert}."
