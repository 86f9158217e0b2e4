"""Output-error metrics on hand-made logits with known answers, and the accuracy budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgemoe.errors import EdgeMoEError
from edgemoe.quant.metrics import AccuracyBudget, OutputError, compare_logits, log_softmax, merge
from edgemoe.quant.schemes import QuantError


def test_identical_logits_agree_fully() -> None:
    logits = np.random.default_rng(0).standard_normal((3, 7, 50)).astype(np.float32)
    err = compare_logits(logits, logits.copy())
    assert (err.top1_agreement, err.mean_kl, err.max_abs, err.tokens) == (1.0, 0.0, 0.0, 21)


def test_shift_changes_max_abs_but_not_distribution() -> None:
    logits = np.random.default_rng(1).standard_normal((4, 10))
    err = compare_logits(logits, logits + 5.0)
    assert err.top1_agreement == 1.0 and err.mean_kl == pytest.approx(0.0, abs=1e-12)
    assert err.max_abs == pytest.approx(5.0)


def test_known_perturbation() -> None:
    # Token 0 identical; token 1: p = (3/4, 1/4), q = (1/4, 3/4): KL = 3/4 ln 3 + 1/4 ln(1/3) = ln(3) / 2.
    ref = np.array([[2.0, -1.0], [math.log(3.0), 0.0]])
    cand = np.array([[2.0, -1.0], [0.0, math.log(3.0)]])
    err = compare_logits(ref, cand)
    assert err.top1_agreement == 0.5
    assert err.mean_kl == pytest.approx(math.log(3.0) / 4)  # mean over both tokens
    assert err.max_abs == pytest.approx(math.log(3.0))


def test_kl_is_reference_first() -> None:
    # KL(p || q) with p = (0.9, 0.1), q = (0.5, 0.5); the reverse direction differs.
    p, q = np.log([[0.9, 0.1]]), np.log([[0.5, 0.5]])
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert compare_logits(p, q).mean_kl == pytest.approx(expected)
    assert compare_logits(q, p).mean_kl != pytest.approx(expected)


def test_log_softmax_is_float64_and_stable() -> None:
    out = log_softmax(np.array([[1e4, 0.0]], dtype=np.float32))
    assert out.dtype == np.float64 and np.isfinite(out).all() and out[0, 0] == pytest.approx(0.0)


def test_merge_weights_by_tokens() -> None:
    merged = merge([OutputError(1.0, 0.0, 0.5, 3), OutputError(0.0, 0.4, 2.0, 1)])
    assert (merged.top1_agreement, merged.mean_kl, merged.max_abs, merged.tokens) == (0.75, pytest.approx(0.1), 2.0, 4)


def test_mismatched_logits_are_errors() -> None:
    with pytest.raises(QuantError, match="shapes differ"):
        compare_logits(np.zeros((2, 5)), np.zeros((2, 6)))


def test_budget_allows_and_usage() -> None:
    budget = AccuracyBudget()
    assert (budget.min_top1, budget.max_kl) == (0.98, 0.02)
    assert budget.allows(OutputError(0.98, 0.02, 1.0, 10))
    assert not budget.allows(OutputError(0.97, 0.0, 0.0, 10))
    assert not budget.allows(OutputError(1.0, 0.021, 0.0, 10))
    assert budget.usage(OutputError(0.99, 0.005, 0.0, 10)) == pytest.approx(0.5)  # top-1 uses half
    assert budget.usage(OutputError(1.0, 0.03, 0.0, 10)) == pytest.approx(1.5)
    assert AccuracyBudget(min_top1=1.0).usage(OutputError(0.9, 0.0, 0.0, 1)) == math.inf


def test_budget_parses_cli_form() -> None:
    assert AccuracyBudget.parse("top1=0.98,kl=0.02") == AccuracyBudget(0.98, 0.02)
    assert AccuracyBudget.parse(" kl=0.05 ") == AccuracyBudget(0.98, 0.05)
    assert AccuracyBudget.parse(str(AccuracyBudget(0.9, 0.1))) == AccuracyBudget(0.9, 0.1)
    for bad in ("top1", "acc=0.9", "kl=abc", "top1=1.5"):
        with pytest.raises(EdgeMoEError):
            AccuracyBudget.parse(bad)
