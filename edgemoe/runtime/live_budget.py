"""A memory budget kept true while the run changes: `LiveBudget`.

Contract: the plan (`runtime.budget.plan_budget`) is made once, from the baseline measured at
start-up. Three things change the memory the experts may have afterwards, and `LiveBudget` resizes
the expert cache (evicting by policy) before each takes its memory:

  fit_prompt(engine, positions, limit)   a prompt and its answer: the KV cache grows to hold them
                                         (old and new buffers both count while it is copied) and the
                                         prefill needs activations for `positions`
  prefilled()                            the prompt is in the KV cache: decoding one token needs a
                                         few hundred KB, so the prefill's activation reserve (59 MB for
                                         StableLM's image prompt) goes to the experts, less an
                                         allowance for allocator noise, until the next prompt takes it back
  vision_closed() / vision_reopening()   the vision tower runs once per image: between images it is
                                         closed and its measured bytes go to the experts; a later
                                         image takes them back first

A conversation that no longer fits is a one-line `BudgetError` naming the minimum budget, raised
before anything runs. With no memory budget (or a store that keeps every expert) nothing is
tracked: the KV cache just grows.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import psutil

from edgemoe.offload.sessions import trim_heap
from edgemoe.runtime.budget import FIXED_SLACK, BudgetPlan, decode_activation, prefill_activation

if TYPE_CHECKING:
    from edgemoe.bundle import Bundle
    from edgemoe.runtime.engine import Engine
    from edgemoe.runtime.trunk import Trunk

log = logging.getLogger(__name__)


class LiveBudget:
    """The plan, the expert cache it sizes, and what the run is holding now (module docstring)."""

    def __init__(self, plan: BudgetPlan, bundle: "Bundle", cache: Any, engine: "Engine", trunk: "Trunk",
                 vision_bytes: int = 0) -> None:
        self.plan, self.bundle, self.cache, self.engine, self.trunk = plan, bundle, cache, engine, trunk
        self.vision_bytes = vision_bytes
        # What a prefill (or an image's vision pass) needs, and what is held now: the same, except while
        # an answer decodes, when most of the reserve is lent to the experts (`prefilled`).
        self._reserve = plan.memory_budget.activation_bytes if plan.memory_budget else 0
        self._activation = self._reserve

    def fit_prompt(self, positions: int, limit: int) -> None:
        engine = self.engine
        need = min(positions + limit, engine.max_positions)
        self._reserve = self._activation = prefill_activation(self.bundle, positions)
        if need > engine.cache.capacity:
            grown = need * (engine.cache.nbytes // engine.cache.capacity)
            self._apply(engine.cache.nbytes + grown, 0)  # while the cache is copied, both count
            engine.reserve(need)
        self._apply(engine.cache.nbytes, 0)

    def prefilled(self) -> None:
        """The prefill is done: its activation reserve goes to the experts while the answer decodes, less
        FIXED_SLACK more allocator noise. Lending all of it left decoding 2 MB over a 1.5 GB budget in
        one of four runs (StableLM int4, footprint sampled from outside every 50 ms)."""
        decode = decode_activation(self.bundle.manifest.model_config(), self.engine.cache.capacity)
        self._activation = min(self._reserve, decode + FIXED_SLACK)
        self._apply(self.engine.cache.nbytes, 0)

    def vision_reopening(self) -> None:
        """Room for the vision tower before it opens again, and the reserve its pass needs back from the
        experts (a chat's next image is encoded before its prompt is fitted)."""
        self._activation = self._reserve
        self._apply(self.engine.cache.nbytes, self.vision_bytes)

    def vision_closed(self, vision_bytes: int) -> None:
        """The tower closed again; `vision_bytes` is what closing it gives back (the largest measured)."""
        self.vision_bytes = vision_bytes
        self._apply(self.engine.cache.nbytes, 0)

    def _apply(self, kv_bytes: int, extra: int) -> None:
        self.plan = self.plan.for_context(kv_bytes, self._activation + extra)
        self.cache.resize(self.plan.expert_bytes)


def close_vision(trunk: "Trunk") -> int:
    """Close the vision tower's session; the RSS that gave back (its weights and buffers)."""
    if not trunk.vision_resident:
        return 0
    before = psutil.Process().memory_info().rss
    trunk.release_vision()
    trim_heap()
    freed = max(0, before - psutil.Process().memory_info().rss)
    log.info("vision tower closed until the next image: %d bytes back", freed)
    return freed
