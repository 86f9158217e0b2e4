"""One decoder block, split where an exporter cuts it: attention block, then the MLP or MoE layer.

Contract: every family's block is `y = h + ffn(m)` after an attention block that returns the
residual stream `h` and the MLP's input `m`:

    sequential (StableLM, Qwen):  h = x + attn(attn_norm x)          m = mlp_norm h
    parallel (Phi-2):             n = attn_norm x;  h = x + attn(n)   m = n

so `attention_block` (norms + attention + residual, with its KV) and `ffn` (a dense MLP, or router
plus experts on MoE layers) can be exported and run separately and recombined by the runtime with
one addition; `AttentionStage` and `RouterStage` wrap those pieces with fixed signatures for
tracing. A layer is MoE exactly when `config.moe.is_moe(index)`; its router and experts live in
`moe` (canonical `layers.N.router` / `layers.N.experts.K`), a dense layer's MLP in `mlp`.

Shape legend: B batch, L new tokens, T cached tokens, H hidden, KV key/value heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from edgemoe.model.config import ModelConfig
from edgemoe.reference.layers import MLP, Attention, Norm
from edgemoe.reference.mla import LatentAttention
from edgemoe.reference.moe import MoELayer, Routing


class DecoderLayer(nn.Module):
    """Decoder block `index` of a model."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.parallel = cfg.parallel_block
        self.attn_norm = Norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.attn = LatentAttention(cfg) if cfg.mla is not None else Attention(cfg)
        self.mlp_norm = None if cfg.parallel_block else Norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        if cfg.moe.is_moe(index):
            self.moe, self.mlp = MoELayer(cfg, cfg.moe.experts_in(index)), None
        else:
            self.moe, self.mlp = None, MLP.for_config(cfg)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def attention_block(self, x: torch.Tensor, position_ids: torch.Tensor, past_k: torch.Tensor | None = None,
                        past_v: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, H] -> (h [B, L, H], mlp input m [B, L, H], new k [B, KV, L, D], new v)."""
        n = self.attn_norm(x)
        a, k, v = self.attn(n, position_ids, past_k, past_v)
        h = x + a
        m = n if self.parallel else self.mlp_norm(h)
        return h, m, k, v

    def ffn(self, m: torch.Tensor, routing: dict[int, Routing] | None = None) -> torch.Tensor:
        """The dense MLP or the MoE layer on m [B, L, H]; records this layer's Routing in `routing`."""
        if self.moe is None:
            return self.mlp(m)
        y, r = self.moe.forward_routed(m)
        if routing is not None:
            routing[self.index] = r
        return y

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, past_k: torch.Tensor | None = None,
                past_v: torch.Tensor | None = None, routing: dict[int, Routing] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, H] -> (y [B, L, H], new k [B, KV, L, D], new v [B, KV, L, D])."""
        h, m, k, v = self.attention_block(x, position_ids, past_k, past_v)
        return h + self.ffn(m, routing), k, v


class AttentionStage(nn.Module):
    """A layer's `attention_block` as a module with a fixed signature, for `torch.onnx.export`.

    x [B, L, H], positions [B, L], past k/v [B, KV, T, D] -> (h, m, new k, new v). Shares the weights.
    """

    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__()
        self.layer = layer
        self.eval()  # exporters warn about (and may trace) training mode otherwise

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.layer.attention_block(x, position_ids, past_k, past_v)


class RouterStage(nn.Module):
    """A MoE layer's routing as a module: m [N, H] -> (experts [N, K] int64, weights [N, K] fp32).

    Deterministic mode only; no data-dependent shapes, so it traces. Experts export on their own
    (`layer.moe.experts[k]`), and the runtime combines y = h + sum_k weights[:, k] * expert(m).
    """

    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__()
        if layer.moe is None:
            raise ValueError(f"layer {layer.index} is dense: it has no router")
        self.layer = layer
        self.eval()

    def forward(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routing = self.layer.moe.route(m)
        return routing.experts, routing.weights
