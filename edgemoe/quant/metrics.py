"""How far a candidate model's outputs are from the fp32 reference, and the budget that bounds it.

Contract: `compare_logits(reference, candidate)` takes logits of the same calibration tokens, shape
[..., V], and returns an `OutputError`: top-1 agreement (fraction of tokens whose argmax matches),
mean KL(reference || candidate) in nats computed from float64 log-softmax, and the max absolute logit
difference. An `AccuracyBudget` (default top-1 >= 0.98 and mean KL <= 0.02, EdgeMoE's "<= 2% loss"
made measurable without labels) says whether an error is allowed and how much of the budget it uses.
Budgets parse from the CLI form "top1=0.98,kl=0.02". Nothing here knows about experts or graphs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgemoe.quant.schemes import QuantError


@dataclass(frozen=True)
class OutputError:
    """Error of candidate logits against reference logits over `tokens` calibration positions."""

    top1_agreement: float
    mean_kl: float
    max_abs: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"top1={self.top1_agreement:.4f} kl={self.mean_kl:.4g} max_abs={self.max_abs:.3g} ({self.tokens} tok)"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (logits near fp32's range would overflow a naive exp)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> OutputError:
    """Top-1 agreement, mean KL(ref || cand) and max |diff| of two logit arrays of equal shape [..., V]."""
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape or ref.ndim == 0 or ref.size == 0:
        raise QuantError(f"logit shapes differ or are empty: reference {ref.shape}, candidate {cand.shape}")
    ref2, cand2 = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
    log_p, log_q = log_softmax(ref2), log_softmax(cand2)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    agree = np.argmax(ref2, axis=-1) == np.argmax(cand2, axis=-1)
    diff = np.abs(ref2.astype(np.float64) - cand2.astype(np.float64))
    # KL is >= 0 mathematically; clip the -1e-17 rounding so budgets compare cleanly.
    return OutputError(float(agree.mean()), float(max(kl.mean(), 0.0)), float(diff.max()), int(ref2.shape[0]))


def merge(errors: Iterable[OutputError]) -> OutputError:
    """Combine errors measured on separate calibration batches, weighting by token count."""
    errs = list(errors)
    total = sum(e.tokens for e in errs)
    if total == 0:
        raise QuantError("cannot merge output errors over zero tokens")
    return OutputError(
        top1_agreement=sum(e.top1_agreement * e.tokens for e in errs) / total,
        mean_kl=sum(e.mean_kl * e.tokens for e in errs) / total,
        max_abs=max(e.max_abs for e in errs),
        tokens=total,
    )


_KEYS = {"top1": "min_top1", "kl": "max_kl"}


@dataclass(frozen=True)
class AccuracyBudget:
    """The most output error a quantized model may show against the fp32 reference."""

    min_top1: float = 0.98
    max_kl: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_top1 <= 1.0 or self.max_kl < 0.0:
            raise QuantError(f"accuracy budget out of range: top1={self.min_top1} (0..1), kl={self.max_kl} (>= 0)")

    def allows(self, err: OutputError) -> bool:
        return err.top1_agreement >= self.min_top1 and err.mean_kl <= self.max_kl

    def usage(self, err: OutputError) -> float:
        """Fraction of the budget `err` uses (1.0 = at the limit): the larger of its two parts.

        A single number is what sensitivities are sorted by; it weighs top-1 loss and KL by how much
        of their own allowance they consume.
        """
        return max(_fraction(1.0 - err.top1_agreement, 1.0 - self.min_top1), _fraction(err.mean_kl, self.max_kl))

    def __str__(self) -> str:
        return f"top1={self.min_top1:g},kl={self.max_kl:g}"

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> "AccuracyBudget":
        """'top1=0.98,kl=0.02' (either part optional, the other keeps its default)."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in _KEYS:
                raise QuantError(f"bad accuracy budget part {part!r} in {text!r}: expected top1=<0..1>,kl=<nats>")
            try:
                values[_KEYS[key.strip()]] = float(value)
            except ValueError:
                raise QuantError(f"bad number {value!r} for {key.strip()} in accuracy budget {text!r}") from None
        return cls(**values)


def _fraction(used: float, allowed: float) -> float:
    used = max(used, 0.0)
    if allowed <= 0.0:  # a zero allowance: any use at all exhausts it
        return 0.0 if used == 0.0 else float("inf")
    return used / allowed
