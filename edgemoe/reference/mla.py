"""Multi-head latent attention (DeepSeek-V2 / DeepSeek-VL2-Small), with the compressed latent as the cache.

Contract: `LatentAttention(cfg)(x, positions, past_c, past_pe)` has `layers.Attention`'s signature,
so a decoder layer and `KVCache` take either; what it caches per position is the normalised latent
c (kv_lora_rank values) and the rotated shared rope key k_pe (qk_rope_head_dim values), stored in the
cache's key and value slots as [B, 1, T, R] and [B, 1, T, P]: 576 values per position for Small,
instead of 16 x (192 + 128) expanded. The math is DeepSeek's (`DeepseekV2Attention`):

    q            = q_proj(x)                         -> per head [nope | rope]
    c, k_pe      = kv_a_proj_with_mqa(x) split        c = RMSNorm(c)   (kv_a_layernorm)
    rope         on q_rope and k_pe after DeepSeek's de-interleave (pairs (2i, 2i+1) -> halves)
    k_nope, v    = kv_b_proj(c) per head              k = [k_nope | k_pe (shared by all heads)]
    out          = o_proj(softmax(q.k * q_head_dim^-0.5, causal) @ v)

computed in the expanded form (as transformers' DeepseekV2Attention, the independent reference).
Attribute names are the canonical leaves: q, kv_a, kv_a_norm, kv_b, o.

Shape legend: B batch, L new tokens, T cached, S = T + L, NH heads, R kv_lora_rank, P rope dims,
N nope dims, V value dims, H hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from edgemoe.model.config import ModelConfig
from edgemoe.reference.layers import Norm, apply_rotary, causal_attention, rotary_cos_sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., P] with rotary pairs (2i, 2i+1) -> the NeoX half-split layout DeepSeek's rotate_half expects."""
    *lead, p = x.shape
    return x.view(*lead, p // 2, 2).transpose(-1, -2).reshape(*lead, p)


class LatentAttention(nn.Module):
    """MLA with q_lora_rank null (q_proj straight from x), caching (c, k_pe)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.mla
        if m is None or m.q_lora_rank is not None:
            raise ValueError("LatentAttention needs an MLA config with q_lora_rank null")
        h, nh = cfg.hidden_size, cfg.num_heads
        self.num_heads, self.m, self.theta = nh, m, cfg.rope_theta
        self.q = nn.Linear(h, nh * m.q_head_dim, bias=False)
        self.kv_a = nn.Linear(h, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_norm = Norm("rmsnorm", m.kv_lora_rank, cfg.norm_eps)
        self.kv_b = nn.Linear(m.kv_lora_rank, nh * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o = nn.Linear(nh * m.v_head_dim, h, bias=False)

    def latent(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, H] -> (c [B, 1, L, R] normalised, k_pe [B, 1, L, P] rotated): what the cache stores."""
        m = self.m
        kv = self.kv_a(x)  # [B, L, R + P]
        c = self.kv_a_norm(kv[..., :m.kv_lora_rank])[:, None]  # [B, 1, L, R]
        cos, sin = rotary_cos_sin(position_ids, m.qk_rope_head_dim, self.theta)
        k_pe = apply_rotary(deinterleave(kv[..., m.kv_lora_rank:])[:, None], cos, sin, in_fp32=False)
        return c, k_pe

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, past_c: torch.Tensor | None = None,
                past_pe: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, H] -> (out [B, L, H], c [B, 1, L, R], k_pe [B, 1, L, P]) for this call's tokens."""
        b, n, _ = x.shape
        m, nh = self.m, self.num_heads
        q = self.q(x).view(b, n, nh, m.q_head_dim).transpose(1, 2)  # [B, NH, L, N + P]
        cos, sin = rotary_cos_sin(position_ids, m.qk_rope_head_dim, self.theta)
        q_pe = apply_rotary(deinterleave(q[..., m.qk_nope_head_dim:]), cos, sin, in_fp32=False)
        q = torch.cat((q[..., :m.qk_nope_head_dim], q_pe), dim=-1)
        c, k_pe = self.latent(x, position_ids)
        all_c = c if past_c is None else torch.cat((past_c, c), dim=2)  # [B, 1, S, R]
        all_pe = k_pe if past_pe is None else torch.cat((past_pe, k_pe), dim=2)  # [B, 1, S, P]
        s = all_c.shape[2]
        kv = self.kv_b(all_c[:, 0]).view(b, s, nh, m.qk_nope_head_dim + m.v_head_dim).transpose(1, 2)
        k = torch.cat((kv[..., :m.qk_nope_head_dim], all_pe.expand(b, nh, s, m.qk_rope_head_dim)), dim=-1)
        v = kv[..., m.qk_nope_head_dim:]  # [B, NH, S, V]
        out = causal_attention(q, k, v, scores_fp32=False)  # scale q_head_dim^-0.5 from q's width
        return self.o(out.transpose(1, 2).reshape(b, n, nh * m.v_head_dim)), c, k_pe
