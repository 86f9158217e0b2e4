"""Mapped experts: page an expert's weights in and out, not its session.

Contract: `MappedExpertStore` is an `ExpertStore` (see store.py) whose experts are ORT sessions on
prepacked graphs (`edgemoe.offload.prepacked`): ORT maps their packed weights from a file instead of
building a private copy. Each expert's session is created once, on its first load, and lives until
`close()`; what the cache holds and evicts is the expert's *pages*. `load(key)` pages the weights in
(`madvise(MADV_POPULATE_READ)`: from the OS page cache at memory speed, from disk when cold) and
returns the expert; `MappedExpert.release()`, which the cache calls on eviction, drops them from the
process (`madvise(MADV_DONTNEED)`: the pages are clean, so nothing is written back). Eviction is
microseconds and a miss costs a read of the expert's packed bytes instead of a session build (tens of
milliseconds). `size_of(key)` is the expert's mapped bytes: what paging it in adds to the process's
RSS and evicting it gives back, known before any load, so budgets are exact. Sessions are never
freed, so their small private memory is not the cache's: `session_overhead_bytes` (every expert's
session at once, at a per-session cost measured on this machine) is a fixed cost a memory budget
sets aside.

Correctness never depends on residency: a session whose pages were dropped still runs (the kernel
faults them back), so outputs equal the session store's bit for bit whatever the cache does.

Linux only (madvise via ctypes and /proc/self/maps); `mapped_store_supported()` says whether this
process can use it, and the runtime falls back to `OnnxExpertStore` where it cannot.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemoe.errors import EdgeMoEError
from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import ExpertLoadError, PrepareError, one_line
from edgemoe.offload.prepacked import PAGE, SESSION_OVERHEAD, PrepackedGraphs, data_file, mapped_bytes
from edgemoe.offload.sessions import glibc
from edgemoe.offload.store import LoadCounter, OnnxExpert, StoreStats
from edgemoe.page_cache import drop_cached, will_need
from edgemoe.proc_stats import smaps_rss, status_bytes

if TYPE_CHECKING:
    from edgemoe.bundle import Bundle

log = logging.getLogger(__name__)

MADV_RANDOM, MADV_WILLNEED, MADV_DONTNEED, MADV_POPULATE_READ = 1, 3, 4, 22  # Linux asm-generic/mman-common.h
# One expert session's private memory is measured, not assumed (measured 174 KiB for DeepSeek-VL2-Tiny's
# 1.8 MB int4 experts, about 0.5 MB for StableLM's 18 MB ones): sample the largest experts, add a margin.
OVERHEAD_SAMPLE = 8
OVERHEAD_MARGIN = 1.5
OVERHEAD_FLOOR = 64 << 10


def anonymous_rss() -> int | None:
    """This process's anonymous resident bytes (RssAnon in /proc/self/status), or None off Linux."""
    return status_bytes("RssAnon")


def _madvise_fn() -> Any:
    """glibc with madvise's signature declared, or None (not Linux/glibc)."""
    lib = glibc()
    if lib is not None and lib.madvise.argtypes is None:
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.restype = ctypes.c_int
    return lib


def mapped_store_supported() -> bool:
    """Whether this process can page mapped experts (Linux: madvise and /proc/self/maps)."""
    return _madvise_fn() is not None and os.path.exists("/proc/self/maps")


def find_mappings(path: Path) -> tuple[tuple[int, int, int], ...]:
    """(address, length, file offset) of every range this process maps from `path`."""
    target = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                start, end = (int(v, 16) for v in parts[0].split("-"))
                ranges.append((start, end - start, int(parts[2], 16)))
    return tuple(ranges)


def resident_bytes(ranges: tuple[tuple[int, ...], ...]) -> int:
    """Bytes of `ranges` (address first) now resident in this process (Rss in /proc/self/smaps)."""
    starts = {r[0] for r in ranges}
    return sum(smaps_rss("self", lambda start, path: start if start in starts else None).values())


# MADV_POPULATE_READ arrived in Linux 5.14; before that madvise answers EINVAL and page_in reads the
# file instead (tests switch this off to exercise that path).
POPULATE_READ = True
READ_CHUNK = 1 << 20


@dataclass
class PageResidency:
    """The ranges one session maps from its data file, paged in and out (module docstring).

    Paging in leaves only the mapped ranges cached (readahead past them is dropped); paging out
    unmaps them and drops them from the page cache, so a later load really reads the file. A failed
    page-in drops whatever it brought in before raising. With `shared`, the file also holds other
    residencies' pages (a fused layer's experts, `offload.fused_pages`): only these ranges are
    dropped, never the rest of the file, whose pages may be another expert's, arriving now."""

    path: Path
    ranges: tuple[tuple[int, int, int], ...] = ()  # (address, length, file offset)
    shared: bool = False

    @property
    def nbytes(self) -> int:
        return sum(r[1] for r in self.ranges)

    def page_in(self) -> None:
        """Make every mapped page resident; OSError when the file cannot be read. Never touches a page
        that might not be readable: MADV_POPULATE_READ returns the error where a touch would SIGBUS,
        and without it the ranges are read with pread, which fails instead."""
        try:
            if not self._populate():
                self._read()
        except OSError:
            self._drain()
            self.page_out()
            raise
        if not self.shared:
            drop_cached(self.path, self._unmapped())  # readahead past the mapped ranges

    def no_readaround(self) -> None:
        """MADV_RANDOM on the mappings: a fault reads its page, not the device's readahead window
        around it (8 MB on the benchmark machine), which would pull the file's other bytes (the
        original weights, another blob) into the page cache, where they count in the footprint and
        cost disk time. `page_in` reads the ranges exactly instead."""
        libc = _madvise_fn()
        for start, length, _ in self.ranges:
            libc.madvise(start, length, MADV_RANDOM)

    def _populate(self) -> bool:
        """MADV_POPULATE_READ every range; False where the kernel lacks it."""
        if not POPULATE_READ:
            return False
        # Exactly the mapped ranges, requested together; the populate below waits for them.
        will_need(self.path, [(offset, length) for _, length, offset in self.ranges])
        libc = _madvise_fn()
        for start, length, _ in self.ranges:
            if libc.madvise(start, length, MADV_POPULATE_READ) == 0:
                continue
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                return False
            raise OSError(err, f"cannot page in {self.path.name}: {os.strerror(err)}")
        return True

    def _read(self) -> None:
        """The ranges read into the page cache with pread (the mapping then faults them in from the
        cache, without I/O); a range the file no longer covers is EIO, as is a read that fails."""
        with open(self.path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if any(size <= offset + length - PAGE for _, length, offset in self.ranges):
                # a range's last page lies past EOF: the file was truncated
                raise OSError(errno.EIO, f"cannot page in {self.path.name}: the file is truncated")
            for at, want in self._chunks(size):
                if len(os.pread(f.fileno(), want, at)) < want:
                    raise OSError(errno.EIO, f"cannot page in {self.path.name}: short read")

    def _drain(self) -> None:
        """Wait out reads still in flight for the ranges (a pread waits on a page under I/O), so that a
        drop afterwards leaves nothing of a failed page-in behind; errors are expected here."""
        try:
            f = open(self.path, "rb", buffering=0)
        except OSError:
            return
        with f:
            for at, want in self._chunks(os.fstat(f.fileno()).st_size):
                try:
                    os.pread(f.fileno(), want, at)
                except OSError:
                    continue

    def _chunks(self, size: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of the ranges in READ_CHUNK pieces, clipped to a file of `size` bytes."""
        for _, length, offset in self.ranges:
            end = min(offset + length, size)
            for at in range(offset, end, READ_CHUNK):
                yield at, min(READ_CHUNK, end - at)

    def page_out(self) -> None:
        libc = _madvise_fn()
        for start, length, _ in self.ranges:
            libc.madvise(start, length, MADV_DONTNEED)
        drop_cached(self.path, [(offset, length) for _, length, offset in self.ranges] if self.shared else None)

    def _unmapped(self) -> list[tuple[int, int]]:
        """(offset, length) of the file's gaps between mapped ranges, the tail as length 0 (to EOF)."""
        gaps, at = [], 0
        for _, length, offset in sorted(self.ranges, key=lambda r: r[2]):
            if offset > at:
                gaps.append((at, offset - at))
            at = max(at, offset + length)
        return gaps + [(at, 0)]

    def resident(self) -> int:
        return resident_bytes(self.ranges)


class MappedExpert(OnnxExpert):
    """An expert whose session lives on; `release()` drops its weight pages (module docstring)."""

    def __init__(self, key: ExpertKey, session: Any, nbytes: int, residency: PageResidency) -> None:
        super().__init__(key, session, nbytes)
        self.residency = residency

    def page_in(self) -> None:
        self.residency.page_in()

    def release(self) -> None:
        self.residency.page_out()

    def __repr__(self) -> str:
        return f"MappedExpert({self.key}, {self.nbytes} bytes)"


class MappedExpertStore:
    """Experts of an opened `Bundle` as mapped prepacked sessions (module docstring)."""

    def __init__(self, bundle: "Bundle", graphs: PrepackedGraphs | None = None, *,
                 session_factory: Callable[[str], Any] | None = None,
                 options: Callable[[], Any] | None = None, verify: bool = True,
                 progress: Callable[[int, int], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        from edgemoe.offload.sessions import session_factory as default_factory, session_options

        if not mapped_store_supported():
            raise EdgeMoEError("mapped experts need Linux (madvise and /proc/self/maps)")
        self.bundle, self.graphs = bundle, graphs or PrepackedGraphs()
        self.verify = verify
        self._counter = LoadCounter(clock)
        self._options = options or session_options
        self._make_session = session_factory or default_factory()
        self._lock = threading.Lock()
        self._key_locks: dict[ExpertKey, threading.Lock] = {k: threading.Lock() for k in self.keys()}
        self._experts: dict[ExpertKey, MappedExpert] = {}
        self._overhead: int | None = None  # per-session private bytes, measured on first ask
        self._paths, self._sizes = self._prepare(progress)

    def keys(self) -> tuple[ExpertKey, ...]:
        return tuple(self.bundle.manifest.experts())

    def _prepare(self, progress: Callable[[int, int], None] | None) -> tuple[dict, dict]:
        """Prepacked graph of every expert (written once per machine) and its resident bytes;
        `progress(done, total)` counts the graphs written this time (none on later runs)."""
        manifest = self.bundle.manifest
        entries = {key: manifest.expert(key) for key in self.keys()}
        missing = [key for key, entry in entries.items() if not self.graphs.exists(entry.sha256)]
        paths, sizes, written = {}, {}, 0
        for key, entry in entries.items():
            try:
                if key in missing and self.verify:
                    self.bundle.verify_file(entry)  # never pack a tampered file
                path = self.graphs.ensure(entry.sha256, self.bundle.path_of(entry), self._options)
                sizes[key] = mapped_bytes(path)
            except EdgeMoEError as exc:
                raise ExpertLoadError(key, str(exc)) from exc
            except Exception as exc:  # OSError writing the cache, ORT refusing the graph
                raise PrepareError(f"cannot prepare {entry.path} for this machine: {one_line(exc)}") from exc
            paths[key] = path
            if key in missing:
                written += 1
                if progress is not None:
                    progress(written, len(missing))
        return paths, sizes

    @property
    def load_transient_bytes(self) -> int:
        """Memory one load holds outside the cache's reservation while it runs. Paging a mapped expert in
        fills pages the cache reserved beforehand; only a first load builds the expert's session, whose
        lasting cost is in `session_overhead_bytes`: at most one more session's worth while it is built."""
        return SESSION_OVERHEAD

    @property
    def session_overhead_bytes(self) -> int:
        """Private memory of every expert's session, once all exist (they are never freed): measured on
        this machine by `per_session_overhead`, never more than the SESSION_OVERHEAD ceiling each."""
        if self._overhead is None:
            self._overhead = self.per_session_overhead()
        return self._overhead * len(self._sizes)

    def per_session_overhead(self, sample: int = OVERHEAD_SAMPLE) -> int:
        """Bytes of private memory one expert session costs here: `sample` sessions are opened (each
        would be on its first load anyway) and the process's anonymous RSS measured around them, times
        OVERHEAD_MARGIN (allocator noise, larger experts), between OVERHEAD_FLOOR and SESSION_OVERHEAD.
        Where the measurement cannot be made (no /proc, every session already open) the ceiling holds."""
        pending = sorted((k for k in self.keys() if k not in self._experts), key=self.size_of, reverse=True)[:sample]
        before = anonymous_rss()
        if not pending or before is None:
            return SESSION_OVERHEAD
        for key in pending:
            self._open(key)
        grown = max(0, (anonymous_rss() or before) - before)
        measured = int(grown / len(pending) * OVERHEAD_MARGIN)
        log.info("expert sessions cost %d bytes of private memory each here (%d sampled, x%.1f margin)",
                 grown // len(pending), len(pending), OVERHEAD_MARGIN)
        return min(SESSION_OVERHEAD, max(OVERHEAD_FLOOR, measured))

    def size_of(self, key: ExpertKey) -> int:
        try:
            return self._sizes[key]
        except KeyError:
            raise ExpertLoadError(key, "no such expert in the bundle") from None

    def load(self, key: ExpertKey) -> MappedExpert:
        return self._counter.measure(lambda: self._page_in(key))

    def _page_in(self, key: ExpertKey) -> tuple[MappedExpert, int]:
        lock = self._key_locks.get(key)
        if lock is None:
            raise ExpertLoadError(key, "no such expert in the bundle")
        with lock:
            expert = self._experts.get(key) or self._open(key)
            try:
                expert.page_in()
            except OSError as exc:
                raise ExpertLoadError(key, f"cannot read {expert.residency.path}: {exc.strerror or exc}") from exc
        return expert, expert.residency.nbytes

    def _open(self, key: ExpertKey) -> MappedExpert:
        """The expert's session, created on its first load and kept (module docstring)."""
        path = self._paths[key]
        if self.verify:
            try:
                self.bundle.verify_file(self.bundle.manifest.expert(key))  # a stat after the first time
            except EdgeMoEError as exc:
                raise ExpertLoadError(key, str(exc)) from exc
        existing = set(find_mappings(data_file(path)))  # another session (an older store) may map it too
        try:
            session = self._make_session(str(path))
        except Exception as exc:
            raise ExpertLoadError(key, f"ONNX Runtime cannot open {path.name}: {one_line(exc)}") from exc
        # Only this session's mappings: another's go away with it, and paging them would fail (ENOMEM).
        ranges = tuple(r for r in find_mappings(data_file(path)) if r not in existing)
        residency = PageResidency(data_file(path), ranges)
        residency.no_readaround()
        # ORT read the whole graph and data file (original weights too) to build the session; keep
        # none of it cached beyond the mapped pages it faulted in (footprint, module docstring).
        drop_cached(path)
        drop_cached(residency.path)
        if residency.nbytes > self._sizes[key]:
            log.warning("expert %s maps %d bytes, more than the %d its budget counts", key, residency.nbytes,
                        self._sizes[key])
        expert = MappedExpert(key, session, self._sizes[key], residency)
        with self._lock:
            self._experts[key] = expert
        return expert

    def stats(self) -> StoreStats:
        return self._counter.stats()

    def close(self) -> None:
        """Drop every session (and its mappings), then the pages they mapped from the page cache: a
        process tearing down must not leave its experts cached (the footprint holds until the end)."""
        with self._lock:
            files = [e.residency.path for e in self._experts.values()]
            self._experts.clear()
        for path in files:
            drop_cached(path)

    @property
    def sessions(self) -> int:
        """Sessions created so far (each lives until `close`)."""
        with self._lock:
            return len(self._experts)

