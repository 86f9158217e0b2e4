"""The multimodal projector: image features (tower width) -> LLM embeddings.

Contract: `mlp2x_gelu` is upstream's `Linear(mm_hidden, hidden) -> GELU -> Linear(hidden, hidden)`,
with torch's default, exact (erf) GELU, not a tanh approximation. As an `nn.Sequential` its
parameters are `0.*` and `2.*`, the canonical `projector.{0,2}.*` names.

Shape legend: B batch, N image tokens, Hv tower hidden (mm_hidden_size), H LLM hidden.
"""

from __future__ import annotations

from torch import nn

from edgemoe.model.config import ModelConfig


class Projector(nn.Sequential):
    """[B, N, Hv] -> [B, N, H]."""

    def __init__(self, mm_hidden: int, hidden: int) -> None:
        super().__init__(nn.Linear(mm_hidden, hidden), nn.GELU(approximate="none"), nn.Linear(hidden, hidden))

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "Projector":
        if cfg.mm_projector_type != "mlp2x_gelu":
            raise ValueError(f"projector {cfg.mm_projector_type!r} is not supported (only mlp2x_gelu)")
        return cls(cfg.mm_hidden_size, cfg.hidden_size)
