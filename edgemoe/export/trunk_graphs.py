"""The LLM's trunk graphs (everything but the experts and the vision tower), built with `onnx.helper`.

Contract: each builder takes one component's canonical tensors with the component prefix stripped
(float32, torch layout [out, in]) and a `Scheme`, builds the fp32 graph (weights as MatMul constant B,
see onnx_ops.py), lowers it with `edgemoe.quant.lowering.lower` and proves every weight MatMul was
quantized (`check_lowered`). Graph I/O is float32 (ids and cache bookkeeping are integers), except
the KV cache, whose element type the export chooses (`kv_cache`: fp16 halves it; fp32 for an fp32
bundle, the exactness reference):

  attention   x [1,S,H], position_ids int64 [S], past_key/past_value [1,KVH,MAX,D] (fp32 | fp16),
              seqlens_k int32 [1] (= total_len - 1), total_len int32 [] (past length + S)
              -> h [1,S,H] = x + attn(attn_norm x), m [1,S,H] (the MLP input: mlp_norm h, or
              attn_norm x for Phi's parallel block), present_key/present_value [1,KVH,MAX,D]
  dense_mlp   x [N,H] -> y [N,H]                   (edgemoe.quant.build_mlp)
  head        h [N,H] -> logits [N,V]              final norm + lm_head (tied models pass the
                                                   embedding as lm_head.weight)
  embed       ids int64 [S] -> embeds [S,H]        a Gather; fp32 table for fp32, else an fp16 table
                                                   + Cast (a lookup reads one row: no quantized op)
  projector   features [N,Hv] -> embeds [N,H]      Linear, exact (erf) GELU, Linear

Attention uses ORT's `com.microsoft.GroupQueryAttention` without its rotary (do_rotary=0): this graph
applies NeoX half-split rotary itself on the first `rotary_dim` dims of every head, with inv_freq as
the reference computes it, so partial rotary (StableLM 16/64, Phi 32/80) is exact. past_key and
present_key have the same shape so the runtime can bind ONE preallocated buffer to both (IOBinding):
ORT then writes the S new keys at rows total_len - S .. total_len - 1 in place and copies nothing.
q, k and v are one fused MatMul (one activation quantization, one kernel), split after; the query's
and key's heads rotate together in one pass (`apply_rotary`: a Gather and two Mul, not a split, four
Mul and a concat per tensor), which keeps the graph's small ops to a few per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto

from edgemoe.attention_ports import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, SEQLENS_K, TOTAL_LEN
from edgemoe.export.onnx_ops import MS_DOMAIN, GraphBuilder, lower_checked, require_fp32, take
from edgemoe.model.config import ModelConfig
from edgemoe.quant.graphs import MlpWeights
from edgemoe.quant.lowering import build_mlp
from edgemoe.quant.schemes import Precision, QuantError, Scheme

F32 = TensorProto.FLOAT
KV_ELEM = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}  # the KV cache's element type


def rotary_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """inv_freq [R/2] in float32, by the reference's own torch expression (layers.rotary_cos_sin):
    numpy's float32 pow differs from torch's by one ulp for some (theta, R), e.g. Qwen's 10000/128."""
    import torch

    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return (1.0 / (theta ** exponent)).numpy().astype(np.float32)


# -- attention --------------------------------------------------------------------------------

def rotary_tables(b: GraphBuilder, cfg: ModelConfig, position_ids: str, d: int, rotary_dim: int) -> tuple[str, str]:
    """cos, signed sin [1, S, 1, d] for one head of width d whose first `rotary_dim` dims rotate.

    The angles are positions * inv_freq in fp32 as the reference computes them (each frequency twice,
    NeoX layout), and 0 on the pass-through dims, where cos is exactly 1 and sin exactly 0. The sin of
    the first half carries the rotation's minus sign (apply_rotary)."""
    half = rotary_dim // 2
    inv_freq = rotary_inv_freq(rotary_dim, cfg.rope_theta)
    freqs = np.zeros(d, np.float32)
    freqs[:half], freqs[half:rotary_dim] = inv_freq, inv_freq
    sign = np.ones(d, np.float32)
    sign[:half] = -1.0
    pos = b.op("Cast", [position_ids], "rope_pos", to=F32)
    pos = b.op("Reshape", [pos, b.ints("rope.pos_shape", [1, -1, 1, 1])], "rope_pos4")
    angles = b.op("Mul", [pos, b.const("rope.freqs", freqs)], "rope_angles")
    sin = b.op("Mul", [b.op("Sin", [angles], "rope_sin_raw"), b.const("rope.sign", sign)], "rope_sin")
    return b.op("Cos", [angles], "rope_cos"), sin


def apply_rotary(b: GraphBuilder, t: str, heads: int, d: int, rotary_dim: int, cos: str, sin: str, name: str) -> str:
    """[1, S, heads*d] -> same, NeoX half-split rotary on each head's first `rotary_dim` dims, the rest
    passing through; `cos`, `sin` from `rotary_tables`. As the reference: y = x cos + rotate_half(x) sin,
    rotate_half(x) = (-x2, x1). Here one Gather swaps the halves and the signed sin supplies the minus,
    (x2)(-sin) being exactly (-x2)(sin); on the pass-through dims x*1 + x*0 = x. So the values are the
    reference's bit for bit, in 6 nodes for every head at once instead of a split, 4 Mul and a concat."""
    half = rotary_dim // 2
    swap = np.arange(d)
    swap[:half], swap[half:rotary_dim] = np.arange(half, rotary_dim), np.arange(half)
    t4 = b.op("Reshape", [t, b.ints(f"{name}.shape4", [0, 0, heads, d])], f"{name}_heads")
    swapped = b.op("Gather", [t4, b.ints(f"{name}.swap", swap)], f"{name}_swapped", axis=-1)
    y = b.op("Add", [b.op("Mul", [t4, cos], f"{name}_xc"), b.op("Mul", [swapped, sin], f"{name}_xs")], f"{name}_rot")
    return b.op("Reshape", [y, b.ints(f"{name}.shape3", [0, 0, heads * d])], f"{name}_rope")


def _fused_qkv(cfg: ModelConfig, w: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """q|k|v weights stacked along out: [(NH + 2 KVH) D, H], with the biases likewise (or None)."""
    weights = [take(w, f"attn.{p}.weight") for p in "qkv"]
    want = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    for p, wt, rows in zip("qkv", weights, want):
        if wt.shape != (rows, cfg.hidden_size):
            raise QuantError(f"attn.{p}.weight has shape {list(wt.shape)}, expected {[rows, cfg.hidden_size]}")
    biases = [take(w, f"attn.{p}.bias", required=cfg.qkv_bias) for p in "qkv"]
    if any(x is None for x in biases) and any(x is not None for x in biases):
        raise QuantError("attn.{q,k,v}.bias: some present, some missing")
    return np.concatenate(weights), None if biases[0] is None else np.concatenate(biases)


def group_query_attention(b: GraphBuilder, q: str, k: str, v: str, past: tuple[str, str], lengths: tuple[str, str],
                          kv_cache: str, width: int, **attrs: object) -> str:
    """ORT's GroupQueryAttention over a cache of element type `kv_cache` -> attn [1, S, width] fp32.
    An fp16 cache takes fp16 q/k/v (GQA's one type) and its output is cast back."""
    if kv_cache == "fp16":  # one Cast per distinct input (MLA passes the latent as both k and v)
        half = {t: b.op("Cast", [t], f"{t}_fp16", to=TensorProto.FLOAT16) for t in dict.fromkeys((q, k, v))}
        q, k, v = half[q], half[k], half[v]
    attn, _, _ = b.op_multi("GroupQueryAttention", [q, k, v, *past, *lengths],
                            ["attn_kv" if kv_cache == "fp16" else "attn", PRESENT_KEY, PRESENT_VALUE],
                            domain=MS_DOMAIN, **attrs)
    if kv_cache == "fp16":
        b.declare(attn, TensorProto.FLOAT16, [1, "S", width])
        attn = b.op("Cast", [attn], "attn", to=F32)
    b.declare(attn, F32, [1, "S", width])
    return attn


def build_attention(cfg: ModelConfig, w: Mapping[str, np.ndarray], scheme: Scheme,
                    max_positions: int | None = None, kv_cache: str = "fp32") -> onnx.ModelProto:
    """One decoder layer's attention block (module docstring). `max_positions` fixes the declared cache
    length MAX (the buffer the runtime preallocates); None leaves it symbolic. `kv_cache` is the
    cache's element type, fp32 or fp16 (attention computes in it; everything else stays fp32)."""
    require_fp32(scheme, "attention")
    nh, kvh, d, hid = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    if nh % kvh or d % 8:  # ORT's CPU GroupQueryAttention rejects other head sizes at run time
        raise QuantError(f"GroupQueryAttention needs heads ({nh}) divisible by kv heads ({kvh}) and a head "
                         f"dim ({d}) divisible by 8")
    b = GraphBuilder("attention")
    cache = [1, kvh, max_positions or "MAX", d]
    x = b.input("x", F32, [1, "S", hid])
    pos = b.input("position_ids", TensorProto.INT64, ["S"])
    past_k, past_v = b.input(PAST_KEY, KV_ELEM[kv_cache], cache), b.input(PAST_VALUE, KV_ELEM[kv_cache], cache)
    seqlens_k, total = b.input(SEQLENS_K, TensorProto.INT32, [1]), b.input(TOTAL_LEN, TensorProto.INT32, [])

    n = b.norm(cfg.norm, x, "attn_norm", w, cfg.norm_eps, out="m" if cfg.parallel_block else "")
    qkv_w, qkv_b = _fused_qkv(cfg, w)
    qkv = b.linear(n, "attn.qkv", qkv_w, qkv_b)
    qk, v = b.op_multi("Split", [qkv, b.ints("attn.qkv_split", [(nh + kvh) * d, kvh * d])], ["qk", "v"], axis=-1)
    cos, sin = rotary_tables(b, cfg, pos, d, cfg.rotary_dim)
    qk = apply_rotary(b, qk, nh + kvh, d, cfg.rotary_dim, cos, sin, "qk")  # q's and k's heads in one pass
    q, k = b.op_multi("Split", [qk, b.ints("attn.qk_split", [nh * d, kvh * d])], ["q", "k"], axis=-1)
    attn = group_query_attention(b, q, k, v, (past_k, past_v), (seqlens_k, total), kv_cache, nh * d,
                                 num_heads=nh, kv_num_heads=kvh, scale=1.0 / math.sqrt(d), do_rotary=0)
    o = b.linear(attn, "attn.o", take(w, "attn.o.weight"), take(w, "attn.o.bias", required=cfg.o_bias))
    h = b.op("Add", [x, o], "h")
    if not cfg.parallel_block:
        b.norm(cfg.norm, h, "mlp_norm", w, cfg.norm_eps, out="m")
    for name, shape in (("h", [1, "S", hid]), ("m", [1, "S", hid])):
        b.output(name, F32, shape)
    for name in (PRESENT_KEY, PRESENT_VALUE):
        b.output(name, KV_ELEM[kv_cache], cache)
    return lower_checked(b, scheme, expected=2)


# -- the rest of the trunk ----------------------------------------------------------------------

def build_dense_mlp(cfg: ModelConfig, w: Mapping[str, np.ndarray], scheme: Scheme) -> onnx.ModelProto:
    """A dense layer's MLP: x [N, H] -> y [N, H], through `edgemoe.quant.build_mlp`."""
    return build_mlp(MlpWeights.from_tensors(w, ""), cfg.mlp_act, scheme, name="dense_mlp")


def build_head(cfg: ModelConfig, w: Mapping[str, np.ndarray], scheme: Scheme) -> onnx.ModelProto:
    """Final norm + lm_head: h [N, H] -> fp32 logits [N, V] (the padded-vocabulary mask is the runtime's)."""
    require_fp32(scheme, "head")
    b = GraphBuilder("head")
    h = b.input("h", F32, ["N", cfg.hidden_size])
    n = b.norm(cfg.norm, h, "final_norm", w, cfg.norm_eps)
    weight = take(w, "lm_head.weight")
    b.linear(n, "lm_head", weight, take(w, "lm_head.bias", required=False), out="logits")
    b.output("logits", F32, ["N", weight.shape[0]])
    return lower_checked(b, scheme, expected=1)


def build_embed(cfg: ModelConfig, weight: np.ndarray, scheme: Scheme) -> onnx.ModelProto:
    """ids int64 [S] -> embeds [S, H]. The table is fp32 for an fp32 scheme, fp16 (half the bytes, a Cast
    after the Gather) for every other: a lookup reads S rows, so quantizing buys nothing in speed, and
    fp16 rows (rel. error 5e-4) are far below the int8/int4 trunk's noise."""
    weight = np.asarray(weight)
    if weight.shape != (cfg.vocab_size, cfg.hidden_size):
        raise QuantError(f"embed.weight has shape {list(weight.shape)}, expected {[cfg.vocab_size, cfg.hidden_size]}")
    half = scheme.precision is not Precision.FP32
    b = GraphBuilder("embed")
    ids = b.input("ids", TensorProto.INT64, ["S"])
    table = b.const("embed.weight", weight, np.float16 if half else np.float32)
    rows = b.op("Gather", [table, ids], "rows" if half else "embeds", axis=0)
    if half:
        b.op("Cast", [rows], "embeds", to=F32)
    b.output("embeds", F32, ["S", cfg.hidden_size])
    return b.model()


def build_projector(cfg: ModelConfig, w: Mapping[str, np.ndarray], scheme: Scheme,
                    grid: int | None = None) -> onnx.ModelProto:
    """mlp2x_gelu: features [N, Hv] -> embeds [N, H], with the exact (erf) GELU upstream uses.
    downsample_mlp_gelu (DeepSeek-VL2, `grid` = G tower tokens per tile side): features [T, G*G, Hv]
    -> embeds [T, g*g, H], g = ceil(G/2), after the 2 x 2 channel-major fold (reference downsample_2x2)."""
    require_fp32(scheme, "projector")
    b = GraphBuilder("projector")
    if cfg.mm_projector_type == "downsample_mlp_gelu":
        if grid is None:
            raise QuantError("downsample_mlp_gelu needs the tower's grid size")
        x, out_shape = _fold_2x2(b, cfg.mm_hidden_size, grid), ["T", ((grid + 1) // 2) ** 2, cfg.hidden_size]
    else:
        x, out_shape = b.input("features", F32, ["N", cfg.mm_hidden_size]), ["N", cfg.hidden_size]
    y = b.linear(x, "projector.0", take(w, "0.weight"), take(w, "0.bias"))
    y = b.op("Gelu", [y], "projector_gelu", approximate="none")
    b.linear(y, "projector.2", take(w, "2.weight"), take(w, "2.bias"), out="embeds")
    b.output("embeds", F32, out_shape)
    return lower_checked(b, scheme, expected=2)


def _fold_2x2(b: GraphBuilder, hv: int, grid: int) -> str:
    """features [T, G*G, Hv] -> [T, g*g, 4*Hv]: zero-pad the grid to even, then feature c*4 + di*2 + dj
    of token (i, j) is grid[2i + di, 2j + dj, c] (F.unfold's order)."""
    g, pad = (grid + 1) // 2, grid % 2
    x = b.input("features", F32, ["T", grid * grid, hv])
    x = b.op("Reshape", [x, b.ints("fold.grid", [0, grid, grid, hv])], "fold_grid")  # [T, G, G, Hv]
    if pad:
        x = b.op("Pad", [x, b.ints("fold.pads", [0, 0, 0, 0, 0, pad, pad, 0])], "fold_padded")
    x = b.op("Reshape", [x, b.ints("fold.blocks", [0, g, 2, g, 2, hv])], "fold_blocks")  # [T, i, di, j, dj, c]
    x = b.op("Transpose", [x], "fold_t", perm=[0, 1, 3, 5, 2, 4])  # [T, i, j, c, di, dj]
    return b.op("Reshape", [x, b.ints("fold.out", [0, g * g, 4 * hv])], "folded")
