"""Decoder building blocks: norms, rotary embedding, attention with an explicit KV cache, MLPs.

Contract: every module's attribute names are the leaves of the canonical tensor names
(`edgemoe.model.names`), so a canonical state dict loads without renaming. Activations come in and
go out in the model dtype; where upstream computes in fp32 inside a half-precision model, so do
these modules: norm statistics, the attention softmax, Phi-2's q.k scores (its modeling_phi upcasts
q and k, "to avoid overflow"), and Qwen's rotary (its apply_rotary_pos_emb works on `t.float()`).
In fp32 all of that is a no-op. Attention is stateless: past keys/values come in, this call's
keys/values go out, and the caller owns the cache (so an exported graph can update one in place).

Shape legend: B batch, L new tokens, T cached tokens, S = T + L, H hidden, NH query heads,
KV key/value heads, D head dim, R rotary dims (<= D, even), F MLP width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgemoe.model.config import ModelConfig


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, written as transformers' NewGELUActivation (Phi-2's `gelu_new`)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
}


class Norm(nn.Module):
    """LayerNorm (weight + bias) or Qwen's RMSNorm (weight only), statistics in fp32."""

    def __init__(self, kind: str, dim: int, eps: float) -> None:
        super().__init__()
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown norm {kind!r}")
        self.kind, self.dim, self.eps = kind, dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        if self.kind == "layernorm":
            return F.layer_norm(x.float(), (self.dim,), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        # Qwen v1 order: normalise in fp32, cast back, then scale by the weight in the model dtype.
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, L, R] in fp32 for positions [B, L] (NeoX layout: frequencies repeated twice)."""
    # The same expression as upstream's and transformers' inv_freq, so the angles agree bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [B, L, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, R]
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_fp32: bool) -> torch.Tensor:
    """NeoX half-split rotary on the first R dims of each head; the rest passes through. [B, N, L, D]."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    if in_fp32:
        rot = rot.float()
    else:  # upstream StableLM/Phi cast their cos/sin cache to the activation dtype
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = r // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rot = rot * cos + rotated * sin
    return torch.cat((rot.to(x.dtype), rest), dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores_fp32: bool) -> torch.Tensor:
    """Softmax attention of L queries over S = T + L keys, query i seeing keys 0..T+i.

    q [B, NH, L, D], k/v [B, KV, S, D] -> [B, NH, L, D]. KV heads are shared by NH/KV query heads (GQA).
    """
    nh, kvh, length, total = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if nh != kvh:
        k = k.repeat_interleave(nh // kvh, dim=1)
        v = v.repeat_interleave(nh // kvh, dim=1)
    if scores_fp32:
        q, k = q.float(), k.float()
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])  # [B, NH, L, S]
    past = total - length
    key_pos = torch.arange(total, device=q.device)
    query_pos = past + torch.arange(length, device=q.device)
    scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    """Multi-head (GQA-ready) causal self-attention with partial NeoX rotary and optional biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"{cfg.num_heads} heads cannot share {cfg.num_kv_heads} key/value heads")
        self.rotary_dim, self.theta = cfg.rotary_dim, cfg.rope_theta
        self.q = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        self.scores_fp32 = cfg.attn_scores_fp32
        self.rotary_fp32 = cfg.rotary_fp32

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, past_k: torch.Tensor | None = None,
                past_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, H], positions [B, L], past [B, KV, T, D] -> (out [B, L, H], k [B, KV, L, D], v [B, KV, L, D]).

        The returned k/v are this call's only (k after rotary): append them to the cache.
        """
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, NH, L, D]
        k = self.k(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, L, D]
        v = self.v(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(position_ids, self.rotary_dim, self.theta)
        q = apply_rotary(q, cos, sin, self.rotary_fp32)
        k = apply_rotary(k, cos, sin, self.rotary_fp32)
        keys = k if past_k is None else torch.cat((past_k, k), dim=2)  # [B, KV, S, D]
        values = v if past_v is None else torch.cat((past_v, v), dim=2)
        out = causal_attention(q, keys, values, self.scores_fp32)  # [B, NH, L, D]
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.o(out), k, v


class MLP(nn.Module):
    """One dense MLP or one expert: `silu_glu` down(silu(gate x) * up x), `gelu_new` down(gelu_new(up x))."""

    def __init__(self, act: str, hidden: int, ffn: int, bias: bool) -> None:
        super().__init__()
        if act not in ("silu_glu", "gelu_new"):
            raise ValueError(f"unknown MLP activation {act!r}")
        self.act = act
        if act == "silu_glu":
            self.gate = nn.Linear(hidden, ffn, bias=bias)
        self.up = nn.Linear(hidden, ffn, bias=bias)
        self.down = nn.Linear(ffn, hidden, bias=bias)

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "MLP":
        return cls(cfg.mlp_act, cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        if self.act == "silu_glu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(gelu_new(self.up(x)))
