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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
