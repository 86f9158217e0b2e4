"""How a MoE layer turns router logits into experts and combine weights: one description for every family.

Contract: a `RoutingRule` is pure data (a frozen dataclass stored in the bundle manifest); the torch
reference (`edgemoe.reference.moe`) and the host router (`edgemoe.runtime.routing`) both implement
exactly this rule, and tests check both against transformers' own DeepSeek-V2/V3 gate code.

    scores  = softmax(logits) | sigmoid(logits)                                    (`scoring`, fp32)
    choice  = scores (+ e_score_correction_bias for noaux_tc)
    greedy:               top_k of choice
    group_limited_greedy: experts split into n_group groups; keep the topk_group groups with the
                          highest max(choice); top_k over the kept experts (others scored 0)
    noaux_tc:             as above with a group's score = sum of its top-2 choices
    weights = scores[chosen]  (never the bias-corrected values)
    renorm  = "none" | "clamp_eps" (DeepSpeed: w / max(sum w, eps), only for top_k >= 2)
              | "plus_tiny" (DeepSeek: w / (sum w + 1e-20), when norm_topk_prob)
    weights *= routed_scaling_factor

Ties go to the lower expert index everywhere (torch.argmax and np.argmax return the first maximum).
`select(logits, rule, bias)` is the rule in fp32 numpy (the host router and the offload predictor use
it); `edgemoe.reference.moe.gate` is the same rule in torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgemoe.errors import EdgeMoEError

SCORINGS = ("softmax", "sigmoid")
METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
RENORMS = ("none", "clamp_eps", "plus_tiny")


@dataclass(frozen=True)
class RoutingRule:
    """One MoE routing rule (module docstring)."""

    top_k: int
    scoring: str = "softmax"
    method: str = "greedy"
    renorm: str = "clamp_eps"
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self) -> None:
        for what, value, allowed in (("scoring", self.scoring, SCORINGS), ("topk_method", self.method, METHODS),
                                     ("renorm", self.renorm, RENORMS)):
            if value not in allowed:
                raise ValueError(f"unknown routing {what} {value!r}; expected one of {', '.join(allowed)}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.method != "greedy" and not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group {self.topk_group} must be in 1..n_group {self.n_group}")

    @property
    def grouped(self) -> bool:
        return self.method != "greedy"

    @property
    def uses_bias(self) -> bool:
        """noaux_tc reads a per-expert `e_score_correction_bias` next to the router weight."""
        return self.method == "noaux_tc"

    def renormalises(self) -> bool:
        return self.renorm == "plus_tiny" or (self.renorm == "clamp_eps" and self.top_k > 1)

    def check_experts(self, num_experts: int) -> None:
        """Raise ValueError unless this rule can route over `num_experts` experts."""
        if self.top_k > num_experts:
            raise ValueError(f"cannot choose {self.top_k} of {num_experts} experts")
        if self.grouped and num_experts % self.n_group:
            raise ValueError(f"{num_experts} experts do not split into n_group={self.n_group} groups")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RoutingRule":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def deepspeed_top_k(top_k: int) -> RoutingRule:
    """MoE-LLaVA's rule: DeepSpeed's TopKGate at inference, deterministic (softmax, renormalised top-k)."""
    return RoutingRule(top_k=top_k, scoring="softmax", method="greedy", renorm="clamp_eps")


# ---- the rule in numpy -----------------------------------------------------------------------------

_EPS = np.finfo(np.float32).eps


@dataclass(frozen=True)
class Routing:
    """Each token's experts (best first) and combine weights."""

    experts: np.ndarray  # [N, K] int64
    weights: np.ndarray  # [N, K] float32, rows sum to 1 for K >= 2
    probs: np.ndarray  # [N, E] float32

    def needed(self) -> tuple[int, ...]:
        """The experts any token uses, ascending."""
        return tuple(int(e) for e in np.unique(self.experts))

    def tokens_of(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices ascending, their slot in `experts`) of the tokens routed to `expert`."""
        token, slot = np.nonzero(self.experts == expert)
        return token, slot


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in fp32, max-subtracted as torch does."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return e / e.sum(axis=-1, keepdims=True, dtype=np.float32)


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """[N, E] -> [N, K]: the k highest-scoring experts per row, best first, ties to the lower index."""
    n, num_experts = probs.shape
    if not 1 <= k <= num_experts:
        raise EdgeMoEError(f"cannot choose {k} of {num_experts} experts")
    score = probs.astype(np.float32, copy=True)
    chosen = np.empty((n, k), dtype=np.int64)
    rows = np.arange(n)
    for i in range(k):
        chosen[:, i] = np.argmax(score, axis=-1)
        score[rows, chosen[:, i]] = -np.inf
    return chosen


def _scores(logits: np.ndarray, scoring: str) -> np.ndarray:
    if scoring == "softmax":
        return softmax(logits)
    return (1.0 / (1.0 + np.exp(-logits, dtype=np.float32))).astype(np.float32)


def _group_mask(choice: np.ndarray, rule: RoutingRule) -> np.ndarray:
    """[N, E] bool: experts in the topk_group best groups (group score: max, or top-2 sum for noaux_tc)."""
    n, num_experts = choice.shape
    groups = choice.reshape(n, rule.n_group, num_experts // rule.n_group)  # [N, G, E/G]
    if rule.method == "noaux_tc":
        group_score = -np.sort(-groups, axis=-1)[..., :2].sum(axis=-1, dtype=np.float32)  # [N, G]
    else:
        group_score = groups.max(axis=-1)
    keep = np.zeros((n, rule.n_group), dtype=bool)
    np.put_along_axis(keep, top_k(group_score, rule.topk_group), True, axis=-1)
    return np.repeat(keep, num_experts // rule.n_group, axis=-1)


def select(logits: np.ndarray, rule: RoutingRule, bias: np.ndarray | None = None) -> Routing:
    """Router logits [N, E] fp32 -> Routing under `rule` (see edgemoe.model.routing_rule)."""
    logits = np.asarray(logits, np.float32)
    try:
        rule.check_experts(logits.shape[-1])
    except ValueError as exc:
        raise EdgeMoEError(str(exc)) from None
    probs = _scores(logits, rule.scoring)
    choice = probs if bias is None or not rule.uses_bias else probs + np.asarray(bias, np.float32)
    if rule.grouped:
        choice = np.where(_group_mask(choice, rule), choice, np.float32(0.0))
    experts = top_k(choice, rule.top_k)
    weights = np.take_along_axis(probs, experts, axis=-1)  # [N, K]
    if rule.renormalises():
        total = weights.sum(axis=-1, keepdims=True, dtype=np.float32)
        weights = weights / (np.maximum(total, _EPS) if rule.renorm == "clamp_eps" else total + np.float32(1e-20))
    if rule.routed_scaling_factor != 1.0:
        weights = weights * np.float32(rule.routed_scaling_factor)
    return Routing(experts, weights.astype(np.float32), probs)
