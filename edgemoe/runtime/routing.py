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

`routers_for(routers, mode, seed)` picks the routing a run uses (`ROUTINGS`): "model" is the router
above; "uniform" is a benchmark mode, `UniformRouters`, that replaces each token's experts by K
distinct experts drawn uniformly at random (a seeded generator, drawn in call order, so one prompt
gives the same experts every run and at every budget) and keeps the model's combine weights. It is
the worst case for an expert cache and a predictor: no expert is more popular than another and the
next layer's experts cannot be guessed from anything (the predictor still guesses with the model's
routers, right only by chance, K/E). Answers under it are not the model's answers.

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


ROUTINGS = ("model", "uniform")


class UniformRouters(Routers):
    """The model's routers with each token's experts drawn uniformly at random (module docstring)."""

    def __init__(self, routers: Routers, seed: int = 0) -> None:
        super().__init__(routers.weights, routers.rule, routers.biases)
        self._rng = np.random.default_rng(seed)

    def route(self, layer: int, m: np.ndarray, k: int) -> Routing:
        own = super().route(layer, m, k)
        n, e = own.probs.shape
        # argsort of iid uniforms: a uniformly random permutation per token; its first K are K distinct experts.
        experts = np.argsort(self._rng.random((n, e)), axis=1)[:, :own.experts.shape[1]].astype(np.int64)
        return Routing(experts, own.weights, own.probs)


def check_routing(mode: str) -> None:
    """A one-line EdgeMoEError unless `mode` is one of `ROUTINGS`."""
    if mode not in ROUTINGS:
        raise EdgeMoEError(f"unknown routing {mode!r}: expected one of {', '.join(ROUTINGS)}")


def routers_for(routers: Routers, mode: str, seed: int = 0) -> Routers:
    """The routers a run uses: the model's ("model") or the uniform benchmark mode ("uniform")."""
    check_routing(mode)
    return routers if mode == "model" else UniformRouters(routers, seed)
