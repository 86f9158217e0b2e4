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

from pathlib import Path

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.model.routing_rule import Routing, RoutingRule, deepspeed_top_k, select
from edgemoe.model.safetensors_io import SafetensorsFile
from edgemoe.page_cache import drop_cached

def route(m: np.ndarray, weight: np.ndarray, rule: RoutingRule | int, bias: np.ndarray | None = None) -> Routing:
    """m [N, H] (the MoE input), router weight [E, H] -> Routing; an int rule means MoE-LLaVA's top-k."""
    if isinstance(rule, int):
        rule = deepspeed_top_k(rule)
    logits = np.asarray(m, np.float32) @ weight.T  # [N, E] fp32
    return select(logits, rule, bias)


class Routers:
    """Every MoE layer's router weight, fp32 [E, H], resident (a few KB per layer), the routing rule, and
    for noaux_tc the per-expert correction biases."""

    def __init__(self, weights: dict[int, np.ndarray], rule: RoutingRule | None = None,
                 biases: dict[int, np.ndarray] | None = None) -> None:
        self.weights, self.rule, self.biases = weights, rule, biases or {}

    @classmethod
    def load(cls, path: Path, layers: tuple[int, ...], rule: RoutingRule | None = None) -> "Routers":
        f = SafetensorsFile(Path(path))
        missing = [n for n in layers if f"layers.{n}.router.weight" not in f.infos]
        if missing:
            raise EdgeMoEError(f"{path} has no router for MoE layer(s) {missing}")
        weights = {n: np.ascontiguousarray(f.tensor(f"layers.{n}.router.weight"), np.float32) for n in layers}
        biases = {n: np.ascontiguousarray(f.tensor(f"layers.{n}.router.bias"), np.float32) for n in layers
                  if f"layers.{n}.router.bias" in f.infos}
        if rule is not None and rule.uses_bias and len(biases) != len(layers):
            raise EdgeMoEError(f"{path} lacks the e_score_correction_bias that {rule.method} routing needs")
        drop_cached(path)  # copied into the arrays above: keep none of the file cached (footprint)
        return cls(weights, rule, biases)

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.weights[layer]

    def route(self, layer: int, m: np.ndarray, k: int) -> Routing:
        """Layer `layer`'s routing of m [N, H]: the rule given at load (the runtime passes the model's
        `moe.routing`, so the hot path builds no rule), else MoE-LLaVA's top-k."""
        return route(m, self.weights[layer], self.rule if self.rule is not None else k, self.biases.get(layer))
