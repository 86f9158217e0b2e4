"""Lower float graphs to a Scheme with ORT's own quantizers, and prove the lowering happened.

Contract: `build_mlp` / `build_linear` return a graph at `scheme` whose every weight MatMul runs the
scheme's kernel, or raise `QuantError`; nothing is ever silently left in float. ORT's quantizers skip
what they do not recognise without a word (a Transpose in front of B, a weight given as a graph
input; a Gemm for MatMulNBitsQuantizer, while quantize_dynamic in ORT 1.32 rewrites Gemm to MatMul),
so `check_lowered` inspects the output, not the intent, and is reusable on any graph.

  fp32  the float graph as built.
  fp16  built in fp16 (weights and compute) with fp32 I/O via Cast: for GPUs. ORT on x86 runs it by
        casting back to fp32, so it is correct on CPU but neither smaller in RAM nor faster there.
  int8  `quantize_dynamic`, weight QInt8 (per-channel by default). The file holds
        DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul; ORT's CPU optimizer fuses these into
        DynamicQuantizeMatMul / MatMulIntegerToFloat at session creation.
  int4  `MatMulNBitsQuantizer` with every default overridden (its Python defaults are asymmetric and
        leave accuracy_level unset: 2-3x slower on an AVX-512 VNNI CPU, far more on AVX2 per the ORT
        notes): MatMulNBits, block 128, symmetric, accuracy_level 4. For target cuda the graph computes
        in fp16 (the fast CUDA kernel wants fp16 activations); not yet run on a GPU.
Graphs stay below ORT's 2 GB protobuf limit, so serialization never needs external data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgemoe.quant.graphs import MlpWeights, float_linear, float_mlp
from edgemoe.quant.schemes import Precision, QuantError, Scheme

# Ops that carry a quantized weight, per integer precision (file form and ORT's fused forms).
QUANTIZED_OPS: dict[Precision, frozenset[str]] = {
    Precision.INT8: frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}),
    Precision.INT4: frozenset({"MatMulNBits"}),
}
# A 2-D float initializer this large is a weight; smaller ones (none in these graphs) may stay float.
MIN_WEIGHT_ELEMENTS = 4096
MAX_GRAPH_BYTES = 2**31 - 1  # protobuf's hard limit; beyond it a graph would need external data


def build_mlp(w: MlpWeights, act: str, scheme: Scheme, name: str = "mlp") -> onnx.ModelProto:
    """One expert (or dense MLP) graph at `scheme`, checked: every weight MatMul is quantized as asked."""
    model = lower(float_mlp(w, act, dtype=scheme.compute_dtype, name=name), scheme)
    check_lowered(model, scheme, expected=sum(1 for _ in w.linears()))
    return model


def build_linear(weight: np.ndarray, bias: np.ndarray | None, scheme: Scheme,
                 name: str = "linear") -> onnx.ModelProto:
    """y = x W^T + b at `scheme` (lm_head, dense layers), checked like `build_mlp`."""
    model = lower(float_linear(weight, bias, dtype=scheme.compute_dtype, name=name), scheme)
    check_lowered(model, scheme, expected=1)
    return model


def lower(model: onnx.ModelProto, scheme: Scheme) -> onnx.ModelProto:
    """Apply `scheme`'s quantization to a float graph already built in `scheme.compute_dtype`."""
    if scheme.precision is Precision.INT8:
        return _int8(model, scheme)
    if scheme.precision is Precision.INT4:
        return _int4(model, scheme)
    return model


def _int8(model: onnx.ModelProto, scheme: Scheme) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgemoe-int8-") as tmp, _quiet_preprocess_hint():
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=scheme.per_channel,
                         reduce_range=scheme.reduce_range, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(out))


def _int4(model: onnx.ModelProto, scheme: Scheme) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    work = onnx.ModelProto()
    work.CopyFrom(model)  # the quantizer edits its input in place
    quantizer = MatMulNBitsQuantizer(
        work, bits=4, block_size=scheme.block_size, is_symmetric=scheme.symmetric,
        accuracy_level=scheme.accuracy_level, op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),),
    )
    quantizer.process()
    return quantizer.model.model


@contextlib.contextmanager
def _quiet_preprocess_hint() -> Iterator[None]:
    """quantize_dynamic logs a root-level hint to run its pre-processing; these graphs need none."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def large_float_weights(model: onnx.ModelProto, min_elements: int = MIN_WEIGHT_ELEMENTS) -> dict[str, np.dtype]:
    """Name -> dtype of every float initializer of rank >= 2 and at least `min_elements` elements,
    except a quantized op's own parameters (MatMulNBits' [N, k_blocks] scales are large 2-D floats)."""
    quantized = set().union(*QUANTIZED_OPS.values())
    params = {name for n in model.graph.node if n.op_type in quantized for name in n.input[2:]}
    found = {}
    for t in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        big = len(t.dims) >= 2 and int(np.prod(t.dims)) >= min_elements
        if big and np.issubdtype(dtype, np.floating) and t.name not in params:
            found[t.name] = dtype
    return found


def check_lowered(model: onnx.ModelProto, scheme: Scheme, expected: int | None = None,
                  min_elements: int = MIN_WEIGHT_ELEMENTS, float_ok: Collection[str] = ()) -> int:
    """Raise QuantError unless every weight MatMul of `model` is stored as `scheme` says.

    Integer schemes: no large float weight may survive (whatever consumes it: MatMul, Gemm, a
    Transpose), and every quantized op must carry the scheme's attributes. Float schemes: every large
    weight is in the compute dtype. Returns the number of weight ops found; `expected` pins it.
    `float_ok` names initializers meant to stay float (a Conv weight, a position-embedding table).
    """
    floats = {k: v for k, v in large_float_weights(model, min_elements).items() if k not in float_ok}
    consumers = {name: [n.name or n.op_type for n in model.graph.node if name in n.input] for name in floats}
    if scheme.precision.is_integer:
        if floats:
            left = ", ".join(f"{k} (-> {', '.join(v) or 'nothing'})" for k, v in consumers.items())
            raise QuantError(f"{scheme.label}: weights left in float after quantization: {left}")
        count = _check_quantized_ops(model, scheme)
    else:
        wrong = sorted(k for k, dt in floats.items() if dt != scheme.compute_dtype)
        if wrong:
            raise QuantError(f"{scheme.label}: weights not in {scheme.compute_dtype}: {', '.join(wrong)}")
        count = sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in floats)
    if expected is not None and count != expected:
        raise QuantError(f"{scheme.label}: found {count} weight MatMuls, expected {expected}")
    return count


def _check_quantized_ops(model: onnx.ModelProto, scheme: Scheme) -> int:
    """Count the scheme's quantized ops with a constant weight; check MatMulNBits' attributes."""
    inits = {t.name for t in model.graph.initializer}
    ops = [n for n in model.graph.node if n.op_type in QUANTIZED_OPS[scheme.precision] and n.input[1] in inits]
    for node in ops:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        want = {"bits": 4, "block_size": scheme.block_size, "accuracy_level": scheme.accuracy_level}
        got = {k: attrs.get(k, 0 if k == "accuracy_level" else None) for k in want}  # absent level = 0
        if got != want:
            raise QuantError(f"{scheme.label}: {node.name} has {got}, expected {want}")
        if scheme.symmetric != (len(node.input) < 4 or not node.input[3]):
            raise QuantError(f"{scheme.label}: {node.name} zero points disagree with symmetric={scheme.symmetric}")
    return len(ops)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the graph's initializers (what `schemes.bytes_for` estimates)."""
    return sum(len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
               for t in model.graph.initializer)


def to_bytes(model: onnx.ModelProto) -> bytes:
    """Serialize a self-contained graph (no external data); QuantError past protobuf's 2 GB limit."""
    size = model.ByteSize()
    if size > MAX_GRAPH_BYTES:
        raise QuantError(f"graph {model.graph.name!r} is {size / 2**30:.2f} GiB: over the 2 GiB protobuf limit")
    return model.SerializeToString()


def save_model(model: onnx.ModelProto, path: Path | str) -> int:
    """Write atomically (temp file + rename) so a crash never leaves half a graph; returns bytes written."""
    path = Path(path)
    data = to_bytes(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)
