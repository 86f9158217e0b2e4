"""Choosing the next token from logits: greedy by default; temperature, top-k, top-p, min-p and a
repeat penalty as llama.cpp users know them, with a seed.

Contract: `Sampler(temperature=0)` is argmax (the first maximum on ties, as torch's argmax), so
greedy output equals the reference's token for token. The order is llama.cpp's: the repeat penalty
first (each distinct id among the last `repeat_last_n` tokens: a positive logit divided by the
penalty, a negative one multiplied), then, when sampling, top-k, softmax(logits / T), top-p (the
smallest set of most probable tokens whose mass reaches `top_p`, the crossing token included, ties
broken by id) and min-p (tokens below `min_p` x the most probable one dropped), each renormalised.
Draws come from one `numpy.random.Generator(PCG64(seed))`: the same seed, logits, history and
settings give the same tokens. Masked logits (-inf) never get probability. Defaults switch every
filter off (top_k 0, top_p 1, min_p 0, repeat_penalty 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgemoe.errors import EdgeMoEError

REPEAT_LAST_N = 64  # llama.cpp's default window for the repeat penalty


@dataclass
class Sampler:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = REPEAT_LAST_N
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise EdgeMoEError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EdgeMoEError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EdgeMoEError(f"top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise EdgeMoEError(f"min-p must be in [0, 1), got {self.min_p}")
        if not (self.repeat_penalty > 0 and np.isfinite(self.repeat_penalty)):
            raise EdgeMoEError(f"repeat penalty must be a finite number > 0 (1: off), got {self.repeat_penalty}")
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: np.ndarray, recent: Sequence[int] = ()) -> int:
        """One token id from logits [V] (fp32, masked entries -inf); `recent`: the ids so far."""
        if self.repeat_penalty != 1 and recent:
            logits = penalize_repeats(logits, recent[-self.repeat_last_n:], self.repeat_penalty)
        if self.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64)
        if 0 < self.top_k < z.shape[0]:
            z = top_k_only(z, self.top_k)
        z = z / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1:
            p = nucleus(p, self.top_p)
        if self.min_p > 0:
            p = np.where(p >= self.min_p * p.max(), p, 0.0)
            p /= p.sum()
        return int(self._rng.choice(p.shape[0], p=p))


def penalize_repeats(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """A copy of logits with each distinct recent id penalised (llama.cpp's rule)."""
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < out.shape[0])]
    chosen = out[ids]
    out[ids] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return out


def top_k_only(z: np.ndarray, k: int) -> np.ndarray:
    """z with all but its k largest entries set to -inf (ties at the k-th value kept by lower id)."""
    order = np.argsort(-z, kind="stable")
    out = np.full_like(z, -np.inf)
    out[order[:k]] = z[order[:k]]
    return out


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """p restricted to its top-p nucleus and renormalised."""
    order = np.argsort(-p, kind="stable")  # descending, lower id first on ties
    cumulative = np.cumsum(p[order])
    keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1  # include the crossing token
    out = np.zeros_like(p)
    chosen = order[:keep]
    out[chosen] = p[chosen]
    return out / out.sum()
