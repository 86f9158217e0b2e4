"""Multi-head latent attention (DeepSeek-V2 / DeepSeek-VL2-Small) as one graph over a latent KV cache.

Contract: `build_latent_attention(cfg, w, scheme, kv_cache)` builds the *rows* attention interface:

  x [1,S,H], position_ids int64 [S], past_latent [1,T,R+P] (the T cached rows, fp32 | fp16)
  -> h [1,S,H], m [1,S,H], new_latent [1,S,R+P] (the S new rows, in the cache's type)

The runtime binds past_latent to the first T rows of the layer's cache buffer and new_latent to rows
T..T+S-1 of the same buffer (`runtime.attention_call`), so ORT reads the context in place and writes the
new rows straight into the cache: nothing is copied. What each row holds is the normalised latent c
(R = kv_lora_rank values) followed by the rotated shared rope key k_pe (P values): 576 values a layer for
Small instead of the expanded 16 x (192 + 128). It computes in the absorbed form, prefill and decode alike:

    score_h = q_nope_h . (W_uk_h c) + q_pe_h . k_pe = [W_uk_h^T q_nope_h | q_pe_h] . [c | k_pe]
    out_h   = W_uv_h (sum_t p_t c_t)

Why not ORT's GroupQueryAttention (which this graph used first, with one KV head of width R+P): at
1,020 positions its CPU kernel took 2.3-3.0 ms a layer with an fp16 cache, most of a full-size Small
token's attention (27 layers), because it handles each of the 16 query heads on its own over the one
shared 576-wide head. Here all heads' queries are one [NH*S, R+P] matrix and the context is read by two
plain products: scores = Gemm(queries, past^T) and weighted = probs @ past, 0.9-1.0 ms for the whole
layer (same machine, same positions, int4 projections). The S new rows attend to the past and,
causally, to each other ([S, S] scores with -inf above the diagonal), so the past is never copied to
append them. With an fp16 cache the new rows are used as the cache will hold them (cast to fp16 and
back), so a prefill, a decode and a cached prompt prefix all see the same keys.

W_uk_h and W_uv_h (kv_b's per-head [128, 512] blocks) are applied as one batched MatMul each over the
heads, [1,NH,S,N] @ [NH,N,R] and [1,NH,S,R] @ [NH,R,V]. No quantized kernel runs a batched product
(MatMulNBits and MatMulInteger take one 2D weight), and sixteen small MatMulNBits per block cost about
0.6 ms a layer in kernel calls. So these two stay float: fp32 in an fp32 bundle; fp16 in the file
otherwise (half the bytes), which ORT's constant folding turns into fp32 at load (8 MB a layer resident
at Small's size). Every other weight is quantized as the scheme says.
Rotary is DeepSeek's: the rope dims' interleaved pairs (2i, 2i+1) are first de-interleaved into
halves (reference mla.deinterleave), then rotated NeoX-style over all P dims.

Shape legend: S new tokens, T cached positions, H hidden, NH heads, R kv_lora_rank, P rope dims,
N nope dims, V value dims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgemoe.attention_ports import NEW_ROWS, PAST_ROWS
from edgemoe.export.onnx_ops import GraphBuilder, lower_checked, require_fp32, take
from edgemoe.export.trunk_graphs import KV_ELEM, apply_rotary, rotary_tables
from edgemoe.model.config import ModelConfig
from edgemoe.quant.schemes import Precision, QuantError, Scheme

F32 = TensorProto.FLOAT
ABSORBED = ("attn.uk", "attn.uv")  # the float batched weights (module docstring)


def _deinterleave(b: GraphBuilder, t: str, heads: int, p: int, name: str) -> str:
    """[1, S, heads*P] with rotary pairs (2i, 2i+1) -> the half-split layout, per head."""
    t = b.op("Reshape", [t, b.ints(f"{name}.pairs", [0, 0, heads, p // 2, 2])], f"{name}_pairs")
    t = b.op("Transpose", [t], f"{name}_halves", perm=[0, 1, 2, 4, 3])
    return b.op("Reshape", [t, b.ints(f"{name}.flat", [0, 0, heads * p])], f"{name}_deint")


def _absorbed_blocks(cfg: ModelConfig, kv_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """kv_b [NH*(N+V), R] -> (W_uk [NH, N, R]: q_nope -> latent, W_uv^T [NH, R, V]: latent -> value)."""
    m, nh = cfg.mla, cfg.num_heads
    if kv_b.shape != (nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank):
        raise QuantError(f"attn.kv_b.weight has shape {list(kv_b.shape)}, expected "
                         f"{[nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank]}")
    blocks = kv_b.reshape(nh, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    uk = np.ascontiguousarray(blocks[:, :m.qk_nope_head_dim])
    uv = np.ascontiguousarray(blocks[:, m.qk_nope_head_dim:].transpose(0, 2, 1))
    return uk, uv


def _float_weight(b: GraphBuilder, name: str, value: np.ndarray, scheme: Scheme) -> str:
    """A batched weight as fp32, stored fp16 (and cast at load) unless the bundle is fp32."""
    if scheme.precision is Precision.FP32:
        return b.const(name, value)
    return b.op("Cast", [b.const(name, value, np.float16)], f"{name}_f32", to=F32)


def _dim(b: GraphBuilder, t: str, axis: int, name: str) -> str:
    """Dimension `axis` of t as an int64 [1]."""
    shape = b.op("Shape", [t], f"{name}_shape")
    return b.op("Slice", [shape, b.ints(f"{name}.start", [axis]), b.ints(f"{name}.end", [axis + 1])], name)


def _attend(b: GraphBuilder, query: str, key: str, past: str, heads: int, width: int) -> str:
    """query [1,NH,S,W] (scaled), the new rows key [1,S,W] and the cached rows past [1,T,W], all fp32 ->
    sum_t p_t row_t [1,NH,S,W], softmax over the T past rows and, causally, the S new ones."""
    s, t = _dim(b, key, 1, "s_dim"), _dim(b, past, 1, "t_dim")
    past2 = b.op("Reshape", [past, b.ints("past.rows", [-1, width])], "past_rows")  # [T, W]
    q2 = b.op("Reshape", [query, b.ints("query.rows", [-1, width])], "query_rows")  # [NH*S, W]
    # allowzero: a first prefill has T = 0, and a 0 in Reshape's shape would otherwise mean "keep".
    shape_past = b.op("Concat", [b.ints("scores.lead", [1, heads]), s, t], "scores_past_shape", axis=0)
    scores_past = b.op("Reshape", [b.op("Gemm", [q2, past2], "scores_past_rows", transB=1), shape_past],
                       "scores_past", allowzero=1)  # [1, NH, S, T]
    key_t = b.op("Unsqueeze", [b.op("Transpose", [key], "key_t", perm=[0, 2, 1]), b.ints("key_t.axis", [1])],
                 "key_t4")  # [1, 1, W, S]
    ss = b.op("Concat", [s, s], "causal_shape", axis=0)
    minus_inf = b.op("ConstantOfShape", [ss], "minus_inf", value=helper.make_tensor("v", F32, [1], [-np.inf]))
    causal = b.op("Trilu", [minus_inf, b.ints("causal.k", [1])], "causal", upper=1)  # -inf above the diagonal
    scores_new = b.op("Add", [b.op("MatMul", [query, key_t], "scores_new_raw"), causal], "scores_new")
    probs = b.op("Softmax", [b.op("Concat", [scores_past, scores_new], "scores", axis=-1)], "probs", axis=-1)
    p_past, p_new = b.op_multi("Split", [probs, b.op("Concat", [t, s], "probs_split", axis=0)],
                               ["p_past", "p_new"], axis=-1)
    p_rows = b.op("Reshape", [p_past, b.op("Concat", [b.ints("p.lead", [-1]), t], "p_rows_shape", axis=0)],
                  "p_past_rows", allowzero=1)  # [NH*S, T]
    from_past = b.op("Reshape", [b.op("MatMul", [p_rows, past2], "from_past_rows"),
                                 b.ints("from_past.shape", [1, heads, -1, width])], "from_past")
    key4 = b.op("Unsqueeze", [key, b.ints("key4.axis", [1])], "key4")  # [1, 1, S, W]
    return b.op("Add", [from_past, b.op("MatMul", [p_new, key4], "from_new")], "weighted")


def build_latent_attention(cfg: ModelConfig, w: Mapping[str, np.ndarray], scheme: Scheme,
                           kv_cache: str = "fp32") -> onnx.ModelProto:
    """One MLA decoder layer's attention block (module docstring); `kv_cache` as trunk_graphs'."""
    require_fp32(scheme, "attention")
    m, nh, hid = cfg.mla, cfg.num_heads, cfg.hidden_size
    if m is None or m.q_lora_rank is not None:
        raise QuantError("latent attention needs an MLA config with q_lora_rank null")
    r, p, n, v = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
    width = r + p
    b = GraphBuilder("latent_attention")
    x = b.input("x", F32, [1, "S", hid])
    pos = b.input("position_ids", TensorProto.INT64, ["S"])
    past = b.input(PAST_ROWS, KV_ELEM[kv_cache], [1, "T", width])

    normed = b.norm(cfg.norm, x, "attn_norm", w, cfg.norm_eps)
    q_w, kv_a_w = take(w, "attn.q.weight"), take(w, "attn.kv_a.weight")
    if q_w.shape != (nh * m.q_head_dim, hid) or kv_a_w.shape != (width, hid):
        raise QuantError(f"attn.q.weight {list(q_w.shape)} / attn.kv_a.weight {list(kv_a_w.shape)}: expected "
                         f"{[nh * m.q_head_dim, hid]} / {[width, hid]}")
    # q and the latent projection read the same input: one fused MatMul, split after.
    qa = b.linear(normed, "attn.q_kv_a", np.concatenate([q_w, kv_a_w]), None)
    q, c_raw, pe_raw = b.op_multi("Split", [qa, b.ints("attn.qa_split", [nh * m.q_head_dim, r, p])],
                                  ["q", "c_raw", "pe_raw"], axis=-1)
    cos, sin = rotary_tables(b, cfg, pos, p, p)
    c = b.rms_norm(c_raw, "attn.kv_a_norm", take(w, "attn.kv_a_norm.weight"), cfg.norm_eps)
    k_pe = apply_rotary(b, _deinterleave(b, pe_raw, 1, p, "k_pe"), 1, p, p, cos, sin, "k_pe")
    key = b.op("Concat", [c, k_pe], "latent_key", axis=-1)  # [1, S, R+P]: the new cache rows
    if kv_cache == "fp16":  # attend with the rows as the cache holds them (module docstring)
        new_rows = b.op("Cast", [key], NEW_ROWS, to=TensorProto.FLOAT16)
        key = b.op("Cast", [new_rows], "latent_key_cached", to=F32)
        past = b.op("Cast", [past], "past_latent_f32", to=F32)
    else:
        new_rows = b.op("Identity", [key], NEW_ROWS)

    q4 = b.op("Reshape", [q, b.ints("q.heads", [0, 0, nh, m.q_head_dim])], "q_heads")
    q_nope, q_pe = b.op_multi("Split", [q4, b.ints("q.split", [n, p])], ["q_nope", "q_pe"], axis=-1)
    q_pe = b.op("Reshape", [q_pe, b.ints("q_pe.flat", [0, 0, nh * p])], "q_pe_flat")
    q_pe = apply_rotary(b, _deinterleave(b, q_pe, nh, p, "q_pe"), nh, p, p, cos, sin, "q_pe")
    q_pe = b.op("Reshape", [q_pe, b.ints("q_pe.heads", [0, 0, nh, p])], "q_pe_heads")
    uk, uv = _absorbed_blocks(cfg, take(w, "attn.kv_b.weight"))
    by_head = [0, 2, 1, 3]  # [1, S, NH, d] <-> [1, NH, S, d]
    q_lat = b.op("MatMul", [b.op("Transpose", [q_nope], "q_nope_by_head", perm=by_head),
                            _float_weight(b, ABSORBED[0], uk, scheme)], "q_latent")  # [1, NH, S, R]
    query = b.op("Concat", [q_lat, b.op("Transpose", [q_pe], "q_pe_by_head", perm=by_head)], "query", axis=-1)
    query = b.op("Mul", [query, b.const("attn.scale", 1.0 / math.sqrt(m.q_head_dim))], "query_scaled")

    weighted = _attend(b, query, key, past, nh, width)  # [1, NH, S, R+P]; its k_pe part is unused
    latent = b.op("Slice", [weighted, b.ints("latent.start", [0]), b.ints("latent.end", [r]),
                            b.ints("latent.axis", [-1])], "weighted_latent")
    values = b.op("MatMul", [latent, _float_weight(b, ABSORBED[1], uv, scheme)], "values_by_head")  # [1,NH,S,V]
    values = b.op("Transpose", [values], "values_heads", perm=by_head)
    values = b.op("Reshape", [values, b.ints("values.flat", [0, 0, nh * v])], "attn_values")
    o = b.linear(values, "attn.o", take(w, "attn.o.weight"), None)
    h = b.op("Add", [x, o], "h")
    b.norm(cfg.norm, h, "mlp_norm", w, cfg.norm_eps, out="m")
    for name in ("h", "m"):
        b.output(name, F32, [1, "S", hid])
    b.output(NEW_ROWS, KV_ELEM[kv_cache], [1, "S", width])
    return lower_checked(b, scheme, expected=2, float_ok=ABSORBED)
