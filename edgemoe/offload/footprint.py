"""A run's footprint, measured from outside the process: RSS plus the page cache its model files hold.

Contract: `measure_footprint(pid, files)` returns a `Footprint`: the process's RSS (VmRSS, which
already counts the file pages it maps and has faulted in) plus, for each watched file, the bytes the
page cache holds that the process does not have mapped in (`cached_bytes` minus the Rss of its
mappings of that file in /proc/PID/smaps, never below 0). That second term is what the OS keeps for
the run beyond its RSS: an evicted expert whose pages stay cached, a bundle file read for its sha256.
`model_files(bundle_dir)` lists what to watch (and what a cold run must read): every file of the bundle
(its manifest included) and, in this machine's
prepacked cache, the twins of its experts and its fused layers. `FootprintSampler` samples a process
every `interval_s` on a thread and keeps the peak (what `--memory-budget` promises to bound).
Linux only; elsewhere `measure_footprint` returns None.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgemoe.page_cache import cached_bytes
from edgemoe.periodic import Periodic
from edgemoe.proc_stats import smaps_rss, status_bytes


@dataclass(frozen=True)
class Footprint:
    rss_bytes: int
    file_cache_bytes: int  # watched files' cached pages the process does not have mapped in

    @property
    def total_bytes(self) -> int:
        return self.rss_bytes + self.file_cache_bytes


def process_rss(pid: int) -> int | None:
    return status_bytes("VmRSS", pid)


def mapped_resident(pid: int, files: set[str]) -> dict[str, int]:
    """Rss of `pid`'s mappings of each of `files` (real paths), from /proc/PID/smaps."""
    return smaps_rss(pid, lambda start, path: path if path in files else None)  # type: ignore[return-value]


def measure_footprint(pid: int, files: list[Path]) -> Footprint | None:
    """The footprint of process `pid` over the watched `files` (module docstring)."""
    rss = process_rss(pid)
    if rss is None:
        return None
    real = [os.path.realpath(p) for p in files]
    mapped = mapped_resident(pid, set(real))
    cached = 0
    for path in real:
        cached += max(0, (cached_bytes(path) or 0) - mapped.get(path, 0))
    return Footprint(rss, cached)


def model_files(bundle_dir: str | os.PathLike) -> list[Path]:
    """The bundle's files and this machine's prepacked twins of its experts and fused layers."""
    from edgemoe.bundle import Bundle
    from edgemoe.bundle.entries import MANIFEST_NAME
    from edgemoe.offload.fused import layer_key
    from edgemoe.offload.prepacked import PrepackedGraphs, data_file

    bundle = Bundle.open(bundle_dir, check_sizes=False)
    files = [bundle.root / MANIFEST_NAME] + [bundle.path_of(entry) for entry in bundle.manifest.files]
    graphs = PrepackedGraphs()
    keys = [entry.sha256 for entry in bundle.manifest.experts().values()]
    keys += [layer_key(bundle, n) for n in bundle.manifest.model_config().moe.layers]
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

    def sample(self) -> Footprint | None:
        now = measure_footprint(self.pid, self.files)
        if now is not None:
            self.samples += 1
            if self.peak is None or now.total_bytes > self.peak.total_bytes:
                self.peak = now
        return now
