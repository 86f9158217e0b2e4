"""Routing predictors and their scoring: router look-ahead, EdgeMoE's table, precision and recall."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.offload import OffloadError, PredictionStats, RouterPredictor, StatisticalPredictor

LAYERS = (1, 3, 5, 7)


def test_perfect_predictions_score_one() -> None:
    stats = PredictionStats()
    for predicted in ([0, 1], [2, 3], [1]):
        stats.record(predicted, predicted)
    s = stats.summary()
    assert (s.precision, s.recall, s.mean_precision, s.mean_recall, s.exact, s.events) == (1.0, 1.0, 1.0, 1.0, 3, 3)


def test_partial_predictions_give_known_numbers() -> None:
    stats = PredictionStats()
    stats.record([0, 1], [1, 2])  # precision 1/2, recall 1/2
    stats.record([0], [0, 3])  # precision 1, recall 1/2
    stats.record([], [1])  # nothing predicted: no precision, recall 0
    s = stats.summary()
    assert (s.predicted, s.needed, s.correct, s.exact) == (3, 5, 2, 0)
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(2 / 5)
    assert s.mean_precision == pytest.approx(0.75) and s.mean_recall == pytest.approx(1 / 3)
    assert PredictionStats().summary().precision is None


def random_routers(seed: int = 0, experts: int = 4, hidden: int = 32) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: rng.standard_normal((experts, hidden)).astype(np.float32) for layer in LAYERS}


def numpy_top_k(hidden: np.ndarray, router: np.ndarray, k: int) -> tuple[int, ...]:
    """Direct top-k of the logits (softmax is monotonic): one token's best first, a union over many
    tokens ascending."""
    logits = np.atleast_2d(hidden).astype(np.float64) @ router.T.astype(np.float64)
    if logits.shape[0] == 1:
        return tuple(int(e) for e in np.argsort(-logits[0], kind="stable")[:k])
    return tuple(sorted({int(e) for row in logits for e in np.argsort(row)[-k:]}))


def test_router_predictor_is_the_next_routers_top_k() -> None:
    routers = random_routers()
    rng = np.random.default_rng(1)
    predictor = RouterPredictor(routers, LAYERS, top_k=2)
    for _ in range(20):
        h = rng.standard_normal(32).astype(np.float32)
        assert predictor.predict(3, h) == {5: numpy_top_k(h, routers[5], 2)}
    many = rng.standard_normal((6, 32)).astype(np.float32)  # prefill: the union over tokens
    assert predictor.predict(1, many) == {3: numpy_top_k(many, routers[3], 2)}


def test_router_predictor_lookahead_stops_at_the_last_layer() -> None:
    routers = random_routers()
    h = np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32)
    predictor = RouterPredictor(routers, LAYERS, top_k=1, lookahead=2)
    assert predictor.predict(3, h) == {5: numpy_top_k(h, routers[5], 1), 7: numpy_top_k(h, routers[7], 1)}
    assert list(predictor.predict(5, h)) == [7]
    assert predictor.predict(7, h) == {} and predictor.predict(3, None) == {}


def test_router_predictor_ties_go_to_the_lower_index() -> None:
    routers = {layer: np.zeros((4, 8), np.float32) for layer in LAYERS}
    assert RouterPredictor(routers, LAYERS, top_k=2).predict(1, np.ones(8, np.float32)) == {3: (0, 1)}


def test_router_predictor_rejects_missing_routers() -> None:
    with pytest.raises(OffloadError, match=r"no router weights for MoE layer\(s\) \[7\]"):
        RouterPredictor({1: np.zeros((4, 8)), 3: np.zeros((4, 8)), 5: np.zeros((4, 8))}, LAYERS, 2)


# Two kinds of token: the routing of each MoE layer follows from the previous two.
TOKEN_A = ({0, 1}, {2, 3}, {0, 2}, {1, 3})
TOKEN_B = ({2, 3}, {0, 1}, {1, 3}, {0, 2})


def test_statistical_predictor_learns_the_two_layer_table() -> None:
    predictor = StatisticalPredictor(LAYERS, num_experts=4, top_n=2)
    predictor.fit([TOKEN_A, TOKEN_B, TOKEN_A, TOKEN_A])
    predictor.observe(1, {2, 3})
    assert predictor.predict(1) == {3: (0, 1)}
    predictor.observe(3, {0, 1})
    assert predictor.predict(3) == {5: (1, 3)}
    p = predictor.probabilities(5, (frozenset({2, 3}), frozenset({0, 1})))
    assert p.tolist() == [0.0, 1.0, 0.0, 1.0]
    predictor.observe(5, {1, 3})
    predictor.observe(7, {0, 2})
    assert predictor.predict(7) == {1: (0, 1)}  # next token's first layer: its marginal (A 3 times, B 2)


def test_statistical_predictor_backs_off_for_unseen_contexts() -> None:
    predictor = StatisticalPredictor(LAYERS, num_experts=4, top_n=2)
    predictor.fit([TOKEN_A, TOKEN_A])
    predictor.observe(1, {1, 2})  # a first layer never seen: layer 3's table has no such context
    assert predictor.predict(1) == {3: (2, 3)}  # falls back to layer 3's marginal
    empty = StatisticalPredictor(LAYERS, num_experts=4)
    empty.observe(1, {0, 1})
    assert empty.predict(1) == {}  # nothing known about layer 3 yet


def test_statistical_predictor_online_scores_perfectly_on_periodic_routing() -> None:
    predictor, stats = StatisticalPredictor(LAYERS, num_experts=4, top_n=2), PredictionStats()
    pending: dict[int, tuple[int, ...]] = {}
    for i, token in enumerate([TOKEN_A, TOKEN_B] * 5):
        for layer, chosen in zip(LAYERS, token):
            guess = pending.pop(layer, None)
            # Within a token the routing is determined once both kinds were seen; across tokens it is not.
            if guess is not None and layer != LAYERS[0] and i >= 2:
                stats.record(guess, chosen)
            predictor.observe(layer, chosen)
            pending.update(predictor.predict(layer))
    s = stats.summary()
    assert s.events == 8 * 3 and s.precision == 1.0 and s.recall == 1.0
