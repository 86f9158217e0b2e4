"""Size and sha256 of bundle files, computed as bytes pass by: once while writing, once per check.

Contract: `HashingWriter` is the only way the bundle writer puts bytes on disk, so the size and sha256
recorded in the manifest are those of the bytes written, never of a second read; `close()` fsyncs
before reporting them. `sha256_file` streams a file in bounded chunks (hashlib releases the GIL on
large updates, so a paging thread checking an expert does not stall the compute thread).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

CHUNK = 8 << 20  # 8 MiB: large enough for disk throughput, small enough for smooth progress


class HashingWriter:
    """A new binary file that counts and hashes everything written to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "xb")  # "x": two entries can never silently share a file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        # Slices of a memoryview are views: a 2 GB tensor is never copied to be written in pieces.
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            self._hash.update(piece)
            self._file.write(piece)
        self.size += len(view)

    def pad_to(self, alignment: int) -> None:
        """Write zeros up to the next multiple of `alignment`."""
        gap = -self.size % alignment
        if gap:
            self.write(bytes(gap))

    def copy_from(self, src: Path) -> None:
        with open(src, "rb") as f:
            while piece := f.read(CHUNK):
                self.write(piece)

    def close(self) -> tuple[int, str]:
        """Flush and fsync; (size, sha256 hex) of what was written."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return self.size, self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()  # the partial file dies with the writer's temp directory


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks; `on_bytes(n)` after each chunk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(CHUNK):
            h.update(piece)
            size += len(piece)
            if on_bytes is not None:
                on_bytes(len(piece))
    return size, h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (new files, renames). A no-op where directories can't be opened."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
