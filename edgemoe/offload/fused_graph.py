"""Building and preparing fused expert layers: a MoE layer's int4 experts as one ONNX Runtime `QMoE` graph.

Contract: `fused_refusal(bundle)` says in one line why a bundle's experts cannot be fused (not all
int4; not SwiGLU gate/up/down MatMulNBits without zero points; widths not multiples of the int4
block), or None. It reads the manifest, and unless the layers are prepared already one expert graph
per layer with `bundle.onnx_wire` (no `onnx` import, a few pages each, dropped from the page cache
afterwards), so `auto` can ask it on every run. `write_layer_graph(bundle,
layer, top_k, directory)` writes the layer's QMoE graph (x [N, H], probs [N, E], weights [N, E] ->
y [N, H]; gate and up rows interleaved, the only SwiGLU layout CPU QMoE takes) and its one data
file, an expert at a time: nothing is re-quantized, and what it holds in memory is one expert's
weights, not the layer's. `prepare_fused_layers(bundle, graphs, progress)` prepacks every layer not
yet in this machine's cache (`PrepackedGraphs`, keyed by `layer_keys`: the member experts' sha256s
and the layout's version), verifying the experts first and leaving nothing it read or wrote in the
page cache. `preparation_bytes(bundle)` is what one layer's preparation may hold at once.

Why a separate step: preparing packs a layer's experts in memory, so a run does it first, before
the trunk is loaded, when the process holds least (`runtime.providers.prepare_expert_store`).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemoe.bundle.onnx_wire import nodes
from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import OffloadError, PrepareError, one_line
from edgemoe.offload.prepacked import PrepackedGraphs
from edgemoe.page_cache import drop_cached, sync_and_drop

if TYPE_CHECKING:
    from edgemoe.bundle import Bundle

FUSED_VERSION = b"edgemoe-qmoe-1"  # part of each layer's cache key: a new layout never reads an old file
ALIGN = 1 << 16  # each weight starts on a 64 KiB boundary of the data file (ORT maps aligned external data)
# One layer's preparation holds its experts' bytes several times at once: the source graph's weights as
# ORT reads them, its packed copy, and both written to the prepacked data file before they are flushed
# and dropped. Measured on full DeepSeek-VL2-Small (294 MB of experts a layer), sampled from outside with
# the cache directory watched: 1.32 GB above the process's start, 4.5 times the layer.
PREPARE_COPIES = 5


def precision_refusal(bundle: "Bundle") -> str | None:
    """Why the experts' precisions rule fusing out (all must be int4), from the manifest alone; or None."""
    precisions = sorted({e.precision or "?" for e in bundle.manifest.experts().values()})
    if precisions != ["int4"]:
        return f"--expert-store fused needs int4 experts; this bundle's are {', '.join(precisions)}"
    return None


def fused_refusal(bundle: "Bundle") -> str | None:
    """Why this bundle's experts cannot run fused, in one line; None if they can (module docstring)."""
    refusal = precision_refusal(bundle)
    if refusal is not None:
        return refusal
    experts = bundle.manifest.experts()
    if fused_layers_prepared(bundle):  # fused before: the prepared layers are keyed by these experts' hashes
        return None
    firsts = {}
    for key, entry in experts.items():
        firsts.setdefault(key.layer, entry)
    for entry in firsts.values():
        matmuls = nodes(bundle.path_of(entry), "MatMulNBits")
        drop_cached(bundle.path_of(entry))  # a few pages, but 26 of them stayed cached beside a Small run
        if len(matmuls) != 3 or any(count != 3 or attrs.get("bits") != 4 for count, attrs in matmuls):
            return ("fused experts need SwiGLU int4 experts (gate, up and down MatMulNBits without zero points "
                    "or biases)")
        for _, attrs in matmuls:
            block, k, n = attrs.get("block_size", 0), attrs.get("K", 0), attrs.get("N", 0)
            if not block or k % block or n % block:
                return f"fused experts need widths divisible by the int4 block ({k}, {n}, {block})"
    return None


def layer_keys(bundle: "Bundle") -> dict[int, str]:
    """Cache key of every fused layer: its member experts' contents, in expert order, and the fused
    layout's version (one pass over the experts: 1,664 on Small, sorted once, not once a layer)."""
    hashes = {n: hashlib.sha256(FUSED_VERSION) for n in bundle.manifest.model_config().moe.layers}
    for key, entry in sorted(bundle.manifest.experts().items()):
        hashes[key.layer].update(entry.sha256.encode())
    return {n: h.hexdigest() for n, h in hashes.items()}


def fused_layers_prepared(bundle: "Bundle", graphs: PrepackedGraphs | None = None) -> bool:
    """Whether every MoE layer's fused graph is already prepared on this machine."""
    graphs = graphs or PrepackedGraphs()
    return all(graphs.exists(key) for key in layer_keys(bundle).values())


def preparation_bytes(bundle: "Bundle") -> int:
    """What preparing the largest layer may hold in memory at once (`PREPARE_COPIES` of its experts)."""
    per_layer: dict[int, int] = {}
    for key, entry in bundle.manifest.experts().items():
        per_layer[key.layer] = per_layer.get(key.layer, 0) + bundle.manifest.bytes_of(entry)
    return PREPARE_COPIES * max(per_layer.values(), default=0)


def prepare_fused_layers(bundle: "Bundle", graphs: PrepackedGraphs | None = None,
                         progress: Callable[[int, int], None] | None = None) -> None:
    """Prepack every fused layer this machine lacks (module docstring); PrepareError if it cannot."""
    from edgemoe.offload.sessions import session_options

    graphs = graphs or PrepackedGraphs()
    cfg = bundle.manifest.model_config()
    keys = layer_keys(bundle)
    missing = [n for n, key in keys.items() if not graphs.exists(key)]
    refusal = fused_refusal(bundle) if missing else None
    if refusal is not None:
        raise OffloadError(refusal)
    for done, layer in enumerate(missing, 1):
        for entry in (e for k, e in bundle.manifest.experts().items() if k.layer == layer):
            bundle.verify_file(entry)  # never pack a tampered expert
        try:
            graphs.root.mkdir(parents=True, exist_ok=True)
            # Beside the twins, not in /tmp: whoever watches this cache's files for a footprint sees these too.
            with tempfile.TemporaryDirectory(prefix=".fused-", dir=graphs.root) as tmp:
                source = write_layer_graph(bundle, layer, cfg.moe.top_k, Path(tmp))
                graphs.ensure(keys[layer], source, session_options)
        except OffloadError:
            raise
        except Exception as exc:
            raise PrepareError(f"cannot prepare the fused experts of layer {layer} for this machine: "
                               f"{one_line(exc)}") from exc
        if progress is not None:
            progress(done, len(missing))


def write_layer_graph(bundle: "Bundle", layer: int, top_k: int, directory: Path) -> Path:
    """The layer's QMoE graph and its data file in `directory`, written one expert at a time."""
    import onnx
    from onnx import TensorProto, helper

    num = bundle.manifest.model_config().moe.experts_in(layer)
    graph_path, data_path = directory / f"layer{layer}.onnx", directory / f"layer{layer}.bin"
    layout: dict[str, tuple[int, tuple[int, ...], int]] = {}  # name -> (offset, shape of one expert, bytes)
    attrs: dict[str, Any] = {}
    with open(data_path, "wb") as data:
        for e in range(num):
            entry = bundle.manifest.expert(ExpertKey(layer, e))
            weights, attrs = _expert_weights(onnx.load(str(bundle.path_of(entry))))
            for path in bundle.manifest.files_of(entry):
                drop_cached(bundle.path_of(path))  # read once here; the run pages it from the prepacked file
            if not layout:
                layout = _layout(weights, num)
            for name, array in weights.items():
                offset, _, nbytes = layout[name]
                data.seek(offset + e * nbytes)
                data.write(np.ascontiguousarray(array).tobytes())
    sync_and_drop([data_path])
    hidden = attrs["K"]
    inits = [_external(name, TensorProto.UINT8 if name.endswith("w") else TensorProto.FLOAT,
                       (num, *shape), offset, nbytes * num, data_path.name)
             for name, (offset, shape, nbytes) in layout.items()]
    node = helper.make_node(
        "QMoE", ["x", "probs", "fc1w", "fc1s", "", "fc2w", "fc2s", "", "", "", "", "", "", "", "weights"], ["y"],
        domain="com.microsoft", k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
        activation_beta=0.0, expert_weight_bits=4, block_size=attrs["block_size"], normalize_routing_weights=0,
        accuracy_level=attrs.get("accuracy_level", 0))
    graph = helper.make_graph(
        [node], f"layer{layer}_experts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", num]),
         helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["N", num])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    graph_path.write_bytes(model.SerializeToString())
    return graph_path


def _expert_weights(model: Any) -> tuple[dict[str, np.ndarray], dict]:
    """One int4 SwiGLU expert as QMoE stacks it: fc1w / fc1s (gate and up rows interleaved), fc2w /
    fc2s (down), and the gate's MatMulNBits attributes."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    feeds_sigmoid = {i for n in model.graph.node if n.op_type == "Sigmoid" for i in n.input}
    output = model.graph.output[0].name
    roles = {}
    for n in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if len(n.input) != 3 or attrs.get("bits") != 4:
            raise OffloadError("fused experts need int4 experts without zero points or biases")
        role = "down" if n.output[0] == output else "gate" if n.output[0] in feeds_sigmoid else "up"
        packed = numpy_helper.to_array(inits[n.input[1]])
        scales = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)
        roles[role] = (packed.reshape(attrs["N"], -1), scales.reshape(attrs["N"], -1), attrs)
    if set(roles) != {"gate", "up", "down"}:
        raise OffloadError("fused experts need SwiGLU experts (gate, up and down MatMulNBits)")
    (gw, gs, attrs), (uw, us, _), (dw, ds, down) = roles["gate"], roles["up"], roles["down"]
    inter, hidden, block = attrs["N"], attrs["K"], attrs["block_size"]
    if hidden % block or inter % block or down["block_size"] != block:
        raise OffloadError(f"fused experts need widths divisible by the int4 block ({hidden}, {inter}, {block})")
    return {"fc1w": np.stack([gw, uw], axis=1).reshape(2 * inter, -1),  # rows g0, u0, g1, u1, ...
            "fc1s": np.stack([gs, us], axis=1).reshape(2 * inter, -1), "fc2w": dw, "fc2s": ds}, attrs


def _layout(weights: dict[str, np.ndarray], experts: int) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """Where each stacked weight starts in the data file (`ALIGN`ed), its per-expert shape and bytes."""
    layout, at = {}, 0
    for name, array in weights.items():
        layout[name] = (at, tuple(array.shape), array.nbytes)
        at = -(-(at + array.nbytes * experts) // ALIGN) * ALIGN
    return layout


def _external(name: str, data_type: int, shape: tuple[int, ...], offset: int, length: int, location: str) -> Any:
    """An initializer whose bytes lie at `offset` of the data file `location` beside the graph."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=data_type, dims=shape, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
