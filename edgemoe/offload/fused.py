"""Fused expert layers: every expert of a MoE layer in one ONNX Runtime `QMoE` node, paged one expert at a time.

Contract: `FusedExperts(bundle)` opens, for each MoE layer, one session on a graph whose single
`com.microsoft.QMoE` node holds the layer's experts stacked, built from the bundle's own int4 expert
graphs and prepacked once per machine (`offload.fused_graph`, which prepares what is missing first).
Nothing is re-quantized, so a fused layer computes what the expert sessions compute up to summation
order. Its packed weights are mapped from the prepacked file, as the mapped store's are.
`run_layer(layer, m, routing)` returns sum_k w_k expert_k(m) for every token: the host's
routing is kept exactly (QMoE's `router_probs` only selects the chosen experts, its `router_weights`
are the routing weights). A bundle whose experts are not all int4 with one block size that divides
both widths is refused in one line.

It is an expert store (`offload.protocols.ExpertStore`) like the mapped one: the packed weights hold
the experts one after another, so each expert is its own page spans of the layer's mapping
(`offload.fused_pages`); `load(key)` pages them in and the returned `FusedExpert.release()` drops
them, so the cache and a memory budget page experts here exactly as with one session per expert,
with 11-26 sessions per model instead of one per expert. A layer runs once its chosen experts are
all delivered and leased together (the provider holds them until the call ends), so the smallest
cache holds a whole layer's experts (`experts_together`): a prefill chunk may choose all of them.

Why: a decoded token of DeepSeek-VL2-Tiny runs 6 of 64 experts in each of 11 layers. As 66 expert
sessions that took 0.76 ms per layer on the benchmark machine; one QMoE call takes 0.36 ms
(`bench/qmoe_from_bundle.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import ExpertLoadError, OffloadError, one_line
from edgemoe.offload.fused_graph import layer_keys, prepare_fused_layers
from edgemoe.offload.fused_pages import ExpertPages, expert_spans, page_out_all
from edgemoe.offload.prepacked import PrepackedGraphs, data_file
from edgemoe.offload.store import LoadCounter, StoreStats
from edgemoe.page_cache import drop_cached

if TYPE_CHECKING:
    from edgemoe.bundle import Bundle
    from edgemoe.model.routing_rule import Routing

NOT_CHOSEN = -1e9  # router_probs of experts a token does not use: QMoE's top-k never picks them


class FusedExpert:
    """One expert of a fused layer as the cache holds it: its pages (`release` drops them). It runs only
    with its layer (`run_layer`: the MoE layer calls that once every chosen expert is delivered)."""

    def __init__(self, key: ExpertKey, pages: ExpertPages, run_layer: Callable[..., np.ndarray]) -> None:
        self.key, self.pages, self.run_layer = key, pages, run_layer
        self.nbytes = pages.nbytes

    def run(self, x: np.ndarray) -> np.ndarray:
        raise OffloadError(f"expert {self.key} of a fused layer runs only with its layer (run_layer)")

    def release(self) -> None:
        self.pages.page_out()

    def __repr__(self) -> str:
        return f"FusedExpert({self.key}, {self.nbytes} bytes)"


class FusedExperts:
    """An expert store: one mapped QMoE session per MoE layer, experts paged one by one (module docstring)."""

    def __init__(self, bundle: "Bundle", graphs: PrepackedGraphs | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        from edgemoe.offload.sessions import create_session, session_options

        cfg = bundle.manifest.model_config()
        self.top_k, self.layers = cfg.moe.top_k, cfg.moe.layers
        # A layer runs every expert its tokens chose in one call, so all of them are resident at once: in a
        # prefill chunk that can be every expert of the layer (decode needs only its top-k).
        self.experts_together = max(cfg.moe.experts_in(n) for n in self.layers)
        graphs = graphs or PrepackedGraphs()
        prepare_fused_layers(bundle, graphs, progress)  # refuses, in one line, experts that cannot be fused
        self._sessions: dict[int, Any] = {}
        self._paths: list[Path] = []
        self._pages: dict[ExpertKey, ExpertPages] = {}
        self._counter = LoadCounter(clock)
        keys = layer_keys(bundle)
        for n in self.layers:
            path = graphs.path(keys[n])
            self._paths.append(path)
            try:
                self._sessions[n] = create_session(str(path), session_options())
            except Exception as exc:
                raise OffloadError(f"ONNX Runtime cannot open the fused experts of layer {n}: {one_line(exc)}") from exc
            for e, spans in enumerate(expert_spans(path, cfg.moe.experts_in(n))):
                self._pages[ExpertKey(n, e)] = ExpertPages(data_file(path), spans)
            drop_cached(path)
            page_out_all(data_file(path))  # what building the session read and faulted in: no expert is loaded

    # -- the store face (edgemoe.offload.protocols.ExpertStore) -------------------------------------

    def keys(self) -> tuple[ExpertKey, ...]:
        return tuple(self._pages)

    def size_of(self, key: ExpertKey) -> int:
        """The expert's page spans: what paging it in adds to the process and evicting it gives back."""
        try:
            return self._pages[key].nbytes
        except KeyError:
            raise ExpertLoadError(key, "no such expert in the bundle") from None

    def load(self, key: ExpertKey) -> FusedExpert:
        return self._counter.measure(lambda: self._page_in(key))

    def _page_in(self, key: ExpertKey) -> tuple[FusedExpert, int]:
        pages = self._pages.get(key)
        if pages is None:
            raise ExpertLoadError(key, "no such expert in the bundle")
        try:
            pages.page_in()
        except OSError as exc:
            raise ExpertLoadError(key, f"cannot read {pages.path}: {exc.strerror or exc}") from exc
        return FusedExpert(key, pages, self.run_layer), pages.nbytes

    # The sessions exist before the runtime measures its baseline, so they are in it: nothing more to set
    # aside per expert, and a load builds nothing.
    session_overhead_bytes = 0
    load_transient_bytes = 0

    def stats(self) -> StoreStats:
        return self._counter.stats()

    # -- running --------------------------------------------------------------------------------

    def run_layer(self, layer: int, m: np.ndarray, routing: "Routing") -> np.ndarray:
        """sum_k w_k expert_k(m) [N, H] under the host's routing (every token uses exactly top_k experts).
        The chosen experts must be resident (leased by the caller); another expert is never touched."""
        n, e = routing.probs.shape
        probs = np.full((n, e), NOT_CHOSEN, np.float32)
        np.put_along_axis(probs, routing.experts, 1.0, axis=1)
        weights = np.zeros((n, e), np.float32)
        np.put_along_axis(weights, routing.experts, routing.weights.astype(np.float32), axis=1)
        feeds = {"x": np.ascontiguousarray(m, np.float32), "probs": probs, "weights": weights}
        return self._sessions[layer].run(None, feeds)[0]

    def close(self) -> None:
        self._sessions.clear()
        self._pages.clear()
        for path in self._paths:  # the mapped packed weights stay cached otherwise (footprint)
            drop_cached(path)
            drop_cached(data_file(path))
