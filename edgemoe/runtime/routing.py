"""The router in the host: MoE-LLaVA's top-2 gating in fp32 numpy, deterministic.

Contract: `route(m, weight, k)` is `edgemoe.reference.moe.top_k_gating` at inference without
Gumbel noise: logits = m @ W^T in fp32, softmax over all experts, experts chosen one at a time by
highest probability with a tie going to the lower index (np.argmax returns the first maximum), and
for k >= 2 the chosen probabilities renormalised to sum to 1 (denominator clamped at fp32 eps, as
DeepSpeed). No token is dropped. Upstream draws the second expert with Gumbel noise even at
inference; this runtime does not (the documented deviation that makes answers repeatable).
`Routers.load(path)` reads `routers.safetensors` (`layers.N.router.weight` [E, H], fp32).

Shape legend: N tokens, H hidden, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.model.safetensors_io import SafetensorsFile

_EPS = np.finfo(np.float32).eps


@dataclass(frozen=True)
class Routing:
    """Each token's experts (best first) and combine weights."""

    experts: np.ndarray  # [N, K] int64
    weights: np.ndarray  # [N, K] float32, rows sum to 1 for K >= 2
    probs: np.ndarray  # [N, E] float32

    def needed(self) -> tuple[int, ...]:
        """The experts any token uses, ascending."""
        return tuple(int(e) for e in np.unique(self.experts))

    def tokens_of(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices ascending, their slot in `experts`) of the tokens routed to `expert`."""
        token, slot = np.nonzero(self.experts == expert)
        return token, slot


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in fp32, max-subtracted as torch does."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return e / e.sum(axis=-1, keepdims=True, dtype=np.float32)


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """[N, E] -> [N, K]: the k most probable experts per row, best first, ties to the lower index."""
    n, num_experts = probs.shape
    if not 1 <= k <= num_experts:
        raise EdgeMoEError(f"cannot choose {k} of {num_experts} experts")
    score = probs.astype(np.float32, copy=True)
    chosen = np.empty((n, k), dtype=np.int64)
    rows = np.arange(n)
    for i in range(k):
        chosen[:, i] = np.argmax(score, axis=-1)
        score[rows, chosen[:, i]] = -np.inf
    return chosen


def route(m: np.ndarray, weight: np.ndarray, k: int) -> Routing:
    """m [N, H] (the MoE input), router weight [E, H] -> Routing (module docstring)."""
    logits = np.asarray(m, np.float32) @ weight.T  # [N, E] fp32
    probs = softmax(logits)
    experts = top_k(probs, k)
    weights = np.take_along_axis(probs, experts, axis=-1)  # [N, K]
    if k > 1:
        weights = weights / np.maximum(weights.sum(axis=-1, keepdims=True, dtype=np.float32), _EPS)
    return Routing(experts, weights.astype(np.float32), probs)


class Routers:
    """Every MoE layer's router weight, fp32 [E, H], resident (a few KB per layer)."""

    def __init__(self, weights: dict[int, np.ndarray]) -> None:
        self.weights = weights

    @classmethod
    def load(cls, path: Path, layers: tuple[int, ...]) -> "Routers":
        f = SafetensorsFile(Path(path))
        missing = [n for n in layers if f"layers.{n}.router.weight" not in f.infos]
        if missing:
            raise EdgeMoEError(f"{path} has no router for MoE layer(s) {missing}")
        return cls({n: np.ascontiguousarray(f.tensor(f"layers.{n}.router.weight"), np.float32) for n in layers})

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.weights[layer]

    def route(self, layer: int, m: np.ndarray, k: int) -> Routing:
        return route(m, self.weights[layer], k)
