"""Which expert provider a request gets, and the provider counters a generation reports.

Contract: `open_expert_store(bundle, kind)` picks where experts come from: "mapped" (prepacked
sessions whose weight pages are paged, `edgemoe.offload.mapped`), "sessions" (a session built per
load, `OnnxExpertStore`), "fused" (each layer's int4 experts in one QMoE session, paged
one expert at a time, `edgemoe.offload.fused`), or "auto": mapped where
this machine supports it and its cache directory is writable, sessions otherwise (logged). `make_provider(bundle, capacity, policy, store)` returns `edgemoe.offload.ResidentProvider` (every
expert loaded once) when no budget applies (capacity None), else an `OffloadingProvider` over the
bundle's experts with a cache of `capacity` bytes and the named eviction policy. The runtime's MoE
layer gives the hints itself (`moe.MoELayer`), so the provider gets no predictor of its own.
`ProviderCounters` are the cumulative hit / miss / paged-byte counters of `provider.stats()`;
subtracting two snapshots gives one generation's share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgemoe.bundle import Bundle
from edgemoe.offload import DEFAULT_LOADERS, DEFAULT_POLICY, POLICIES, OffloadingProvider, OnnxExpertStore, ResidentProvider
from edgemoe.offload.errors import OffloadError, PrepareError
from edgemoe.offload.fused import FusedExperts, fused_layers_prepared
from edgemoe.offload.mapped import MappedExpertStore, mapped_store_supported
from edgemoe.offload.sessions import configure_process, session_factory

log = logging.getLogger(__name__)

EXPERT_STORES = ("auto", "mapped", "sessions", "fused")


def open_expert_store(bundle: Bundle, kind: str = "auto", progress: Callable[[int, int], None] | None = None,
                      may_prepare_fused: bool = True) -> Any:
    """The bundle's expert store of `kind` (module docstring). `may_prepare_fused=False` (a run under a
    memory budget) refuses, in one line, a fused store not yet prepared on this machine: preparing it
    holds a layer's experts and their packing in memory, more than the budget accounts for."""
    if kind not in EXPERT_STORES:
        raise OffloadError(f"unknown expert store {kind!r}: expected one of {', '.join(EXPERT_STORES)}")
    configure_process()
    if kind == "fused":  # each layer's experts in one QMoE session, paged per expert (edgemoe.offload.fused)
        if not may_prepare_fused and not fused_layers_prepared(bundle):
            raise OffloadError("--expert-store fused is not prepared on this machine yet, and preparing it takes more "
                               "memory than --memory-budget accounts for: run once without --memory-budget first")
        return FusedExperts(bundle, progress=progress)
    if kind == "sessions" or (kind == "auto" and not mapped_store_supported()):
        return OnnxExpertStore(bundle, session_factory())
    try:
        return MappedExpertStore(bundle, progress=progress)
    except PrepareError as exc:
        if kind == "mapped":
            raise
        log.warning("%s; experts will be loaded as sessions instead", exc)
        return OnnxExpertStore(bundle, session_factory())


def store_kind(store: Any) -> str:
    """How a store pages experts: "mapped", "sessions" or "fused" (what generation stats report)."""
    if isinstance(store, FusedExperts):
        return "fused"
    return "mapped" if isinstance(store, MappedExpertStore) else "sessions"


def resident_sizes(store: Any) -> dict | None:
    """The RSS each expert adds when resident, where the store knows it exactly (mapped, fused);
    None where the budget must convert file bytes (a session store)."""
    if isinstance(store, (MappedExpertStore, FusedExperts)):
        return {key: store.size_of(key) for key in store.keys()}
    return None


def make_provider(bundle: Bundle, capacity_bytes: int | None, policy: str = DEFAULT_POLICY, store: Any = None,
                  loaders: int = DEFAULT_LOADERS) -> Any:
    """A resident provider (capacity None) or an offloading one (module docstring)."""
    if policy not in POLICIES:
        raise OffloadError(f"unknown eviction policy {policy!r}: expected one of {', '.join(POLICIES)}")
    configure_process()
    store = store if store is not None else OnnxExpertStore(bundle, session_factory())
    if capacity_bytes is None:
        return ResidentProvider(store, store.keys())
    return OffloadingProvider.from_bundle(bundle, capacity_bytes, policy, store=store, loaders=loaders)


@dataclass(frozen=True)
class ProviderCounters:
    """Cumulative provider counters; `a - b` is what happened between two snapshots."""

    hits: int = 0
    misses: int = 0
    bytes_paged: int = 0
    load_seconds: float = 0.0  # spent loading experts (reading, verifying, first-use sessions), summed over threads
    in_time: int = 0  # hits on experts a hint had loaded (prefetched in time)
    late: int = 0  # hinted loads needed before they were done

    def __sub__(self, other: "ProviderCounters") -> "ProviderCounters":
        return ProviderCounters(self.hits - other.hits, self.misses - other.misses,
                                self.bytes_paged - other.bytes_paged, self.load_seconds - other.load_seconds,
                                self.in_time - other.in_time, self.late - other.late)


def provider_counters(provider: Any) -> ProviderCounters:
    """A snapshot of `provider.stats()` (zeros for a provider that reports nothing)."""
    stats = provider.stats() if provider is not None else None
    if stats is None:
        return ProviderCounters()
    cache = getattr(stats, "cache", None)
    store = getattr(stats, "store", None)
    paged = store.bytes_read if store is not None else getattr(cache, "bytes_loaded", 0)
    prefetch = getattr(stats, "prefetch", None)
    return ProviderCounters(getattr(cache, "hits", 0), getattr(cache, "misses", 0), int(paged),
                            float(getattr(store, "load_seconds", 0.0) or 0.0),
                            int(getattr(stats, "prefetched_in_time", 0)), int(getattr(prefetch, "late", 0)))
