"""A run's footprint, measured from outside the process: its memory plus the page cache its model files hold.

Contract: `FootprintProbe(pid, files)` measures process `pid` again and again; `measure()` returns a
`Footprint`: the process's private memory (RssAnon + RssShmem from /proc/PID/status, plus the Rss of
its mappings of files that are not watched: libraries, the interpreter) and the watched files' bytes
in the page cache, mapped by the process or not. Their sum is the footprint: what the run holds in RAM
and what the OS keeps for it beyond that (an evicted expert whose pages stay cached, a bundle file
read for its sha256). Each watched page counts once: a mapped expert page is in the page cache, so it
is counted there and not again as RSS. `measure_footprint(pid, files)` is one such measurement.
`model_files(bundle_dir)` lists what to watch (and what a cold run must read): every file of the
bundle (its manifest included) and, in this machine's prepacked cache, the twins of its experts and its
fused layers. `FootprintSampler` samples a process every `interval_s` on a thread and keeps the peak
(what `--memory-budget` promises to bound). Linux only; elsewhere `measure` returns None.

Why this shape: a sample must be close to a snapshot, or a run that swaps experts is counted twice
(RSS read before an expert left, its successor's cache pages counted after it came). The parts that
change while experts move (anonymous memory, the watched files' cache) are read together in a few
milliseconds (`page_cache.CacheProbe`); the slow part, smaps (~40 ms), only gives the Rss of unwatched
files, which does not change while a run decodes, and is re-read at most every `libraries_every_s`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgemoe.page_cache import CacheProbe
from edgemoe.periodic import Periodic
from edgemoe.proc_stats import smaps_rss, status_bytes

# Paths in smaps that are shared memory (counted in RssShmem), not files on disk.
_SHMEM_PREFIXES = ("/memfd:", "/dev/shm/", "/SYSV")


@dataclass(frozen=True)
class Footprint:
    rss_bytes: int  # VmRSS when sampled (for reference: it counts mapped watched pages too)
    private_bytes: int  # anonymous and shared memory, and unwatched files' mapped pages
    model_cache_bytes: int  # watched files' pages in the page cache, mapped or not

    @property
    def total_bytes(self) -> int:
        return self.private_bytes + self.model_cache_bytes

    @property
    def file_cache_bytes(self) -> int:
        """What the footprint holds beyond RSS: watched files' cached pages the process does not map."""
        return max(0, self.total_bytes - self.rss_bytes)


def unwatched_file_rss(pid: int, files: set[str]) -> int:
    """File-backed Rss of `pid`'s mappings of files outside `files` (real paths), from /proc/PID/smaps
    (their copied-on-write pages are anonymous: RssAnon has them)."""
    def group(start: int, path: str) -> str | None:
        if not path.startswith("/") or path in files or path.startswith(_SHMEM_PREFIXES):
            return None
        return "other"
    return smaps_rss(pid, group, file_backed_only=True).get("other", 0)


class FootprintProbe:
    """Measures one process's footprint over watched files, many times (module docstring)."""

    def __init__(self, pid: int, files: list[Path], libraries_every_s: float = 1.0) -> None:
        self.pid = pid
        self._real = {os.path.realpath(p) for p in files}
        self._cache = CacheProbe(sorted(self._real))
        self._libraries_every_s = libraries_every_s
        self._libraries: tuple[float, int] | None = None  # (when read, bytes)

    def measure(self) -> Footprint | None:
        libraries = self._library_bytes()
        rss, anon, shmem = (status_bytes(f, self.pid) for f in ("VmRSS", "RssAnon", "RssShmem"))
        cached = sum(c or 0 for c in self._cache.cached())
        if rss is None or anon is None:
            return None
        return Footprint(rss, anon + (shmem or 0) + libraries, cached)

    def _library_bytes(self) -> int:
        now = time.monotonic()
        if self._libraries is None or now - self._libraries[0] >= self._libraries_every_s:
            self._libraries = (now, unwatched_file_rss(self.pid, self._real))
        return self._libraries[1]

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> "FootprintProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_footprint(pid: int, files: list[Path]) -> Footprint | None:
    """The footprint of process `pid` over the watched `files` now (module docstring)."""
    with FootprintProbe(pid, files) as probe:
        return probe.measure()


def model_files(bundle_dir: str | os.PathLike) -> list[Path]:
    """The bundle's files and this machine's prepacked twins of its experts and fused layers."""
    from edgemoe.bundle import Bundle
    from edgemoe.bundle.entries import MANIFEST_NAME
    from edgemoe.offload.fused_graph import layer_keys
    from edgemoe.offload.prepacked import PrepackedGraphs, data_file

    bundle = Bundle.open(bundle_dir, check_sizes=False)
    files = [bundle.root / MANIFEST_NAME] + [bundle.path_of(entry) for entry in bundle.manifest.files]
    graphs = PrepackedGraphs()
    keys = [entry.sha256 for entry in bundle.manifest.experts().values()]
    keys += list(layer_keys(bundle).values())
    for key in keys:
        graph = graphs.path(key)
        files += [graph, data_file(graph)]
    return [path for path in files if path.is_file()]


class FootprintSampler(Periodic):
    """Peak footprint of a process, sampled on a daemon thread (`with FootprintSampler(pid, files)`)."""

    def __init__(self, pid: int, files: list[Path], interval_s: float = 0.1) -> None:
        super().__init__(interval_s, "edgemoe-footprint")
        self.pid, self.files = pid, files
        self.peak: Footprint | None = None
        self.samples = 0
        self._probe: FootprintProbe | None = None

    def sample(self) -> Footprint | None:
        if self._probe is None:
            self._probe = FootprintProbe(self.pid, self.files)
        now = self._probe.measure()
        if now is not None:
            self.samples += 1
            if self.peak is None or now.total_bytes > self.peak.total_bytes:
                self.peak = now
        return now

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._probe is not None:
            self._probe.close()
            self._probe = None
