"""What a generation reports: `GenerationStats`, `GenerationResult`, and the RSS sampler behind them.

Contract: both are frozen dataclasses with `to_dict()` (what `edgemoe ask --json` prints). Timing:
time to first token runs from the start of the request (image preprocessing included, bundle
loading excluded: that is `load_s`) to the first id; decode tokens/s counts the tokens after the
first over the time after the first. Cache and prediction numbers come from the expert provider's
own counters over this generation (a delta, so a chat's turns each report their own). Peak RSS is
the maximum of `RssSampler`'s samples (psutil, a background thread every few ms, plus explicit
samples at phase boundaries) and, separately, the process's lifetime high-water mark from
`resource.getrusage` (which includes whatever ran before, e.g. an export in the same process).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from edgemoe.periodic import Periodic
from edgemoe.proc_stats import io_bytes, status_bytes
from edgemoe.runtime.providers import ProviderCounters, provider_counters


@dataclass(frozen=True)
class GenerationStats:
    """Numbers about one generation (see module docstring)."""

    prompt_tokens: int  # spliced prompt length L' (image tokens included)
    image_tokens: int
    prefill_tokens: int  # positions computed at prefill (less than prompt_tokens when a chat reuses its cache)
    new_tokens: int
    load_s: float
    prefill_s: float
    time_to_first_token_s: float
    decode_s: float
    decode_tokens_per_s: float | None  # None with fewer than two tokens
    cache_hits: int
    cache_misses: int
    prediction_precision: float | None  # None when no prediction was scored
    prediction_recall: float | None
    bytes_paged: int  # every expert byte paged in during the request (prefill included)
    decode_bytes_paged: int  # those paged after the first token
    peak_rss_bytes: int  # sampled during this generation
    max_rss_bytes: int  # the process's lifetime high-water mark (getrusage)
    expert_budget_bytes: int | None  # None: every expert resident
    policy: str
    expert_store: str = "sessions"  # how experts were paged: mapped | sessions
    expert_cache_fraction: float | None = None  # the expert cache's share of all expert bytes (None: all)
    disk_read_bytes: int | None = None  # bytes this process read from storage during the request (/proc/self/io)
    image_encode_s: float = 0.0  # TTFT = image_encode_s + prefill_s: the vision tower and projector
    prefill_expert_load_s: float = 0.0  # of prefill_s: loading experts (read, verify, first sessions), over threads
    prefill_hash_s: float = 0.0  # of that: hashing bundle files for their sha256
    prefetched_in_time: int = 0  # of cache_hits: experts a hint loaded before the layer asked (first use)
    prefetched_late: int = 0  # of cache_misses: hinted experts still loading when the layer asked
    decode_disk_read_bytes: int | None = None  # those read after the first token
    hints_withheld: int = 0  # guessed experts not paged in: their rank's precision was below the floor (HintGate)
    routing: str = "model"  # "uniform": the benchmark mode (runtime.routing), not the model's answers

    @property
    def hit_rate(self) -> float | None:
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate}

    def summary(self) -> str:
        """One line for people: prompt, speed, experts, memory."""
        speed = "-" if self.decode_tokens_per_s is None else f"{self.decode_tokens_per_s:.1f}"
        reused = self.prompt_tokens - self.prefill_tokens  # a chat's earlier turns, or a prompt cache hit
        parts = [f"{self.prompt_tokens} prompt tokens ({self.image_tokens} image"
                 + (f", {reused} reused)" if reused > 0 else ")"),
                 f"first token {self.time_to_first_token_s:.2f} s (image {self.image_encode_s:.2f} s, experts loading "
                 f"{self.prefill_expert_load_s:.2f} s)", f"{self.new_tokens} tokens at {speed} tok/s",
                 f"experts {self.cache_hits} hits / {self.cache_misses} misses ({self.policy})",
                 f"{_mb(self.bytes_paged)} paged", f"peak RSS {_mb(self.peak_rss_bytes)}"]
        if self.prediction_precision is not None and self.prediction_recall is not None:
            parts.insert(4, f"prediction P {self.prediction_precision:.0%} R {self.prediction_recall:.0%}")
        if self.routing != "model":
            parts.insert(0, f"routing {self.routing} (benchmark mode: not the model's answer)")
        return " · ".join(parts)


@dataclass(frozen=True)
class GenerationResult:
    """An answer: its text, the generated ids (the stop id last when it stopped there), why it stopped."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: str  # "eos" | "stop" (a caller's stop string) | "length" | "context" | "cancelled"
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "token_ids": list(self.token_ids), "stop_reason": self.stop_reason,
                "stats": self.stats.to_dict()}


@dataclass
class Clock:
    """When generation started and when the first and latest token came out."""

    start: float
    first: float | None = None
    last: float | None = None
    at_first: "CounterSnapshot | None" = None  # counters when the first token came out

    def token(self) -> None:
        self.last = time.monotonic()
        self.first = self.first or self.last


@dataclass(frozen=True)
class CounterSnapshot:
    """Cumulative provider and prediction counters, to subtract per generation."""

    counters: ProviderCounters
    predicted: int
    needed: int
    correct: int
    disk_read: int | None = None  # /proc/self/io read_bytes: what really came from storage
    hash_seconds: float = 0.0  # the bundle's hashing time so far
    withheld: int = 0  # guessed experts the hint gate did not send

    @classmethod
    def take(cls, provider: Any, predictions: Any, hash_seconds: float = 0.0) -> "CounterSnapshot":
        """`predictions`: the MoE layer's prediction record (anything with `summary()`)."""
        p = predictions.summary()
        return cls(provider_counters(provider), p.predicted, p.needed, p.correct, storage_read_bytes(), hash_seconds,
                   p.withheld)

    def __sub__(self, other: "CounterSnapshot") -> "CounterSnapshot":
        disk = None if self.disk_read is None or other.disk_read is None else self.disk_read - other.disk_read
        return CounterSnapshot(self.counters - other.counters, self.predicted - other.predicted,
                               self.needed - other.needed, self.correct - other.correct, disk,
                               self.hash_seconds - other.hash_seconds, self.withheld - other.withheld)


def rss_high_water() -> int:
    """This process's peak RSS since its program started (VmHWM in /proc/self/status). Unlike
    getrusage's ru_maxrss, which carries the parent's RSS across fork + exec (a child of a large
    process reports the parent's peak), VmHWM belongs to this program's own address space. 0 off Linux."""
    return status_bytes("VmHWM") or 0


def storage_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (read_bytes in /proc/self/io: page
    faults, readahead and MADV_POPULATE_READ included; page-cache hits excluded), or None off Linux."""
    return io_bytes("read_bytes")


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def max_rss_bytes() -> int:
    """The process's peak RSS so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler(Periodic):
    """Samples this process's RSS on a daemon thread while in use (`with RssSampler() as s: ...`)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__(interval_s, "edgemoe-rss")
        self._proc = psutil.Process()
        self.peak = 0

    def sample(self) -> int:
        rss = self._proc.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss
