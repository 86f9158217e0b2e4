"""Budget lists for a sweep: `--expert-budgets 100%,75%,50%` or sizes, `--memory-budgets 2GB,3GB`.

Contract: `parse_budgets(text, option)` turns a comma-separated list into `Budget`s, each keeping the
text it was given (that text is what the child `edgemoe ask` receives, so the runtime's own parser
decides what it means at run time) plus its value: a fraction of all expert bytes (`50%`) or a byte
count (`1.5GB`, `512MiB`, `2000000`). Decimal units (kB, MB, GB, TB) are powers of 1000, as disk sizes
are sold and as `edgemoe inspect` prints them; KiB/MiB/GiB are powers of 1024; a bare G or M is
refused as ambiguous. Anything else is a
one-line `BenchError` naming the option and the item at fault. `Budget.bytes_of(total)` resolves a
budget against the bundle's expert bytes, which the physical-limit arithmetic needs. Sizes are read
by the offload package's own `parse_size`, so the bench and the runtime agree on every unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgemoe.bench.errors import BenchError
from edgemoe.offload.budget import parse_size as _runtime_parse_size
from edgemoe.offload.errors import BudgetError

DEFAULT_EXPERT_BUDGETS = "100%,75%,50%,25%"


@dataclass(frozen=True)
class Budget:
    """One budget as given: a fraction of the expert bytes, or a byte count."""

    text: str
    fraction: float | None = None  # 0 < fraction <= 1 for "N%"
    nbytes: int | None = None  # for sizes

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.nbytes is None):
            raise BenchError(f"budget {self.text!r} must be either a percentage or a size")

    @property
    def is_fraction(self) -> bool:
        return self.fraction is not None

    def bytes_of(self, total: int) -> int:
        """This budget in bytes when `total` is 100% (sizes are returned as they are)."""
        # floor, as the runtime resolves a percentage (offload.budget)
        return math.floor(self.fraction * total) if self.fraction is not None else int(self.nbytes)

    def __str__(self) -> str:
        return self.text


def parse_size(text: str, where: str = "size") -> int:
    """'1.5GB' -> 1500000000, '512MiB' -> 536870912, '2000' -> 2000; BenchError otherwise."""
    if text.strip().endswith("%"):
        raise BenchError(f"{where}: {text!r} is a percentage; give a size such as 2GB")
    try:
        return _runtime_parse_size(text)
    except BudgetError as exc:
        raise BenchError(f"{where}: {exc}") from None


def parse_budget(text: str, where: str = "budget", allow_percent: bool = True) -> Budget:
    """One item: 'N%' (0 < N <= 100) or a size."""
    item = text.strip()
    if item.endswith("%"):
        if not allow_percent:
            return Budget(item, nbytes=parse_size(item, where))  # refused there, with the reason
        try:
            pct = float(item[:-1])
        except ValueError:
            raise BenchError(f"{where}: {item!r} is not a percentage (examples: 100%, 25%)") from None
        if not (0 < pct <= 100):
            raise BenchError(f"{where}: {item!r} must be above 0% and at most 100%")
        return Budget(item, fraction=pct / 100)
    return Budget(item, nbytes=parse_size(item, where))


def parse_budgets(text: str | None, option: str = "--expert-budgets", allow_percent: bool = True
                  ) -> tuple[Budget, ...]:
    """A comma-separated list of budgets, in the order given; duplicates are refused."""
    if text is None:
        return ()
    items = [t.strip() for t in text.split(",")]
    if not any(items) or "" in items:
        raise BenchError(f"{option}: {text!r} has an empty item (expected e.g. 100%,50% or 1GB,2GB)")
    budgets = tuple(parse_budget(t, f"{option} item", allow_percent) for t in items)
    seen = [b.text for b in budgets]
    dupes = sorted({t for t in seen if seen.count(t) > 1})
    if dupes:
        raise BenchError(f"{option}: {', '.join(dupes)} listed twice")
    return budgets
