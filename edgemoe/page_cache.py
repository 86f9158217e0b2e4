"""The OS page cache of a file: measured with `mincore`, dropped with `posix_fadvise(DONTNEED)`.

A leaf module: the bundle reader, the offload stores and the bench all use it.

Contract: `cached_bytes(path)` is how many bytes of the file the page cache holds now (as `fincore`
counts them: `mincore` over a fresh read-only shared mapping, which faults nothing in), or None
where it cannot be measured (not Linux/glibc, the file unreadable). `drop_cached(path, ranges)`
asks the kernel to drop the file's clean pages in `ranges` (all of it by default). Pages that a
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
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.mmap.restype = ctypes.c_void_p
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.mincore.restype = ctypes.c_int
    return lib


def cached_bytes(path: str | os.PathLike) -> int | None:
    """Bytes of `path` in the page cache now (module docstring); 0 for an empty file."""
    lib = _libc()
    if lib is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = lib.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return None
        try:
            pages = -(-size // PAGE)
            vec = (ctypes.c_ubyte * pages)()
            if lib.mincore(addr, size, vec) != 0:
                return None
            resident = int((np.frombuffer(vec, np.uint8) & 1).sum())  # bit 0: resident; others reserved
        finally:
            lib.munmap(addr, size)
    finally:
        os.close(fd)
    return resident * PAGE


def resident_array_bytes(array: np.ndarray) -> int | None:
    """Bytes of a C-contiguous array's memory resident in RAM now (`mincore` over its pages; a lazily
    zeroed buffer counts only the pages written), or None where mincore is unavailable."""
    lib = _libc()
    if lib is None or array.nbytes == 0:
        return None if lib is None else 0
    start = array.ctypes.data // PAGE * PAGE
    size = array.ctypes.data + array.nbytes - start
    vec = (ctypes.c_ubyte * -(-size // PAGE))()
    if lib.mincore(ctypes.c_void_p(start), size, vec) != 0:
        return None
    return int((np.frombuffer(vec, np.uint8) & 1).sum()) * PAGE


def drop_cached(path: str | os.PathLike, ranges: Iterable[tuple[int, int]] | None = None) -> None:
    """Advise the kernel to drop `path`'s cached pages in (offset, length) `ranges` (default: all)."""
    _advise(path, ((0, 0),) if ranges is None else ranges, "POSIX_FADV_DONTNEED")


def will_need(path: str | os.PathLike, ranges: Iterable[tuple[int, int]]) -> None:
    """Start reading exactly `ranges` of `path` into the page cache, all at once (POSIX_FADV_WILLNEED:
    the reads go out together and mark no page for further readahead). Advice: never fails."""
    _advise(path, ranges, "POSIX_FADV_WILLNEED")


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
