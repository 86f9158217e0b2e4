"""The uniform-routing benchmark mode: K distinct experts per token drawn uniformly at random, the
same every run, identical answers at every budget, and a predictor reduced to chance."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.errors import EdgeMoEError
from edgemoe.model.routing_rule import RoutingRule
from edgemoe.runtime import ChatSession, GenerationOptions
from edgemoe.runtime.routing import Routers, UniformRouters, routers_for
from edgemoe.offload.predictor import HintGate
from test_runtime_fixtures import one_expert_bytes, per_expert_store, run_engine, tiny  # noqa: F401

FAMILY = "deepseek-vl2-tiny"
QUESTION = "What is in the image?"


def _routers(experts: int = 16, hidden: int = 32, k: int = 4) -> tuple[Routers, int]:
    rng = np.random.default_rng(1)
    weights = {n: rng.standard_normal((experts, hidden)).astype(np.float32) for n in (1, 3)}
    rule = RoutingRule(top_k=k, scoring="softmax", renorm="plus_tiny")
    return Routers(weights, rule), k


def test_experts_are_distinct_uniform_and_keep_the_models_weights() -> None:
    routers, k = _routers()
    m = np.random.default_rng(2).standard_normal((4000, 32)).astype(np.float32)
    own = routers.route(1, m, k)
    drawn = UniformRouters(routers, seed=0).route(1, m, k)
    assert drawn.experts.shape == own.experts.shape
    assert all(len(set(row)) == k for row in drawn.experts.tolist())
    np.testing.assert_array_equal(drawn.weights, own.weights)
    # 16,000 picks over 16 experts: each expected 1,000 (sd ~29); the model's router is far from flat.
    counts = np.bincount(drawn.experts.ravel(), minlength=16)
    assert counts.min() > 880 and counts.max() < 1120, counts
    # Token-independent: the experts a token gets do not follow from its input.
    assert np.mean(drawn.experts[:, 0] == own.experts[:, 0]) < 0.1


def test_the_same_seed_draws_the_same_experts_and_another_seed_others() -> None:
    routers, k = _routers()
    m = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    first = [UniformRouters(routers, seed=5).route(n, m, k).experts for n in (1, 3)]
    again = [UniformRouters(routers, seed=5).route(n, m, k).experts for n in (1, 3)]
    other = UniformRouters(routers, seed=6).route(1, m, k).experts
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other)


def test_model_routing_is_the_routers_themselves_and_unknown_modes_fail() -> None:
    routers, _ = _routers()
    assert routers_for(routers, "model") is routers
    with pytest.raises(EdgeMoEError, match="unknown routing"):
        routers_for(routers, "zipf")
    with pytest.raises(EdgeMoEError, match="unknown routing"):
        GenerationOptions(routing="zipf")


def _answer(bundle, image, **options):
    with ChatSession(bundle, image, GenerationOptions(max_tokens=10, **options)) as session:
        return session.ask(QUESTION)


def test_uniform_routing_answers_alike_at_every_budget_and_defeats_the_predictor(tiny) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    resident = _answer(bundle, tiny.image, routing="uniform", expert_store="sessions")
    model = _answer(bundle, tiny.image, expert_store="sessions")
    assert resident.stats.routing == "uniform" and model.stats.routing == "model"
    for experts in (6, 2):
        paged = _answer(bundle, tiny.image, routing="uniform", expert_budget=experts * one_expert_bytes(bundle),
                        expert_store=per_expert_store())
        assert paged.token_ids == resident.token_ids, f"{experts} experts"
        assert paged.stats.cache_misses > 0
    again = _answer(bundle, tiny.image, routing="uniform", expert_store="sessions")
    assert again.token_ids == resident.token_ids
    # The predictor guesses with the model's routers: right about as often as chance under uniform routing,
    # far more often under the model's own.
    assert resident.stats.prediction_precision < model.stats.prediction_precision - 0.2


def test_the_hint_gate_closes_near_chance_and_reopens_when_guesses_improve() -> None:
    gate = HintGate(floor=0.7, window=4)
    assert gate.open(3) and gate.precision(3) is None  # a layer starts open
    for i in range(6):  # each rank right every other time: chance for top-2 of 4
        gate.record(3, (1, 2) if i % 2 else (0, 3), (1, 2))
    assert not gate.open(3, 0) and not gate.open(3, 1) and 0.3 < gate.precision(3, 1) < 0.7
    assert gate.open(5)  # per layer
    for _ in range(6):
        gate.record(3, (1, 2), (1, 2))
    assert gate.open(3, 0) and gate.open(3, 1)


def test_the_hint_gate_keeps_a_layers_confident_ranks_open() -> None:
    gate = HintGate(floor=0.9, window=4)
    for i in range(8):  # the first guess always right, the second right one time in two
        gate.record(3, (1, 2) if i % 2 else (1, 0), (1, 2))
    assert gate.open(3, 0) and gate.precision(3, 0) == 1.0
    assert not gate.open(3, 1) and gate.precision(3, 1) < 0.9
    with pytest.raises(Exception, match="floor"):
        HintGate(floor=1.5)


def test_withheld_hints_change_no_answer_and_read_fewer_bytes_under_uniform_routing(tiny) -> None:
    bundle = tiny.bundle(FAMILY, "int4")
    budget = 4 * one_expert_bytes(bundle)
    runs = {}
    for floor in (0.0, 0.7):  # 0.0: every guess is hinted, as before the gate
        moe: list = []
        tokens, logits, stats = run_engine(bundle, tiny.image, budget, "edgemoe", max_tokens=16, routing="uniform",
                                           gate=HintGate(floor=floor), moe_out=moe)
        runs[floor] = tokens, logits, stats, moe[0].predictions.summary()
    (t0, l0, s0, p0), (t1, l1, s1, p1) = runs[0.0], runs[0.7]
    assert t0 == t1 and all(np.array_equal(a, b) for a, b in zip(l0, l1))
    assert p0.withheld == 0 and p1.withheld > 0
    assert s1.cache.bytes_loaded < s0.cache.bytes_loaded, (s1.cache.bytes_loaded, s0.cache.bytes_loaded)
