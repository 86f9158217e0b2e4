"""Errors of the offload package: every one a one-line `EdgeMoEError` that names the expert or budget at fault.

Contract: a failure to produce a runnable expert (unreadable file, checksum mismatch, ONNX Runtime
refusing the graph) is an `ExpertLoadError` naming the expert, raised in the thread that asked for
it: the caller's own load, or re-raised from the prefetcher's thread to whoever waits on that key.
A cache that cannot hold what it is asked to hold raises `CacheCapacityError`; a memory budget too
small for the working set raises `BudgetError` naming the minimum. Nothing here ever hangs silently:
waits that give up raise `OffloadTimeout`.
"""

from __future__ import annotations

from edgemoe.errors import EdgeMoEError
from edgemoe.keys import ExpertKey


class OffloadError(EdgeMoEError):
    """Base class of the offload package's errors."""


class ExpertLoadError(OffloadError):
    """One expert could not be read, verified or turned into a session."""

    def __init__(self, key: ExpertKey, reason: str) -> None:
        super().__init__(f"cannot load expert {key}: {one_line(reason)}")
        self.key = key


class PrepareError(OffloadError):
    """Experts could not be prepacked for this machine (cache not writable, ORT refusing a graph): a
    store that does not need prepacking can still serve them. Raised while a store opens, never by a load."""


class CacheCapacityError(OffloadError):
    """An expert does not fit the cache: larger than its capacity, or everything else is pinned."""


class BudgetError(OffloadError):
    """A size string is malformed, or a memory budget cannot hold the working set."""


class OffloadTimeout(OffloadError):
    """A wait for an expert (or for room in the cache) gave up."""


def one_line(text: object) -> str:
    """The first non-empty line of a message (ORT's errors are long and multi-line)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"
