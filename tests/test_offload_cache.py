"""ExpertCache and its policies: scripted eviction orders, counters, pins, capacity as a hard bound."""

from __future__ import annotations

import pytest

from edgemoe.keys import ExpertKey
from edgemoe.offload import CacheCapacityError, EdgeMoEPolicy, ExpertCache, OffloadError, make_policy
from offload_fakes import FakeRunner

A, B, C, D, E = (ExpertKey(1, e) for e in range(5))


class Checked:
    """A cache whose used and peak bytes are asserted within capacity after every operation."""

    def __init__(self, capacity: int, policy: str = "lru", **kw) -> None:
        self.cache = ExpertCache(capacity, policy, **kw)
        self.evicted: list[int] = []

    def put(self, key: ExpertKey, nbytes: int = 10, lease: str | None = None):
        before = set(self.cache.resident())
        taken = self.cache.put(key, FakeRunner(key, nbytes), lease=lease)
        self.evicted += sorted(before - set(self.cache.resident()))
        self.check()
        return taken

    def get(self, *keys: ExpertKey) -> None:
        for key in keys:
            self.cache.get(key)
        self.check()

    def check(self) -> None:
        s = self.cache.stats()
        assert s.used_bytes <= s.capacity_bytes and s.peak_bytes <= s.capacity_bytes


def test_lru_evicts_least_recently_used() -> None:
    c = Checked(30)
    c.put(A), c.put(B), c.put(C)
    c.get(A)  # B is now the oldest
    c.put(D)
    c.get(C)
    c.put(E)  # order of last use: A, D, C -> A goes
    assert c.evicted == [B, A]
    assert c.cache.resident() == (C, D, E)


def test_lfu_evicts_least_frequently_used_ties_to_older() -> None:
    c = Checked(30, "lfu")
    c.get(A, A, A, B, C, C)  # activations (misses count too): A 3, B 1, C 2
    c.put(A), c.put(B), c.put(C)
    c.put(D)  # B has fewest
    c.get(D)
    c.put(E)  # C 2, D 1, A 3 -> D
    c.get(E, E)
    c.get(B, B, B)  # B is not resident, but its count persists (4)
    c.put(B)  # E 2, C 2 tie -> C was used longer ago
    assert c.evicted == [B, D, C]
    s = c.cache.stats()
    assert (s.hits, s.misses, s.evictions, s.loads, s.bytes_loaded) == (3, 9, 3, 6, 60)


def test_edgemoe_scores_frequency_over_forward_layer_distance() -> None:
    layers = (1, 3, 5, 7)
    l1, l3, l5, l7 = (ExpertKey(layer, 0) for layer in layers)
    policy = EdgeMoEPolicy(layers)
    policy.advance(3)
    assert [policy.distance(k) for k in (l1, l3, l5, l7)] == [3, 4, 1, 2]  # l3 is current: a whole token away
    c = Checked(40, policy)
    for key in (l1, l3, l5, l7):
        c.put(key)
    # scores (freq + 1) / distance: l1 1/3, l3 1/4, l5 1/1, l7 1/2 -> l3 first
    c.put(ExpertKey(5, 1))
    c.get(l1, l1, l1, l1, l1)  # l1 6/3 = 2 now; l7 0.5 is the lowest
    c.put(ExpertKey(5, 2))
    c.cache.advance(5)  # distances from 5: l1 2, l5 4, L5/E1 4, L5/E2 4
    c.put(ExpertKey(7, 1))  # l1 6/2=3, l5 1/4, L5/E1 1/4 (used later), L5/E2 1/4 -> tie to least recent: l5
    assert c.evicted == [l3, l7, l5]


def test_edgemoe_victim_is_its_lowest_rank_in_any_state() -> None:
    """The victim is worked out with each layer's distance computed once per call (hundreds of candidates
    on every eviction): it must be exactly the per-key ranking's minimum, ties included."""
    import random

    layers = tuple(range(1, 27))
    policy = EdgeMoEPolicy(layers)
    keys = [ExpertKey(layer, e) for layer in layers for e in range(64)]
    rng = random.Random(0)
    for key in keys:
        policy.inserted(key)
        for _ in range(rng.randrange(4)):  # few distinct counts: many exact score ties across layers
            policy.accessed(key)
    for current in (1, 5, 13, 26):
        policy.advance(current)
        for subset in (keys, rng.sample(keys, 300), rng.sample(keys, 3), keys[:1]):
            assert policy.victim(subset) == min(subset, key=policy._rank)
    with pytest.raises(OffloadError, match="layer 99 is not one of the MoE layers"):
        policy.victim([ExpertKey(99, 0)])


def test_leased_keys_are_never_evicted_and_the_error_names_each_holder() -> None:
    c = Checked(30)
    use = c.put(A, lease="use")
    c.put(B), c.put(C)
    c.put(D)  # A is least recent but leased
    assert c.evicted == [B]
    guard = c.cache.lease([C, D], "guard")
    hold = c.cache.lease([D], "hold", until_step=3)
    with pytest.raises(CacheCapacityError, match=r"no room for expert L1/E4 \(10 bytes\): 30 of 30 bytes are leased "
                       r"or loading \(L1/E0 \(use\), L1/E2 \(guard\), L1/E3 \(guard, hold\)\)"):
        c.put(E)
    assert c.cache.resident() == (A, C, D)
    assert [(lease.keys, lease.purpose, lease.until_step) for lease in c.cache.leases()] == [
        ((A,), "use", None), ((C, D), "guard", None), ((D,), "hold", 3)]
    use.release()
    use.release()  # a second release changes nothing
    c.put(E)
    assert c.evicted == [B, A]
    guard.release()
    assert c.cache.pinned() == (D,) and hold.active and not guard.active
    hold.release()
    assert c.cache.pinned() == () and c.cache.leases() == ()


def test_leases_nest_and_acquire_leases_atomically() -> None:
    c = Checked(20)
    c.put(A)
    first, second = c.cache.acquire(A), c.cache.acquire(A)
    assert first is not None and second is not None and first[0] is second[0]
    c.put(B)
    first[1].release()
    c.put(C)  # A still leased once: B goes
    assert c.evicted == [B]
    assert c.cache.acquire(D) is None and c.cache.pinned() == (A,)


def test_oversize_expert_is_refused() -> None:
    cache = ExpertCache(100)
    with pytest.raises(CacheCapacityError, match=r"expert L1/E0 needs 101 bytes.*\(100 bytes\).*at least 101"):
        cache.put(A, FakeRunner(A, 101))
    with pytest.raises(CacheCapacityError, match="needs 101 bytes"):
        cache.reserve(A, 101)
    assert cache.stats().used_bytes == 0


def test_reservations_count_and_cannot_be_evicted() -> None:
    c = Checked(30)
    c.put(A)
    assert c.cache.reserve(B, 10) and c.cache.reserve(C, 10)
    assert not c.cache.reserve(D, 20)  # only A (10) is evictable
    assert c.cache.resident() == (A,)  # and a refused reservation evicts nothing
    assert c.cache.reserve(D, 10)  # evicts A
    c.put(B)
    c.cache.cancel(C)
    c.check()
    assert c.cache.stats().used_bytes == 20 and c.cache.resident() == (B,)
    with pytest.raises(OffloadError, match="already being loaded"):
        c.cache.reserve(D, 10)


def test_capacity_is_never_exceeded_on_a_long_sequence() -> None:
    sizes = {ExpertKey(layer, e): 7 + 3 * e + layer for layer in range(4) for e in range(4)}
    for policy in ("lru", "lfu", "edgemoe"):
        c = Checked(40, policy, moe_layers=range(4))
        for step in range(200):
            key = ExpertKey(step % 4, (step * 7 + step // 4) % 4)
            c.cache.advance(key.layer)
            if c.cache.get(key) is None:
                c.put(key, sizes[key])
        s = c.cache.stats()
        assert s.hits + s.misses == 200 and s.loads == s.misses and s.peak_bytes <= 40


def test_policy_by_name_and_bad_names() -> None:
    assert make_policy("LRU").name == "lru" and make_policy("lfu").name == "lfu"
    assert make_policy("edgemoe", (1, 3)).name == "edgemoe"
    with pytest.raises(OffloadError, match="unknown eviction policy 'fifo': expected one of lru, lfu, edgemoe"):
        make_policy("fifo")
    with pytest.raises(OffloadError, match="needs the model's MoE layers"):
        ExpertCache(10, "edgemoe")
    with pytest.raises(OffloadError, match="positive number of bytes"):
        ExpertCache(0)
