"""Keep the exporter's resident memory close to what it actually holds (glibc only; a no-op elsewhere).

Contract: `return_freed_memory()` is called once at the start of an export. It fixes glibc's mmap
threshold at 128 KiB, so every large buffer (a 16-800 MB weight, a serialized graph) is its own
mapping that goes back to the OS when freed. With glibc's default dynamic threshold, freeing one
mapped buffer raises the threshold to 32 MiB and later buffers of that size land on the heap, which
glibc keeps: on a full-size export the vision step left 4.7 GB resident after it had freed all but
0.5 GB (measured, see the export report). `trim()` hands back free heap pages after a step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD = 128 << 10


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_freed_memory() -> bool:
    """Fix the mmap threshold (module docstring); False where libc has no mallopt (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    log.debug("mallopt(M_MMAP_THRESHOLD, %d): %s", MMAP_THRESHOLD, ok)
    return ok


def trim() -> None:
    """Give free heap pages back to the OS (malloc_trim(0))."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
