"""Memory budgets: size strings parsed to bytes, and the expert cache capacity a budget leaves.

Contract: `parse_size` reads "1.5GB", "300 MB", "300000000", "512MiB" (kB/MB/GB/TB are powers of
1000, KiB/MiB/GiB/TiB powers of 1024, case-insensitive) and "25%" (of all expert bytes, which the
caller must supply) into a positive whole number of bytes, or raises a one-line `BudgetError` that
quotes the text and says what is accepted. A bare "G" or "M" is refused rather than guessed (tools
disagree on whether it means 10^9 or 2^30).

Two ways to size the expert cache, both frozen results:
  * `ExpertBudget.for_experts(spec, sizes)`: the cache capacity given directly ("2GB", "25%").
  * `MemoryBudget(total, trunk, kv_cache, activations, slack).expert_budget(sizes)`: what is left of
    a whole-process budget after the measured baseline (trunk weights + KV cache + activations +
    allocator slack; measured by the caller, passed in as numbers).
Either way the capacity is capped at all experts' bytes (more would never be used) and must hold at
least ONE expert, the largest: the provider works there by running a layer's top-2 experts one after
the other (load, run, evict). Below that the refusal names the minimum budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgemoe.offload.errors import BudgetError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_AMBIGUOUS = {"k", "m", "g", "t"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([A-Za-z%]*)\s*$")


def parse_size(spec: str | int, all_experts_bytes: int | None = None) -> int:
    """Bytes for a size string (module docstring); `all_experts_bytes` resolves percentages."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise BudgetError(f"a size must be a string like '1.5GB' or a number of bytes, got {spec!r}")
    if isinstance(spec, int):
        return _positive(spec, repr(spec))
    match = _SIZE.match(spec)
    if match is None:
        raise BudgetError(f"cannot read size {spec!r}: expected a number with an optional unit "
                          "(B, kB, MB, GB, TB, KiB, MiB, GiB, TiB) or a percentage like '25%'")
    number, exponent, unit = match.group(1), match.group(2), match.group(3).lower()
    value = float(number) * 10 ** int(exponent or 0)
    if unit == "%":
        return _percent(value, spec, all_experts_bytes)
    if unit in _AMBIGUOUS:
        raise BudgetError(f"size {spec!r} is ambiguous: write {unit.upper()}B (powers of 1000) "
                          f"or {unit.upper()}iB (powers of 1024)")
    if unit not in _UNITS:
        raise BudgetError(f"unknown unit {match.group(3)!r} in size {spec!r}: use B, kB, MB, GB, TB, "
                          "KiB, MiB, GiB or TiB")
    if _UNITS[unit] == 1 and not value.is_integer():
        raise BudgetError(f"size {spec!r} is a fraction of a byte: give whole bytes or a unit")
    return _positive(math.floor(value * _UNITS[unit]), spec)


def _percent(value: float, spec: str, all_experts_bytes: int | None) -> int:
    if all_experts_bytes is None:
        raise BudgetError(f"size {spec!r} is a percentage of all expert bytes, which are not known here")
    if not 0 < value <= 100:
        raise BudgetError(f"size {spec!r}: a percentage must be above 0 and at most 100")
    return _positive(math.floor(all_experts_bytes * value / 100), spec)


def _positive(nbytes: int, spec: str) -> int:
    if nbytes <= 0:
        raise BudgetError(f"size {spec} is not a positive number of bytes")
    return int(nbytes)


def format_bytes(nbytes: int) -> str:
    """'1.50 GB', '300.00 MB', '512 B': decimal units, as users write budgets."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


@dataclass(frozen=True)
class Budget:
    """A parsed size: its bytes and the text it came from (for messages)."""

    nbytes: int
    text: str

    @classmethod
    def parse(cls, spec: str | int, all_experts_bytes: int | None = None) -> "Budget":
        return cls(parse_size(spec, all_experts_bytes), str(spec))

    def __str__(self) -> str:
        return f"{self.text} ({format_bytes(self.nbytes)})"


def _sizes(expert_sizes: Mapping[Any, int] | Iterable[int], together: int = 1) -> tuple[int, int]:
    """(minimum capacity, total) of expert sizes given as {key: bytes} or plain byte counts: the
    minimum is the `together` largest (one expert, or a fused layer's experts held at once)."""
    sizes = list(expert_sizes.values() if isinstance(expert_sizes, Mapping) else expert_sizes)
    if not sizes:
        raise BudgetError("no experts to budget for")
    return minimum_capacity(sizes, together), sum(sizes)


def minimum_capacity(sizes: Iterable[int], together: int = 1) -> int:
    """The smallest expert cache that runs: the `together` largest experts resident at once."""
    return sum(sorted(sizes, reverse=True)[:max(1, together)])


@dataclass(frozen=True)
class ExpertBudget:
    """Bytes the expert cache may hold, with the numbers it was checked against."""

    capacity_bytes: int
    largest_expert_bytes: int  # the minimum capacity: one expert at a time
    all_experts_bytes: int

    @property
    def holds_all(self) -> bool:
        return self.capacity_bytes >= self.all_experts_bytes

    @property
    def fraction(self) -> float:
        """Share of all expert bytes the cache holds."""
        return self.capacity_bytes / self.all_experts_bytes

    @classmethod
    def for_experts(cls, spec: str | int, expert_sizes: Mapping[Any, int] | Iterable[int],
                    together: int = 1) -> "ExpertBudget":
        """The cache capacity given directly ('2GB', '25%'), checked against the experts' sizes."""
        largest, total = _sizes(expert_sizes, together)
        nbytes = parse_size(spec, total)
        if nbytes < largest:
            what = "the largest expert" if together <= 1 else f"a layer's {together} largest experts at once"
            raise BudgetError(f"expert budget {spec} ({format_bytes(nbytes)}) cannot hold {what}: "
                              f"the minimum is {largest} bytes ({format_bytes(largest)}){_one_at_a_time(together)}")
        return cls(min(nbytes, total), largest, total)


def _one_at_a_time(together: int) -> str:
    """The way out of a layer-at-once minimum (a fused store's), for a budget error's tail."""
    return "" if together <= 1 else "; --expert-store mapped pages one expert at a time"


@dataclass(frozen=True)
class MemoryBudget:
    """A whole-process budget and the measured baseline that is not experts (module docstring)."""

    total_bytes: int
    trunk_bytes: int = 0  # resident non-expert weights (vision tower, attention, dense MLPs, head)
    kv_cache_bytes: int = 0
    activation_bytes: int = 0  # peak activations (an image prefill is the largest)
    slack_bytes: int = 0  # allocator and runtime overhead measured above the sum of the parts
    startup_peak_bytes: int = 0  # the RSS high-water mark of start-up (loading, the first image's vision pass)

    def __post_init__(self) -> None:
        for name in ("total_bytes", "trunk_bytes", "kv_cache_bytes", "activation_bytes", "slack_bytes",
                     "startup_peak_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BudgetError(f"{name} must be a non-negative number of bytes, got {value!r}")

    @classmethod
    def parse(cls, spec: str | int, **baseline: int) -> "MemoryBudget":
        """A budget from a size string; percentages are refused (they size the expert cache only)."""
        if isinstance(spec, str) and spec.strip().endswith("%"):
            raise BudgetError(f"memory budget {spec!r}: a percentage sizes the expert cache, not the process; "
                              "give bytes like '4GB'")
        return cls(parse_size(spec), **baseline)

    @property
    def baseline_bytes(self) -> int:
        return self.trunk_bytes + self.kv_cache_bytes + self.activation_bytes + self.slack_bytes

    def expert_budget(self, expert_sizes: Mapping[Any, int] | Iterable[int], together: int = 1) -> ExpertBudget:
        """The expert cache capacity this budget leaves; BudgetError naming the minimum if none (the
        `together` largest experts: see `minimum_capacity`)."""
        largest, total = _sizes(expert_sizes, together)
        available = self.total_bytes - self.baseline_bytes
        if self.startup_peak_bytes > self.total_bytes and available >= largest:
            minimum = self.startup_peak_bytes
            raise BudgetError(
                f"memory budget {format_bytes(self.total_bytes)} cannot run this model: start-up (loading it "
                f"and encoding the image) peaked at {format_bytes(minimum)} before any expert was loaded; "
                f"the minimum budget is {minimum} bytes ({format_bytes(minimum)})")
        if available < largest:
            minimum = max(self.baseline_bytes + largest, self.startup_peak_bytes)
            raise BudgetError(
                f"memory budget {format_bytes(self.total_bytes)} cannot run this model: the baseline takes "
                f"{format_bytes(self.baseline_bytes)} (trunk {format_bytes(self.trunk_bytes)}, KV cache "
                f"{format_bytes(self.kv_cache_bytes)}, activations {format_bytes(self.activation_bytes)}, slack "
                f"{format_bytes(self.slack_bytes)}) and {'one expert needs' if together <= 1 else f'{together} experts at once need'} {format_bytes(largest)}; "
                f"the minimum budget is {minimum} bytes ({format_bytes(minimum)}){_one_at_a_time(together)}")
        return ExpertBudget(min(available, total), largest, total)
