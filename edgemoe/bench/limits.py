"""The physical limit of decoding, measured on this machine: bandwidth probes and the bytes a token touches.

Contract: a decoded token must stream every resident byte it uses through memory, and every byte
that missed the expert cache over the link it is paged from, so

    tokens/s <= 1 / (resident_bytes / memory_bandwidth + paged_bytes_per_token / link_bandwidth)

`token_bytes(manifest, context)` counts the resident bytes from the bundle's own file sizes (what
ONNX Runtime maps, at the precision each graph was stored in): every attention, dense-MLP and head
graph, the routers, one embedding row, `top_k` experts of every MoE layer, and the fp32 KV cache at
the context length. `measure_memory_bandwidth` streams a large float32 array (`np.add.reduce`),
single-threaded and split across threads; `measure_disk_read` reads files sequentially after
`posix_fadvise(DONTNEED)` (cold) and again at once (warm, page cache). A "cold" read of a file
written minutes ago may still come from the host's cache: reports say which was measured.
`decode_bound` combines them; `uniform_paged_bytes` is the paging one expects with a static cache
of a fraction of the experts under uniform routing (the anchors' 2.0/1.5/1.0/0.5 loads per layer
for 0-3 of 4 cached experts, top-2): real routing has locality, so a good cache beats it.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edgemoe.bench.errors import BenchError
from edgemoe.bundle import Manifest
from edgemoe.page_cache import sync_and_drop

TRUNK_ROLES = ("attention", "dense_mlp", "head", "router")  # read whole by every decoded token
CHUNK = 8 << 20
DISK_NOTE = "sequential read after posix_fadvise(DONTNEED); a recently written file may still be host-cached"


# -- bandwidth probes ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Bandwidths:
    """Measured bandwidths in bytes/s (best of a few repeats) and how they were measured."""

    memory_1t: float
    memory_mt: float | None  # `memory_threads` threads over disjoint halves; None when 1
    memory_threads: int
    memory_probe_bytes: int
    disk_cold: float | None  # None: nothing to read
    disk_warm: float | None
    disk_probe_bytes: int
    disk_probe_files: int
    disk_note: str = DISK_NOTE

    @property
    def memory(self) -> float:
        """The best streaming rate: what a physical limit must assume."""
        return max(self.memory_1t, self.memory_mt or 0.0)

    def link(self, cold: bool) -> float | None:
        """The bandwidth paged bytes come over: the disk (cold runs) or the page cache (warm runs)."""
        return self.disk_cold if cold else self.disk_warm


def _best_rate(nbytes: int, run, repeats: int) -> float:
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return nbytes / max(best, 1e-9)


def measure_memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 3, threads: int = 2
                             ) -> tuple[float, float | None]:
    """(single-thread, `threads`-thread) streaming read rate of a float32 array of `nbytes`, bytes/s."""
    arr = np.ones(max(nbytes // 4, 1024), dtype=np.float32)  # np.ones writes every page: no lazy zeros
    nbytes = arr.nbytes
    np.add.reduce(arr)  # warm up (page tables, caches)
    single = _best_rate(nbytes, lambda: np.add.reduce(arr), repeats)
    multi = None
    if threads > 1:
        parts = np.array_split(arr, threads)  # views: no copy
        with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL inside reductions
            multi = _best_rate(nbytes, lambda: list(pool.map(np.add.reduce, parts)), repeats)
    del arr
    return single, multi


def evict_pages(paths: Iterable[Path]) -> int:
    """Drop the page cache of each file (written back first); bytes advised. Linux; a no-op elsewhere."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    existing = [p for p in paths if os.path.isfile(p)]
    sync_and_drop(existing)
    return sum(os.path.getsize(p) for p in existing)


def _read_all(paths: Sequence[Path], limit: int, buf: bytearray) -> int:
    done = 0
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while done < limit and (n := f.readinto(view)):
                done += n
        if done >= limit:
            break
    return done


def measure_disk_read(paths: Sequence[Path], max_bytes: int = 1 << 30, chunk: int = CHUNK
                      ) -> tuple[float | None, float | None, int, int]:
    """(cold, warm) sequential read rates in bytes/s over `paths` (largest first, up to `max_bytes`),
    bytes read, files read. Cold = after DONTNEED (may be host-cached); warm = the same bytes again."""
    files = sorted((p for p in paths if p.is_file()), key=lambda p: p.stat().st_size, reverse=True)
    chosen, total = [], 0
    for p in files:
        if total >= max_bytes:
            break
        chosen.append(p)
        total += p.stat().st_size
    if not chosen or total == 0:
        return None, None, 0, 0
    buf = bytearray(chunk)
    evict_pages(chosen)
    t0 = time.perf_counter()
    done = _read_all(chosen, max_bytes, buf)
    cold = done / max(time.perf_counter() - t0, 1e-9)
    t0 = time.perf_counter()
    again = _read_all(chosen, max_bytes, buf)
    warm = again / max(time.perf_counter() - t0, 1e-9)
    return cold, warm, done, len(chosen)


def measure_bandwidths(disk_paths: Sequence[Path], memory_bytes: int = 1 << 30, disk_bytes: int = 1 << 30,
                       repeats: int = 3, threads: int | None = None) -> Bandwidths:
    """Both probes. `threads` defaults to the machine's cores, capped at 2 (cheap on a shared box)."""
    threads = min(2, os.cpu_count() or 1) if threads is None else threads
    single, multi = measure_memory_bandwidth(memory_bytes, repeats, threads)
    cold, warm, read, nfiles = measure_disk_read(disk_paths, disk_bytes)
    if not (single > 0 and math.isfinite(single)):
        raise BenchError(f"memory bandwidth probe returned {single}")
    return Bandwidths(single, multi, threads, (max(memory_bytes // 4, 1024)) * 4, cold, warm, read, nfiles)


# -- bytes per decoded token --------------------------------------------------------------------

@dataclass(frozen=True)
class TokenBytes:
    """Bytes one decoded token touches, from a bundle's manifest (module docstring)."""

    trunk_bytes: int  # attention + dense MLP + head graphs + routers
    embed_row_bytes: int
    experts_bytes: int  # top_k experts of every MoE layer (each layer's mean expert size)
    kv_bytes: int  # the KV cache at `context_tokens`
    context_tokens: int
    expert_bytes_total: int  # every expert of the bundle
    top_k: int
    moe_layers: int

    @property
    def resident_bytes(self) -> int:
        return self.trunk_bytes + self.embed_row_bytes + self.experts_bytes + self.kv_bytes


def kv_cache_bytes(manifest: Manifest, context_tokens: int, value_bytes: int | None = None) -> int:
    """The KV cache at `context_tokens`, in the bundle's cache dtype unless `value_bytes` says."""
    cfg = manifest.model_config()
    return cfg.kv_values_per_position * int(context_tokens) * (value_bytes or manifest.kv_value_bytes)


def token_bytes(manifest: Manifest, context_tokens: int, kv_value_bytes: int | None = None) -> TokenBytes:
    """Resident bytes a decoded token at `context_tokens` touches (module docstring)."""
    cfg = manifest.model_config()
    trunk = sum(manifest.bytes_of(e) for role in TRUNK_ROLES for e in manifest.by_role(role))
    embed = sum(manifest.bytes_of(e) for e in manifest.by_role("embed"))
    per_layer: dict[int, list[int]] = {}
    for key, entry in manifest.experts().items():
        per_layer.setdefault(key.layer, []).append(manifest.bytes_of(entry))
    top_k = cfg.moe.top_k
    experts = sum(top_k * sum(sizes) / len(sizes) for sizes in per_layer.values())
    return TokenBytes(trunk_bytes=trunk, embed_row_bytes=int(math.ceil(embed / max(cfg.vocab_size, 1))),
                      experts_bytes=int(round(experts)), kv_bytes=kv_cache_bytes(manifest, context_tokens,
                                                                                  kv_value_bytes),
                      context_tokens=int(context_tokens), expert_bytes_total=manifest.expert_bytes_total,
                      top_k=top_k, moe_layers=len(per_layer))


def uniform_paged_bytes(tb: TokenBytes, cached_fraction: float) -> float:
    """Expected paged bytes per token with `cached_fraction` of every layer's experts resident and
    uniform routing: top_k * (1 - c/E) expert loads per MoE layer."""
    f = min(max(cached_fraction, 0.0), 1.0)
    return (1.0 - f) * tb.experts_bytes


@dataclass(frozen=True)
class DecodeBound:
    """The fastest decode the bytes allow (module docstring)."""

    resident_bytes: int
    paged_bytes_per_token: float
    memory_bandwidth: float  # bytes/s
    link_bandwidth: float | None  # bytes/s; None when nothing was measured (then paging is free)
    link: str  # "disk" (after DONTNEED) | "page cache" (read) | "page cache (mapped)" (no copy)

    @property
    def seconds_per_token(self) -> float:
        paged = 0.0 if not self.link_bandwidth else self.paged_bytes_per_token / self.link_bandwidth
        return self.resident_bytes / self.memory_bandwidth + paged

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else math.inf


def decode_bound(tb: TokenBytes, paged_bytes_per_token: float, bw: Bandwidths, cold: bool,
                 mapped: bool = False) -> DecodeBound:
    """`mapped`: the paged bytes are page-cache pages mapped into the process, not copied (a mapped
    expert store), so they cost at most one pass at memory bandwidth, not a read()."""
    if mapped and not cold:
        return DecodeBound(tb.resident_bytes, float(paged_bytes_per_token), bw.memory, bw.memory,
                           "page cache (mapped)")
    return DecodeBound(tb.resident_bytes, float(paged_bytes_per_token), bw.memory, bw.link(cold),
                       "disk" if cold else "page cache")


def budget_curve(tb: TokenBytes, bw: Bandwidths, cold: bool, fractions: Sequence[float], mapped: bool = False
                 ) -> list[tuple[float, float]]:
    """(fraction of experts cached, bound tokens/s under uniform routing) for each fraction."""
    return [(f, decode_bound(tb, uniform_paged_bytes(tb, f), bw, cold, mapped).tokens_per_s) for f in fractions]
