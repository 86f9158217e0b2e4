"""Which expert provider a request gets, and the provider counters a generation reports.

Contract: `make_provider(bundle, capacity, policy)` returns `edgemoe.offload.ResidentProvider` (every
expert loaded once) when no budget applies (capacity None), else an `OffloadingProvider` over the
bundle's experts with a cache of `capacity` bytes and the named eviction policy. The runtime's MoE
layer gives the hints itself (`moe.MoELayer`), so the provider gets no predictor of its own.
`ProviderCounters` are the cumulative hit / miss / paged-byte counters of `provider.stats()`;
subtracting two snapshots gives one generation's share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgemoe.bundle import Bundle
from edgemoe.offload import POLICIES, OffloadingProvider, OnnxExpertStore, ResidentProvider
from edgemoe.offload.errors import OffloadError
from edgemoe.offload.sessions import configure_process, session_factory


def make_provider(bundle: Bundle, capacity_bytes: int | None, policy: str = "lru") -> Any:
    """A resident provider (capacity None) or an offloading one (module docstring)."""
    if policy not in POLICIES:
        raise OffloadError(f"unknown eviction policy {policy!r}: expected one of {', '.join(POLICIES)}")
    configure_process()
    if capacity_bytes is None:
        store = OnnxExpertStore(bundle, session_factory())
        return ResidentProvider(store, store.keys())
    return OffloadingProvider.from_bundle(bundle, capacity_bytes, policy)


@dataclass(frozen=True)
class ProviderCounters:
    """Cumulative provider counters; `a - b` is what happened between two snapshots."""

    hits: int = 0
    misses: int = 0
    bytes_paged: int = 0

    def __sub__(self, other: "ProviderCounters") -> "ProviderCounters":
        return ProviderCounters(self.hits - other.hits, self.misses - other.misses,
                                self.bytes_paged - other.bytes_paged)


def provider_counters(provider: Any) -> ProviderCounters:
    """A snapshot of `provider.stats()` (zeros for a provider that reports nothing)."""
    stats = provider.stats() if provider is not None else None
    if stats is None:
        return ProviderCounters()
    cache = getattr(stats, "cache", None)
    store = getattr(stats, "store", None)
    paged = store.bytes_read if store is not None else getattr(cache, "bytes_loaded", 0)
    return ProviderCounters(getattr(cache, "hits", 0), getattr(cache, "misses", 0), int(paged))
