"""Policies with synthetic evaluators whose answers are known in closed form (error = sum of the
assigned experts' costs), plus one run of `auto` over real ONNX expert graphs of a tiny MoE."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort
import pytest

from edgemoe.keys import ExpertKey
from edgemoe.quant.graphs import MlpWeights
from edgemoe.quant.lowering import build_mlp, to_bytes
from edgemoe.quant.metrics import AccuracyBudget, OutputError, compare_logits
from edgemoe.quant.policy import PolicyResult, auto, uniform
from edgemoe.quant.schemes import Precision, QuantError, Scheme, bytes_for

FP32, INT8, INT4 = Precision.FP32, Precision.INT8, Precision.INT4
LEVELS = [FP32, INT8, INT4]
KEYS = [ExpertKey(layer, e) for layer in (1, 3) for e in range(4)]
SIZE = {FP32: 4000, INT8: 1000, INT4: 560}
# int4 costs 0.001 .. 0.008 spread over the keys out of order, so the policy has to sort them.
INT4_COST = {k: 0.001 * (i + 1) for k, i in zip(KEYS, [5, 0, 7, 2, 4, 1, 6, 3])}
INT8_COST = {k: 0.0002 for k in KEYS}
LEAST_SENSITIVE = sorted(KEYS, key=INT4_COST.get)


def additive(int8: Mapping[ExpertKey, float] = INT8_COST, int4: Mapping[ExpertKey, float] = INT4_COST):
    """Evaluator whose KL is the sum of per-expert costs; records every assignment it sees."""
    seen: list[dict[ExpertKey, Precision]] = []

    def evaluate(assignment: Mapping[ExpertKey, Precision]) -> OutputError:
        seen.append(dict(assignment))
        kl = sum({INT8: int8, INT4: int4}[p][k] for k, p in assignment.items() if p is not FP32)
        return OutputError(1.0, kl, 0.0, 100)

    evaluate.seen = seen  # type: ignore[attr-defined]
    return evaluate


def size_of(key: ExpertKey, precision: Precision) -> int:
    return SIZE[precision]


def test_uniform() -> None:
    schemes = uniform(reversed(KEYS), "int4")
    assert list(schemes) == KEYS and set(schemes.values()) == {Scheme.default(INT4)}


def test_auto_mixes_precisions_within_accuracy_budget() -> None:
    evaluate = additive()
    result = auto(KEYS, LEVELS, evaluate, size_of)
    # Phase 1 lowers all 8 to int8 (kl 0.0016). Phase 2: the K least int4-sensitive go to int4 while
    # 0.0016 + sum_{i<K} (0.001 (i+1) - 0.0002) <= 0.02: K = 5 (0.0156), K = 6 would be 0.0214.
    assert result.counts() == {INT4: 5, INT8: 3}
    assert {k for k, p in result.precisions.items() if p is INT4} == set(LEAST_SENSITIVE[:5])
    assert result.error.mean_kl == pytest.approx(0.0156) and AccuracyBudget().allows(result.error)
    assert result.total_bytes == 5 * 560 + 3 * 1000
    # 1 baseline + 8 sensitivities + 1 (all to int8) + 1 (all to int4: fails) + 3 (binary search in 0..8)
    assert result.evaluations == 14 == len(evaluate.seen)
    assert result.sensitivity[LEAST_SENSITIVE[0]] == {INT4: pytest.approx(0.001 / 0.02)}
    assert all(s.accuracy_level == 4 for s in result.assignment.values())


def test_supplied_sensitivities_order_the_experts_and_cost_no_evaluations() -> None:
    evaluate = additive()
    proxy = {k: {INT4: 10 * INT4_COST[k]} for k in KEYS[1:]}  # same order, another scale; KEYS[0] unmeasured
    result = auto(KEYS, LEVELS, evaluate, size_of, sensitivity=proxy)
    # 1 baseline + 1 (all to int8) + 1 (all to int4: fails) + 3 (binary search in 0..8): no sensitivity runs
    assert result.evaluations == 6 == len(evaluate.seen)
    # KEYS[0] (cost 0.006) has no supplied sensitivity, so it lowers first, as a measured 0 would
    first = [KEYS[0]] + [k for k in LEAST_SENSITIVE if k != KEYS[0]]
    lowered = {k for k, p in result.precisions.items() if p is INT4}
    assert lowered == set(first[:len(lowered)]) and AccuracyBudget().allows(result.error)
    assert result.error.mean_kl == pytest.approx(evaluate(result.precisions).mean_kl)  # measured, not assumed


def test_auto_keeps_an_expert_too_sensitive_even_for_int8_at_fp32() -> None:
    fragile = LEAST_SENSITIVE[-1]
    result = auto(KEYS, LEVELS, additive({**INT8_COST, fragile: 0.05}, {**INT4_COST, fragile: 1.0}), size_of)
    assert result.precisions[fragile] is FP32 and set(result.counts()) == {FP32, INT8, INT4}
    assert AccuracyBudget().allows(result.error)
    # 1 + 8 + phase 1: all fails, binary search over 0..8 (3) + phase 2 over 7: all fails, 3 more
    assert result.evaluations == 1 + 8 + 1 + 3 + 1 + 3


def test_size_budget_stops_at_the_least_lowering_that_fits() -> None:
    result = auto(KEYS, LEVELS, additive(), size_of, size_budget=26000)
    # 32000 B all fp32; two experts at int8 make 26000: only the two least sensitive move.
    assert result.counts() == {FP32: 6, INT8: 2} and result.total_bytes == 26000
    assert {k for k, p in result.precisions.items() if p is INT8} == set(LEAST_SENSITIVE[:2])
    assert result.evaluations == 1 + 8 + 1

    result = auto(KEYS, LEVELS, additive(), size_of, size_budget=6000)
    assert result.counts() == {INT4: 5, INT8: 3} and result.total_bytes == 5800 <= 6000
    assert result.evaluations == 1 + 8 + 1 + 1


def test_unreachable_size_budget_names_the_smallest_size() -> None:
    # 7 experts at int4 would fit 5000 B (4920) but cost 0.0282 KL; the accuracy limit is 5 (5800 B).
    with pytest.raises(QuantError, match=r"size budget 5000 B cannot be met .* smallest assignment found is 5800 B"):
        auto(KEYS, LEVELS, additive(), size_of, size_budget=5000)


def test_size_budget_met_unlowered_costs_one_evaluation() -> None:
    result = auto(KEYS, LEVELS, additive(), size_of, size_budget=10**9)
    assert result.counts() == {FP32: 8} and result.evaluations == 1 and result.sensitivity == {}


def test_baseline_outside_budget_is_an_error() -> None:
    def evaluate(assignment: Mapping[ExpertKey, Precision]) -> OutputError:
        return OutputError(0.5, 1.0, 9.0, 10)

    with pytest.raises(QuantError, match="already misses the accuracy budget"):
        auto(KEYS, LEVELS, evaluate, size_of)


def test_top1_budget_binds_too() -> None:
    def evaluate(assignment: Mapping[ExpertKey, Precision]) -> OutputError:
        return OutputError(1.0 - 0.004 * sum(p is INT4 for p in assignment.values()), 0.0, 0.0, 250)

    result = auto(KEYS, [FP32, INT4], evaluate, size_of, budget=AccuracyBudget.parse("top1=0.98"))
    assert result.counts() == {INT4: 5, FP32: 3}  # 5 x 0.004 = 0.02 top-1 loss: exactly at the limit


def test_per_level_sensitivity_measures_every_level() -> None:
    result = auto(KEYS, LEVELS, additive(), size_of, per_level=True)
    assert result.counts() == {INT4: 5, INT8: 3}
    assert set(result.sensitivity[KEYS[0]]) == {INT8, INT4}
    assert result.evaluations == 1 + 16 + 1 + 1 + 3


@pytest.mark.parametrize("seed", range(5))
def test_never_exceeds_budget_with_a_non_monotone_evaluator(seed: int) -> None:
    """Interactions make real errors non-additive: whatever is returned was measured within budget."""
    def evaluate(assignment: Mapping[ExpertKey, Precision]) -> OutputError:
        lowered = tuple(sorted((k.layer, k.expert, p.bits) for k, p in assignment.items() if p is not FP32))
        return OutputError(1.0, random.Random(f"{seed}{lowered}").uniform(0.0, 0.03) if lowered else 0.0, 0.0, 1)

    result = auto(KEYS, LEVELS, evaluate, size_of)
    assert AccuracyBudget().allows(result.error) and result.error == evaluate(result.precisions)
    assert result.evaluations <= 1 + 8 + 2 * (1 + math.ceil(math.log2(8)))


def test_bad_ladders_are_errors_before_any_evaluation() -> None:
    evaluate = additive()
    for ladder in ([INT4, FP32], [FP32, FP32], []):
        with pytest.raises(QuantError, match="highest first"):
            auto(KEYS, ladder, evaluate, size_of)
    with pytest.raises(QuantError, match="no CUDA kernel"):
        auto(KEYS, LEVELS, evaluate, size_of, target="cuda")
    assert evaluate.seen == []


def test_custom_schemes_are_recorded() -> None:
    per_tensor = Scheme(INT8, per_channel=False)
    result = auto(KEYS, LEVELS, additive(), size_of, schemes={INT8: per_tensor})
    assert {s for k, s in result.assignment.items() if s.precision is INT8} == {per_tensor}


def test_result_serializes_for_the_manifest() -> None:
    record = json.loads(json.dumps(auto(KEYS, LEVELS, additive(), size_of).to_dict()))
    assert record["assignment"]["L1/E0"]["precision"] in {"int8", "int4"}
    assert record["evaluations"] == 14 and record["budget"] == {"min_top1": 0.98, "max_kl": 0.02}


def test_auto_over_real_expert_graphs() -> None:
    """A tiny 2-layer MoE (4 experts each, every expert applied with weight 1/4) with expert graphs
    from `build_mlp`: auto's evaluations run onnxruntime, and its answer must hold when re-measured."""
    rng = np.random.default_rng(0)
    h, f, vocab = 128, 256, 64

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    experts = {k: MlpWeights(up=w(f, h), down=w(h, f), gate=w(f, h)) for k in KEYS}
    head, x = w(vocab, h) * 8, rng.standard_normal((32, h)).astype(np.float32)
    sessions: dict[tuple[ExpertKey, Precision], ort.InferenceSession] = {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2

    def run(assignment: Mapping[ExpertKey, Precision]) -> np.ndarray:
        hidden = x
        for layer in (1, 3):
            out = hidden.copy()
            for k in (k for k in KEYS if k.layer == layer):
                if (k, assignment[k]) not in sessions:
                    model = to_bytes(build_mlp(experts[k], "silu_glu", Scheme.default(assignment[k])))
                    sessions[k, assignment[k]] = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
                out += 0.25 * sessions[k, assignment[k]].run(None, {"x": hidden})[0]
            hidden = out
        return hidden @ head.T

    reference = run({k: FP32 for k in KEYS})
    result = auto(KEYS, LEVELS, lambda a: compare_logits(reference, run(a)),
                  lambda k, p: sum(bytes_for(t.shape, Scheme.default(p)) for _, t, _ in experts[k].linears()),
                  budget=AccuracyBudget(0.9, 0.01))
    assert isinstance(result, PolicyResult)
    assert AccuracyBudget(0.9, 0.01).allows(compare_logits(reference, run(result.precisions)))
    assert result.counts().get(FP32, 0) < 8 and result.total_bytes < 0.3 * 8 * 3 * f * h * 4  # most lowered
    assert result.evaluations <= 1 + 8 + 2 * (1 + 3)
