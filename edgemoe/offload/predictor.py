"""Routing predictors: which experts the next MoE layer(s) will need, guessed early enough to page them in.

Contract: a predictor `observe(layer, chosen)`s the experts each MoE layer actually used and
`predict(layer, hidden)` returns {target layer: experts} for layers after `layer`, most likely first
(a guess's rank is what `HintGate` keys its precision by); a union over many tokens has no ranks and
is ascending. It
never touches the cache; the provider turns predictions into hints. `PredictionStats` scores any
predictor (or hint) against what was then needed. `HintGate` decides per layer whether guesses are
good enough to page in (below).

  RouterPredictor      Mixtral-offloading's trick: the residual stream changes little between
                       neighbouring layers, so the NEXT MoE layer's router (fp32, softmax, top-k,
                       ties to the lower index, as `runtime.routing`) applied to the hidden state
                       entering this one guesses its experts. The caller chooses which hidden state
                       to pass (the MLP input m, or the residual h). `lookahead` layers ahead, never
                       past the last MoE layer: the next token's hidden state does not exist yet.
                       One token's guess is its top-k, best first; with many tokens (prefill)
                       the guess is the union of the tokens' top-k, ascending.
  StatisticalPredictor EdgeMoE's table: counts of next-layer experts given the expert SETS chosen at
                       the two previous MoE layers (None where a token has no such layer yet),
                       learned online from observed routing and optionally seeded from calibration
                       traces (`fit`). Unseen contexts back off to the previous layer alone, then to
                       the layer's marginal. After the last MoE layer it predicts the next token's
                       first MoE layer from that layer's marginal. Predicts the `top_n` most likely.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgemoe.model.routing_rule import RoutingRule, deepspeed_top_k, select
from edgemoe.offload.errors import OffloadError

Context = tuple[frozenset[int] | None, frozenset[int] | None]  # experts at (layer - 2, layer - 1)


class ExpertPredictor(Protocol):
    """Guesses future routing (see module docstring)."""

    def observe(self, layer: int, chosen: Iterable[int]) -> None: ...
    def predict(self, layer: int, hidden: np.ndarray | None = None) -> dict[int, tuple[int, ...]]: ...


class _LayerOrder:
    """Position of each MoE layer in decoding order."""

    def __init__(self, moe_layers: Sequence[int]) -> None:
        if not moe_layers:
            raise OffloadError("a predictor needs the model's MoE layers")
        self.layers = tuple(sorted(set(moe_layers)))
        self._index = {layer: i for i, layer in enumerate(self.layers)}

    def index(self, layer: int) -> int:
        try:
            return self._index[layer]
        except KeyError:
            raise OffloadError(f"layer {layer} is not one of the MoE layers {list(self.layers)}") from None


class RouterPredictor:
    """The next MoE layer's router applied to this layer's hidden state (module docstring)."""

    def __init__(self, routers: Mapping[int, np.ndarray], moe_layers: Sequence[int], top_k: int,
                 lookahead: int = 1, rule: RoutingRule | None = None,
                 biases: Mapping[int, np.ndarray] | None = None) -> None:
        self.order = _LayerOrder(moe_layers)
        missing = [layer for layer in self.order.layers if layer not in routers]
        if missing:
            raise OffloadError(f"no router weights for MoE layer(s) {missing}")
        if top_k < 1 or lookahead < 1:
            raise OffloadError(f"top_k and lookahead must be >= 1, got {top_k} and {lookahead}")
        self.routers = {layer: np.ascontiguousarray(routers[layer], np.float32) for layer in self.order.layers}
        self.top_k, self.lookahead = top_k, lookahead
        # The model's own rule (DeepSeek: top-6 of 64, grouped or bias-corrected choices), else top-k softmax.
        self.rule = rule if rule is not None else deepspeed_top_k(top_k)
        self.biases = dict(biases or {})

    def observe(self, layer: int, chosen: Iterable[int]) -> None:
        pass  # stateless: the hidden state carries everything

    def predict(self, layer: int, hidden: np.ndarray | None = None) -> dict[int, tuple[int, ...]]:
        if hidden is None:
            return {}
        start = self.order.index(layer)
        targets = self.order.layers[start + 1:start + 1 + self.lookahead]
        x = np.atleast_2d(np.asarray(hidden, np.float32))
        routings = {t: select(x @ self.routers[t].T, self.rule, self.biases.get(t)) for t in targets}
        if x.shape[0] == 1:  # one token: its experts best first (their ranks)
            return {t: tuple(int(e) for e in r.experts[0]) for t, r in routings.items()}
        return {t: r.needed() for t, r in routings.items()}


class StatisticalPredictor:
    """EdgeMoE's two-previous-layers table, learned online (module docstring)."""

    def __init__(self, moe_layers: Sequence[int], num_experts: int, top_n: int = 2,
                 min_probability: float = 0.0) -> None:
        self.order = _LayerOrder(moe_layers)
        if not 1 <= top_n <= num_experts:
            raise OffloadError(f"top_n must be in 1..{num_experts}, got {top_n}")
        self.num_experts, self.top_n, self.min_probability = num_experts, top_n, min_probability
        # (target layer, context) -> [count of each expert, number of observations]
        self._full: dict[tuple[int, Context], np.ndarray] = defaultdict(self._zeros)
        self._prev: dict[tuple[int, frozenset[int] | None], np.ndarray] = defaultdict(self._zeros)
        self._marginal: dict[int, np.ndarray] = defaultdict(self._zeros)
        self._history: list[frozenset[int]] = []  # this token's choices, by MoE position
        self._lock = threading.Lock()

    def _zeros(self) -> np.ndarray:
        return np.zeros(self.num_experts + 1, np.int64)  # last slot: observations

    def observe(self, layer: int, chosen: Iterable[int]) -> None:
        idx, chosen = self.order.index(layer), frozenset(int(e) for e in chosen)
        with self._lock:
            if idx < len(self._history):  # back at (or before) a layer this token has seen: a new token
                self._history = []
            self._history += [frozenset()] * (idx - len(self._history))  # layers skipped: nothing chosen
            context = self._context(idx)
            for table, ctx in ((self._full, (layer, context)), (self._prev, (layer, context[1])),
                               (self._marginal, layer)):
                row = table[ctx]
                row[list(chosen)] += 1
                row[-1] += 1
            self._history.append(chosen)

    def _context(self, idx: int) -> Context:
        prev1 = self._history[idx - 1] if idx >= 1 else None
        prev2 = self._history[idx - 2] if idx >= 2 else None
        return prev2, prev1

    def _seen(self, idx: int) -> frozenset[int]:
        return self._history[idx] if idx < len(self._history) else frozenset()

    def fit(self, traces: Iterable[Sequence[Iterable[int]]]) -> None:
        """Seed from calibration traces: each trace is one token's experts at every MoE layer, in order."""
        for trace in traces:
            for layer, chosen in zip(self.order.layers, trace):
                self.observe(layer, chosen)

    def probabilities(self, layer: int, context: Context) -> np.ndarray:
        """P(expert used at `layer` | context) [E], backing off to coarser tables; zeros when unseen."""
        with self._lock:
            for row in (self._full.get((layer, context)), self._prev.get((layer, context[1])),
                        self._marginal.get(layer)):
                if row is not None and row[-1] > 0:
                    return row[:-1] / row[-1]
        return np.zeros(self.num_experts)

    def predict(self, layer: int, hidden: np.ndarray | None = None) -> dict[int, tuple[int, ...]]:
        idx = self.order.index(layer)
        with self._lock:
            if idx + 1 < len(self.order.layers):
                target = self.order.layers[idx + 1]
                context: Context = (self._seen(idx - 1) if idx >= 1 else None, self._seen(idx))
            else:  # the next token's first MoE layer: nothing of that token is known yet
                target, context = self.order.layers[0], (None, None)
        probs = self.probabilities(target, context)
        best = np.argsort(-probs, kind="stable")[:self.top_n]
        chosen = tuple(int(e) for e in best if probs[e] > 0 and probs[e] >= self.min_probability)  # best first
        return {target: chosen} if chosen else {}


@dataclass(frozen=True)
class PredictionSummary:
    """Predicted vs used experts, over `events` scored layer visits."""

    events: int
    predicted: int  # experts predicted, summed over events
    needed: int  # experts then needed, summed
    correct: int  # predicted and needed
    mean_precision: float | None  # per-event precision, averaged over events that predicted something
    mean_recall: float | None  # per-event recall, averaged over events that needed something
    exact: int  # events whose prediction was exactly the needed set
    withheld: int = 0  # guessed experts not sent to the provider (`HintGate` closed for their layer)

    @property
    def precision(self) -> float | None:
        """Of the experts predicted, the fraction needed (pooled over events)."""
        return self.correct / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        """Of the experts needed, the fraction predicted (pooled over events)."""
        return self.correct / self.needed if self.needed else None


class PredictionStats:
    """Accumulates per-event precision and recall of predicted vs used expert sets (thread-safe), as
    running sums: its memory does not grow with the tokens a long chat or server decodes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events = self._predicted = self._needed = self._correct = self._exact = 0
        self._precision_sum = self._recall_sum = 0.0
        self._precision_events = self._recall_events = 0
        self._withheld = 0

    def withhold(self, count: int) -> None:
        """`count` guessed experts were scored but not hinted."""
        with self._lock:
            self._withheld += count

    def record(self, predicted: Iterable[int], needed: Iterable[int]) -> float | None:
        """Score one guess against what was needed; its precision (None for an empty guess)."""
        p, n = set(predicted), set(needed)
        hit = len(p & n)
        with self._lock:
            self._events += 1
            self._predicted, self._needed, self._correct = self._predicted + len(p), self._needed + len(n), \
                self._correct + hit
            self._exact += p == n
            if p:
                self._precision_sum += hit / len(p)
                self._precision_events += 1
            if n:
                self._recall_sum += hit / len(n)
                self._recall_events += 1
        return hit / len(p) if p else None

    def summary(self) -> PredictionSummary:
        with self._lock:
            return PredictionSummary(self._events, self._predicted, self._needed, self._correct,
                                     _mean(self._precision_sum, self._precision_events),
                                     _mean(self._recall_sum, self._recall_events), self._exact, self._withheld)


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


HINT_FLOOR = 0.7  # running precision below which a layer's guesses are withheld
HINT_WINDOW = 16  # scored guesses the running precision mostly remembers


class HintGate:
    """Whether a MoE layer's guesses are worth paging in, rank by rank: the running precision of the
    layer's first guesses, of its second, ... (an exponential average over about the last `window`
    scored guesses of that rank; each starts open) against `floor`.

    Why: a right hint only hides a read the layer would make anyway; a wrong one reads an expert nobody
    uses and evicts one that might be used. Near chance (routing no predictor can follow: K/E, 0.5 for
    top-2 of 4) prefetching reads more bytes than on-demand loading would (measured on StableLM under
    uniform routing: 1.5-1.6x a static cache of the same size). So a closed layer's guesses are still
    made and scored, to reopen the gate when they improve, but not sent. The floor sits between chance
    for the families here (0.09-0.5) and what the router trick scores on routing it can follow (0.9).

    Why by rank: a layer's best guess is right far more often than its last (StableLM at full size,
    model routing: 0.984 for the first of two, 0.878 for the second, measured), and every wrong guess
    costs disk bytes while a right one saves only time. A floor between the two (`--hint-floor 0.9`)
    pages in only the confident guesses: fewer bytes, less overlap.
    """

    def __init__(self, floor: float = HINT_FLOOR, window: int = HINT_WINDOW) -> None:
        if not 0.0 <= floor <= 1.0 or window < 1:
            raise OffloadError(f"a hint gate needs a floor in [0, 1] and a window >= 1, got {floor}, {window}")
        self.floor, self._alpha = floor, 1.0 / window
        self._precision: dict[tuple[int, int], float] = {}

    def record(self, layer: int, hinted: Sequence[int], needed: Iterable[int]) -> None:
        """Score a guess (best first) against what the layer then used, rank by rank."""
        used = set(needed)
        for rank, expert in enumerate(hinted):
            key, hit = (layer, rank), float(expert in used)
            was = self._precision.get(key)
            self._precision[key] = hit if was is None else was + self._alpha * (hit - was)

    def open(self, layer: int, rank: int = 0) -> bool:
        return self._precision.get((layer, rank), 1.0) >= self.floor

    def precision(self, layer: int, rank: int = 0) -> float | None:
        """The running precision of the layer's guesses of that rank (None before the first is scored)."""
        return self._precision.get((layer, rank))
