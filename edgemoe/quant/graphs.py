"""Float ONNX graphs of one MLP/expert or one linear, built with `onnx.helper` from numpy weights.

Contract: input `x` float32 [N, H] (N dynamic: 1 at decode, hundreds at image prefill), output `y`
float32 [N, out]. Every weight is a constant initializer in [in, out] layout (torch's [out, in]
transposed here, once) feeding `MatMul` directly as B: no Gemm, no Transpose, no weight inputs,
because ORT's quantizers silently skip anything else (onnxruntime-notes.md). Biases are separate
`Add`s. With a float16 compute dtype the graph casts at its boundary, so callers always see fp32.
These graphs are float only; `lowering.py` turns them into a scheme's quantized form.

    silu_glu:  y = down(silu(gate x) * up x)          (StableLM, Qwen)
    gelu_new:  y = down(gelu_tanh(up x + bu)) + bd    (Phi-2)

`mlp_reference` / `linear_reference` are the float64 numpy definitions the graphs are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgemoe.quant.schemes import QuantError

# Opset 20 is the first with Gelu(approximate="tanh"); ORT's CPU kernel for it ran 4.5x faster than
# the explicit tanh formula (N=256, F=10240: 4.4 vs 19.5 ms; ORT does not fuse the formula).
OPSET = 20
IR_VERSION = 10
ACTIVATIONS = ("silu_glu", "gelu_new")
_GELU_K = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class MlpWeights:
    """One MLP's tensors in torch Linear layout: up/gate [F, H], down [H, F], biases [out]."""

    up: np.ndarray
    down: np.ndarray
    gate: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    gate_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        f, h = self.up.shape
        if self.down.shape != (h, f) or (self.gate is not None and self.gate.shape != (f, h)):
            raise QuantError(f"MLP shapes disagree: up {self.up.shape}, down {self.down.shape}, "
                             f"gate {None if self.gate is None else self.gate.shape}")

    @property
    def hidden(self) -> int:
        return int(self.up.shape[1])

    @property
    def ffn(self) -> int:
        return int(self.up.shape[0])

    def linears(self) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
        """(part, weight, bias) for every present linear, gate first."""
        if self.gate is not None:
            yield "gate", self.gate, self.gate_bias
        yield "up", self.up, self.up_bias
        yield "down", self.down, self.down_bias

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], prefix: str) -> "MlpWeights":
        """Pick `{prefix}{gate?,up,down}.{weight,bias?}` out of canonical tensors (see model/names.py)."""
        def get(name: str) -> np.ndarray | None:
            return tensors.get(prefix + name)

        if get("up.weight") is None or get("down.weight") is None:
            raise QuantError(f"no MLP under {prefix!r}: {prefix}up.weight / {prefix}down.weight missing")
        return cls(up=get("up.weight"), down=get("down.weight"), gate=get("gate.weight"),
                   up_bias=get("up.bias"), gate_bias=get("gate.bias"), down_bias=get("down.bias"))


class _GraphBuilder:
    """Accumulates nodes and initializers; every node gets a unique name (quantizers key on names)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray | float) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=self.dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}/{op_type}", **attrs))
        return out

    def linear(self, x: str, part: str, weight: np.ndarray, bias: np.ndarray | None, out: str = "") -> str:
        # [out, in] -> [in, out] here so the graph has a constant B and no Transpose.
        w = self.const(f"{part}.weight_t", np.ascontiguousarray(np.asarray(weight).T))
        out = out or f"{part}_out"
        if bias is None:
            return self.op("MatMul", [x, w], out)
        y = self.op("MatMul", [x, w], f"{part}_mm")
        return self.op("Add", [y, self.const(f"{part}.bias", bias)], out)

    def model(self, name: str, x: str, y: str, hidden: int, out: int, opset: int) -> onnx.ModelProto:
        """Wrap the body with fp32 I/O (casting when the body computes in another dtype)."""
        onnx_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        if self.dtype != np.float32:
            self.nodes.insert(0, helper.make_node("Cast", ["x"], [x], name="x/Cast", to=onnx_type))
            self.op("Cast", [y], "y", to=TensorProto.FLOAT)
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="edgemoe")
        model.ir_version = IR_VERSION
        return model


def _input_and_output(b: _GraphBuilder) -> tuple[str, str]:
    """Names of the body's input/output: the graph's own `x`/`y` unless casts sit at the boundary."""
    return ("x", "y") if b.dtype == np.float32 else ("x_c", "y_c")


def _gelu_tanh(b: _GraphBuilder, h: str, opset: int) -> str:
    if opset >= 20:
        return b.op("Gelu", [h], "act", approximate="tanh")
    # 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), for graphs pinned below opset 20.
    h3 = b.op("Mul", [b.op("Mul", [h, h], "act_h2"), h], "act_h3")
    inner = b.op("Add", [h, b.op("Mul", [h3, b.const("gelu_c", 0.044715)], "act_c")], "act_in")
    t = b.op("Tanh", [b.op("Mul", [inner, b.const("gelu_k", _GELU_K)], "act_k")], "act_t")
    half_h = b.op("Mul", [h, b.const("gelu_half", 0.5)], "act_hh")
    return b.op("Mul", [half_h, b.op("Add", [t, b.const("gelu_one", 1.0)], "act_1t")], "act")


def float_mlp(w: MlpWeights, act: str, dtype: np.dtype = np.float32, opset: int = OPSET,
              name: str = "mlp") -> onnx.ModelProto:
    """The float graph of one MLP/expert (module docstring), computing in `dtype`."""
    if act not in ACTIVATIONS:
        raise QuantError(f"unknown MLP activation {act!r}: expected one of {', '.join(ACTIVATIONS)}")
    if (act == "silu_glu") != (w.gate is not None):
        raise QuantError(f"activation {act} {'needs' if act == 'silu_glu' else 'takes no'} gate weights")
    b = _GraphBuilder(dtype)
    x, y = _input_and_output(b)
    up = b.linear(x, "up", w.up, w.up_bias)
    if act == "silu_glu":
        gate = b.linear(x, "gate", w.gate, w.gate_bias)
        # silu(g) = g * sigmoid(g); ORT fuses Sigmoid+Mul into one QuickGelu kernel.
        silu = b.op("Mul", [gate, b.op("Sigmoid", [gate], "gate_sig")], "gate_silu")
        hidden = b.op("Mul", [silu, up], "act")
    else:
        hidden = _gelu_tanh(b, up, opset)
    b.linear(hidden, "down", w.down, w.down_bias, out=y)
    return b.model(name, x, y, w.hidden, w.hidden, opset)


def float_linear(weight: np.ndarray, bias: np.ndarray | None = None, dtype: np.dtype = np.float32,
                 opset: int = OPSET, name: str = "linear") -> onnx.ModelProto:
    """The float graph of y = x W^T + b for a torch-layout weight [out, in] (lm_head, dense layers)."""
    if weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[:1]):
        raise QuantError(f"linear needs weight [out, in] and bias [out], got {weight.shape} / "
                         f"{None if bias is None else bias.shape}")
    b = _GraphBuilder(dtype)
    x, y = _input_and_output(b)
    b.linear(x, "linear", weight, bias, out=y)
    return b.model(name, x, y, int(weight.shape[1]), int(weight.shape[0]), opset)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """gelu_new (tanh approximation), in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(_GELU_K * (x + 0.044715 * x**3)))


def linear_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x W^T + b in float64."""
    y = np.asarray(x, dtype=np.float64) @ np.asarray(weight, dtype=np.float64).T
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)


def mlp_reference(w: MlpWeights, act: str, x: np.ndarray) -> np.ndarray:
    """The MLP in float64 numpy: what `float_mlp` computes, by an independent route."""
    up = linear_reference(x, w.up, w.up_bias)
    if act == "silu_glu":
        gate = linear_reference(x, w.gate, w.gate_bias)
        hidden = gate / (1.0 + np.exp(-gate)) * up
    else:
        hidden = gelu_tanh(up)
    return linear_reference(hidden, w.down, w.down_bias)
