"""What a benchmark produced: `RunStats` (a child's own numbers), `BenchRun`, `PeerComparison`, `BenchReport`.

Contract: all frozen dataclasses. `BenchReport.to_json()` writes every field plus a `derived` block
per run (label, hit rate, paged bytes per token, bound tokens/s, fraction of the bound), the peer
comparisons and the uniform-routing budget curve, for readers that do not run Python;
`BenchReport.from_json()` reads the fields back (derived values are recomputed, not trusted), so a
round trip compares equal. A run that failed keeps its command and its one-line `error`, with no
numbers. Ratios to peers are peer / edgemoe for the same metric: decode 0.25 means the peer decodes
at a quarter of edgemoe's rate; peak RSS 3.0 means the peer needed three times the memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from edgemoe import __version__
from edgemoe.bench.codec import decode, encode
from edgemoe.bench.errors import BenchError
from edgemoe.bench.limits import Bandwidths, DecodeBound, TokenBytes, budget_curve
from edgemoe.bench.machine import MachineInfo

SCHEMA = "edgemoe-bench/1"
EDGEMOE = "edgemoe"
RESIDENT_PEER = "edgemoe-resident"  # the same bundle with every expert resident: our own ceiling
CURVE_FRACTIONS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
_KNOWN = ("time_to_first_token_s", "decode_tokens_per_s", "cache_hits", "cache_misses", "prediction_precision",
          "prediction_recall", "bytes_paged", "decode_bytes_paged", "prompt_tokens", "load_s", "peak_rss_bytes",
          "expert_budget_bytes", "decode_disk_read_bytes")


_INTS = ("cache_hits", "cache_misses", "bytes_paged", "decode_bytes_paged", "prompt_tokens", "peak_rss_bytes",
         "expert_budget_bytes", "decode_disk_read_bytes")


def _num(key: str, value: Any) -> Any:
    """A finite number (ints for counts and bytes), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        return None
    return int(value) if key in _INTS else value


@dataclass(frozen=True)
class RunStats:
    """The numbers a child reported about itself (`edgemoe ask --json` stats, or a peer's)."""

    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None
    cache_hits: int | None = None
    cache_misses: int | None = None
    prediction_precision: float | None = None
    prediction_recall: float | None = None
    bytes_paged: int | None = None  # every byte paged in during the request (prefill included)
    decode_bytes_paged: int | None = None  # during decode only, when the child reports it
    prompt_tokens: int | None = None  # spliced prompt length (image tokens included)
    load_s: float | None = None
    peak_rss_inside_bytes: int | None = None  # the child's own sampled peak
    decode_disk_read_bytes: int | None = None  # read from storage after the first token (/proc/self/io)
    expert_budget_bytes: int | None = None  # as the runtime resolved it
    extra: tuple[tuple[str, Any], ...] = ()  # the child's other scalar stats, for the record

    @classmethod
    def from_child(cls, stats: Mapping[str, Any]) -> "RunStats":
        """Known keys by name (missing ones stay None); other scalar keys go to `extra`."""
        known = {k: _num(k, stats.get(k)) for k in _KNOWN}
        known["peak_rss_inside_bytes"] = known.pop("peak_rss_bytes")
        extra = tuple(sorted((k, v) for k, v in stats.items()
                             if k not in _KNOWN and (v is None or isinstance(v, (int, float, str, bool)))))
        return cls(**known, extra=extra)

    def get(self, key: str) -> Any:
        """A stat by name, known or extra."""
        if key in self.__dataclass_fields__ and key != "extra":
            return getattr(self, key)
        return dict(self.extra).get(key)


@dataclass(frozen=True)
class BenchRun:
    """One measured process: an edgemoe run at a (budget, policy), or a peer."""

    engine: str  # "edgemoe" | "edgemoe-resident" | "torch-fp32" | "torch-bf16" | "accelerate-bf16"
    policy: str | None
    expert_budget: str | None  # as given ("50%", "1.5GB")
    memory_budget: str | None
    budget_bytes: int | None  # the expert budget in bytes; for an accelerate peer, the RAM it was given
    tokens_requested: int
    command: tuple[str, ...]
    token_ids: tuple[int, ...] = ()
    answer: str = ""
    stop_reason: str | None = None  # "eos" | "length" | ...: an early eos means fewer decoded tokens
    stats: RunStats = RunStats()
    peak_rss_bytes: int | None = None  # ru_maxrss of the child (wait4): exact
    peak_rss_polled_bytes: int | None = None  # psutil samples every 20 ms: may miss a short peak
    peak_footprint_bytes: int | None = None  # RSS + the model files' page cache it keeps, sampled from outside
    peak_file_cache_bytes: int | None = None  # the page-cache part of that peak
    wall_s: float = 0.0
    bound: DecodeBound | None = None
    error: str | None = None  # one line when the child failed
    expert_store: str | None = None  # an edgemoe run's --expert-store (None: the runtime's default)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def budget_label(self) -> str:
        parts = [p for p in (self.expert_budget, None if self.memory_budget is None else f"mem {self.memory_budget}")
                 if p]
        return " / ".join(parts) or "resident"

    @property
    def budget_key(self) -> tuple[str | None, str | None]:
        return self.expert_budget, self.memory_budget

    @property
    def label(self) -> str:
        if self.engine == EDGEMOE:
            store = f"({self.expert_store})" if self.expert_store else ""  # not [..]: rich markup
            return f"edgemoe {self.policy or ''} {store} {self.budget_label}".replace("  ", " ")
        if self.engine.startswith("accelerate"):
            return f"{self.engine} {self.budget_label}"
        return self.engine

    @property
    def decoded_tokens(self) -> int:
        """Tokens after the first (the first comes out of prefill)."""
        return max(len(self.token_ids) - 1, 0)

    @property
    def hit_rate(self) -> float | None:
        hits, misses = self.stats.cache_hits, self.stats.cache_misses
        if hits is None or misses is None or hits + misses == 0:
            return None
        return hits / (hits + misses)

    @property
    def paged_scope(self) -> str:
        """"decode" when the child split its paging by phase; "total" when prefill paging is included."""
        return "decode" if self.stats.decode_bytes_paged is not None else "total"

    @property
    def bytes_paged_per_token(self) -> float | None:
        """Paged bytes per decoded token (all paging over all tokens when the child gives no split)."""
        if self.stats.decode_bytes_paged is not None:
            return self.stats.decode_bytes_paged / self.decoded_tokens if self.decoded_tokens else None
        if self.stats.bytes_paged is None or not self.token_ids:
            return None
        return self.stats.bytes_paged / len(self.token_ids)

    @property
    def fraction_of_bound(self) -> float | None:
        rate = self.stats.decode_tokens_per_s
        if self.bound is None or rate is None:
            return None
        return rate / self.bound.tokens_per_s

    def derived(self) -> dict[str, Any]:
        return {"label": self.label, "hit_rate": self.hit_rate, "bytes_paged_per_token": self.bytes_paged_per_token,
                "paged_scope": self.paged_scope,
                "bound_tokens_per_s": None if self.bound is None else self.bound.tokens_per_s,
                "fraction_of_bound": self.fraction_of_bound}


@dataclass(frozen=True)
class PeerComparison:
    """A peer against one edgemoe run: each ratio is peer / edgemoe (module docstring)."""

    peer: str
    run: str
    decode_ratio: float | None
    ttft_ratio: float | None
    peak_rss_ratio: float | None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(peer: BenchRun, run: BenchRun) -> PeerComparison:
    return PeerComparison(peer.label, run.label,
                          _ratio(peer.stats.decode_tokens_per_s, run.stats.decode_tokens_per_s),
                          _ratio(peer.stats.time_to_first_token_s, run.stats.time_to_first_token_s),
                          _ratio(peer.peak_rss_bytes, run.peak_rss_bytes))


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class BenchReport:
    """A sweep of one bundle on one machine, with its measured limits and peers."""

    bundle: str
    bundle_bytes: int
    expert_precisions: tuple[tuple[str, int], ...]  # (precision, number of experts)
    machine: MachineInfo
    bandwidths: Bandwidths
    token_bytes: TokenBytes  # at the mean decode context of this sweep
    question: str
    image: str
    tokens: int
    cold: bool  # bundle pages evicted (DONTNEED) before each run
    runs: tuple[BenchRun, ...]
    peers: tuple[BenchRun, ...] = ()
    checkpoint: str | None = None
    routing: str = "model"  # "uniform": every edgemoe run drew its experts at random (runtime.routing)
    created_at: str = ""
    edgemoe_version: str = __version__

    def __post_init__(self) -> None:
        if not self.created_at:
            object.__setattr__(self, "created_at", _now())

    @property
    def failures(self) -> tuple[BenchRun, ...]:
        return tuple(r for r in self.runs + self.peers if not r.ok)

    def comparisons(self) -> tuple[PeerComparison, ...]:
        """Every peer against the edgemoe runs it is comparable with: resident peers against all of
        them, an offloading peer against the runs at its own budget."""
        out = []
        for peer in self.peers:
            for run in self.runs:
                if not (peer.ok and run.ok):
                    continue
                if peer.engine.startswith("accelerate") and peer.budget_key != run.budget_key:
                    continue
                out.append(compare(peer, run))
        return tuple(out)

    @property
    def _mapped(self) -> bool:
        """Whether a run paged mapped experts (pages mapped from the page cache, not copied)."""
        return any(r.stats.get("expert_store") == "mapped" for r in self.runs)

    @property
    def curve_link(self) -> str:
        """The link the budget curve pages over: decode re-reads the page cache (mapped when a run was)."""
        return "page cache (mapped)" if self._mapped else "page cache"

    def budget_curve(self) -> list[tuple[float, float]]:
        """(fraction of experts cached, uniform-routing bound tokens/s) for the plot and the JSON; over
        the page cache, like each run's own bound (sweep.with_bound)."""
        return budget_curve(self.token_bytes, self.bandwidths, False, CURVE_FRACTIONS, mapped=self._mapped)

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = encode(self)
        for key in ("runs", "peers"):
            for run, raw in zip(getattr(self, key), d[key]):
                raw["derived"] = run.derived()
        d["derived"] = {"comparisons": [encode(c) for c in self.comparisons()],
                        "budget_curve": [{"cached_fraction": f, "bound_tokens_per_s": t}
                                         for f, t in self.budget_curve()],
                        "resident_bytes_per_token": self.token_bytes.resident_bytes,
                        "memory_bandwidth": self.bandwidths.memory}
        return {"schema": SCHEMA, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> "BenchReport":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            found = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise BenchError(f"not an edgemoe bench report (schema {found!r}, expected {SCHEMA!r})")
        return decode(cls, d)

    @classmethod
    def from_json(cls, text: str | bytes) -> "BenchReport":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise BenchError(f"bench report is not valid JSON: {e.msg} (line {e.lineno})") from None
