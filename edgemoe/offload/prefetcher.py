"""Prefetcher: background threads that page experts into the cache ahead of need.

Contract: `request(keys, step, urgent)` queues loads of keys neither resident nor already queued or
loading (never two loads of one key). The thread reserves a key's bytes in the cache before loading
(so a load never overshoots the budget, and the reservation cannot be evicted), loads it with the
store, and puts it in the cache. A request the cache has no room for is dropped, not queued behind
pinned experts: whoever needs that key later loads it on demand. Requests carry the decoding `step`
they are for; after `advance(step)` passes it they are stale and dropped unloaded (a load already
under way is kept, unleased: it is paid for, and the eviction policy decides whether it stays).

`urgent` requests are the current layer's misses: they go to the front of the queue, their bytes are
reserved while loading, and once loaded they stay under a "hold" lease (`ExpertCache.lease`) until
`wait()` hands them out or decoding passes their step, so nothing evicts them before use. Hints are
protected only while loading (their reservation); afterwards the eviction policy protects them (they
are recent and near).

`wait(key)` returns the runner and a "use" lease for the caller (who must `release()` it). A key
loading on the thread is waited for; a background load that fails re-raises its own `ExpertLoadError`
in the waiter, or in the next `wait` for that key if nobody was waiting yet (a new `request`
retries); a key merely queued, or not requested at all, is loaded on the caller's own thread (a demand load). Why there and
not at the head of the queue: the caller is blocked anyway, so its core is free; it never waits behind
a different key's load already in progress; and ORT releases the GIL while building a session, so a
demand load and a prefetch proceed in parallel. If the cache has no room for a demand load, it first
releases pins held for later keys (they will be reloaded if still needed), then waits for the load in
flight to finish, and raises `CacheCapacityError` only when nothing could free room.

`workers` threads take jobs from the one queue (DEFAULT_LOADERS). Several keep several experts' reads in
flight: one thread pages one expert at a time, advise, populate, put, and on a fast disk that leaves
most of the disk's rate unused (measured: one thread moved about 0.8 GB/s from a 1.95 GB/s disk).

`close()` drops queued work, releases held pins and joins the threads with a timeout: a load stuck in
the store cannot hang shutdown (the threads are daemons and discard what they finish after close).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import OffloadError, OffloadTimeout

if TYPE_CHECKING:
    from edgemoe.offload.cache import ExpertCache, Lease
    from edgemoe.offload.protocols import ExpertRunner, ExpertStore

log = logging.getLogger(__name__)

# Loader threads: two keep two experts' reads in flight, which is what a laptop SSD or these machines'
# virtual disks need to approach their sequential rate; more mostly add contention on two cores.
DEFAULT_LOADERS = 2


@dataclass(frozen=True)
class PrefetchStats:
    """What the prefetcher did."""

    requested: int  # loads queued
    prefetched: int  # loads completed by the background thread
    demand_loads: int  # loads done on a waiting caller's thread
    dropped_stale: int  # requests whose step had passed
    dropped_no_room: int  # requests the cache had no unleased room for
    failed: int  # loads that raised (either thread)
    wait_seconds: float  # time callers spent in wait(), their own demand loads included
    load_seconds: float  # background load time
    late: int = 0  # hinted loads a layer needed before they were done (made urgent, waited for)


@dataclass(eq=False)
class _Job:
    key: ExpertKey
    step: int | None  # decoding step this load is for; None = never stale
    urgent: bool
    state: str = "queued"  # queued -> loading -> done | failed | dropped
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Prefetcher:
    """Loads experts into `cache` from `store` on `workers` background threads (module docstring)."""

    def __init__(self, store: "ExpertStore", cache: "ExpertCache", clock: Callable[[], float] = time.monotonic,
                 *, wait_timeout: float | None = 600.0, name: str = "edgemoe-prefetch",
                 workers: int = DEFAULT_LOADERS) -> None:
        if workers < 1:
            raise ValueError(f"a prefetcher needs at least one worker thread, got {workers}")
        self.store, self.cache, self._clock, self.wait_timeout = store, cache, clock, wait_timeout
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._jobs: dict[ExpertKey, _Job] = {}  # queued or loading (on either thread)
        self._held: dict[ExpertKey, "Lease"] = {}  # urgent loads, held until wait() takes them
        self._failed: dict[ExpertKey, BaseException] = {}  # background failures not yet reported
        self._busy: set[_Job] = set()  # the background threads' current jobs
        self._step = 0
        self._closed = False
        self._fresh: set[ExpertKey] = set()  # hinted loads stored and not yet used
        self._counts = dict.fromkeys(("requested", "prefetched", "demand_loads", "dropped_stale", "late",
                                      "dropped_no_room", "failed"), 0)
        self._wait_seconds = self._load_seconds = 0.0
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()
        # A daemon thread still inside ORT when the interpreter tears down aborts the process
        # ("terminate called without an active exception"): stop it first if nobody closed us.
        atexit.register(self.close)

    # --- requests ------------------------------------------------------------------------------

    def request(self, keys: Iterable[ExpertKey], step: int | None = None, *, urgent: bool = False) -> int:
        """Queue loads of `keys` for decoding step `step`; returns how many were queued."""
        queued: list[_Job] = []
        with self._cond:
            if self._closed or self._is_stale(step):
                return 0
            for key in dict.fromkeys(keys):
                self._failed.pop(key, None)  # asked again: retry rather than report the old failure
                job = self._jobs.get(key)
                if job is not None:
                    if urgent:
                        self._make_urgent(job)
                elif key not in self._held and key not in self.cache:
                    queued.append(_Job(key, step, urgent))
            for job in reversed(queued) if urgent else queued:
                self._jobs[job.key] = job
                (self._queue.appendleft if urgent else self._queue.append)(job)
            self._counts["requested"] += len(queued)
            self._cond.notify_all()
        return len(queued)

    def take_fresh(self, key: ExpertKey) -> bool:
        """Whether `key` is resident because a hint loaded it and this is its first use (then it is
        no longer fresh): a prefetch that arrived in time."""
        with self._cond:
            if key in self._fresh:
                self._fresh.discard(key)
                return True
            return False

    def _make_urgent(self, job: _Job) -> None:
        """A hint the current layer turns out to need: hold it once loaded, and load it next."""
        if not job.urgent:
            self._counts["late"] += 1
        job.urgent = True
        if job.state == "queued":
            self._queue.remove(job)
            self._queue.appendleft(job)

    def release(self, keys: Iterable[ExpertKey]) -> None:
        """The caller will not wait for `keys` after all: no holds for them (loads still complete)."""
        keys = set(keys)
        with self._cond:
            for key in keys:
                job = self._jobs.get(key)
                if job is not None:
                    job.urgent = False
                hold = self._held.pop(key, None)
                if hold is not None:
                    hold.release()

    def advance(self, step: int) -> None:
        """Decoding reached `step`: drop requests and release holds for earlier steps."""
        with self._cond:
            self._step = step
            for job in [j for j in self._queue if self._is_stale(j.step)]:
                self._queue.remove(job)
                self._finish(job, "dropped", counter="dropped_stale")
            self._release_holds(self._is_stale)

    def _is_stale(self, step: int | None) -> bool:
        return step is not None and step < self._step

    def _release_holds(self, which: Callable[[int | None], bool]) -> int:
        keys = [k for k, hold in self._held.items() if which(hold.until_step)]
        for key in keys:
            self._held.pop(key).release()
        return len(keys)

    # --- waiting -------------------------------------------------------------------------------

    def wait(self, key: ExpertKey, timeout: float | None = None) -> tuple["ExpertRunner", "Lease"]:
        """The runner for `key` and a use lease on it for the caller; loads it here if nobody is (module
        docstring)."""
        start = self._clock()
        try:
            return self._wait(key, self.wait_timeout if timeout is None else timeout)
        finally:
            with self._cond:
                self._wait_seconds += self._clock() - start

    def _wait(self, key: ExpertKey, timeout: float | None) -> tuple["ExpertRunner", "Lease"]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if self._closed:
                    raise OffloadError(f"the prefetcher is closed: cannot fetch expert {key}")
                job = self._jobs.get(key)
                if job is not None and job.state == "queued":  # not started: load it here instead
                    self._queue.remove(job)
                    self._finish(job, "dropped")
                    job = None
                if job is None and key in self._failed:  # failed in the background before anyone waited
                    raise self._failed.pop(key)
                if job is None:
                    taken = self._take(key)
                    if taken is not None:
                        return taken
                    job = self._jobs[key] = _Job(key, None, True, state="loading")
                    break
            if not job.done.wait(_remaining(deadline)):
                raise OffloadTimeout(f"timed out after {timeout:g} s waiting for expert {key} to load")
            if job.error is not None:
                with self._cond:
                    self._failed.pop(key, None)  # reported here, so not again to the next waiter
                raise job.error
        return self._demand_load(job, deadline)

    def _take(self, key: ExpertKey) -> tuple["ExpertRunner", "Lease"] | None:
        """The resident runner under a use lease for the caller, which replaces its hold (if any)."""
        taken = self.cache.acquire(key, count=False)
        if taken is not None and key in self._held:
            self._held.pop(key).release()
        return taken

    def _demand_load(self, job: _Job, deadline: float | None) -> tuple["ExpertRunner", "Lease"]:
        try:
            self._reserve_for_demand(job.key, deadline)
            try:
                runner = self.store.load(job.key)
                lease = self.cache.put(job.key, runner, lease="use")
            except BaseException:
                self.cache.cancel(job.key)
                raise
        except BaseException as exc:
            with self._cond:
                self._finish(job, "failed", exc, counter="failed")
            raise
        with self._cond:
            self._finish(job, "done", counter="demand_loads")
        assert lease is not None
        return runner, lease

    def _reserve_for_demand(self, key: ExpertKey, deadline: float | None) -> None:
        nbytes = self.store.size_of(key)
        while not self.cache.reserve(key, nbytes):
            with self._cond:
                if self._release_holds(lambda step: True):
                    log.debug("released held experts to make room for %s", key)
                    continue
                if any(j.state == "loading" and j.key != key for j in self._jobs.values()):
                    if not self._cond.wait(_remaining(deadline)):  # that load will end and free its pin
                        raise OffloadTimeout(f"timed out waiting for room in the expert cache for {key}")
                    continue
                # Nothing is loading, so the cache cannot change under this lock: a last, decisive try.
                if self.cache.reserve(key, nbytes):
                    return
                raise self.cache.no_room(key, nbytes)

    # --- the background thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                job.state = "loading"
                self._busy.add(job)
            self._load(job)
            with self._cond:
                self._busy.discard(job)
                self._cond.notify_all()

    def _load(self, job: _Job) -> None:
        key, reserved, start = job.key, False, self._clock()
        try:
            if key in self.cache:
                self._end(job, "done")
                return
            reserved = self.cache.reserve(key, self.store.size_of(key))
            if not reserved:
                self._end(job, "dropped", counter="dropped_no_room")
                return
            runner = self.store.load(key)
        except Exception as exc:
            if reserved:
                self.cache.cancel(key)
            log.debug("prefetch of %s failed: %s", key, exc)  # raised to whoever waits for it
            with self._cond:
                self._failed[key] = exc  # the next wait() for this key raises it
                self._finish(job, "failed", exc, counter="failed")
            return
        self._store(job, runner, self._clock() - start)

    def _store(self, job: _Job, runner: "ExpertRunner", seconds: float) -> None:
        with self._cond:
            self._load_seconds += seconds
            if self._closed:
                self.cache.cancel(job.key)
                self._finish(job, "dropped")
                return
            # A load that arrives after its step is still kept (unleased): it is paid for, and the policy
            # decides whether it stays. A hold is taken by the put itself, so no eviction slips in between.
            hold = job.urgent and not self._is_stale(job.step)
            if not job.urgent:
                self._fresh.add(job.key)
        try:
            lease = self.cache.put(job.key, runner, lease="hold" if hold else None, until_step=job.step)
        except Exception as exc:  # it grew past its reservation and everything else is leased
            self._end(job, "failed", exc, counter="failed")
            return
        if lease is not None:
            with self._cond:  # waiters wait for `done`, set below: none can look for the hold before this
                if self._closed or not job.urgent:  # closed, or `release`d by its caller meanwhile
                    lease.release()
                else:
                    self._held[job.key] = lease
        self._end(job, "done", counter="prefetched")

    def _end(self, job: _Job, state: str, error: BaseException | None = None, counter: str | None = None) -> None:
        with self._cond:
            self._finish(job, state, error, counter)

    def _finish(self, job: _Job, state: str, error: BaseException | None = None, counter: str | None = None) -> None:
        """Record a job's end (lock held) and wake its waiters and any demand waiting for room."""
        job.state, job.error = state, error
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        if counter is not None:
            self._counts[counter] += 1
        job.done.set()
        self._cond.notify_all()

    # --- lifecycle and reporting ---------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the thread; whether it ended within `timeout` (it cannot be killed mid-load)."""
        atexit.unregister(self.close)
        with self._cond:
            self._closed = True
            while self._queue:
                self._finish(self._queue.popleft(), "dropped")
            self._release_holds(lambda step: True)
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if threading.current_thread() is not thread:
                thread.join(_remaining(deadline))
        alive = sum(t.is_alive() for t in self._threads)
        if alive:
            log.warning("%d prefetch thread(s) still loading after %.1f s; leaving them to finish as daemons",
                        alive, timeout)
        return not alive

    def join_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or loading in the background (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def held(self) -> tuple[ExpertKey, ...]:
        with self._cond:
            return tuple(sorted(self._held))

    def stats(self) -> PrefetchStats:
        with self._cond:
            return PrefetchStats(**self._counts, wait_seconds=self._wait_seconds, load_seconds=self._load_seconds)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
