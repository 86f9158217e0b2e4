"""Expert stores: where runnable experts come from. `OnnxExpertStore` builds them from a bundle's files.

Contract: `load(key)` returns a fresh, independent `ExpertRunner` or raises `ExpertLoadError` naming
the expert, whatever went wrong (missing entry, unreadable file, size or sha256 mismatch, ONNX
Runtime refusing the graph): one line, never a hang, never a half-built runner. `size_of(key)` is
known before loading and equals the runner's `nbytes`, so the cache reserves exactly what the load
will hold. Stores are called from the prefetcher's thread and the caller's at once: thread-safe.

`OnnxExpertStore` reads `experts/L{l}/E{e}.onnx` (from disk, or from RAM when the OS page cache has
it), checks it through the bundle the first time (`Bundle.verify_file`: size + sha256, remembered
by stat identity, so later loads cost one `stat`), and creates the session from the bytes it read
(graphs with external data are opened by path, so ORT finds their weights). `nbytes` is the file
size (plus any external data), not a measurement of resident memory: it is known before the load
(an exact reservation), deterministic (the same budget gives the same evictions on every machine),
and it is what budgets are written in. A session's resident memory differs from its file by a
kernel-dependent factor (prepacked weights, per-session buffers); `nbytes_factor` scales it when a
benchmark has measured that factor on the target machine.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import ExpertLoadError, one_line

if TYPE_CHECKING:
    from edgemoe.bundle import Bundle

log = logging.getLogger(__name__)

SessionFactory = Callable[[bytes | str], Any]  # serialized model (or a path) -> an InferenceSession


@dataclass(frozen=True)
class StoreStats:
    """What a store has read and built."""

    loads: int
    failures: int
    bytes_read: int
    load_seconds: float  # read + verify + session creation, summed over loads (threads overlap)

    @property
    def read_rate(self) -> float | None:
        """Bytes per second of load time: the effective paging bandwidth."""
        return self.bytes_read / self.load_seconds if self.load_seconds > 0 else None


class LoadCounter:
    """A store's load counters (`StoreStats`), thread-safe: `measure(build)` times one load."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._loads = self._failures = self._bytes = 0
        self._seconds = 0.0

    def measure(self, build: Callable[[], tuple[Any, int]]) -> Any:
        """Run `build() -> (runner, bytes read)`, count it (or its failure), return the runner."""
        start = self._clock()
        try:
            runner, nread = build()
        except Exception:
            with self._lock:
                self._failures += 1
            raise
        elapsed = self._clock() - start
        with self._lock:
            self._loads += 1
            self._bytes += nread
            self._seconds += elapsed
        return runner

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self._loads, self._failures, self._bytes, self._seconds)


class OnnxExpert:
    """One expert as an ORT session: `run(x [N, H] fp32) -> [N, H]`."""

    def __init__(self, key: ExpertKey, session: Any, nbytes: int) -> None:
        self.key, self.session, self.nbytes = key, session, nbytes
        self._input = session.get_inputs()[0].name
        self._outputs = [session.get_outputs()[0].name]

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(self._outputs, {self._input: x})[0]

    __call__ = run

    def __repr__(self) -> str:
        return f"OnnxExpert({self.key}, {self.nbytes} bytes)"


class OnnxExpertStore:
    """Experts of an opened `Bundle`, one ORT session each (module docstring)."""

    def __init__(self, bundle: "Bundle", session_factory: SessionFactory | None = None, *,
                 verify: bool = True, nbytes_factor: float = 1.0, clock: Callable[[], float] = time.perf_counter):
        if not (math.isfinite(nbytes_factor) and nbytes_factor > 0):
            raise EdgeMoEError(f"nbytes_factor must be a positive number, got {nbytes_factor!r}")
        if session_factory is None:
            from edgemoe.offload.sessions import session_factory as default_factory
            session_factory = default_factory()
        self.bundle, self.verify, self.nbytes_factor = bundle, verify, nbytes_factor
        self._make_session = session_factory
        self._counter = LoadCounter(clock)

    def keys(self) -> tuple[ExpertKey, ...]:
        return tuple(self.bundle.manifest.experts())

    def size_of(self, key: ExpertKey) -> int:
        entry = self._entry(key)
        return math.ceil(self.bundle.manifest.bytes_of(entry) * self.nbytes_factor)

    def load(self, key: ExpertKey) -> OnnxExpert:
        runner = self._counter.measure(lambda: self._build(key))
        log.debug("loaded %s", key)
        return runner

    def _build(self, key: ExpertKey) -> tuple[OnnxExpert, int]:
        entry = self._entry(key)
        manifest = self.bundle.manifest
        try:
            if self.verify:
                self.bundle.verify_file(entry)  # hashes the first time; a stat afterwards
            # By path, never from bytes: a session made from a bytes object keeps a copy of the whole
            # serialized graph beside its prepacked weights (measured 2.27x the file's bytes resident
            # for an int4 expert, 1.24x by path), and ORT resolves external data beside the graph.
            source = self._checked_path(entry)
        except EdgeMoEError as exc:
            raise ExpertLoadError(key, str(exc)) from exc
        except OSError as exc:
            raise ExpertLoadError(key, f"cannot read {entry.path}: {exc.strerror or exc}") from exc
        try:
            session = self._make_session(source)
        except Exception as exc:  # ORT raises Fail / InvalidProtobuf / RuntimeError with long texts
            raise ExpertLoadError(key, f"ONNX Runtime cannot open {entry.path}: {one_line(exc)}") from exc
        return OnnxExpert(key, session, self.size_of(key)), manifest.bytes_of(entry)

    def _checked_path(self, entry: Any) -> str:
        path = self.bundle.path_of(entry)
        size = path.stat().st_size
        if size != entry.size:  # changed between the check and the load
            raise EdgeMoEError(f"{entry.path} is {size} bytes but the manifest says {entry.size}")
        return str(path)

    def _entry(self, key: ExpertKey) -> Any:
        try:
            return self.bundle.manifest.expert(key)
        except EdgeMoEError as exc:
            raise ExpertLoadError(key, str(exc)) from exc

    def stats(self) -> StoreStats:
        return self._counter.stats()
