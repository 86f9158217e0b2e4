"""Choosing the next token from logits: greedy by default, temperature / top-p with a seed.

Contract: `Sampler(temperature=0)` is argmax (the first maximum on ties, as torch's argmax), so
greedy output equals the reference's token for token. With temperature > 0 it samples from
softmax(logits / T) restricted to the smallest set of most probable tokens whose mass reaches
`top_p` (the token that crosses the threshold included; ties broken by id), drawn from one
`numpy.random.Generator(PCG64(seed))`: the same seed, logits and settings give the same tokens.
Masked logits (-inf) never get probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemoe.errors import EdgeMoEError


@dataclass
class Sampler:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise EdgeMoEError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EdgeMoEError(f"top-p must be in (0, 1], got {self.top_p}")
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray) -> int:
        """One token id from logits [V] (fp32, masked entries -inf)."""
        if self.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1:
            p = nucleus(p, self.top_p)
        return int(self._rng.choice(p.shape[0], p=p))


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """p restricted to its top-p nucleus and renormalised."""
    order = np.argsort(-p, kind="stable")  # descending, lower id first on ties
    cumulative = np.cumsum(p[order])
    keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1  # include the crossing token
    out = np.zeros_like(p)
    chosen = order[:keep]
    out[chosen] = p[chosen]
    return out / out.sum()
