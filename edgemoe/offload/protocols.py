"""The offload package's interfaces, in one leaf module that imports nothing else of edgemoe's but keys.

Contract: what the pieces promise each other, so that store, cache, prefetcher, provider and the
runtime's MoE layer depend on these protocols rather than on each other's modules:

    ExpertRunner    one runnable expert: y [N, H] = run(x [N, H] float32); `nbytes` as the cache counts it
    ExpertStore     makes runners: size_of(key) before any load, load(key) (may block on I/O)
    ExpertProvider  what a MoE layer asks: experts(layer, needed) yields (key, runner) pairs,
                    hint(layer, predicted) pages guesses in ahead, stats(), close()

Stats types stay with the classes that count them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgemoe.keys import ExpertKey


@runtime_checkable
class ExpertRunner(Protocol):
    """One runnable expert: y [N, H] = run(x [N, H] float32); `nbytes` it holds, as the cache counts it."""

    nbytes: int

    def run(self, x: np.ndarray) -> np.ndarray: ...


class ExpertStore(Protocol):
    """Makes runnable experts (edgemoe.offload.store, edgemoe.offload.mapped)."""

    def size_of(self, key: ExpertKey) -> int: ...
    def load(self, key: ExpertKey) -> ExpertRunner: ...


class ExpertProvider(Protocol):
    """What a MoE layer needs from the offload package (resident or offloading)."""

    def experts(self, layer: int, needed: Sequence[int]) -> Iterator[tuple[ExpertKey, ExpertRunner]]: ...
    def hint(self, layer: int, predicted: Sequence[int]) -> None: ...
    def stats(self) -> Any: ...
    def close(self) -> None: ...
