"""Policies: which expert gets which scheme. Returns `dict[ExpertKey, Scheme]` / a `PolicyResult`.

Contract: `uniform` gives every expert one precision. `auto` is EdgeMoE's sensitivity-based bitwidth
selection (Yi et al., arXiv 2308.14352) generalised from {fp, int2} to an ordered ladder of levels
(e.g. fp32 > int8 > int4). It never sees weights or graphs, only three callables the exporter supplies:
`evaluate(assignment) -> OutputError` (run the model with those experts at those precisions against
the fp32 reference), `size_of(key, precision) -> bytes`, and an `AccuracyBudget`; plus an optional
size budget in bytes. It never returns an assignment whose *measured* error exceeds the accuracy
budget, nor one over the size budget: when the size budget cannot be met it raises `QuantError`
naming the smallest size reachable within the accuracy budget.

Method (evaluate() calls in brackets; E experts, m lowering levels):
  0. the all-highest assignment must be within budget                                   [1]
  1. sensitivity of each expert = budget usage (metrics.AccuracyBudget.usage) with that expert
     alone at the lowest level (every level with per_level=True)                       [E, or m*E]
     or, when the caller supplies `sensitivity` (a cheaper proxy it measured, e.g. the evaluator's
     local error), that: only the order of experts depends on it                       [0]
  2. level by level, lower a prefix of the least sensitive experts still at the level above;
     binary search (EdgeMoE's) for the longest prefix whose *whole* assignment stays in budget,
     trying "all of them" first because int8 usually passes for every expert      [<= 1 + ceil(log2 E)]
     With a size budget, the phase first tries the shortest prefix that meets it and stops there:
     the least lowering that fits keeps the most accuracy.
Binary search rather than one-at-a-time: O(E + m log E) evaluations instead of O(m E), and each one
is a calibration run of the whole model. It assumes the error grows with the prefix (EdgeMoE's
assumption); if it does not, the result is still an evaluated, in-budget assignment, only smaller
savings than possible. Repeated assignments are answered from a cache and not counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgemoe.keys import ExpertKey
from edgemoe.quant.metrics import AccuracyBudget, OutputError
from edgemoe.quant.schemes import Precision, QuantError, Scheme

log = logging.getLogger(__name__)

Assignment = dict[ExpertKey, Precision]
Evaluate = Callable[[Mapping[ExpertKey, Precision]], OutputError]
SizeOf = Callable[[ExpertKey, Precision], int]


def uniform(keys: Iterable[ExpertKey], precision: Precision | str, target: str = "cpu") -> dict[ExpertKey, Scheme]:
    """Every expert at one precision, with that precision's default scheme."""
    scheme = Scheme.default(precision, target)
    return {k: scheme for k in sorted(set(keys))}


@dataclass(frozen=True)
class PolicyResult:
    """What `auto` chose and why; `to_dict` is the manifest's record of it."""

    assignment: Mapping[ExpertKey, Scheme]
    sensitivity: Mapping[ExpertKey, Mapping[Precision, float]]  # budget usage, expert alone at that level
    error: OutputError  # measured on the final assignment
    total_bytes: int
    evaluations: int  # evaluate() calls actually made
    budget: AccuracyBudget = field(default_factory=AccuracyBudget)
    size_budget: int | None = None

    @property
    def precisions(self) -> Assignment:
        return {k: s.precision for k, s in self.assignment.items()}

    def counts(self) -> dict[Precision, int]:
        """How many experts ended at each precision."""
        out: dict[Precision, int] = {}
        for s in self.assignment.values():
            out[s.precision] = out.get(s.precision, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "assignment": {str(k): s.to_dict() for k, s in sorted(self.assignment.items())},
            "sensitivity": {str(k): {p.value: v for p, v in lv.items()} for k, lv in sorted(self.sensitivity.items())},
            "error": self.error.to_dict(),
            "total_bytes": self.total_bytes,
            "evaluations": self.evaluations,
            "budget": self.budget.to_dict(),
            "size_budget": self.size_budget,
        }


class _Evaluator:
    """evaluate() with a cache of assignments already measured and a count of real calls."""

    def __init__(self, evaluate: Evaluate, budget: AccuracyBudget) -> None:
        self._evaluate, self.budget = evaluate, budget
        self._cache: dict[tuple[tuple[ExpertKey, Precision], ...], OutputError] = {}
        self.calls = 0

    def error(self, assignment: Assignment) -> OutputError:
        key = tuple(sorted(assignment.items()))
        if key not in self._cache:
            self.calls += 1
            self._cache[key] = self._evaluate(dict(assignment))
        return self._cache[key]

    def ok(self, assignment: Assignment) -> bool:
        return self.budget.allows(self.error(assignment))


def _check_levels(levels: Sequence[Precision]) -> list[Precision]:
    out = [Precision.parse(p) for p in levels]
    if not out or any(a.bits <= b.bits for a, b in zip(out, out[1:])):
        raise QuantError(f"precisions must be listed highest first without repeats, got {[p.value for p in out]}")
    return out


def _sensitivities(ev: _Evaluator, keys: list[ExpertKey], levels: list[Precision],
                   per_level: bool) -> dict[ExpertKey, dict[Precision, float]]:
    """Budget usage with each expert alone lowered (to the lowest level, or to every level)."""
    top = {k: levels[0] for k in keys}
    measured = levels[1:] if per_level else levels[-1:]
    return {k: {p: ev.budget.usage(ev.error({**top, k: p})) for p in measured} for k in keys}


def _supplied(sensitivity: Mapping[ExpertKey, Mapping[Precision, float]], keys: list[ExpertKey],
              levels: list[Precision]) -> dict[ExpertKey, dict[Precision, float]]:
    """The caller's sensitivities for every lowering level; an expert it has none for (no calibration
    token reached it) lowers first, as a measured sensitivity of zero would have it."""
    out = {k: {Precision.parse(p): float(v) for p, v in sensitivity.get(k, {}).items()} for k in keys}
    for k in keys:
        for level in levels[1:]:
            out[k].setdefault(level, 0.0)
    return out


def _order(keys: list[ExpertKey], sens: Mapping[ExpertKey, Mapping[Precision, float]],
           level: Precision, lowest: Precision) -> list[ExpertKey]:
    """Least sensitive first, by this level's sensitivity if measured, else the lowest level's."""
    return sorted(keys, key=lambda k: (sens[k].get(level, sens[k][lowest]), k))


def _size(assignment: Assignment, size_of: SizeOf) -> int:
    return sum(size_of(k, p) for k, p in assignment.items())


def _lower_phase(ev: _Evaluator, assignment: Assignment, candidates: list[ExpertKey], level: Precision,
                 size_of: SizeOf, size_budget: int | None) -> tuple[Assignment, bool]:
    """Lower the longest in-budget prefix of `candidates` to `level`; (assignment, size budget met)."""
    def trial(n: int) -> Assignment:
        return {**assignment, **{k: level for k in candidates[:n]}}

    hi = len(candidates) + 1  # smallest prefix known to fail (n + 1: none known yet)
    if size_budget is not None:
        fits = next((n for n in range(len(candidates) + 1) if _size(trial(n), size_of) <= size_budget), None)
        if fits is not None:
            if ev.ok(trial(fits)):
                return trial(fits), True
            hi = fits
    if hi == len(candidates) + 1:
        if ev.ok(trial(len(candidates))):
            return trial(len(candidates)), False
        hi = len(candidates)
    lo = 0  # the current assignment: already measured within budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ev.ok(trial(mid)) else (lo, mid)
    return trial(lo), False


def auto(
    keys: Iterable[ExpertKey],
    precisions: Sequence[Precision | str],
    evaluate: Evaluate,
    size_of: SizeOf,
    budget: AccuracyBudget = AccuracyBudget(),
    size_budget: int | None = None,
    target: str = "cpu",
    per_level: bool = False,
    schemes: Mapping[Precision, Scheme] | None = None,
    sensitivity: Mapping[ExpertKey, Mapping[Precision, float]] | None = None,
) -> PolicyResult:
    """EdgeMoE's per-expert precision selection over several levels (see module docstring).

    `schemes` overrides the scheme a level is stored with (default: `Scheme.default(level, target)`);
    `evaluate` must measure the experts with those same schemes.
    """
    keys, levels = sorted(set(keys)), _check_levels(precisions)
    # Resolve schemes first: an impossible one (int8 on cuda) fails before any evaluation is spent.
    by_level = {p: (schemes or {}).get(p) or Scheme.default(p, target) for p in levels}
    ev = _Evaluator(evaluate, budget)
    assignment: Assignment = {k: levels[0] for k in keys}
    base = ev.error(assignment)
    if not budget.allows(base):
        raise QuantError(f"every expert at {levels[0].value} already misses the accuracy budget {budget}: {base}")
    # With a size budget, stop lowering as soon as it is met; without one, lower all the budget allows.
    done = size_budget is not None and _size(assignment, size_of) <= size_budget
    if done or len(levels) == 1:
        sens: Mapping[ExpertKey, Mapping[Precision, float]] = {}
    elif sensitivity is not None:
        sens = _supplied(sensitivity, keys, levels)
    else:
        sens = _sensitivities(ev, keys, levels, per_level)
    for upper, level in zip(levels, levels[1:]):
        if done:
            break
        candidates = _order([k for k in keys if assignment[k] is upper], sens, level, levels[-1])
        assignment, done = _lower_phase(ev, assignment, candidates, level, size_of, size_budget)
        log.info("lowered %d experts to %s (%d evaluations so far)",
                 sum(p is level for p in assignment.values()), level.value, ev.calls)
    total = _size(assignment, size_of)
    if size_budget is not None and total > size_budget:
        raise QuantError(
            f"size budget {size_budget} B cannot be met within accuracy budget {budget}: the smallest "
            f"assignment found is {total} B ({_describe(assignment)}); raise the size budget or relax accuracy"
        )
    chosen = {k: by_level[p] for k, p in assignment.items()}
    return PolicyResult(chosen, sens, ev.error(assignment), total, ev.calls, budget, size_budget)


def _describe(assignment: Assignment) -> str:
    counts: dict[str, int] = {}
    for p in assignment.values():
        counts[p.value] = counts.get(p.value, 0) + 1
    return ", ".join(f"{n} x {p}" for p, n in sorted(counts.items()))
