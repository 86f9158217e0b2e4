"""The reference model's KV cache: per layer, the keys and values of every token seen so far.

Contract: the cache only stores; attention computes. `past(layer)` gives what a layer's attention
takes as past_k/past_v (None before the first token), `append(layer, k, v)` adds what it returned.
Keys are stored after rotary, so they never need re-rotating. Growing by concatenation copies the
cache each step: fine for a reference, and the reason the runtime preallocates instead.

Shape legend: B batch, KV key/value heads, T cached tokens, L new tokens, D head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values [B, KV, T, D] for each of `num_layers` layers."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Tokens cached (T), read from layer 0; every layer holds the same count between forwards."""
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def past(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer], self.values[layer]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add this step's k/v [B, KV, L, D] after the cached [B, KV, T, D]."""
        old_k, old_v = self.keys[layer], self.values[layer]
        self.keys[layer] = k if old_k is None else torch.cat((old_k, k), dim=2)
        self.values[layer] = v if old_v is None else torch.cat((old_v, v), dim=2)
