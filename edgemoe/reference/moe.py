"""A MoE layer: router -> gating -> dispatch -> experts -> combine (+ always-on shared experts).

`gate(logits, rule, bias)` implements every `RoutingRule` (edgemoe.model.routing_rule); the rest of
this docstring describes MoE-LLaVA's rule, `top_k_gating`.

Contract: `top_k_gating(logits, k)` is the routing rule every implementation (reference, exported
graphs, runtime) must reproduce, and `MoELayer.route(x)` returns it as a `Routing` (expert indices
and combine weights per token) so they can be compared. The rule is DeepSpeed's TopKGate at
inference, made deterministic:

- the router (`wg`, no bias) runs in fp32 on the input cast to fp32, as upstream does;
- softmax over all experts; experts chosen one at a time by highest probability, a tie going to the
  lower expert index (torch.argmax and ONNX ArgMax both return the first maximum);
- for k >= 2 the chosen probabilities are renormalised to sum to 1 (denominator clamped at fp32 eps,
  as DeepSpeed); for k = 1 the probability itself is the weight (DeepSpeed's top1gating);
- no token is dropped (upstream's eval capacity is S tokens per expert for 4 experts, top-2).

Upstream draws the second expert as argmax(logits + Gumbel noise), even at inference. A seeded
`torch.Generator` on the layer reproduces that mode for parity studies; it is off by default.
Experts are ordinary `MLP` modules in `experts`, each callable (and exportable) on its own.

Shape legend: N tokens (batch and sequence flattened), H hidden, E experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgemoe.model.config import ModelConfig
from edgemoe.model.routing_rule import RoutingRule, deepspeed_top_k
from edgemoe.reference.layers import MLP


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to and with what weight."""

    experts: torch.Tensor  # [N, K] int64, in choice order (best first)
    weights: torch.Tensor  # [N, K] fp32 combine weights
    probs: torch.Tensor  # [N, E] fp32 softmax over all experts

    def tokens_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices, their slot in `experts`) of the tokens routed to `expert`."""
        token, slot = (self.experts == expert).nonzero(as_tuple=True)
        return token, slot


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, H] x [E, H] -> [N, E] in fp32 (upstream casts both the router and its input to fp32)."""
    return F.linear(x.float(), weight.float())


def gumbel_noise(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel samples, -log(-log(U)), from a seeded generator."""
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=generator.device)
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - torch.finfo(torch.float32).eps)))


def _first_max_top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """[N, E] -> [N, K] indices, best first, ties to the lower index (torch.topk leaves ties unordered)."""
    taken = torch.zeros_like(score, dtype=torch.bool)
    chosen = []
    for _ in range(k):
        pick = score.masked_fill(taken, float("-inf")).argmax(dim=-1)  # [N], first maximum on ties
        taken = taken | F.one_hot(pick, score.shape[-1]).bool()
        chosen.append(pick)
    return torch.stack(chosen, dim=-1)


def gate(logits: torch.Tensor, rule: RoutingRule, bias: torch.Tensor | None = None) -> Routing:
    """Router logits [N, E] -> Routing under `rule` (edgemoe.model.routing_rule), in fp32."""
    logits = logits.float()
    rule.check_experts(logits.shape[-1])
    probs = torch.softmax(logits, dim=-1) if rule.scoring == "softmax" else torch.sigmoid(logits)  # [N, E]
    choice = probs + bias.float() if (bias is not None and rule.uses_bias) else probs
    if rule.grouped:
        n, e = choice.shape
        groups = choice.view(n, rule.n_group, e // rule.n_group)  # [N, G, E/G]
        if rule.method == "noaux_tc":
            group_score = groups.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        else:
            group_score = groups.max(dim=-1).values
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, _first_max_top_k(group_score, rule.topk_group), True)
        keep = keep.repeat_interleave(e // rule.n_group, dim=1)  # [N, E]
        choice = choice.masked_fill(~keep, 0.0)
    experts = _first_max_top_k(choice, rule.top_k)  # [N, K]
    weights = probs.gather(-1, experts)  # [N, K]
    if rule.renormalises():
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total.clamp(min=torch.finfo(torch.float32).eps) if rule.renorm == "clamp_eps"
                             else total + 1e-20)
    return Routing(experts, weights * rule.routed_scaling_factor, probs)


def top_k_gating(logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> Routing:
    """MoE-LLaVA's routing rule (module docstring). logits [N, E] fp32 -> Routing.

    With `generator`, experts after the first are chosen by argmax(logits + Gumbel noise) over the
    experts not yet chosen, as upstream's DeepSpeed does; the weights are still the renormalised
    softmax probabilities of the chosen experts.
    """
    logits = logits.float()
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"cannot choose {k} of {num_experts} experts")
    if generator is None:
        return gate(logits, deepspeed_top_k(k))
    probs = torch.softmax(logits, dim=-1)  # [N, E]
    noisy = logits + gumbel_noise(logits.shape, generator)
    taken = torch.zeros_like(probs, dtype=torch.bool)
    chosen = []
    for i in range(k):
        score = probs if i == 0 else noisy
        pick = score.masked_fill(taken, float("-inf")).argmax(dim=-1)  # [N], first maximum on ties
        taken = taken | F.one_hot(pick, num_experts).bool()
        chosen.append(pick)
    experts = torch.stack(chosen, dim=-1)  # [N, K]
    weights = probs.gather(-1, experts)  # [N, K]
    if k > 1:
        denom = weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
        weights = weights / denom
    return Routing(experts, weights, probs)


class Router(nn.Module):
    """Router weight [E, H] (no bias in the logits) and, for noaux_tc, the choice-only correction bias [E]."""

    def __init__(self, hidden: int, num_experts: int, correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init: a fresh layer routes somewhere
        self.bias = nn.Parameter(torch.zeros(num_experts)) if correction_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, E] fp32
        return router_logits(x, self.weight)


class MoELayer(nn.Module):
    """Router `router` [E, H], experts `experts.K` and, where the family has them, always-on `shared`
    experts (one fused MLP); y = sum over chosen experts of w_e * expert_e(x) (+ shared(x))."""

    def __init__(self, cfg: ModelConfig, num_experts: int) -> None:
        super().__init__()
        self.rule = cfg.moe.routing
        self.top_k = self.rule.top_k
        self.router = Router(cfg.hidden_size, num_experts, self.rule.uses_bias)
        width = cfg.expert_intermediate_size
        self.experts = nn.ModuleList(MLP(cfg.mlp_act, cfg.hidden_size, width, cfg.mlp_bias) for _ in range(num_experts))
        shared = cfg.moe.shared_intermediate
        self.shared = MLP(cfg.mlp_act, cfg.hidden_size, shared, cfg.mlp_bias) if shared else None
        # Set to a seeded generator for upstream's Gumbel second-expert mode; None = deterministic.
        self.generator: torch.Generator | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, x: torch.Tensor) -> Routing:
        """x [..., H] -> Routing over its tokens, flattened in row-major order."""
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        if self.generator is not None:  # MoE-LLaVA's upstream mode, for parity studies only
            return top_k_gating(logits, self.top_k, self.generator)
        return gate(logits, self.rule, self.router.bias)

    def forward_routed(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x [..., H] -> (y [..., H], the Routing used)."""
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        routing = self.route(flat)
        # DeepSpeed combines with weights cast to the activation dtype, accumulating in fp32.
        weights = routing.weights.to(x.dtype).float()
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)  # [N, H]
        for e, expert in enumerate(self.experts):
            token, slot = routing.tokens_of(e)
            if token.numel() == 0:
                continue
            y = expert(flat[token]).float()  # [n_e, H]
            out.index_add_(0, token, y * weights[token, slot, None])
        if self.shared is not None:
            out = out + self.shared(flat).float()
        return out.to(x.dtype).reshape(x.shape), routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x)[0]
