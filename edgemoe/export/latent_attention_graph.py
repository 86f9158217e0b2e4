"""Multi-head latent attention (DeepSeek-V2 / DeepSeek-VL2-Small) as one graph over a latent KV cache.

Contract: `build_latent_attention(cfg, w, scheme)` has the attention graph's interface (trunk_graphs):

  x [1,S,H], position_ids int64 [S], past_key/past_value [1,1,MAX,R+P], seqlens_k int32 [1],
  total_len int32 [] -> h [1,S,H], m [1,S,H], present_key/present_value [1,1,MAX,R+P]

What it caches per position is the normalised latent c (R = kv_lora_rank values) followed by the
rotated shared rope key k_pe (P values): 576 values per layer for Small instead of the expanded
16 x (192 + 128). It computes in the absorbed form, for prefill and decode alike:

    score_h = q_nope_h . (W_uk_h c) + q_pe_h . k_pe = [W_uk_h^T q_nope_h | q_pe_h] . [c | k_pe]
    out_h   = W_uv_h (sum_t p_t c_t)

so every head attends over the one cached [c | k_pe] row (ORT's GroupQueryAttention with one KV head
of width R+P, scale q_head_dim^-0.5) and nothing is ever expanded from the cache: a decoded token reads
576 values per position, not the 16 x 256 an expanded k/v would need, and kv_b's per-head blocks are
applied to the query (W_uk) and the attention output (W_uv) instead. The value input IS the key
input, so the runtime binds one buffer to all four cache names (KVLayout.shared): GroupQueryAttention
writes the same new rows twice into the same memory, and the cache costs R+P values a position. The
last P outputs of each head (the attention-weighted k_pe) are not used.

W_uk_h and W_uv_h are per-head [128, 512] blocks of kv_b: each is its own MatMul (2 x heads small
MatMuls, quantized like every other weight), since a batched weight would stay in fp32.
Rotary is DeepSeek's: the rope dims' interleaved pairs (2i, 2i+1) are first de-interleaved into
halves (reference mla.deinterleave), then rotated NeoX-style over all P dims.

Shape legend: S new tokens, H hidden, NH heads, R kv_lora_rank, P rope dims, N nope dims, V value dims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto

from edgemoe.export.onnx_ops import GraphBuilder, lower_checked, require_fp32, take
from edgemoe.export.trunk_graphs import KV_ELEM, apply_rotary, group_query_attention, rotary_tables
from edgemoe.model.config import ModelConfig
from edgemoe.quant.schemes import QuantError, Scheme

F32 = TensorProto.FLOAT


def _deinterleave(b: GraphBuilder, t: str, heads: int, p: int, name: str) -> str:
    """[1, S, heads*P] with rotary pairs (2i, 2i+1) -> the half-split layout, per head."""
    t = b.op("Reshape", [t, b.ints(f"{name}.pairs", [0, 0, heads, p // 2, 2])], f"{name}_pairs")
    t = b.op("Transpose", [t], f"{name}_halves", perm=[0, 1, 2, 4, 3])
    return b.op("Reshape", [t, b.ints(f"{name}.flat", [0, 0, heads * p])], f"{name}_deint")


def _per_head(b: GraphBuilder, t: str, heads: int, weights: list[np.ndarray], name: str) -> str:
    """t [1, S, heads, K] -> [1, S, heads, N]: head i through its own linear (torch layout [N, K])."""
    parts = b.op_multi("Split", [t, b.ints(f"{name}.split", [1] * heads)],
                       [f"{name}_in{i}" for i in range(heads)], axis=2)
    outs = [b.linear(part, f"{name}.{i}", w, None) for i, (part, w) in enumerate(zip(parts, weights))]
    return b.op("Concat", outs, f"{name}_heads", axis=2)


def _kv_b_blocks(cfg: ModelConfig, kv_b: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """kv_b [NH*(N+V), R] -> per head (W_uk_h^T [R, N], W_uv_h [V, R]) in linear's [out, in] layout."""
    m, nh = cfg.mla, cfg.num_heads
    if kv_b.shape != (nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank):
        raise QuantError(f"attn.kv_b.weight has shape {list(kv_b.shape)}, expected "
                         f"{[nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank]}")
    blocks = kv_b.reshape(nh, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    uk = [np.ascontiguousarray(blocks[h, :m.qk_nope_head_dim].T) for h in range(nh)]  # q_nope -> latent
    uv = [np.ascontiguousarray(blocks[h, m.qk_nope_head_dim:]) for h in range(nh)]  # latent -> value
    return uk, uv


def build_latent_attention(cfg: ModelConfig, w: Mapping[str, np.ndarray], scheme: Scheme,
                           max_positions: int | None = None, kv_cache: str = "fp32") -> onnx.ModelProto:
    """One MLA decoder layer's attention block (module docstring); `kv_cache` as trunk_graphs'."""
    require_fp32(scheme, "attention")
    m, nh, hid = cfg.mla, cfg.num_heads, cfg.hidden_size
    if m is None or m.q_lora_rank is not None:
        raise QuantError("latent attention needs an MLA config with q_lora_rank null")
    r, p, n, v = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
    width = r + p
    b = GraphBuilder("latent_attention")
    cache = [1, 1, max_positions or "MAX", width]
    x = b.input("x", F32, [1, "S", hid])
    pos = b.input("position_ids", TensorProto.INT64, ["S"])
    past_k, past_v = b.input("past_key", KV_ELEM[kv_cache], cache), b.input("past_value", KV_ELEM[kv_cache], cache)
    seqlens_k, total = b.input("seqlens_k", TensorProto.INT32, [1]), b.input("total_len", TensorProto.INT32, [])

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
    key = b.op("Concat", [c, k_pe], "latent_key", axis=-1)  # [1, S, R+P]: what the cache stores

    q4 = b.op("Reshape", [q, b.ints("q.heads", [0, 0, nh, m.q_head_dim])], "q_heads")
    q_nope, q_pe = b.op_multi("Split", [q4, b.ints("q.split", [n, p])], ["q_nope", "q_pe"], axis=-1)
    q_pe = b.op("Reshape", [q_pe, b.ints("q_pe.flat", [0, 0, nh * p])], "q_pe_flat")
    q_pe = apply_rotary(b, _deinterleave(b, q_pe, nh, p, "q_pe"), nh, p, p, cos, sin, "q_pe")
    q_pe = b.op("Reshape", [q_pe, b.ints("q_pe.heads", [0, 0, nh, p])], "q_pe_heads")
    uk, uv = _kv_b_blocks(cfg, take(w, "attn.kv_b.weight"))
    q_lat = _per_head(b, q_nope, nh, uk, "attn.uk")  # [1, S, NH, R]
    query = b.op("Concat", [q_lat, q_pe], "latent_query4", axis=-1)
    query = b.op("Reshape", [query, b.ints("query.flat", [0, 0, nh * width])], "latent_query")

    attn = group_query_attention(b, query, key, key, (past_k, past_v), (seqlens_k, total), kv_cache, nh * width,
                                 num_heads=nh, kv_num_heads=1, scale=1.0 / math.sqrt(m.q_head_dim), do_rotary=0)
    attn4 = b.op("Reshape", [attn, b.ints("attn.heads", [0, 0, nh, width])], "attn_heads")
    lat = b.op("Slice", [attn4, b.ints("attn.lat_start", [0]), b.ints("attn.lat_end", [r]),
                         b.ints("attn.lat_axis", [-1])], "attn_latent")  # [1, S, NH, R]
    values = _per_head(b, lat, nh, uv, "attn.uv")  # [1, S, NH, V]
    values = b.op("Reshape", [values, b.ints("values.flat", [0, 0, nh * v])], "attn_values")
    o = b.linear(values, "attn.o", take(w, "attn.o.weight"), None)
    h = b.op("Add", [x, o], "h")
    b.norm(cfg.norm, h, "mlp_norm", w, cfg.norm_eps, out="m")
    for name, shape in (("h", [1, "S", hid]), ("m", [1, "S", hid])):
        b.output(name, F32, shape)
    for name in ("present_key", "present_value"):
        b.output(name, KV_ELEM[kv_cache], cache)
    return lower_checked(b, scheme, expected=2 + 2 * nh)
