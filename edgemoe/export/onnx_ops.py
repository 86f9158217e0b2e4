"""Shared pieces of the trunk graph builders: a small graph builder, graph I/O signatures, validation.

Contract: `GraphBuilder` writes fp32 graphs with `onnx.helper` from numpy weights. Every weight is a
constant initializer in [in, out] layout feeding `MatMul` as B directly (no Gemm, no Transpose), so
`edgemoe.quant.lowering.lower` can quantize it; biases are separate `Add`s. Node and tensor names are
unique (the quantizers key on them). Graphs import ai.onnx at `edgemoe.quant.graphs.OPSET` (20, so
`Gelu` exists) and com.microsoft 1 when they use a contrib op.

`io_signature(model)` gives a graph's declared inputs and outputs as `TensorInfo(name, dtype, shape)`
tuples for the manifest. `run_graph` / `validate` run a graph in ORT's CPU EP with 2 threads; an input
`past_X` with an output `present_X` is bound to ONE buffer through IOBinding, as the runtime does, so
validation exercises the in-place KV cache update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgemoe.quant.graphs import IR_VERSION, OPSET
from edgemoe.quant.lowering import check_lowered, lower, to_bytes
from edgemoe.quant.schemes import QuantError, Scheme

MS_DOMAIN = "com.microsoft"
Dim = int | str


class TensorInfo(NamedTuple):
    """One declared graph input or output: name, ONNX element type ("float", "int64", ...), dims as str."""

    name: str
    dtype: str
    shape: tuple[str, ...]


def require_fp32(scheme: Scheme, what: str) -> None:
    """Trunk graphs compute in fp32 (their KV cache and I/O are fp32); fp16/CUDA trunks are not built yet."""
    if scheme.compute_dtype != np.float32:
        raise QuantError(f"{what}: {scheme.label} computes in {scheme.compute_dtype}; trunk graphs compute in "
                         "fp32 (use an fp32, int8 or int4 cpu scheme)")


def take(w: Mapping[str, np.ndarray], name: str, required: bool = True) -> np.ndarray | None:
    """w[name] as float32, a QuantError naming the tensor when a required one is missing."""
    if name not in w:
        if required:
            raise QuantError(f"missing tensor {name!r} (have: {', '.join(sorted(w)) or 'none'})")
        return None
    return np.asarray(w[name], dtype=np.float32)


class GraphBuilder:
    """Accumulates inputs, outputs, nodes and initializers of one fp32 graph."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.nodes: list[onnx.NodeProto] = []
        # Arrays, not TensorProtos, until model(): make_graph would copy every initializer, doubling a
        # 1.2 GB vision tower's footprint; model() moves them into the graph one at a time instead.
        self.inits: list[tuple[str, np.ndarray]] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._used: set[str] = set()
        self._ms = False

    def unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def input(self, name: str, elem: int, shape: Sequence[Dim]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        self._used.add(name)
        return name

    def output(self, name: str, elem: int, shape: Sequence[Dim]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))

    def declare(self, name: str, elem: int, shape: Sequence[Dim] | None) -> None:
        """Type an intermediate tensor. onnx shape inference knows no contrib op, and quantize_dynamic
        fails on a MatMul whose input type it cannot infer, so contrib ops' outputs are declared."""
        self.value_info.append(helper.make_tensor_value_info(name, elem, None if shape is None else list(shape)))

    def const(self, name: str, value: np.ndarray | float | Sequence[int], dtype: np.dtype | type = np.float32) -> str:
        name = self.unique(name)
        self.inits.append((name, np.ascontiguousarray(np.asarray(value, dtype=dtype))))
        return name

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.const(name, values, np.int64)

    def op(self, op_type: str, inputs: Sequence[str], out: str, domain: str = "", **attrs: object) -> str:
        """One single-output node; returns its (unique) output name. `out` given exactly is kept."""
        out = self.unique(out)
        self._add(op_type, inputs, [out], domain, attrs)
        return out

    def op_multi(self, op_type: str, inputs: Sequence[str], outs: Sequence[str], domain: str = "",
                 **attrs: object) -> list[str]:
        outs = [self.unique(o) if o else "" for o in outs]
        self._add(op_type, inputs, outs, domain, attrs)
        return outs

    def _add(self, op_type: str, inputs: Sequence[str], outs: list[str], domain: str, attrs: dict) -> None:
        self._ms |= domain == MS_DOMAIN
        name = f"{next(o for o in outs if o)}/{op_type}"
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))

    # -- layers ---------------------------------------------------------------------------------

    def linear(self, x: str, prefix: str, weight: np.ndarray, bias: np.ndarray | None, out: str = "") -> str:
        """x @ W^T + b for a torch-layout weight [out, in], stored [in, out] as MatMul's constant B."""
        w = self.const(f"{prefix}.weight_t", np.asarray(weight, dtype=np.float32).T)
        out = out or f"{prefix}_out"
        if bias is None:
            return self.op("MatMul", [x, w], out)
        y = self.op("MatMul", [x, w], f"{prefix}_mm")
        return self.op("Add", [y, self.const(f"{prefix}.bias", bias)], out)

    def layer_norm(self, x: str, prefix: str, weight: np.ndarray, bias: np.ndarray, eps: float,
                   out: str = "") -> str:
        scale, b = self.const(f"{prefix}.weight", weight), self.const(f"{prefix}.bias", bias)
        return self.op("LayerNormalization", [x, scale, b], out or f"{prefix}_out", axis=-1, epsilon=float(eps))

    def rms_norm(self, x: str, prefix: str, weight: np.ndarray, eps: float, out: str = "") -> str:
        """Qwen's RMSNorm x / sqrt(mean(x^2) + eps) * w, in the op pattern ORT fuses into
        SimplifiedLayerNormalization (ai.onnx RMSNormalization needs opset 23)."""
        sq = self.op("Pow", [x, self.const(f"{prefix}.two", 2.0)], f"{prefix}_sq")
        ms = self.op("ReduceMean", [sq, self.ints(f"{prefix}.axes", [-1])], f"{prefix}_ms", keepdims=1)
        rms = self.op("Sqrt", [self.op("Add", [ms, self.const(f"{prefix}.eps", eps)], f"{prefix}_mse")],
                      f"{prefix}_rms")
        normed = self.op("Div", [x, rms], f"{prefix}_normed")
        return self.op("Mul", [normed, self.const(f"{prefix}.weight", weight)], out or f"{prefix}_out")

    def norm(self, kind: str, x: str, prefix: str, w: Mapping[str, np.ndarray], eps: float, out: str = "") -> str:
        """LayerNorm (`prefix.weight`, `prefix.bias`) or RMSNorm (`prefix.weight`) from canonical tensors."""
        if kind == "layernorm":
            return self.layer_norm(x, prefix, take(w, f"{prefix}.weight"), take(w, f"{prefix}.bias"), eps, out)
        if kind == "rmsnorm":
            return self.rms_norm(x, prefix, take(w, f"{prefix}.weight"), eps, out)
        raise QuantError(f"unknown norm {kind!r}")

    # -- model ----------------------------------------------------------------------------------

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, value_info=self.value_info)
        inits, self.inits = self.inits, []
        inits.reverse()
        while inits:  # pop as we go: each array is freed once its bytes are in the graph
            name, value = inits.pop()
            graph.initializer.append(numpy_helper.from_array(value, name))
            del value
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if self._ms else [])
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgemoe")
        model.ir_version = IR_VERSION
        return model


def lower_checked(b: GraphBuilder, scheme: Scheme, expected: int, float_ok: tuple[str, ...] = ()
                  ) -> onnx.ModelProto:
    """The built graph lowered to `scheme`, with exactly `expected` weight MatMuls in its form. Every
    float initializer of rank >= 2 counts as a weight (these graphs have no other), unless `float_ok`."""
    model = lower(b.model(), scheme)
    check_lowered(model, scheme, expected=expected, min_elements=1, float_ok=float_ok)
    return model


# -- signatures ---------------------------------------------------------------------------------

def _info(v: onnx.ValueInfoProto) -> TensorInfo:
    t = v.type.tensor_type
    dims = tuple(d.dim_param if d.HasField("dim_param") else str(d.dim_value) for d in t.shape.dim)
    return TensorInfo(v.name, TensorProto.DataType.Name(t.elem_type).lower(), dims)


def io_signature(model: onnx.ModelProto) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """(inputs, outputs) as declared by the graph, e.g. TensorInfo("x", "float", ("1", "S", "2048"))."""
    inits = {t.name for t in model.graph.initializer}
    inputs = tuple(_info(v) for v in model.graph.input if v.name not in inits)
    return inputs, tuple(_info(v) for v in model.graph.output)


# -- running and validation -------------------------------------------------------------------

def session(model: onnx.ModelProto, threads: int = 2):
    """An ORT CPU session with `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(to_bytes(model), so, providers=["CPUExecutionProvider"])


def shared_cache_pairs(names_in: Sequence[str], names_out: Sequence[str]) -> dict[str, str]:
    """past_X input -> present_X output, for every such pair: the buffers the runtime shares."""
    outs = set(names_out)
    return {n: "present_" + n[5:] for n in names_in if n.startswith("past_") and "present_" + n[5:] in outs}


def run_bound(sess, feeds: Mapping[str, np.ndarray], caches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with IOBinding: each `caches[past_X]` array is bound as both past_X and present_X, so ORT
    updates it in place (it must be C-contiguous float32); other outputs are returned by name."""
    import onnxruntime as ort

    binding = sess.io_binding()
    pairs = shared_cache_pairs([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    for name, arr in feeds.items():
        if name not in caches:
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
    names = [o.name for o in sess.get_outputs() if o.name not in {pairs[p] for p in caches}]
    for name in names:  # bound first: copy_outputs_to_cpu lists outputs in binding order
        binding.bind_output(name, "cpu")
    for past, arr in caches.items():
        if arr.dtype != np.float32 or not arr.flags.c_contiguous:
            raise ValueError(f"cache {past} must be a C-contiguous float32 array to be updated in place")
        value = ort.OrtValue.ortvalue_from_numpy(arr)  # shares arr's memory
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(pairs[past], value)
    sess.run_with_iobinding(binding)
    return dict(zip(names, binding.copy_outputs_to_cpu()[:len(names)]))


def run_graph(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], threads: int = 2) -> dict[str, np.ndarray]:
    """Every output of `model` on `feeds`; past/present pairs share one buffer (a copy of the fed past)."""
    sess = session(model, threads)
    pairs = shared_cache_pairs(list(feeds), [o.name for o in sess.get_outputs()])
    caches = {p: np.array(feeds[p], dtype=np.float32, order="C") for p in pairs}
    out = run_bound(sess, feeds, caches)
    out.update({pairs[p]: arr for p, arr in caches.items()})
    return out


def validate(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> float:
    """Max abs error over the outputs named in `expected` (present_X: the whole shared buffer)."""
    got = run_graph(model, feeds)
    missing = set(expected) - set(got)
    if missing:
        raise QuantError(f"graph {model.graph.name!r} has no output(s) {sorted(missing)}")
    return max(float(np.max(np.abs(got[k].astype(np.float64) - np.asarray(v, np.float64)), initial=0.0))
               for k, v in expected.items())
