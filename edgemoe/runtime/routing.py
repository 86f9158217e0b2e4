"""The router in the host, in fp32 numpy, deterministic: every `RoutingRule` (softmax or sigmoid
scoring; greedy, group-limited and noaux_tc choice; DeepSpeed or DeepSeek renormalisation; scaling).

Contract: `select(logits, rule, bias)` is `edgemoe.reference.moe.gate` in numpy. MoE-LLaVA's rule
(`route(m, weight, k)` with an int k) is `edgemoe.reference.moe.top_k_gating` at inference without
Gumbel noise: logits = m @ W^T in fp32, softmax over all experts, experts chosen one at a time by
highest probability with a tie going to the lower index (np.argmax returns the first maximum), and
for k >= 2 the chosen probabilities renormalised to sum to 1 (denominator clamped at fp32 eps, as
DeepSpeed). No token is dropped. Upstream draws the second expert with Gumbel noise even at
inference; this runtime does not (the documented deviation that makes answers repeatable).
`Routers.load(path)` reads `routers.safetensors` (`layers.N.router.weight` [E, H], fp32).

Shape legend: N tokens, H hidden, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.model.routing_rule import RoutingRule, deepspeed_top_k
from edgemoe.model.safetensors_io import SafetensorsFile

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


def route(m: np.ndarray, weight: np.ndarray, rule: RoutingRule | int, bias: np.ndarray | None = None) -> Routing:
    """m [N, H] (the MoE input), router weight [E, H] -> Routing; an int rule means MoE-LLaVA's top-k."""
    if isinstance(rule, int):
        rule = deepspeed_top_k(rule)
    logits = np.asarray(m, np.float32) @ weight.T  # [N, E] fp32
    return select(logits, rule, bias)


class Routers:
    """Every MoE layer's router weight, fp32 [E, H], resident (a few KB per layer)."""

    def __init__(self, weights: dict[int, np.ndarray]) -> None:
        self.weights = weights

    @classmethod
    def load(cls, path: Path, layers: tuple[int, ...]) -> "Routers":
        f = SafetensorsFile(Path(path))
        missing = [n for n in layers if f"layers.{n}.router.weight" not in f.infos]
        if missing:
            raise EdgeMoEError(f"{path} has no router for MoE layer(s) {missing}")
        return cls({n: np.ascontiguousarray(f.tensor(f"layers.{n}.router.weight"), np.float32) for n in layers})

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.weights[layer]

    def route(self, layer: int, m: np.ndarray, k: int) -> Routing:
        return route(m, self.weights[layer], k)
