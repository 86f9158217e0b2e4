"""Expert/linear graphs at every scheme, run in onnxruntime (CPU EP, 2 threads), against numpy float64
references within each precision's declared tolerance; the quantized graphs must hold the quantized ops
and no float weight; bytes_for must predict the initializer bytes; check_lowered must catch the graphs
ORT's quantizers silently skip (Gemm, Transpose before B)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemoe.quant.graphs import MlpWeights, float_mlp, linear_reference, mlp_reference
from edgemoe.quant.lowering import (
    QUANTIZED_OPS,
    build_linear,
    build_mlp,
    check_lowered,
    initializer_bytes,
    lower,
    save_model,
    to_bytes,
)
from edgemoe.quant.schemes import Precision, QuantError, Scheme, bytes_for

H, F = 128, 384  # K = 128 / 384: whole int4 blocks of 128, as in every real model
SCHEMES = [Scheme.default(p) for p in Precision] + [Scheme(Precision.INT4, target="cuda")]
ACTS = ("silu_glu", "gelu_new")


def _weights(act: str, bias: bool, seed: int = 0) -> MlpWeights:
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:  # 1/sqrt(fan_in): activations stay O(1) as in trained models
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    b = (lambda n: w(n)) if bias else (lambda n: None)
    return MlpWeights(up=w(F, H), down=w(H, F), gate=w(F, H) if act == "silu_glu" else None,
                      up_bias=b(F), gate_bias=b(F) if act == "silu_glu" else None, down_bias=b(H))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(to_bytes(model), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def built() -> dict[tuple[str, str], tuple[MlpWeights, onnx.ModelProto]]:
    """Every (activation, scheme) graph, built once: silu_glu without biases (StableLM/Qwen) and
    gelu_new with biases (Phi-2)."""
    out = {}
    for act in ACTS:
        w = _weights(act, bias=act == "gelu_new")
        for scheme in SCHEMES:
            out[act, scheme.label] = (w, build_mlp(w, act, scheme))
    return out


@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("act", ACTS)
def test_expert_graph_matches_numpy(built, act: str, scheme: Scheme, n: int) -> None:
    w, model = built[act, scheme.label]
    x = np.random.default_rng(n).standard_normal((n, H)).astype(np.float32)
    y = _session(model).run(None, {"x": x})[0]
    assert y.shape == (n, H) and y.dtype == np.float32
    scheme.tolerance.check(y, mlp_reference(w, act, x), what=f"{act} {scheme.label} N={n}")


@pytest.mark.parametrize("act", ACTS)
def test_tolerances_reject_wrong_graphs(built, act: str) -> None:
    """Even int4's loose tolerance rejects another expert's weights. A dropped bias (~15% of the output
    here) hides in int4 noise, but the quantizers only swap MatMuls, so the fp32 build, validated
    tightly, vouches for the structure every scheme shares."""
    x = np.random.default_rng(5).standard_normal((37, H)).astype(np.float32)
    w, int4 = built[act, Scheme.default(Precision.INT4).label]
    other = _weights(act, bias=act == "gelu_new", seed=1)
    with pytest.raises(QuantError):
        Scheme.default("int4").tolerance.check(_session(int4).run(None, {"x": x})[0], mlp_reference(other, act, x))
    if w.down_bias is not None:
        _, fp32 = built[act, Scheme.default(Precision.FP32).label]
        no_bias = MlpWeights(up=w.up, down=w.down, up_bias=w.up_bias)
        with pytest.raises(QuantError):
            Scheme.default("fp32").tolerance.check(_session(fp32).run(None, {"x": x})[0], mlp_reference(no_bias, act, x))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_quantized_ops_present_and_no_float_weight(built, scheme: Scheme) -> None:
    for act in ACTS:
        w, model = built[act, scheme.label]
        ops = [n.op_type for n in model.graph.node]
        n_linears = sum(1 for _ in w.linears())
        if scheme.precision.is_integer:
            assert sum(op in QUANTIZED_OPS[scheme.precision] for op in ops) == n_linears
            assert "MatMul" not in ops and "Gemm" not in ops
        else:
            assert ops.count("MatMul") == n_linears
        assert check_lowered(model, scheme) == n_linears


def test_int4_attributes_are_the_fast_cpu_path(built) -> None:
    _, model = built["silu_glu", Scheme.default(Precision.INT4).label]
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 128, 4)
            assert len(node.input) == 3  # symmetric: no zero points


def test_int8_runs_as_dynamic_quantize_matmul(built, tmp_path) -> None:
    """The file holds MatMulInteger; ORT's CPU optimizer must turn it into its fused int8 kernels."""
    _, model = built["silu_glu", Scheme.default(Precision.INT8).label]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(to_bytes(model), so, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "DynamicQuantizeMatMul" in fused and "MatMulInteger" not in fused


def test_fp16_graph_keeps_fp32_io_and_fp16_weights(built) -> None:
    _, model = built["gelu_new", Scheme.default(Precision.FP16).label]
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_bytes_for_matches_initializers(built, scheme: Scheme) -> None:
    for act in ACTS:
        w, model = built[act, scheme.label]
        tensors = [t for _, wt, b in w.linears() for t in (wt, b) if t is not None]
        estimate = sum(bytes_for(t.shape, scheme) for t in tensors)
        assert initializer_bytes(model) == pytest.approx(estimate, rel=0.01)
        assert len(to_bytes(model)) == pytest.approx(estimate, rel=0.03)  # protobuf framing is small


@pytest.mark.parametrize("scheme", SCHEMES[:4], ids=lambda s: s.label)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_numpy(scheme: Scheme, bias: bool) -> None:
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((200, H)) / np.sqrt(H)).astype(np.float32)  # e.g. a tiny lm_head
    b = rng.standard_normal(200).astype(np.float32) if bias else None
    model = build_linear(weight, b, scheme)
    x = rng.standard_normal((5, H)).astype(np.float32)
    y = _session(model).run(None, {"x": x})[0]
    assert y.shape == (5, 200)
    scheme.tolerance.check(y, linear_reference(x, weight, b), what=f"linear {scheme.label}")


def test_int4_scales_are_not_mistaken_for_float_weights() -> None:
    """MatMulNBits keeps [N, K/128] float scales: 4096 of them here, as large as a small weight."""
    weight = np.random.default_rng(4).standard_normal((512, 1024)).astype(np.float32)
    model = build_linear(weight, None, Scheme.default(Precision.INT4))
    scales = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert [list(t.dims) for t in scales] == [[512, 8]]


def test_gelu_formula_below_opset_20_matches() -> None:
    w = _weights("gelu_new", bias=True)
    model = float_mlp(w, "gelu_new", opset=18)
    assert "Gelu" not in {n.op_type for n in model.graph.node}
    x = np.random.default_rng(1).standard_normal((4, H)).astype(np.float32)
    Scheme.default("fp32").tolerance.check(_session(model).run(None, {"x": x})[0], mlp_reference(w, "gelu_new", x))


def _skipped_by_quantizers(kind: str) -> onnx.ModelProto:
    """Graphs ORT's quantizers leave alone: a Gemm, or a Transpose in front of the MatMul's B."""
    w = numpy_helper.from_array(np.ones((H, H), np.float32), "w")
    if kind == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="g")]
    else:
        nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="t"),
                 helper.make_node("MatMul", ["x", "wt"], ["y"], name="m")]
    graph = helper.make_graph(nodes, "skipped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


# quantize_dynamic (ORT 1.32) rewrites a Gemm into MatMul + Add before quantizing; MatMulNBitsQuantizer
# does not, and neither looks through a Transpose.
@pytest.mark.parametrize("kind, precision", [("gemm", Precision.INT4), ("transpose", Precision.INT4),
                                             ("transpose", Precision.INT8)])
def test_check_lowered_catches_silently_skipped_weights(kind: str, precision: Precision) -> None:
    scheme = Scheme.default(precision)
    with pytest.raises(QuantError, match="left in float"):
        check_lowered(lower(_skipped_by_quantizers(kind), scheme), scheme)


def test_check_lowered_catches_slow_int4_attributes(built) -> None:
    _, model = built["silu_glu", Scheme.default(Precision.INT4).label]
    with pytest.raises(QuantError, match="accuracy_level"):
        check_lowered(model, Scheme(Precision.INT4, accuracy_level=0))
    with pytest.raises(QuantError, match="expected 2"):
        check_lowered(model, Scheme.default(Precision.INT4), expected=2)


def test_check_lowered_catches_fp32_weights_in_fp16_graph(built) -> None:
    _, model = built["silu_glu", Scheme.default(Precision.FP32).label]
    with pytest.raises(QuantError, match="not in float16"):
        check_lowered(model, Scheme.default(Precision.FP16))


def test_bad_weights_are_one_line_errors() -> None:
    w = _weights("silu_glu", bias=False)
    with pytest.raises(QuantError, match="needs gate"):
        float_mlp(MlpWeights(up=w.up, down=w.down), "silu_glu")
    with pytest.raises(QuantError, match="shapes disagree"):
        MlpWeights(up=w.up, down=w.up)
    with pytest.raises(QuantError, match="unknown MLP activation"):
        float_mlp(w, "relu")
    with pytest.raises(QuantError, match="missing"):
        MlpWeights.from_tensors({}, "layers.1.experts.0.")


def test_from_tensors_reads_canonical_names_and_save_round_trips(built, tmp_path) -> None:
    w, model = built["gelu_new", Scheme.default(Precision.INT4).label]
    tensors = {f"layers.3.experts.2.{part}.{kind}": t for part, wt, b in w.linears()
               for kind, t in (("weight", wt), ("bias", b))}
    again = MlpWeights.from_tensors(tensors, "layers.3.experts.2.")
    assert again.gate is None and np.array_equal(again.down_bias, w.down_bias) and again.ffn == F
    path = tmp_path / "experts" / "L3" / "E2.onnx"
    assert save_model(model, path) == path.stat().st_size
    assert onnx.load(str(path)).SerializeToString() == to_bytes(model)
