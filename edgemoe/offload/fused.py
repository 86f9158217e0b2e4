"""Fused expert layers: every expert of a MoE layer in one ONNX Runtime `QMoE` node, paged one expert at a time.

Contract: `FusedExperts(bundle)` builds, for each MoE layer, one graph whose single
`com.microsoft.QMoE` node holds the layer's experts stacked, from the bundle's own int4 expert graphs
(their MatMulNBits bytes and scales as they are; gate and up rows interleaved, the only SwiGLU
layout CPU QMoE takes). Nothing is re-quantized, so a fused layer computes what the expert sessions
compute up to summation order. The graphs are prepacked once per machine (`PrepackedGraphs`, keyed
by the member experts' sha256s) and their packed weights are mapped from that file, as the mapped
store's are. `run_layer(layer, m, routing)` returns sum_k w_k expert_k(m) for every token: the host's
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

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import ExpertLoadError, OffloadError, one_line
from edgemoe.offload.fused_pages import ExpertPages, expert_spans, page_out_all
from edgemoe.offload.prepacked import PrepackedGraphs, data_file
from edgemoe.offload.store import LoadCounter, StoreStats
from edgemoe.page_cache import drop_cached

if TYPE_CHECKING:
    from edgemoe.bundle import Bundle
    from edgemoe.model.routing_rule import Routing

FUSED_VERSION = b"edgemoe-qmoe-1"  # part of each layer's cache key: a new layout never reads an old file
NOT_CHOSEN = -1e9  # router_probs of experts a token does not use: QMoE's top-k never picks them


def _expert_weights(model: Any) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """gate / up / down of one int4 expert graph: (packed bytes [N, K/2], scales [N, K/B], attributes)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    feeds_sigmoid = {i for n in model.graph.node if n.op_type == "Sigmoid" for i in n.input}
    output = model.graph.output[0].name
    roles = {}
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if len(n.input) != 3 or attrs.get("bits") != 4:
            raise OffloadError("fused experts need int4 experts without zero points or biases")
        role = "down" if n.output[0] == output else "gate" if n.output[0] in feeds_sigmoid else "up"
        packed = numpy_helper.to_array(inits[n.input[1]])
        scales = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)
        roles[role] = (packed.reshape(attrs["N"], -1), scales.reshape(attrs["N"], -1), attrs)
    if set(roles) != {"gate", "up", "down"}:
        raise OffloadError("fused experts need SwiGLU experts (gate, up and down MatMulNBits)")
    return roles


def layer_graph(bundle: "Bundle", layer: int, top_k: int) -> Any:
    """The layer's QMoE graph: x [N, H], probs [N, E], weights [N, E] -> y [N, H] (module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    num = bundle.manifest.model_config().moe.experts_in(layer)
    fc1w, fc1s, fc2w, fc2s, attrs = [], [], [], [], None
    for e in range(num):
        w = _expert_weights(onnx.load(str(bundle.path_of(bundle.manifest.expert(ExpertKey(layer, e))))))
        gate, up, down = w["gate"], w["up"], w["down"]
        inter, hidden, block = gate[2]["N"], gate[2]["K"], gate[2]["block_size"]
        if hidden % block or inter % block or down[2]["block_size"] != block:
            raise OffloadError(f"fused experts need widths divisible by the int4 block ({hidden}, {inter}, {block})")
        fc1w.append(np.stack([gate[0], up[0]], axis=1).reshape(2 * inter, -1))  # rows g0, u0, g1, u1, ...
        fc1s.append(np.stack([gate[1], up[1]], axis=1).reshape(2 * inter, -1))
        fc2w.append(down[0])
        fc2s.append(down[1])
        attrs = gate[2]
    weights = {"fc1w": np.stack(fc1w), "fc1s": np.stack(fc1s), "fc2w": np.stack(fc2w), "fc2s": np.stack(fc2s)}
    node = helper.make_node(
        "QMoE", ["x", "probs", "fc1w", "fc1s", "", "fc2w", "fc2s", "", "", "", "", "", "", "", "weights"], ["y"],
        domain="com.microsoft", k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
        activation_beta=0.0, expert_weight_bits=4, block_size=attrs["block_size"], normalize_routing_weights=0,
        accuracy_level=attrs.get("accuracy_level", 0))
    hidden = attrs["K"]
    graph = helper.make_graph(
        [node], f"layer{layer}_experts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", num]),
         helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["N", num])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def fused_layers_prepared(bundle: "Bundle", graphs: PrepackedGraphs | None = None) -> bool:
    """Whether every MoE layer's fused graph is already prepared on this machine (a first run prepares
    them, holding a layer's experts and ONNX Runtime's packing of them in memory)."""
    graphs = graphs or PrepackedGraphs()
    return all(graphs.exists(layer_key(bundle, n)) for n in bundle.manifest.model_config().moe.layers)


def layer_key(bundle: "Bundle", layer: int) -> str:
    """Cache key of a fused layer: its member experts' contents and the fused layout's version."""
    h = hashlib.sha256(FUSED_VERSION)
    for key, entry in sorted(bundle.manifest.experts().items()):
        if key.layer == layer:
            h.update(entry.sha256.encode())
    return h.hexdigest()


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
        precisions = sorted({e.precision or "?" for e in bundle.manifest.experts().values()})
        if precisions != ["int4"]:
            raise OffloadError(f"--expert-store fused needs int4 experts; this bundle's are {', '.join(precisions)}")
        graphs = graphs or PrepackedGraphs()
        keys = {n: layer_key(bundle, n) for n in self.layers}
        missing = [n for n in self.layers if not graphs.exists(keys[n])]
        self._sessions: dict[int, Any] = {}
        self._paths: list[Path] = []
        self._pages: dict[ExpertKey, ExpertPages] = {}
        self._counter = LoadCounter(clock)
        for n in self.layers:
            path = self._prepare(bundle, graphs, n, keys[n])
            self._paths.append(path)
            if n in missing and progress is not None:
                progress(missing.index(n) + 1, len(missing))
            try:
                self._sessions[n] = create_session(str(path), session_options())
            except Exception as exc:
                raise OffloadError(f"ONNX Runtime cannot open the fused experts of layer {n}: {one_line(exc)}") from exc
            experts = cfg.moe.experts_in(n)
            for e, spans in enumerate(expert_spans(path, experts)):
                self._pages[ExpertKey(n, e)] = ExpertPages(data_file(path), spans)
            drop_cached(path)
            page_out_all(data_file(path))  # what building the session read and faulted in: no expert is loaded

    def _prepare(self, bundle: "Bundle", graphs: PrepackedGraphs, layer: int, key: str) -> Path:
        from edgemoe.offload.sessions import session_options

        if graphs.exists(key):
            return graphs.path(key)
        for entry in (e for k, e in bundle.manifest.experts().items() if k.layer == layer):
            bundle.verify_file(entry)  # never pack a tampered expert
        with tempfile.TemporaryDirectory(prefix="edgemoe-fused-") as tmp:
            source = Path(tmp) / f"layer{layer}.onnx"
            source.write_bytes(layer_graph(bundle, layer, self.top_k).SerializeToString())
            try:
                return graphs.ensure(key, source, session_options)
            except Exception as exc:
                raise OffloadError(f"cannot prepare the fused experts of layer {layer}: {one_line(exc)}") from exc

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
