"""OffloadingProvider == ResidentProvider on scripted layer requests, from all experts down to one."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.keys import ExpertKey
from edgemoe.offload import (ExpertCache, ExpertLoadError, OffloadingProvider, Prefetcher, ResidentProvider,
                             StatisticalPredictor)
from offload_fakes import PATIENCE, FakeClock, FakeStore, keys_of

LAYERS = (1, 3, 5, 7)
SIZES = {k: 100 + 10 * k.expert + k.layer for k in keys_of(LAYERS, 4)}  # unequal, largest L7/E3 = 137
ALL = sum(SIZES.values())
LARGEST = max(SIZES.values())


def script(tokens: int = 6, seed: int = 0) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """(layer, needed, hint for the next layer) per MoE layer visit: decode tokens, then a prefill."""
    rng = np.random.default_rng(seed)
    steps = [(layer, (0, 1, 2, 3), ()) for layer in LAYERS]  # an image prefill needs every expert
    for _ in range(tokens):
        for layer in LAYERS:
            needed = tuple(sorted(rng.choice(4, 2, replace=False).tolist()))
            steps.append((layer, needed, tuple(sorted(rng.choice(4, 2, replace=False).tolist()))))
    return steps


def run(provider, steps, x: np.ndarray) -> list[dict[ExpertKey, np.ndarray]]:
    """What a MoE layer does: hint the next layer, then run each expert as it arrives."""
    outputs = []
    for i, (layer, needed, guess) in enumerate(steps):
        if guess:
            provider.hint(LAYERS[(LAYERS.index(layer) + 1) % len(LAYERS)], guess)
        got = {}
        for key, runner in provider.experts(layer, needed):
            assert key.layer == layer and key not in got
            got[key] = runner.run(x * (i + 1))
        assert sorted(k.expert for k in got) == sorted(set(needed))
        outputs.append(got)
    return outputs


def offloading(capacity: int, policy: str, store: FakeStore | None = None, predictor=None):
    store = store or FakeStore(SIZES)
    cache = ExpertCache(capacity, policy, moe_layers=LAYERS)
    return OffloadingProvider(store, cache, Prefetcher(store, cache, FakeClock(), workers=1), predictor), store


@pytest.mark.parametrize("policy", ["lru", "lfu", "edgemoe"])
@pytest.mark.parametrize("capacity", [ALL, ALL // 2, 2 * LARGEST, LARGEST])
def test_offloaded_outputs_equal_resident(capacity: int, policy: str) -> None:
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)
    steps = script()
    resident = ResidentProvider(FakeStore(SIZES), SIZES)
    expected = run(resident, steps, x)
    provider, store = offloading(capacity, policy)
    try:
        got = run(provider, steps, x)
    finally:
        provider.close()
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        for key in want:
            np.testing.assert_array_equal(have[key], want[key])
    stats = provider.stats()
    assert stats.cache.peak_bytes <= capacity and stats.layer_calls == len(steps)
    assert stats.cache.hits + stats.cache.misses == sum(len(set(n)) for _, n, _ in steps)
    if capacity == ALL:
        assert stats.cache.evictions == 0 and len(set(store.loads)) == len(store.loads)  # each loaded once
    hinted = len(steps) - len(LAYERS) - 1  # the prefill gives no hints, and the last hint is never scored
    assert stats.prediction is not None and stats.prediction.events == hinted


def test_one_expert_of_capacity_runs_a_top2_layer_one_expert_at_a_time() -> None:
    provider, _ = offloading(LARGEST, "lru")
    cache = provider.cache
    try:
        it = provider.experts(3, [2, 0])
        k1, _ = next(it)
        assert cache.pinned() == (k1,) and cache.resident() == (k1,)
        k2, _ = next(it)  # moving on released k1, so it could be evicted for k2
        assert cache.pinned() == (k2,) and cache.resident() == (k2,)
        assert {k1, k2} == {ExpertKey(3, 0), ExpertKey(3, 2)}
        assert next(it, None) is None and cache.pinned() == ()
    finally:
        provider.close()


def test_resident_experts_come_first_and_abandoning_releases_pins() -> None:
    provider, _ = offloading(ALL, "lru")
    try:
        run(provider, [(1, (2,), ())], np.ones((1, 8), np.float32))
        it = provider.experts(1, [0, 1, 2])
        assert next(it)[0] == ExpertKey(1, 2)  # the hit before the misses
        assert next(it)[0] == ExpertKey(1, 0)
        it.close()
        assert provider.cache.pinned() == () and provider.prefetcher.join_idle(PATIENCE)
        assert provider.cache.pinned() == ()  # a miss still loading for the abandoned call is not left pinned
    finally:
        provider.close()


def test_a_corrupt_expert_surfaces_from_experts_as_one_line() -> None:
    store = FakeStore(SIZES, fail=[ExpertKey(3, 1)], fail_times=99)
    provider, _ = offloading(ALL, "lru", store)
    try:
        with pytest.raises(ExpertLoadError, match=r"^cannot load expert L3/E1: disk on fire$"):
            for _key, runner in provider.experts(3, [0, 1]):
                runner.run(np.ones((1, 8), np.float32))
        assert provider.cache.pinned() == ()
        assert [k for k, _ in provider.experts(3, [0, 2])] == [ExpertKey(3, 0), ExpertKey(3, 2)]  # still works
    finally:
        provider.close()


def test_statistical_predictor_hints_through_the_provider() -> None:
    tokens = [({0, 1}, {2, 3}, {0, 2}, {1, 3}), ({2, 3}, {0, 1}, {1, 3}, {0, 2})] * 4
    steps = [(layer, tuple(sorted(chosen)), ()) for token in tokens for layer, chosen in zip(LAYERS, token)]
    predictor = StatisticalPredictor(LAYERS, num_experts=4, top_n=2)
    provider, store = offloading(ALL, "edgemoe", predictor=predictor)
    try:
        run(provider, steps, np.ones((1, 8), np.float32))
    finally:
        provider.close()
    s = provider.stats()
    # Unscored: layers 3, 5, 7 of the first token (nothing known yet) and the very last hint.
    assert s.prediction.events == len(steps) - 4 and s.prediction.recall > 0.7
    assert s.prefetch.requested > 0 and s.cache.hit_rate > 0.7


def test_a_hint_for_the_layer_after_next_does_not_evict_the_next_layers_experts() -> None:
    store = FakeStore({k: 10 for k in keys_of(LAYERS, 4)})
    provider, _ = offloading(40, "lru", store)  # four experts
    cache = provider.cache
    try:
        for e in (0, 1):  # layer 3's experts, resident from an earlier token: the least recently used
            cache.put(ExpertKey(3, e), store.load(ExpertKey(3, e)))
        list(provider.experts(1, [0, 1]))  # fills the cache
        provider.hint(5, [0, 1])  # the runtime's order: hint layer 5, then ask for layer 3
        assert provider.prefetcher.join_idle(PATIENCE)
        before = cache.stats()
        assert [k for k, _ in provider.experts(3, [0, 1])] == [ExpertKey(3, 0), ExpertKey(3, 1)]
        assert cache.stats().hits - before.hits == 2  # LRU alone would have evicted them for layer 5
        assert cache.resident() == (ExpertKey(3, 0), ExpertKey(3, 1), ExpertKey(5, 0), ExpertKey(5, 1))
        assert cache.pinned() == ()
    finally:
        provider.close()
