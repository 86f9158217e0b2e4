"""A MoE layer in the host: route -> dispatch -> experts -> combine, experts from an `ExpertProvider`.

Contract: `MoELayer.forward(layer, h, m)` returns h + sum_k w_k expert_k(m) for every token, where
the routing is `routing.route` (fp32, deterministic) and the experts come from the provider. The
layer never knows where an expert lives: it asks `provider.experts(layer, needed)` once per layer
call and runs each expert it gets ONCE over all the tokens routed to it (an image prefill streams
each expert once per layer, never once per token). Results are combined in ascending expert order
whatever order the provider yields them in (resident first, misses as they stream in), so the sum,
and therefore every token, is bit-identical between a resident and an offloading provider.

Before running this layer's experts it hints the provider with its guess for the next MoE layer:
the next layer's router applied to this layer's MoE input (the residual stream changes little
between neighbouring layers; Mixtral-offloading's trick), so paging overlaps this layer's compute.
The hint goes out once the provider has delivered the first expert, i.e. after it has pinned this
layer's resident experts and queued its misses, so a guess can never evict what this layer needs.
The guess is `edgemoe.offload.predictor.RouterPredictor` by default (any `ExpertPredictor` fits);
`predictions` (a `PredictionStats`) scores every guess against what that layer then needs, and a
`HintGate` withholds a layer's guesses of each rank (first, second, ...) whose running precision is
below the floor (they are still scored, so the gate reopens when they improve).

Shape legend: N tokens, H hidden, E experts, K experts per token.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.keys import ExpertKey
from edgemoe.offload.predictor import HINT_FLOOR, ExpertPredictor, HintGate, PredictionStats, RouterPredictor
from edgemoe.offload.protocols import ExpertProvider
from edgemoe.runtime.routing import Routers, Routing
from edgemoe.runtime.routing_trace import RoutingTrace


def run_expert(runner: Any, x: np.ndarray) -> np.ndarray:
    """y [n, H] = expert(x [n, H]) for a runner that is callable or has `run(x)`."""
    fn = runner if callable(runner) else getattr(runner, "run", None)
    if fn is None:
        raise EdgeMoEError(f"expert runner {type(runner).__name__} is neither callable nor has run()")
    return np.asarray(fn(x), dtype=np.float32)


class MoELayer:
    """Every MoE layer of a model, sharing one provider and one set of routers."""

    def __init__(self, routers: Routers, provider: ExpertProvider, moe_layers: tuple[int, ...], top_k: int,
                 predictor: ExpertPredictor | None = None, prefetch: bool = True, lookahead: int = 1,
                 hint_floor: float = HINT_FLOOR) -> None:
        self.routers, self.provider, self.top_k, self.prefetch = routers, provider, top_k, prefetch
        self.moe_layers = tuple(sorted(moe_layers))
        self.predictor = predictor or RouterPredictor(routers.weights, self.moe_layers, top_k, rule=routers.rule,
                                                      biases=routers.biases, lookahead=lookahead)
        # layer -> (experts guessed for its next call, whether best first: one token's guess has ranks,
        # a prefill's union over many tokens has none and is not scored by the gate)
        self._hinted: dict[int, tuple[tuple[int, ...], bool]] = {}
        self.predictions = PredictionStats()
        self.gate = HintGate(hint_floor)
        self.trace: RoutingTrace | None = None  # every call's routing, written down for replay (bench)

    def forward(self, layer: int, h: np.ndarray, m: np.ndarray, shared: np.ndarray | None = None) -> np.ndarray:
        """h, m [N, H] -> h + moe(m) [N, H]; `shared` (the always-on shared experts' output on m, where the
        model has them) joins the routed sum before the residual, as the reference adds it."""
        routing = self.routers.route(layer, m, self.top_k)  # route
        if self.trace is not None:
            self.trace.record(layer, routing)
        needed = routing.needed()
        guessed = self._hinted.pop(layer, None)
        if guessed is not None:
            hinted, ranked = guessed
            self.predictions.record(hinted, needed)
            if ranked:
                self.gate.record(layer, hinted, needed)
        self.predictor.observe(layer, needed)
        routed = self._run_experts(layer, needed, routing, m)  # dispatch + experts (+ next-layer hint) + combine
        return h + (routed if shared is None else routed + shared)

    def _hint_next(self, layer: int, m: np.ndarray) -> None:
        if not self.prefetch:
            return
        ranked = m.shape[0] == 1
        for target, guess in self.predictor.predict(layer, m).items():
            self._hinted[target] = guess, ranked
            admitted = tuple(e for rank, e in enumerate(guess) if self.gate.open(target, rank if ranked else 0))
            if admitted:
                self.provider.hint(target, admitted)
            if len(admitted) < len(guess):
                self.predictions.withhold(len(guess) - len(admitted))

    def _run_experts(self, layer: int, needed: tuple[int, ...], routing: Routing, m: np.ndarray) -> np.ndarray:
        """The layer's routed sum [N, H]. Each expert runs as it is delivered, or, where its runner belongs
        to a fused layer (`run_layer`), the layer runs once with every chosen expert delivered and still
        leased (the provider holds them until this call closes its iterator)."""
        outputs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        fused: set[int] = set()
        with closing(self.provider.experts(layer, needed)) as delivered:
            for key, runner in delivered:
                if not outputs and not fused:
                    # The provider has now pinned this layer's resident experts and queued its misses,
                    # so paging the next layer's guesses cannot evict what this layer is about to use.
                    self._hint_next(layer, m)
                run_layer = getattr(runner, "run_layer", None)
                if run_layer is None:
                    outputs[key.expert] = self._run_one(layer, needed, routing, m, key, runner, outputs)
                    continue
                _check_delivery(layer, needed, key, fused)
                fused.add(key.expert)
                if outputs:
                    raise EdgeMoEError(f"layer {layer} mixes fused and separate experts")
                if len(fused) == len(needed):
                    # Before asking the iterator for more: running out would end the call and its leases.
                    return run_layer(layer, m, routing)
        missing = [e for e in needed if e not in outputs and e not in fused]
        if missing:
            raise EdgeMoEError(f"expert provider did not deliver L{layer}/E{missing[0]}")
        return combine(outputs, routing, m.shape)

    def _run_one(self, layer: int, needed: tuple[int, ...], routing: Routing, m: np.ndarray, key: ExpertKey,
                 runner: Any, done: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dispatch: the expert runs once over every token routed to it, as soon as it is delivered
        (the provider may evict it when asked for the next one)."""
        _check_delivery(layer, needed, key, done)
        token, slot = routing.tokens_of(key.expert)
        return token, slot, run_expert(runner, np.ascontiguousarray(m[token]))

    def reset_hints(self) -> None:
        """Forget pending guesses (a forward pass was abandoned)."""
        self._hinted.clear()


def _check_delivery(layer: int, needed: tuple[int, ...], key: ExpertKey, done: Any) -> None:
    if key.layer != layer or key.expert not in needed or key.expert in done:
        raise EdgeMoEError(f"expert provider returned {key} when asked for layer {layer} experts {needed}")


def combine(outputs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], routing: Routing,
            shape: tuple[int, ...]) -> np.ndarray:
    """sum_k w_k y_k per token, accumulated in fp32 in ascending expert order (order-independent input)."""
    out = np.zeros(shape, dtype=np.float32)  # [N, H]
    for e in sorted(outputs):
        token, slot, y = outputs[e]
        # A token appears at most once per expert (top-k picks distinct experts): plain indexing adds.
        out[token] += y * routing.weights[token, slot, None]
    return out
