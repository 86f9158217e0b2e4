"""Which expert provider a request gets, and the provider counters a generation reports.

Contract: `open_expert_store(bundle, kind)` picks where experts come from: "mapped" (prepacked
sessions whose weight pages are paged, `edgemoe.offload.mapped`), "sessions" (a session built per
load, `OnnxExpertStore`), "fused" (each layer's int4 experts in one QMoE session, paged one expert at
a time, `edgemoe.offload.fused`), or "auto" (`resolve_store`): on a machine that maps prepacked
weights, fused for layers that route a token to `FUSED_FROM_TOP_K` or more experts whose experts can
be fused (int4 SwiGLU, `fused_graph.fused_refusal`), else mapped; elsewhere sessions. A cache
directory that cannot be written falls back down that list (logged). The choice depends on the bundle
and the machine only, never on a budget, so one bundle's answers are the same at every budget. `prepare_expert_store` prepacks what a fused store lacks, first thing in a
run (module `fused_graph`), and refuses in one line a memory budget too small for that step.
`make_provider(bundle, capacity, policy, store)` returns `edgemoe.offload.ResidentProvider` (every
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

import psutil

from edgemoe.bundle import Bundle
from edgemoe.offload import DEFAULT_LOADERS, DEFAULT_POLICY, POLICIES, OffloadingProvider, OnnxExpertStore, ResidentProvider
from edgemoe.offload.budget import format_bytes, parse_size
from edgemoe.offload.errors import BudgetError, OffloadError, PrepareError
from edgemoe.offload.fused import FusedExperts
from edgemoe.offload.fused_graph import (fused_layers_prepared, fused_refusal, precision_refusal, prepare_fused_layers,
                                        preparation_bytes)
from edgemoe.offload.mapped import MappedExpertStore, mapped_store_supported
from edgemoe.offload.sessions import configure_process, session_factory

log = logging.getLogger(__name__)

EXPERT_STORES = ("auto", "mapped", "sessions", "fused")
# auto fuses layers that route each token to several experts. One session per expert is then that many
# calls a layer (DeepSeek-VL2: 6, 156 a token on Small), and one QMoE call halved Small's time to first token.
# At top-2 (MoE-LLaVA) the per-expert calls are two, fused decoded about as fast (StableLM, measured), and
# holding a whole layer at once would raise full StableLM's minimum budget from under 1 GB to 1.04 GB
# (4 experts together instead of one; measured).
FUSED_FROM_TOP_K = 3


def resolve_store(bundle: Bundle, kind: str = "auto") -> str:
    """The store `kind` names; "auto" resolved for this bundle on this machine (module docstring)."""
    if kind not in EXPERT_STORES:
        raise OffloadError(f"unknown expert store {kind!r}: expected one of {', '.join(EXPERT_STORES)}")
    if kind != "auto":
        return kind
    if not mapped_store_supported():
        return "sessions"
    reason = precision_refusal(bundle) or _few_experts_a_token(bundle) or fused_refusal(bundle)
    if reason is not None:
        log.info("experts are paged one session each (mapped): %s", reason)
        return "mapped"
    return "fused"


def _few_experts_a_token(bundle: Bundle) -> str | None:
    top_k = bundle.manifest.model_config().moe.top_k
    return f"{top_k} experts a token per layer are few enough" if top_k < FUSED_FROM_TOP_K else None


def prepare_expert_store(bundle: Bundle, kind: str = "auto", progress: Callable[[int, int], None] | None = None,
                         memory_budget: str | int | None = None) -> None:
    """Prepack the fused layers this machine lacks when `kind` resolves to fused (a first run's step,
    done before the model loads). Under `memory_budget` the step must fit beside what the process
    holds: BudgetError naming the minimum otherwise. Under auto, a cache that cannot be written is left
    to `open_expert_store`'s fallback."""
    if resolve_store(bundle, kind) != "fused" or fused_layers_prepared(bundle):
        return
    configure_process()
    if memory_budget is not None:
        need = psutil.Process().memory_info().rss + preparation_bytes(bundle)
        if need > parse_size(memory_budget):
            raise BudgetError(
                f"memory budget {format_bytes(parse_size(memory_budget))} cannot prepare the fused experts for this "
                f"machine (a first run's step that packs a layer's experts at once): it needs about "
                f"{format_bytes(need)}; run once with at least that, or without --memory-budget, or choose "
                f"--expert-store mapped")
    try:
        prepare_fused_layers(bundle, progress=progress)
    except PrepareError as exc:
        if kind == "fused":
            raise
        log.warning("%s; experts will be paged one session each instead", exc)


def open_expert_store(bundle: Bundle, kind: str = "auto", progress: Callable[[int, int], None] | None = None) -> Any:
    """The bundle's expert store of `kind` (module docstring), prepared first if it must be. A store that
    cannot be prepared here falls back down fused -> mapped -> sessions unless it was named."""
    store = resolve_store(bundle, kind)
    configure_process()
    while store in _PREPARED_STORES:
        try:
            return _PREPARED_STORES[store](bundle, progress=progress)
        except PrepareError as exc:
            if kind == store:
                raise
            fallback = "mapped" if store == "fused" else "sessions"
            log.warning("%s; experts will be paged as %s instead", exc, fallback)
            store = fallback
    return OnnxExpertStore(bundle, session_factory())


_PREPARED_STORES = {"fused": FusedExperts, "mapped": MappedExpertStore}  # stores built on prepacked graphs


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
