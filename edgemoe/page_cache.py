"""The OS page cache of a file: measured with `mincore`, dropped with `posix_fadvise(DONTNEED)`.

A leaf module: the bundle reader, the offload stores and the bench all use it.

Contract: `cached_bytes(path)` is how many bytes of the file the page cache holds now (as `fincore`
counts them: `cachestat`, or `mincore` over a read-only shared mapping, which faults nothing in), or None
where it cannot be measured (not Linux/glibc, the file unreadable); `CacheProbe(paths)` counts many
files again and again, each opened once, so that one sweep is close to a snapshot.
`drop_cached(path, ranges)` asks the kernel to drop the file's clean pages in `ranges` (all of it by default). Pages that a
process maps and has faulted in stay (they are that process's RSS), dirty pages stay until written
(`sync_and_drop` writes them first), and the call never fails: dropping is advice, and a file that
cannot be opened has no pages to drop. On tmpfs nothing is dropped (its pages are the file).
`resident_array_bytes(array)` is the same count for a process's own buffer: how much of a lazily
zeroed array is backed by RAM (with transparent huge pages, one written row can back 2 MB).

Why this exists: a memory budget must bound the run's footprint, RSS plus what the process keeps in
the page cache. Evicting an expert (MADV_DONTNEED) only unmaps it; without the drop its pages stay
cached, a later miss is served at memory speed, and a machine whose page cache cannot hold the model
would see far slower paging than the run reported.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

PAGE = mmap.PAGESIZE
_PROT_READ, _MAP_SHARED = 0x1, 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value


_lib: Any = None


def _libc() -> Any:
    """The C library with mmap/mincore declared, or None off Linux (a leaf: no edgemoe imports)."""
    global _lib
    if _lib is None:
        _lib = False
        if os.name == "posix" and os.path.exists("/proc/self/maps"):
            try:
                _lib = ctypes.CDLL(None, use_errno=True)
                _lib.mincore  # noqa: B018 (present on Linux and the BSDs)
            except (OSError, AttributeError):
                _lib = False
    lib = _lib or None
    if lib is not None and lib.mincore.argtypes is None:
        lib.syscall.restype = ctypes.c_long
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.mmap.restype = ctypes.c_void_p
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.mincore.restype = ctypes.c_int
    return lib


def cached_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of `path` in the page cache now (module docstring); 0 for an empty file."""
    with CacheProbe([path]) as probe:
        counts = probe.cached()
    return counts[0]


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]  # len 0: to the end of the file


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # Linux >= 6.5; the same number on every architecture (the unified syscall table)


class CacheProbe:
    """`cached_bytes` for many files, over and over, fast enough to be a snapshot.

    Each file is opened once and kept until `close()`. Where the kernel has `cachestat` (Linux 6.5+),
    `cached()` is one cachestat per file, whose cost follows the pages cached (0.3 ms for 189 files of
    which little is cached); elsewhere each file is mapped once (read-only, shared, never touched) and
    counted with `mincore`, whose cost follows the file's size (42 ms for the same files, 4 GB). A
    sweep taking tens of milliseconds is not a snapshot: a paging run swaps several experts meanwhile,
    and one paged in after its file was counted and one paged out before are both counted. mincore mode
    has a caveat: the probe's mappings show in its own /proc/self/maps, where the mapped expert store
    looks for the mappings its sessions made, so measure another process."""

    def __init__(self, paths: Iterable[str | os.PathLike], cachestat: bool = True) -> None:
        """`cachestat=False` counts with mincore even where cachestat works (tests compare the two)."""
        self._lib = _libc()
        self._fds: list[int | None] = [self._open(p) for p in paths]
        self._maps: list[tuple[int, int] | None] | None = None  # mincore mode: (address, size) per file
        if self._lib is not None and not (cachestat and self._cachestat_works()):
            self._maps = [self._map(fd) for fd in self._fds]

    @staticmethod
    def _open(path: str | os.PathLike) -> int | None:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None

    def _cachestat_works(self) -> bool:
        fd = next((fd for fd in self._fds if fd is not None), None)
        return fd is not None and self._cachestat(fd) is not None

    def _cachestat(self, fd: int) -> int | None:
        out = _Cachestat()
        if self._lib.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CachestatRange(0, 0)), ctypes.byref(out), 0) != 0:
            return None
        return out.nr_cache * PAGE

    def _map(self, fd: int | None) -> tuple[int, int] | None:
        """(address, size) of a fresh mapping of the file, (0, 0) when empty, None when unmappable."""
        if fd is None:
            return None
        size = os.fstat(fd).st_size
        if size == 0:
            return (0, 0)
        addr = self._lib.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        return None if addr in (None, _MAP_FAILED) else (addr, size)

    def cached(self) -> list[int | None]:
        """Bytes of each file in the page cache now, in the order given; None where unmeasurable."""
        if self._lib is None:
            return [None] * len(self._fds)
        if self._maps is not None:
            return [self._mincore(m) for m in self._maps]
        return [None if fd is None else self._cachestat(fd) for fd in self._fds]

    def _mincore(self, mapping: tuple[int, int] | None) -> int | None:
        if mapping is None or mapping[1] == 0:
            return None if mapping is None else 0
        return _resident_bytes(self._lib, *mapping)

    def close(self) -> None:
        for mapping in self._maps or ():
            if mapping is not None and mapping[1]:
                self._lib.munmap(mapping[0], mapping[1])
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._maps, self._fds = None, []

    def __enter__(self) -> "CacheProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resident_array_bytes(array: np.ndarray) -> int | None:
    """Bytes of a C-contiguous array's memory resident in RAM now (`mincore` over its pages; a lazily
    zeroed buffer counts only the pages written), or None where mincore is unavailable."""
    lib = _libc()
    if lib is None or array.nbytes == 0:
        return None if lib is None else 0
    start = array.ctypes.data // PAGE * PAGE
    return _resident_bytes(lib, start, array.ctypes.data + array.nbytes - start)


def resident_range_bytes(addr: int, size: int) -> int | None:
    """Bytes of the pages spanning [addr, addr + size) of this process's memory that are resident in
    RAM (for a file mapping: in the page cache), or None where mincore is unavailable."""
    lib = _libc()
    if lib is None or size <= 0:
        return None if lib is None else 0
    start = addr // PAGE * PAGE
    return _resident_bytes(lib, start, addr + size - start)


def _resident_bytes(lib: Any, addr: int, size: int) -> int | None:
    """Bytes of the pages in [addr, addr + size) that `mincore` reports resident; None if it fails."""
    vec = (ctypes.c_ubyte * -(-size // PAGE))()
    if lib.mincore(ctypes.c_void_p(addr), size, vec) != 0:
        return None
    return int((np.frombuffer(vec, np.uint8) & 1).sum()) * PAGE  # bit 0: resident; others reserved


def drop_cached(path: str | os.PathLike, ranges: Iterable[tuple[int, int]] | None = None) -> None:
    """Advise the kernel to drop `path`'s cached pages in (offset, length) `ranges` (default: all)."""
    _advise(path, ((0, 0),) if ranges is None else ranges, "POSIX_FADV_DONTNEED")


# Linux starts at most max(the device's readahead window, its largest request) of one WILLNEED call
# (force_page_cache_ra): 8 MB on the benchmark machine, 128 KB - 1.25 MB with common defaults. A larger
# range was left mostly unread, and its rest then faulted in a page at a time (the mappings are
# MADV_RANDOM): a 13 MB range had 8.4 MB cached 0.5 s later, and paging a 19.5 MB fused StableLM expert
# took 80-110 ms instead of about 16. So the advice goes out in pieces that no device cuts short.
WILL_NEED_PIECE = 1 << 20


def will_need(path: str | os.PathLike, ranges: Iterable[tuple[int, int]]) -> None:
    """Start reading exactly `ranges` of `path` into the page cache, all at once (POSIX_FADV_WILLNEED, in
    pieces of `WILL_NEED_PIECE`: the reads go out together and mark no page for further readahead).
    Advice: never fails."""
    pieces = [(at, min(WILL_NEED_PIECE, offset + length - at)) for offset, length in ranges
              for at in range(offset, offset + length, WILL_NEED_PIECE)]
    _advise(path, pieces, "POSIX_FADV_WILLNEED")


def _advise(path: str | os.PathLike, ranges: Iterable[tuple[int, int]], advice: str) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for offset, length in ranges:
            os.posix_fadvise(fd, offset, length, getattr(os, advice))
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_and_drop(paths: Iterable[str | os.PathLike]) -> None:
    """Write `paths`' dirty pages to disk, then drop them from the cache (files just written)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
        drop_cached(path)
