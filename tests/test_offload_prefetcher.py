"""Prefetcher, driven deterministically: a fake store whose loads block on Events the test opens."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from edgemoe.keys import ExpertKey
from edgemoe.offload import CacheCapacityError, ExpertCache, ExpertLoadError, OffloadError, Prefetcher
from offload_fakes import PATIENCE, FakeClock, FakeStore, keys_of

K0, K1, K2, K3 = (ExpertKey(1, e) for e in range(4))


@pytest.fixture
def store() -> FakeStore:
    return FakeStore({k: 10 for k in keys_of([1, 3], 4)})


def make(store: FakeStore, capacity: int = 40) -> tuple[ExpertCache, Prefetcher, FakeClock]:
    cache, clock = ExpertCache(capacity), FakeClock()
    return cache, Prefetcher(store, cache, clock, workers=1), clock


@pytest.fixture
def parts(store: FakeStore) -> Iterator[tuple[ExpertCache, Prefetcher, FakeClock]]:
    cache, prefetcher, clock = make(store)
    yield cache, prefetcher, clock
    for gate in store.gates.values():
        gate.set()
    assert prefetcher.close(PATIENCE)


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """Run fn(*args) on a thread; the dict gets 'value' or 'error'."""
    out: dict = {}

    def body() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


def test_prefetched_key_becomes_a_hit(store: FakeStore, parts) -> None:
    cache, prefetcher, _ = parts
    assert prefetcher.request([K0, K1]) == 2
    assert prefetcher.join_idle(PATIENCE)
    assert cache.get(K0) is not None and cache.get(K1) is not None
    s = cache.stats()
    assert (s.hits, s.misses) == (2, 0)
    assert store.threads == ["edgemoe-prefetch-0"] * 2
    assert prefetcher.stats().prefetched == 2 and cache.pinned() == ()  # hints are leased only while loading


def test_wait_on_an_in_flight_key_returns_when_its_load_completes(store: FakeStore, parts) -> None:
    cache, prefetcher, _ = parts
    gate = store.gate(K0)
    prefetcher.request([K0])
    assert store.started[K0].wait(PATIENCE)
    thread, out = in_thread(prefetcher.wait, K0)
    assert cache.is_reserved(K0) and not out  # the load is held by the gate: nothing can have returned
    gate.set()
    thread.join(PATIENCE)
    runner, lease = out["value"]
    assert runner.key == K0 and cache.pinned() == (K0,) and lease.purpose == "use"  # leased to the waiter
    assert store.loads == [K0]  # the waiter did not load it a second time
    lease.release()
    lease.release()  # twice is harmless
    assert cache.pinned() == ()


def test_no_duplicate_loads_for_a_key_requested_twice(store: FakeStore, parts) -> None:
    cache, prefetcher, _ = parts
    gate = store.gate(K0)
    assert prefetcher.request([K0, K0, K1]) == 2
    assert store.started[K0].wait(PATIENCE)
    assert prefetcher.request([K0, K1]) == 0  # loading / queued
    gate.set()
    assert prefetcher.join_idle(PATIENCE)
    assert prefetcher.request([K0, K1]) == 0  # resident
    assert store.loads == [K0, K1] and prefetcher.stats().requested == 2


def test_a_failed_load_reaches_the_waiter_and_the_prefetcher_keeps_working() -> None:
    store = FakeStore({K0: 10, K1: 10}, fail=[K0])
    cache, prefetcher, _ = make(store)
    gate = store.gate(K0)
    prefetcher.request([K0])
    assert store.started[K0].wait(PATIENCE)
    thread, out = in_thread(prefetcher.wait, K0)
    gate.set()
    thread.join(PATIENCE)
    # Whether the waiter was already blocked or came after the failure, it gets the load's own error.
    assert out["error"] is store.errors[0] and isinstance(out["error"], ExpertLoadError)
    assert str(out["error"]) == "cannot load expert L1/E0: disk on fire"
    assert store.loads == [K0] and cache.stats().used_bytes == 0  # reservation given back
    assert prefetcher.wait(K0)[0].key == K0  # asked again: loaded (on this thread), the store works now
    prefetcher.request([K1])
    assert prefetcher.join_idle(PATIENCE) and K1 in cache
    assert prefetcher.stats().failed == 1 and prefetcher.stats().demand_loads == 1
    prefetcher.close(PATIENCE)


def test_wait_for_an_unrequested_key_loads_it_on_the_callers_thread(store: FakeStore, parts) -> None:
    cache, prefetcher, clock = parts
    runner, _ = prefetcher.wait(K2)
    assert runner.key == K2 and store.threads == [threading.current_thread().name]
    assert cache.pinned() == (K2,) and prefetcher.stats().demand_loads == 1
    assert prefetcher.stats().wait_seconds == 0.0  # the fake clock did not move


def test_a_queued_key_is_taken_over_by_its_waiter(store: FakeStore, parts) -> None:
    cache, prefetcher, _ = parts
    gate = store.gate(K0)
    prefetcher.request([K0, K1])
    assert store.started[K0].wait(PATIENCE)  # the thread is stuck on K0; K1 is still queued
    assert prefetcher.wait(K1)[0].key == K1  # loaded here instead of waiting behind K0
    gate.set()
    assert prefetcher.join_idle(PATIENCE)
    assert store.loads == [K0, K1] and store.threads[1] == threading.current_thread().name


def test_stale_requests_are_dropped(store: FakeStore, parts) -> None:
    cache, prefetcher, _ = parts
    gate = store.gate(K0)
    prefetcher.request([K0])
    assert store.started[K0].wait(PATIENCE)
    prefetcher.request([K1], step=1)
    prefetcher.request([K2], step=3)
    prefetcher.advance(2)
    assert prefetcher.request([K3], step=1) == 0  # already passed
    gate.set()
    assert prefetcher.join_idle(PATIENCE)
    assert store.loads == [K0, K2] and prefetcher.stats().dropped_stale == 1


def test_urgent_loads_stay_held_until_taken_and_go_first(store: FakeStore, parts) -> None:
    cache, prefetcher, _ = parts
    gate = store.gate(K0)
    prefetcher.request([K0])
    assert store.started[K0].wait(PATIENCE)
    prefetcher.request([K1], step=1)
    prefetcher.request([K2, K3], step=1, urgent=True)
    gate.set()
    assert prefetcher.join_idle(PATIENCE)
    assert store.loads == [K0, K2, K3, K1]
    assert prefetcher.held() == (K2, K3) and cache.pinned() == (K2, K3)
    assert {(lease.keys, lease.purpose, lease.until_step) for lease in cache.leases()} == {((K2,), "hold", 1),
                                                                                         ((K3,), "hold", 1)}
    runner, lease = prefetcher.wait(K2)
    assert runner.key == K2 and cache.pinned() == (K2, K3)  # the hold became the caller's lease
    assert {(lease.keys, lease.purpose) for lease in cache.leases()} == {((K2,), "use"), ((K3,), "hold")}
    prefetcher.advance(2)  # K3 was never taken: its hold is released with its step
    assert cache.pinned() == (K2,) and prefetcher.held() == ()


def test_no_room_drops_a_prefetch_and_a_demand_load_makes_room(store: FakeStore) -> None:
    cache, prefetcher, _ = make(store, capacity=10)  # exactly one expert
    try:
        _, first = prefetcher.wait(K0)  # leased: in use
        prefetcher.request([K1])
        assert prefetcher.join_idle(PATIENCE) and prefetcher.stats().dropped_no_room == 1
        with pytest.raises(CacheCapacityError, match=r"no room for expert L1/E1 \(10 bytes\).*L1/E0 \(use\)"):
            prefetcher.wait(K1)  # the caller still holds K0: nothing could ever free room
        first.release()
        assert prefetcher.wait(K1)[0].key == K1 and cache.resident() == (K1,)
        assert cache.stats().peak_bytes == 10
    finally:
        prefetcher.close(PATIENCE)


def test_demand_load_releases_holds_for_later_keys(store: FakeStore) -> None:
    cache, prefetcher, _ = make(store, capacity=10)
    try:
        prefetcher.request([K1], step=0, urgent=True)  # held for a later wait
        assert prefetcher.join_idle(PATIENCE) and prefetcher.held() == (K1,)
        assert prefetcher.wait(K0)[0].key == K0  # evicts the held K1 rather than failing
        assert prefetcher.held() == () and cache.resident() == (K0,)
    finally:
        prefetcher.close(PATIENCE)


def test_close_does_not_hang_with_loads_pending(store: FakeStore) -> None:
    cache, prefetcher, _ = make(store)
    gate = store.gate(K0)
    prefetcher.request([K0, K1, K2])
    assert store.started[K0].wait(PATIENCE)
    assert prefetcher.close(timeout=0) is False  # returns at once, the thread is mid-load
    gate.set()
    for thread in prefetcher._threads:
        thread.join(PATIENCE)
    assert not any(t.is_alive() for t in prefetcher._threads)
    assert store.loads == [K0] and cache.resident() == () and cache.stats().used_bytes == 0
    with pytest.raises(OffloadError, match="prefetcher is closed"):
        prefetcher.wait(K1)
    assert prefetcher.request([K1]) == 0


def test_close_when_idle_joins_at_once(store: FakeStore) -> None:
    _, prefetcher, _ = make(store)
    assert prefetcher.close(PATIENCE) is True


def test_two_workers_keep_two_loads_in_flight(store: FakeStore) -> None:
    cache = ExpertCache(40)
    prefetcher = Prefetcher(store, cache, FakeClock(), workers=2)
    gates = [store.gate(K0), store.gate(K1)]
    try:
        assert prefetcher.request([K0, K1, K2]) == 3
        # Both gated loads start before either ends: two threads, two reads in flight.
        assert store.started[K0].wait(PATIENCE) and store.started[K1].wait(PATIENCE)
        assert not prefetcher.join_idle(0)
        for gate in gates:
            gate.set()
        assert prefetcher.join_idle(PATIENCE)
        assert sorted(cache.resident()) == [K0, K1, K2] and prefetcher.stats().prefetched == 3
        assert {t for t in store.threads} == {"edgemoe-prefetch-0", "edgemoe-prefetch-1"}
        assert cache.stats().used_bytes == 30 and cache.pinned() == ()
    finally:
        for gate in gates:
            gate.set()
        assert prefetcher.close(PATIENCE)
