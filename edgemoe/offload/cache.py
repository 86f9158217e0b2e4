"""ExpertCache: runnable experts held within a byte capacity, evicted by a pluggable policy.

Contract: `used bytes = resident experts + reservations <= capacity_bytes` at every instant, and the
peak is recorded. A load first `reserve`s its bytes (evicting by policy to make room), then `put`s
the runner into its reservation, or `cancel`s it when the load fails: an expert's memory is counted
before it is allocated, so the capacity is a hard bound, not a hint. A reservation, and a key under a
live `Lease`, are never evicted. An expert larger than the whole capacity is refused with
`CacheCapacityError`; so is a `put` that cannot fit because everything else is leased. `get`/`acquire`
count hits and misses and tell the policy of the activation; the policy learns the decoding position
from `advance(layer)`.

Leases are the one way anything keeps an expert from eviction, whoever holds it: a MoE layer running
an expert ("use", from `acquire` or a demand load's `put`), the prefetcher holding a current layer's
miss for its waiter until a decoding step (a "hold", which the waiter's use lease replaces), the
provider guarding the next layer's residents while hints for later layers load ("guard"). The cache
owns them: `lease(keys, purpose)` takes one, `Lease.release()` gives it back (twice is harmless),
`pinned()` and `leases()` say what is held and why, and a full cache's error names each holder.

Thread-safe: one lock, and evicted runners are dropped (sessions freed, `on_evict` called) outside
it; a runner with a `release()` (a mapped expert, whose session outlives its pages) is released
inside it, so the bytes it frees are free before anyone reserves them.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import CacheCapacityError, OffloadError
from edgemoe.offload.policies import EvictionPolicy, make_policy

if TYPE_CHECKING:
    from edgemoe.offload.protocols import ExpertRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's counters."""

    policy: str
    capacity_bytes: int
    used_bytes: int  # resident + reserved
    peak_bytes: int
    resident: tuple[ExpertKey, ...]
    hits: int
    misses: int
    evictions: int
    loads: int  # runners put into the cache
    bytes_loaded: int

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


@dataclass(eq=False)
class Lease:
    """Keys the cache must not evict until `release()` (module docstring). `until_step` is the decoding
    step the holder needs them for (None: no deadline); the holder decides what a passed step means."""

    keys: tuple[ExpertKey, ...]
    purpose: str  # "use" | "hold" | "guard"
    until_step: int | None = None
    _cache: "ExpertCache | None" = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self._cache is not None

    def release(self) -> None:
        cache, self._cache = self._cache, None
        if cache is not None:
            cache._end_lease(self)


class ExpertCache:
    """Experts resident within `capacity_bytes` (module docstring)."""

    # "lru" here only because a bare cache may not know the model's MoE layers, which the edgemoe
    # policy needs; providers pass the runtime's DEFAULT_POLICY with the layers.
    def __init__(self, capacity_bytes: int, policy: str | EvictionPolicy = "lru", *,
                 moe_layers: Sequence[int] | None = None, on_evict: Callable[[int], None] | None = None) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise OffloadError(f"cache capacity must be a positive number of bytes, got {capacity_bytes!r}")
        self.capacity_bytes = capacity_bytes
        self.policy = make_policy(policy, moe_layers)
        self._on_evict = on_evict  # e.g. a heap trim: freed sessions leave glibc's heap fragmented
        self._lock = threading.Lock()
        self._runners: dict[ExpertKey, ExpertRunner] = {}
        self._sizes: dict[ExpertKey, int] = {}
        self._reserved: dict[ExpertKey, int] = {}
        self._pins: Counter[ExpertKey] = Counter()  # live leases per key
        self._leases: set[Lease] = set()
        self._used = self._peak = 0
        self._hits = self._misses = self._evictions = self._loads = self._bytes_loaded = 0

    # --- lookups -------------------------------------------------------------------------------

    def __contains__(self, key: ExpertKey) -> bool:
        with self._lock:
            return key in self._runners

    def is_reserved(self, key: ExpertKey) -> bool:
        with self._lock:
            return key in self._reserved

    def get(self, key: ExpertKey) -> ExpertRunner | None:
        """The runner if resident; counts a hit or a miss (an activation either way)."""
        with self._lock:
            return self._lookup(key, count=True)

    def acquire(self, key: ExpertKey, *, count: bool = True) -> tuple[ExpertRunner, Lease] | None:
        """Like `get`, and leases the key for use when resident (atomically): the caller releases it."""
        with self._lock:
            runner = self._lookup(key, count)
            return None if runner is None else (runner, self._lease((key,), "use", None))

    def _lookup(self, key: ExpertKey, count: bool) -> ExpertRunner | None:
        runner = self._runners.get(key)
        if count:
            self.policy.accessed(key)
            if runner is None:
                self._misses += 1
            else:
                self._hits += 1
        return runner

    # --- leases and position --------------------------------------------------------------------

    def lease(self, keys: Iterable[ExpertKey], purpose: str, until_step: int | None = None) -> Lease:
        """Protect `keys` (resident or not yet) from eviction until the lease is released; leases nest."""
        with self._lock:
            return self._lease(tuple(dict.fromkeys(keys)), purpose, until_step)

    def _lease(self, keys: tuple[ExpertKey, ...], purpose: str, until_step: int | None) -> Lease:
        lease = Lease(keys, purpose, until_step, self)
        self._leases.add(lease)
        self._pins.update(keys)
        return lease

    def _end_lease(self, lease: Lease) -> None:
        with self._lock:
            self._leases.discard(lease)
            self._pins.subtract(lease.keys)
            for key in lease.keys:
                if self._pins[key] <= 0:
                    del self._pins[key]

    def pinned(self) -> tuple[ExpertKey, ...]:
        """Keys under at least one live lease."""
        with self._lock:
            return tuple(sorted(self._pins))

    def leases(self) -> tuple[Lease, ...]:
        """The live leases, oldest key first (reporting and tests)."""
        with self._lock:
            return tuple(sorted(self._leases, key=lambda lease: (lease.keys, lease.purpose)))

    def advance(self, layer: int) -> None:
        """Decoding reached MoE layer `layer` (the edgemoe policy measures distance from it)."""
        with self._lock:
            self.policy.advance(layer)

    # --- filling -------------------------------------------------------------------------------

    def reserve(self, key: ExpertKey, nbytes: int) -> bool:
        """Count `nbytes` for a load of `key` about to start, evicting by policy to make room.

        False (evicting nothing) when leased experts and other reservations leave no room; then the
        caller may release holds, wait for loads in flight, or give up (the prefetcher decides which).
        """
        self._check_size(key, nbytes)
        evicted: list[ExpertRunner] = []
        with self._lock:
            if key in self._runners or key in self._reserved:
                raise OffloadError(f"{key} is already {'resident' if key in self._runners else 'being loaded'}")
            if not self._make_room(nbytes, evicted):
                return False
            self._reserved[key] = nbytes
            self._grow(nbytes)
        self._dispose(evicted)
        return True

    def cancel(self, key: ExpertKey) -> None:
        """Give back a reservation whose load failed or was abandoned."""
        with self._lock:
            self._used -= self._reserved.pop(key, 0)

    def put(self, key: ExpertKey, runner: ExpertRunner, *, lease: str | None = None,
            until_step: int | None = None) -> Lease | None:
        """Make `runner` resident (into its reservation, if any), evicting by policy; with `lease`, leased
        for that purpose in the same step (nothing can evict it in between), and the lease returned."""
        nbytes = int(runner.nbytes)
        evicted: list[ExpertRunner] = []
        with self._lock:
            self._used -= self._reserved.pop(key, 0)  # the reservation becomes the entry
            old = self._remove(key) if key in self._runners else None
            self._check_size(key, nbytes)
            if not self._make_room(nbytes, evicted):
                raise CacheCapacityError(self._no_room(key, nbytes))
            self._runners[key], self._sizes[key] = runner, nbytes
            self._grow(nbytes)
            self._loads += 1
            self._bytes_loaded += nbytes
            self.policy.inserted(key)
            taken = None if lease is None else self._lease((key,), lease, until_step)
        if old is not None:
            evicted.append(old)
        del old
        self._dispose(evicted)
        return taken

    def discard(self, key: ExpertKey) -> bool:
        """Evict `key` now if it is resident and unleased; whether it was."""
        with self._lock:
            if key not in self._runners or self._pins[key]:
                return False
            evicted = [self._remove(key)]
            self._evictions += 1
        self._dispose(evicted)
        return True

    def clear(self) -> None:
        """Release every unleased expert (closing time: not counted as evictions)."""
        with self._lock:
            released = [self._remove(key) for key in [k for k in self._runners if not self._pins[k]]]
        self._dispose(released)

    # --- internals (called with the lock held) -------------------------------------------------

    def _check_size(self, key: ExpertKey, nbytes: int) -> None:
        if nbytes > self.capacity_bytes:
            raise CacheCapacityError(f"expert {key} needs {nbytes} bytes, more than the whole expert cache "
                                     f"({self.capacity_bytes} bytes): raise the budget to at least {nbytes}")

    def _make_room(self, nbytes: int, evicted: list[ExpertRunner]) -> bool:
        """Evict unleased experts by policy until `nbytes` more fit; evict nothing if they never could.
        Runs under the lock on loader threads for every load: with room to spare it does nothing, since
        listing hundreds of resident experts per call cost more than the load's own Python (DeepSeek-VL2-
        Small at 4 GB: 179 calls a token, 1.7 ms each, on two cores that also decode)."""
        if self._used + nbytes <= self.capacity_bytes:
            return True
        pins, sizes = self._pins, self._sizes
        evictable = [k for k in self._runners if not pins[k]]
        if self._used - sum(sizes[k] for k in evictable) + nbytes > self.capacity_bytes:
            return False
        while self._used + nbytes > self.capacity_bytes:
            victim = self.policy.victim(evictable)
            evictable.remove(victim)
            evicted.append(self._remove(victim))
            self._evictions += 1
            log.debug("evicted %s (%s policy)", victim, self.policy.name)
        return True

    def resize(self, capacity_bytes: int) -> None:
        """A new capacity (a memory budget's room for experts changed: the KV cache grew); evicts by
        policy down to it. CacheCapacityError, with nothing changed, when leased or loading experts
        alone exceed it."""
        evicted: list[ExpertRunner] = []
        with self._lock:
            if capacity_bytes <= 0:
                raise CacheCapacityError(f"cache capacity must be positive, got {capacity_bytes}")
            held = self._used - sum(self._sizes[k] for k in self._runners if not self._pins[k])
            if held > capacity_bytes:
                raise CacheCapacityError(f"cannot shrink the expert cache to {capacity_bytes} bytes: {held} bytes "
                                         "are leased or loading")
            old, self.capacity_bytes = self.capacity_bytes, capacity_bytes
            self._make_room(0, evicted)
        if capacity_bytes != old:
            log.info("expert cache resized from %d to %d bytes (%d evicted)", old, capacity_bytes, len(evicted))
        self._dispose(evicted)

    def no_room(self, key: ExpertKey, nbytes: int) -> CacheCapacityError:
        """The error for a load of `key` that cannot find room (names what holds the capacity)."""
        with self._lock:
            return CacheCapacityError(self._no_room(key, nbytes))

    def _no_room(self, key: ExpertKey, nbytes: int) -> str:
        held: dict[ExpertKey, list[str]] = {}
        for lease in self._leases:
            for k in lease.keys:
                if k in self._runners:
                    held.setdefault(k, []).append(lease.purpose)
        holders = [f"{k} ({', '.join(sorted(purposes))})" for k, purposes in sorted(held.items())]
        holders += [f"{k} (loading)" for k in sorted(self._reserved)]
        return (f"no room for expert {key} ({nbytes} bytes): {self._used} of {self.capacity_bytes} bytes are "
                f"leased or loading ({', '.join(holders) or 'nothing'}); "
                "run one expert at a time or raise the budget")

    def _grow(self, nbytes: int) -> None:
        self._used += nbytes
        self._peak = max(self._peak, self._used)

    def _remove(self, key: ExpertKey) -> ExpertRunner:
        self._used -= self._sizes.pop(key)
        self.policy.removed(key)
        runner = self._runners.pop(key)
        release = getattr(runner, "release", None)
        if release is not None:  # a mapped expert drops its pages now (microseconds), before the bytes are reused
            release()
        return runner

    def _dispose(self, runners: list[ExpertRunner]) -> None:
        """Drop evicted runners outside the lock (freeing a session takes time), then notify the hook."""
        if not runners:
            return
        freed = sum(int(r.nbytes) for r in runners)
        runners.clear()
        if self._on_evict is not None:
            self._on_evict(freed)

    # --- reporting -----------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def resident_in(self, layer: int) -> list[ExpertKey]:
        """The resident experts of one layer (unsorted: cheaper than `resident()` on a large cache)."""
        with self._lock:
            return [k for k in self._runners if k.layer == layer]

    def resident(self) -> tuple[ExpertKey, ...]:
        with self._lock:
            return tuple(sorted(self._runners))

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.policy.name, self.capacity_bytes, self._used, self._peak,
                              tuple(sorted(self._runners)), self._hits, self._misses, self._evictions,
                              self._loads, self._bytes_loaded)
