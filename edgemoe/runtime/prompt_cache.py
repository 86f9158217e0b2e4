"""A prompt's image prefix kept on disk, so a later question about the same image, in a fresh process,
skips the vision tower and the image's prefill (the document-QA case: many questions, one image).

Contract: `PromptCache(directory)` holds two kinds of entry, both named by a blake2b digest of what
they depend on, so a hit is only ever what a cold run would compute here:
- image features: `features(pixels)` / `save_features(pixels, rows)`: an image's projected rows
  [N, H], keyed by the prepared pixels (`ImageInput`: views and grid, not the file's path or mtime).
- a KV prefix: `restore(cache, positions, image_digest)` / `save(cache, positions, image_digest)`:
  the KV rows of the spliced positions up to the end of the last image, keyed by those positions (the
  template, the system prompt, the image markers expanded) and the digest of the image rows they hold.
`restore` reads the rows straight into the cache's preallocated buffers (no second copy in RAM: a
memory budget has already counted those buffers) and sets the cache's length; it returns False, with
the cache as it was, when there is no entry or the entry does not match, and False with the cache
emptied (length 0) when the file fails part-way through.
The directory is per bundle and machine (`for_bundle`: the manifest's sha256 and
`offload.prepacked.machine_signature`, since KV rows carry this CPU's and ORT's rounding). Files are
written whole (a temporary file, then a rename: a crash leaves no half entry) and their pages are
dropped from the page cache after writing and reading (they are not the model, and the footprint a
memory budget bounds must not grow by them). A file that cannot be written is logged and skipped: the
cache only ever saves time.

File format (`.kv`): 8 bytes little-endian header length, a JSON header {"shape": [B, KVH, P, D],
"dtype": "float16" | "float32", "positions": [...]}, then B x KVH blocks of P x D rows in the cache's
dtype (buffer-major, as `KVCache` holds them).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from edgemoe.model.image import ImageInput
from edgemoe.page_cache import drop_cached
from edgemoe.runtime.kv_cache import KVCache

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.hexdigest()


def pixels_digest(image: ImageInput) -> str:
    """What identifies a prepared image: its views' bytes and shape, and its tile grid."""
    pixels = np.ascontiguousarray(image.pixels, np.float32)
    return _digest(repr((pixels.shape, image.grid)).encode(), pixels.data)


def _write_whole(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
    """Write `chunks` to `path` through a temporary file and a rename, then drop its pages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())  # written back, so the drop below can evict every page
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    drop_cached(path)


class PromptCache:
    """Image features and image-prefix KV rows on disk (module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.hits = self.misses = 0  # KV prefixes restored / looked up and not found

    @classmethod
    def for_bundle(cls, root: str | os.PathLike, manifest_path: str | os.PathLike) -> "PromptCache":
        """The cache of one bundle on this machine, under `root`."""
        from edgemoe.offload.prepacked import machine_signature

        bundle = hashlib.sha256(Path(manifest_path).read_bytes()).hexdigest()[:16]
        return cls(Path(root) / f"{bundle}-{machine_signature()}")

    # -- image features ---------------------------------------------------------------------------

    def _features_path(self, key: str) -> Path:
        return self.directory / f"image-{key}.npy"

    def features(self, key: str) -> np.ndarray | None:
        """The projected rows saved for the prepared image with digest `key`, or None."""
        path = self._features_path(key)
        try:
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        drop_cached(path)
        return rows

    def save_features(self, key: str, rows: np.ndarray) -> None:
        path = self._features_path(key)
        if path.exists():
            return
        try:
            rows = np.ascontiguousarray(rows, np.float32)
            header = io.BytesIO()  # the .npy header, then the rows as they lie in memory
            np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(rows))
            _write_whole(path, [header.getvalue(), rows.data])
        except OSError as exc:
            log.warning("prompt cache: could not save image features to %s: %s", path, exc)

    # -- KV prefixes ------------------------------------------------------------------------------

    def _prefix_path(self, positions: Sequence[int], image_digest: bytes | None) -> Path:
        key = _digest(np.asarray(positions, np.int64).tobytes(), image_digest or b"")
        return self.directory / f"prefix-{key}.kv"

    def restore(self, cache: KVCache, positions: Sequence[int], image_digest: bytes | None) -> bool:
        """Read the saved rows of `positions` into `cache` (rows 0..P-1; length P); False if none."""
        path = self._prefix_path(positions, image_digest)
        buffers = cache.buffers()
        want = [len(buffers), cache.layout.heads, len(positions), cache.layout.dim]
        try:
            with open(path, "rb") as f:
                (size,) = _HEADER.unpack(f.read(_HEADER.size))
                header = json.loads(f.read(size))
                if header.get("shape") != want or header.get("positions") != list(positions) \
                        or header.get("dtype", "float32") != cache.dtype.name or cache.capacity < len(positions):
                    self.misses += 1
                    return False
                cache.truncate(0)  # the rows are overwritten from here on: nothing before is kept
                for buffer in buffers:
                    for head in range(cache.layout.heads):
                        block = buffer[0, head, :len(positions)]  # contiguous rows of one head
                        if f.readinto(memoryview(block).cast("B")) != block.nbytes:
                            raise OSError("truncated")
        except FileNotFoundError:
            self.misses += 1
            return False
        except (OSError, ValueError) as exc:
            log.warning("prompt cache: ignoring unreadable %s: %s", path, exc)
            self.misses += 1
            return False
        finally:
            drop_cached(path)
        cache.truncate(0)
        cache.advance(len(positions))
        self.hits += 1
        return True

    def save(self, cache: KVCache, positions: Sequence[int], image_digest: bytes | None) -> None:
        """Write the cache's rows 0..P-1 for `positions` (P = len(positions) <= cache.length)."""
        path = self._prefix_path(positions, image_digest)
        if path.exists() or cache.length < len(positions):
            return
        buffers = cache.buffers()
        header = json.dumps({"shape": [len(buffers), cache.layout.heads, len(positions), cache.layout.dim],
                             "dtype": cache.dtype.name, "positions": [int(p) for p in positions]}).encode()
        blocks = (memoryview(buffer[0, head, :len(positions)]).cast("B")
                  for buffer in buffers for head in range(cache.layout.heads))
        try:
            _write_whole(path, [_HEADER.pack(len(header)), header, *blocks])
        except OSError as exc:
            log.warning("prompt cache: could not save a prompt prefix to %s: %s", path, exc)
