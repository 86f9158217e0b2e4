"""Eviction policies for the expert cache: which unleased expert goes first when room is needed.

Contract: a policy only ranks; the cache decides when to evict, never evicts a leased key, and calls
the policy under its own lock (so policies need no locking of their own). The cache tells the policy
four things: `accessed(key)` each time a MoE layer asks for an expert (hit or miss: an activation),
`inserted(key)` when an expert becomes resident, `removed(key)` when it leaves, and `advance(layer)`
as decoding reaches each MoE layer. `victim(candidates)` names the candidate to evict. Every ranking
is deterministic: ties go to the least recently used key, and "recent" is a counter, not a clock.

  lru      least recently accessed or inserted first (a prefetched expert counts as recent on arrival).
  lfu      fewest activations first. Counts persist across evictions: an expert's popularity does not
           reset because it was paged out.
  edgemoe  EdgeMoE's score, lowest first: (activations + 1) / distance, where distance is how many MoE
           layers decoding must advance from the current one to reach the key's layer, forward and
           modulo the number of MoE layers (the next token comes back to the first one):
               distance = ((idx(key.layer) - idx(current) - 1) mod n) + 1   in 1..n
           so the next MoE layer's experts are at 1 and the current layer's own are at n (they run
           again only after a full token). Before any `advance`, decoding stands before the first MoE
           layer. The +1 keeps a just-prefetched, never-activated expert from scoring zero (EdgeMoE
           counts frequencies offline; here they are learned online and may be seeded).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import OffloadError

POLICIES = ("lru", "lfu", "edgemoe")
# The default of the library, the CLI and the bench alike: the policy that paged the fewest bytes per
# token at every budget of the published policy sweep (README, "Eviction policies").
DEFAULT_POLICY = "edgemoe"


class EvictionPolicy(Protocol):
    """Ranks resident experts for eviction (see module docstring)."""

    name: str

    def accessed(self, key: ExpertKey) -> None: ...
    def inserted(self, key: ExpertKey) -> None: ...
    def removed(self, key: ExpertKey) -> None: ...
    def advance(self, layer: int) -> None: ...
    def victim(self, candidates: Collection[ExpertKey]) -> ExpertKey: ...


class _Usage:
    """Recency ticks and activation counts shared by every policy."""

    name = "usage"

    def __init__(self) -> None:
        self._tick = 0
        self.last_use: dict[ExpertKey, int] = {}
        self.frequency: Counter[ExpertKey] = Counter()

    def _touch(self, key: ExpertKey) -> None:
        self._tick += 1
        self.last_use[key] = self._tick

    def accessed(self, key: ExpertKey) -> None:
        self.frequency[key] += 1
        self._touch(key)

    def inserted(self, key: ExpertKey) -> None:
        self._touch(key)

    def removed(self, key: ExpertKey) -> None:
        pass  # frequency and recency are facts about the expert, kept after eviction

    def advance(self, layer: int) -> None:
        pass

    def victim(self, candidates: Collection[ExpertKey]) -> ExpertKey:
        if not candidates:
            raise OffloadError(f"{self.name} policy asked for a victim among no candidates")
        return self._lowest(candidates)

    def _lowest(self, candidates: Collection[ExpertKey]) -> ExpertKey:
        """The candidate of lowest `_rank` (a policy may find it faster, never differently)."""
        return min(candidates, key=self._rank)

    def _rank(self, key: ExpertKey) -> tuple:
        return (self.last_use.get(key, 0), key)


class LRUPolicy(_Usage):
    """Least recently used first."""

    name = "lru"


class LFUPolicy(_Usage):
    """Fewest activations first; ties to the least recently used."""

    name = "lfu"

    def _rank(self, key: ExpertKey) -> tuple:
        return (self.frequency[key], self.last_use.get(key, 0), key)


class EdgeMoEPolicy(_Usage):
    """Lowest (activations + 1) / forward layer distance first (module docstring)."""

    name = "edgemoe"

    def __init__(self, moe_layers: Sequence[int], frequencies: Mapping[ExpertKey, int] | None = None) -> None:
        super().__init__()
        if not moe_layers:
            raise OffloadError("the edgemoe policy needs the model's MoE layers to measure layer distance")
        self.moe_layers = tuple(sorted(set(moe_layers)))
        self._index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._current = -1  # before the first MoE layer
        self.frequency.update(frequencies or {})  # e.g. counts from calibration traces

    def advance(self, layer: int) -> None:
        self._current = self._position(layer)

    def distance(self, key: ExpertKey) -> int:
        """MoE layers from the current one forward to `key.layer`, in 1..n (module docstring)."""
        return self._steps_to(self._position(key.layer))

    def _steps_to(self, position: int) -> int:
        return (position - self._current - 1) % len(self.moe_layers) + 1

    def score(self, key: ExpertKey) -> float:
        return (self.frequency[key] + 1) / self.distance(key)

    def _position(self, layer: int) -> int:
        try:
            return self._index[layer]
        except KeyError:
            raise OffloadError(f"layer {layer} is not one of the MoE layers {list(self.moe_layers)}") from None

    def _rank(self, key: ExpertKey) -> tuple:
        return (self.score(key), self.last_use.get(key, 0), key)

    def _lowest(self, candidates: Collection[ExpertKey]) -> ExpertKey:
        """`_rank`'s minimum, with each layer's distance worked out once per call instead of once per
        candidate: the cache asks on every eviction, over every unleased resident expert (hundreds)."""
        distance = {layer: self._steps_to(i) for layer, i in self._index.items()}
        frequency, last_use = self.frequency, self.last_use
        keys = list(candidates)
        try:
            scores = [(frequency[k] + 1) / distance[k.layer] for k in keys]
        except KeyError as exc:
            raise OffloadError(f"layer {exc.args[0]} is not one of the MoE layers {list(self.moe_layers)}") from None
        lowest = min(scores)
        tied = [k for k, s in zip(keys, scores) if s == lowest]  # usually one: then no tuple is built
        return tied[0] if len(tied) == 1 else min(tied, key=lambda k: (last_use.get(k, 0), k))


def make_policy(policy: str | EvictionPolicy, moe_layers: Sequence[int] | None = None) -> EvictionPolicy:
    """A policy by name ("lru" | "lfu" | "edgemoe"), or `policy` itself when it already is one."""
    if not isinstance(policy, str):
        return policy
    name = policy.strip().lower()
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "edgemoe":
        return EdgeMoEPolicy(moe_layers or ())
    raise OffloadError(f"unknown eviction policy {policy!r}: expected one of {', '.join(POLICIES)}")
