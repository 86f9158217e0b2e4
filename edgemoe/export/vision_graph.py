"""The vision tower (CLIP or SigLIP) as one ONNX graph: pixel_values -> upstream's image features.

Contract: `build_vision(tower, w, scheme, select_layer)` takes the `vision.*` canonical tensors with
that prefix stripped (HF `vision_model.*` suffixes) and returns a graph

    pixel_values float32 [1, C, I, I] -> features float32 [N', Hv]
    pixel_values float32 [T, C, I, I] -> features float32 [T, N, Hv]     (select_feature "full_normed":
                                          every layer, then post_layernorm: DeepSeek-VL2's tiles)

equal to the reference `VisionTower`: `hidden_states[select_layer][:, 1:]` for select_feature
"patch" (the slice drops SigLIP's first patch too, as upstream: 728 of 729 tokens at so400m-384), all
tokens for "cls_patch". Only the encoder layers the features depend on are built; later layers,
`post_layernorm` and SigLIP's head are ignored if present in `w`.

The patch embedding stays a float `Conv` (the quantizers only take MatMuls; it is 0.2% of the FLOPs),
and the position/class embeddings stay float; every q|k|v (fused), out_proj, fc1 and fc2 MatMul is
lowered to the scheme. Attention is ORT's `com.microsoft.MultiHeadAttention` (bidirectional, no mask).

Shape legend: N tokens (patches + CLIP's class token), Hv hidden, G = I / P patches per side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto

from edgemoe.export.onnx_ops import MS_DOMAIN, GraphBuilder, lower_checked, require_fp32, take
from edgemoe.model.towers import VisionTowerConfig
from edgemoe.quant.schemes import Precision, QuantError, Scheme

F32 = TensorProto.FLOAT
EMBEDDINGS_STAY_FLOAT = ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
                         "embeddings.class_embedding")


def layers_needed(num_layers: int, select_layer: int) -> int:
    """Encoder layers that hidden_states[select_layer] depends on (hidden_states[0] is the encoder input).
    The same rule as edgemoe.reference.vision.layers_needed, here without importing torch."""
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise QuantError(f"mm_vision_select_layer {select_layer} outside a {num_layers}-layer tower")
    return index


def vision_scheme(scheme: Scheme, int4_as_int8: bool = True) -> Scheme:
    """The scheme to build the tower at when the trunk's is `scheme`. The tower only ever runs one
    577-729-token prefill, which is compute bound: at CLIP-L/336 shape (2 threads, AVX-512 VNNI EPYC)
    a layer took 187 ms fp32, 81 ms int8, 129 ms int4 (MatMulNBits, block 128, accuracy_level 4), and
    ORT's notes report int4 slower still on AVX2. So by default a cpu int4 trunk gets an int8 tower;
    int4_as_int8=False keeps int4 (half int8's bytes). Re-measure on the target."""
    if int4_as_int8 and scheme.precision is Precision.INT4 and scheme.target == "cpu":
        return Scheme.default(Precision.INT8, target=scheme.target)
    return scheme


def _embeddings(b: GraphBuilder, v: VisionTowerConfig, w: Mapping[str, np.ndarray], pixels: str) -> str:
    """Patch Conv (+ CLIP's class token) + positions (+ CLIP's pre_layrnorm): [1, N, Hv]."""
    clip = v.kind == "clip"
    weight = take(w, "embeddings.patch_embedding.weight")
    conv_in = [pixels, b.const("embeddings.patch_embedding.weight", weight)]
    if not clip:
        conv_in.append(b.const("embeddings.patch_embedding.bias", take(w, "embeddings.patch_embedding.bias")))
    x = b.op("Conv", conv_in, "patches", kernel_shape=[v.patch_size] * 2, strides=[v.patch_size] * 2)
    x = b.op("Reshape", [x, b.ints("patches.shape", [0, v.hidden_size, -1])], "patches_flat")  # [T, Hv, G*G]
    x = b.op("Transpose", [x], "patches_t", perm=[0, 2, 1])  # [T, G*G, Hv], row-major patches
    if clip:
        cls = b.const("embeddings.class_embedding", take(w, "embeddings.class_embedding").reshape(1, 1, -1))
        x = b.op("Concat", [cls, x], "tokens", axis=1)
    pos = b.const("embeddings.position_embedding.weight", take(w, "embeddings.position_embedding.weight"))
    x = b.op("Add", [x, pos], "embedded")
    if clip:
        x = b.norm("layernorm", x, "pre_layrnorm", w, v.layer_norm_eps)
    return x


def _activation(b: GraphBuilder, act: str, x: str, name: str) -> str:
    if act == "quick_gelu":  # x sigmoid(1.702 x): ORT fuses this pattern into QuickGelu
        s = b.op("Sigmoid", [b.op("Mul", [x, b.const(f"{name}.alpha", 1.702)], f"{name}_ax")], f"{name}_sig")
        return b.op("Mul", [x, s], f"{name}_act")
    if act == "gelu_pytorch_tanh":
        return b.op("Gelu", [x], f"{name}_act", approximate="tanh")
    if act == "gelu":
        return b.op("Gelu", [x], f"{name}_act", approximate="none")
    raise QuantError(f"unknown vision activation {act!r}")


def _layer(b: GraphBuilder, v: VisionTowerConfig, w: Mapping[str, np.ndarray], x: str, i: int) -> str:
    """Pre-LN encoder layer i: x + attn(ln1 x), then + mlp(ln2 .)."""
    p, hv, eps = f"encoder.layers.{i}", v.hidden_size, v.layer_norm_eps
    n = b.norm("layernorm", x, f"{p}.layer_norm1", w, eps)
    qkv_w = np.concatenate([take(w, f"{p}.self_attn.{t}_proj.weight") for t in "qkv"])
    qkv_b = np.concatenate([take(w, f"{p}.self_attn.{t}_proj.bias") for t in "qkv"])
    qkv = b.linear(n, f"{p}.self_attn.qkv", qkv_w, qkv_b)
    q, k, val = b.op_multi("Split", [qkv, b.ints(f"{p}.qkv_split", [hv] * 3)], [f"{p}_q", f"{p}_k", f"{p}_v"],
                           axis=-1)
    attn = b.op("MultiHeadAttention", [q, k, val], f"{p}_attn", domain=MS_DOMAIN, num_heads=v.num_heads,
                scale=1.0 / math.sqrt(v.head_dim))
    b.declare(attn, F32, ["T", "N", hv])
    o = b.linear(attn, f"{p}.self_attn.out_proj", take(w, f"{p}.self_attn.out_proj.weight"),
                 take(w, f"{p}.self_attn.out_proj.bias"))
    x = b.op("Add", [x, o], f"{p}_h")
    n = b.norm("layernorm", x, f"{p}.layer_norm2", w, eps)
    y = b.linear(n, f"{p}.mlp.fc1", take(w, f"{p}.mlp.fc1.weight"), take(w, f"{p}.mlp.fc1.bias"))
    y = _activation(b, v.hidden_act, y, f"{p}.mlp")
    y = b.linear(y, f"{p}.mlp.fc2", take(w, f"{p}.mlp.fc2.weight"), take(w, f"{p}.mlp.fc2.bias"))
    return b.op("Add", [x, y], f"{p}_out")


def build_vision(tower: VisionTowerConfig, w: Mapping[str, np.ndarray], scheme: Scheme, select_layer: int = -2,
                 select_feature: str = "patch") -> onnx.ModelProto:
    """The tower's feature graph at `scheme` (module docstring); see `vision_scheme` for int4 trunks."""
    require_fp32(scheme, "vision tower")
    if select_feature not in ("patch", "cls_patch", "full_normed"):
        raise QuantError(f"mm_vision_select_feature {select_feature!r} is not supported (patch, cls_patch, "
                         "full_normed)")
    layers = layers_needed(tower.num_layers, select_layer)
    size, hv = tower.image_size, tower.hidden_size
    b = GraphBuilder("vision")
    tiles = select_feature == "full_normed"
    x = _embeddings(b, tower, w, b.input("pixel_values", F32, ["T" if tiles else 1, tower.num_channels, size, size]))
    for i in range(layers):
        x = _layer(b, tower, w, x, i)
    if tiles:  # DeepSeek-VL2: every layer, the final LayerNorm, all tokens of every tile
        b.norm("layernorm", x, "post_layernorm", w, tower.layer_norm_eps, out="features")
        b.output("features", F32, ["T", tower.num_positions, hv])
        return lower_checked(b, scheme, expected=4 * layers, float_ok=EMBEDDINGS_STAY_FLOAT)
    skip = 1 if select_feature == "patch" else 0
    if skip:
        x = b.op("Slice", [x, b.ints("select.start", [1]), b.ints("select.end", [tower.num_positions]),
                           b.ints("select.axes", [1])], "selected")
    b.op("Reshape", [x, b.ints("features.shape", [-1, hv])], "features")
    b.output("features", F32, [tower.num_positions - skip, hv])
    return lower_checked(b, scheme, expected=4 * layers, float_ok=EMBEDDINGS_STAY_FLOAT)
