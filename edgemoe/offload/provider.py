"""Expert providers: what a MoE layer asks for experts. Model code never knows about offloading.

Contract: `experts(layer, needed)` yields `(ExpertKey, ExpertRunner)` once for each distinct expert in
`needed`, resident experts first while misses load (mixtral-offloading's `unordered=True`), so the
caller must combine outputs in an order of its own (the runtime sums in ascending expert order).
Each runner is valid until the caller asks for the next one: the provider holds a use lease on it
while it is out and releases it when the caller moves on (or abandons the generator), which is what
lets a cache of exactly one expert run a top-2 layer: load, run, evict, load, run. Callers must therefore run each
expert as they receive it, never collect them all first. `hint(layer, predicted)` asks for a future
layer's experts to be paged in; `stats()` reports; `close()` releases everything. One caller thread.

  ResidentProvider     every expert loaded once at start: the reference the others are tested against.
  OffloadingProvider   store -> cache (byte capacity, eviction policy) -> prefetcher (one thread),
                       plus an optional predictor that turns observed routing (or, through
                       `predict_from`, a hidden state) into hints, and scoring of every hint.

Decoding position: each visit of a new MoE layer is one step. A hint for layer t made at layer c is
for the step `forward distance(c -> t)` ahead (modulo the number of MoE layers, in 1..n), so a hint
for the next token's first layer made at the last layer is one step ahead; once decoding passes
that step, the prefetcher drops the hint if it has not started.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import OffloadError
from edgemoe.offload.predictor import PredictionStats, PredictionSummary
from edgemoe.offload.prefetcher import DEFAULT_LOADERS
from edgemoe.offload.protocols import ExpertRunner, ExpertStore

if TYPE_CHECKING:
    from edgemoe.bundle import Bundle
    from edgemoe.offload.cache import CacheStats, ExpertCache, Lease
    from edgemoe.offload.predictor import ExpertPredictor
    from edgemoe.offload.prefetcher import PrefetchStats, Prefetcher
    from edgemoe.offload.store import StoreStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProviderStats:
    """Everything a provider counts: cache, paging, store and prediction."""

    cache: "CacheStats"
    prefetch: "PrefetchStats | None"
    store: "StoreStats | None"
    prediction: PredictionSummary | None
    layer_calls: int
    prefetched_in_time: int = 0  # hits on experts a hint loaded, at their first use

    @property
    def hit_rate(self) -> float | None:
        return self.cache.hit_rate


def _distinct(layer: int, needed: Iterable[int]) -> list[ExpertKey]:
    return [ExpertKey(layer, int(e)) for e in dict.fromkeys(needed)]


def _store_stats(store: object) -> "StoreStats | None":
    stats = getattr(store, "stats", None)
    return stats() if callable(stats) else None


class ResidentProvider:
    """Every expert of `keys` loaded once, up front, and never evicted."""

    def __init__(self, store: "ExpertStore", keys: Iterable[ExpertKey]) -> None:
        self.store = store
        self._runners = {key: store.load(key) for key in keys}
        self._hits = self._calls = 0

    def experts(self, layer: int, needed: Sequence[int]) -> Iterator[tuple[ExpertKey, ExpertRunner]]:
        self._calls += 1
        for key in _distinct(layer, needed):
            runner = self._runners.get(key)
            if runner is None:
                raise OffloadError(f"expert {key} is not among the resident experts")
            self._hits += 1
            yield key, runner

    def hint(self, layer: int, predicted: Sequence[int]) -> None:
        pass  # everything is resident

    def stats(self) -> ProviderStats:
        from edgemoe.offload.cache import CacheStats

        total = sum(int(r.nbytes) for r in self._runners.values())
        cache = CacheStats("resident", total, total, total, tuple(sorted(self._runners)), self._hits, 0, 0,
                           len(self._runners), total)
        return ProviderStats(cache, None, _store_stats(self.store), None, self._calls)

    def close(self) -> None:
        self._runners.clear()
        _close_store(self.store)


class OffloadingProvider:
    """Experts paged through a byte-bounded cache (module docstring)."""

    def __init__(self, store: "ExpertStore", cache: "ExpertCache", prefetcher: "Prefetcher",
                 predictor: "ExpertPredictor | None" = None, *, moe_layers: Sequence[int] | None = None) -> None:
        self.store, self.cache, self.prefetcher, self.predictor = store, cache, prefetcher, predictor
        if moe_layers is None and hasattr(store, "keys"):
            moe_layers = sorted({k.layer for k in store.keys()})
        self.moe_layers = tuple(sorted(set(moe_layers or ())))  # empty: hints never go stale
        self._index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._layer: int | None = None  # the MoE layer being decoded
        self._step = 0
        self._calls = 0
        self._hinted: dict[int, set[int]] = {}  # layer -> experts hinted for its next visit
        self._guard: "Lease | None" = None  # the upcoming layer's residents, leased while hints load
        self.predictions = PredictionStats()
        self._in_time = 0  # hits served by a hint's load, at first use (single caller thread)
        # A store whose layer runs its chosen experts in one call (fused) needs them all leased until the
        # call ends; otherwise each lease ends as the caller moves on (a one-expert cache needs that).
        self._hold = getattr(store, "experts_together", 1) > 1

    # --- the MoE layer's side ------------------------------------------------------------------

    def experts(self, layer: int, needed: Sequence[int]) -> Iterator[tuple[ExpertKey, ExpertRunner]]:
        keys = _distinct(layer, needed)
        self._enter(layer, [k.expert for k in keys])
        hits, misses = self._split(keys)
        leases, delivered = [lease for _, _, lease in hits], 0
        try:
            self._drop_guard()  # this layer's hits are leased now; the rest may make room
            self.prefetcher.request(misses, self._step, urgent=True)
            self._predict(layer, None)  # table predictors hint the next layer while this one runs
            # Each lease ends as the caller moves on (then the expert may be evicted), unless the store
            # runs a layer's experts together: then all are held until the caller closes this iterator.
            for key, runner, lease in hits:
                yield key, runner
                if not self._hold:
                    lease.release()
            for key in misses:
                runner, lease = self.prefetcher.wait(key)  # a prefetched hold handed over, or our own load
                leases.append(lease)
                yield key, runner
                if not self._hold:
                    lease.release()
                delivered += 1
        finally:  # the caller stopped early or a load failed: nothing of this call stays leased
            for lease in leases:
                lease.release()
            self.prefetcher.release(misses[delivered:])

    def _split(self, keys: list[ExpertKey]) -> tuple[list[tuple[ExpertKey, ExpertRunner, "Lease"]], list[ExpertKey]]:
        """(resident experts, leased; missing keys): each lookup counts one hit or miss."""
        hits, misses = [], []
        for key in keys:
            taken = self.cache.acquire(key)
            if taken is None:
                misses.append(key)
            else:
                hits.append((key, *taken))
                self._in_time += self.prefetcher.take_fresh(key)
        return hits, misses

    def _enter(self, layer: int, needed: list[int]) -> None:
        """Advance the decoding position to `layer`, and score and learn from what it needs."""
        self._calls += 1
        if layer != self._layer:
            self._step += self._distance(layer)
            self._layer = layer
            self.cache.advance(layer)
            self.prefetcher.advance(self._step)
        hinted = self._hinted.pop(layer, None)
        if hinted is not None:
            self.predictions.record(hinted, needed)
        if self.predictor is not None:
            self.predictor.observe(layer, needed)

    def _distance(self, target: int) -> int:
        """Steps from the current MoE layer forward to `target`, in 1..n (1 when layers are unknown)."""
        if target not in self._index:
            return 1
        current = -1 if self._layer is None else self._index.get(self._layer, -1)
        return (self._index[target] - current - 1) % len(self.moe_layers) + 1

    # --- hints ---------------------------------------------------------------------------------

    def hint(self, layer: int, predicted: Sequence[int]) -> None:
        """Page in `layer`'s `predicted` experts for its next visit (best effort, never blocks)."""
        keys = _distinct(layer, predicted)
        if not keys:
            return
        self._hinted.setdefault(layer, set()).update(k.expert for k in keys)
        step = self._step + self._distance(layer) if layer in self._index else None
        if step is not None and step > self._step + 1:
            self._guard_upcoming()
        self.prefetcher.request(keys, step)

    def _guard_upcoming(self) -> None:
        """A hint for beyond the next MoE layer must not evict what that layer is about to use.

        The runtime hints layer L+1 before asking for layer L's experts; under LRU, L's residents are
        the oldest entries and the hint's loads would evict them a moment before they are needed.
        """
        if self._guard is not None:
            return
        upcoming = self.moe_layers[(self._index.get(self._layer, -1) + 1) % len(self.moe_layers)]
        residents = self.cache.resident_in(upcoming)
        if residents:  # none yet: look again at the next hint
            self._guard = self.cache.lease(residents, "guard")

    def _drop_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.release()

    def predict_from(self, layer: int, hidden: np.ndarray) -> dict[int, tuple[int, ...]]:
        """Hint what the predictor guesses from the hidden state entering `layer` (RouterPredictor)."""
        return self._predict(layer, hidden)

    def _predict(self, layer: int, hidden: np.ndarray | None) -> dict[int, tuple[int, ...]]:
        if self.predictor is None:
            return {}
        guesses = self.predictor.predict(layer, hidden)
        for target, experts in guesses.items():
            self.hint(target, experts)
        return guesses

    # --- reporting and lifecycle ---------------------------------------------------------------

    def stats(self) -> ProviderStats:
        prediction = self.predictions.summary()
        return ProviderStats(self.cache.stats(), self.prefetcher.stats(), _store_stats(self.store),
                             prediction if prediction.events else None, self._calls, self._in_time)

    def close(self) -> None:
        self.prefetcher.close()
        self._drop_guard()
        self.cache.clear()  # the experts (and their sessions) go before the store closes: it then drops
        # their pages from the page cache
        _close_store(self.store)
        cache = self.cache.stats()
        log.debug("offloading provider closed: %d hits, %d misses, %d evictions, peak %d of %d bytes",
                  cache.hits, cache.misses, cache.evictions, cache.peak_bytes, cache.capacity_bytes)

    @classmethod
    def from_bundle(cls, bundle: "Bundle", capacity_bytes: int, policy: str = "edgemoe", *,
                    predictor: "ExpertPredictor | None" = None, threads: int | None = None,
                    store: "ExpertStore | None" = None, loaders: int = DEFAULT_LOADERS) -> "OffloadingProvider":
        """The usual assembly: process hygiene, a store (ONNX sessions unless one is given), a cache
        trimming the heap after evictions."""
        from edgemoe.offload.cache import ExpertCache
        from edgemoe.offload.prefetcher import Prefetcher
        from edgemoe.offload.sessions import HeapTrimmer, configure_process, session_factory
        from edgemoe.offload.store import OnnxExpertStore

        configure_process()
        store = store if store is not None else OnnxExpertStore(bundle, session_factory(threads))
        layers = sorted({k.layer for k in store.keys()})
        cache = ExpertCache(capacity_bytes, policy, moe_layers=layers, on_evict=HeapTrimmer())
        return cls(store, cache, Prefetcher(store, cache, workers=loaders), predictor, moe_layers=layers)


def _close_store(store: object) -> None:
    """Release what a store keeps beyond its runners (a mapped store's sessions)."""
    close = getattr(store, "close", None)
    if close is not None:
        close()
