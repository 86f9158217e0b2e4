"""Budget lists: percentages and sizes in, Budgets out; bad input is a one-line BenchError."""

from __future__ import annotations

import pytest

from edgemoe.bench.budgets import Budget, parse_budget, parse_budgets, parse_size
from edgemoe.bench.errors import BenchError
from edgemoe.bench.sweep import BenchOptions
from edgemoe.errors import EdgeMoEError


def test_percentages_and_sizes() -> None:
    budgets = parse_budgets("100%, 75%,50%,25%")
    assert [b.text for b in budgets] == ["100%", "75%", "50%", "25%"]
    assert [b.fraction for b in budgets] == [1.0, 0.75, 0.5, 0.25]
    assert budgets[2].bytes_of(1000) == 500 and budgets[0].is_fraction
    sizes = parse_budgets("1.5GB,512MiB,2000000,3kB,1e3")  # read by the runtime's own parser
    assert [b.nbytes for b in sizes] == [1_500_000_000, 512 << 20, 2_000_000, 3000, 1000]
    assert sizes[0].bytes_of(10) == 1_500_000_000 and not sizes[0].is_fraction
    assert parse_budgets(None) == ()


@pytest.mark.parametrize("text, fragment", [
    ("50%,abc", "cannot read size 'abc'"),
    ("0%", "above 0%"),
    ("150%", "at most 100%"),
    ("x%", "not a percentage"),
    ("50%,,25%", "empty item"),
    ("", "empty item"),
    ("1.5XB", "unknown unit 'XB'"),
    ("-2GB", "cannot read size"),
    ("2G", "ambiguous"),
    ("50%,50%", "listed twice"),
])
def test_bad_items_are_one_line_errors(text: str, fragment: str) -> None:
    with pytest.raises(BenchError) as info:
        parse_budgets(text, "--expert-budgets")
    message = str(info.value)
    assert fragment in message and "\n" not in message and message.startswith("--expert-budgets")
    assert isinstance(info.value, EdgeMoEError)  # the CLI turns it into `error: ...`, exit code 2


def test_memory_budgets_are_sizes_only() -> None:
    assert parse_budgets("2GB,3GB", "--memory-budgets", allow_percent=False)[1].nbytes == 3_000_000_000
    with pytest.raises(BenchError, match="is a percentage"):
        parse_budgets("50%", "--memory-budgets", allow_percent=False)


def test_budget_needs_exactly_one_value() -> None:
    with pytest.raises(BenchError):
        Budget("x")
    assert parse_budget(" 25% ").text == "25%" and parse_size("1GiB") == 1 << 30


def test_options_parse_defaults_and_product() -> None:
    opts = BenchOptions.parse(None, None, "lru,edgemoe", tokens=4)
    assert [b.text for b in opts.expert_budgets] == ["100%", "75%", "50%", "25%"]
    assert opts.policies == ("lru", "edgemoe") and len(opts.budget_pairs()) == 4
    mem_only = BenchOptions.parse(None, "2GB,3GB", "lru")
    assert mem_only.expert_budgets == () and [m.text for _, m in mem_only.budget_pairs()] == ["2GB", "3GB"]
    both = BenchOptions.parse("50%", "2GB,3GB", "lru")
    assert [(e.text, m.text) for e, m in both.budget_pairs()] == [("50%", "2GB"), ("50%", "3GB")]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(policies="lru,fifo"), "unknown policy 'fifo'"),
    (dict(tokens=1), "--tokens must be at least 2"),
    (dict(peers=True), "--peers needs --checkpoint"),
])
def test_bad_options(kwargs: dict, fragment: str) -> None:
    with pytest.raises(BenchError, match=fragment):
        BenchOptions.parse("50%", **kwargs)
