"""Budgets: size strings to bytes, clear errors for bad ones, and the expert capacity a budget leaves."""

from __future__ import annotations

import pytest

from edgemoe.keys import ExpertKey
from edgemoe.offload import Budget, BudgetError, ExpertBudget, MemoryBudget, parse_size

SIZES = {ExpertKey(layer, e): 100 + 10 * e for layer in (1, 3) for e in range(4)}  # 920 bytes, largest 130


@pytest.mark.parametrize("text, nbytes", [
    ("1.5GB", 1_500_000_000), ("300MB", 300_000_000), ("300 mb", 300_000_000), ("300000000", 300_000_000),
    ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1kB", 1000), ("64KiB", 65536), ("1TB", 10**12),
    ("10B", 10), (" 7 ", 7), ("1e3", 1000), ("0.5GiB", 2**29), (4096, 4096),
])
def test_good_sizes(text, nbytes) -> None:
    assert parse_size(text) == nbytes


def test_percentages_are_of_all_expert_bytes() -> None:
    assert parse_size("25%", 1000) == 250 and parse_size("100%", 1000) == 1000
    assert parse_size("12.5 %", 1001) == 125  # rounded down: a budget never grows by rounding
    assert Budget.parse("25%", 2000) == Budget(500, "25%")
    assert str(Budget.parse("1.5GB")) == "1.5GB (1.50 GB)"


@pytest.mark.parametrize("text, message", [
    ("", "cannot read size ''"),
    ("lots", "cannot read size 'lots'"),
    ("-1GB", "cannot read size '-1GB'"),
    ("1.5XB", "unknown unit 'XB' in size '1.5XB'"),
    ("2G", "ambiguous: write GB .* or GiB"),
    ("1.5", "fraction of a byte"),
    ("0", "not a positive number of bytes"),
    ("0.0001B", "fraction of a byte"),
    ("25%", "percentage of all expert bytes, which are not known"),
    (True, "a size must be a string"),
    (-5, "not a positive number"),
])
def test_bad_sizes_say_what_is_wrong(text, message) -> None:
    with pytest.raises(BudgetError, match=message):
        parse_size(text)


def test_percent_out_of_range() -> None:
    for text in ("0%", "150%"):
        with pytest.raises(BudgetError, match="above 0 and at most 100"):
            parse_size(text, 1000)


def test_expert_budget_given_directly() -> None:
    b = ExpertBudget.for_experts("50%", SIZES)
    assert (b.capacity_bytes, b.largest_expert_bytes, b.all_experts_bytes, b.holds_all) == (460, 130, 920, False)
    assert ExpertBudget.for_experts("1GB", SIZES).capacity_bytes == 920  # capped: more is never used
    assert ExpertBudget.for_experts(130, SIZES.values()).capacity_bytes == 130  # exactly one expert is enough
    with pytest.raises(BudgetError, match=r"cannot hold the largest expert: the minimum is 130 bytes"):
        ExpertBudget.for_experts("129", SIZES)


def test_memory_budget_subtracts_the_baseline() -> None:
    budget = MemoryBudget.parse("1kB", trunk_bytes=300, kv_cache_bytes=200, activation_bytes=100, slack_bytes=50)
    assert budget.baseline_bytes == 650
    assert budget.expert_budget(SIZES) == ExpertBudget(350, 130, 920)


def test_memory_budget_too_small_names_the_minimum() -> None:
    budget = MemoryBudget(700, trunk_bytes=300, kv_cache_bytes=200, activation_bytes=100, slack_bytes=50)
    with pytest.raises(BudgetError, match=r"baseline takes 650 B .* one expert needs 130 B; "
                                          r"the minimum budget is 780 bytes"):
        budget.expert_budget(SIZES)
    with pytest.raises(BudgetError, match="percentage sizes the expert cache, not the process"):
        MemoryBudget.parse("25%")
    with pytest.raises(BudgetError, match="trunk_bytes must be a non-negative"):
        MemoryBudget(1000, trunk_bytes=-1)
    with pytest.raises(BudgetError, match="no experts to budget for"):
        MemoryBudget(1000).expert_budget({})


def test_the_plan_follows_a_growing_kv_cache_and_refuses_naming_the_minimum() -> None:
    from edgemoe.offload.budget import BudgetError
    from edgemoe.runtime.budget import BudgetPlan

    memory = MemoryBudget(1000, trunk_bytes=300, kv_cache_bytes=100, activation_bytes=50, slack_bytes=50)
    plan = BudgetPlan(500, 2000, 120, memory, resident_sizes=(120,) * 20, factor=1.0)
    grown = plan.for_context(kv_cache_bytes=300, activation=50)
    assert grown.expert_bytes == 1000 - 300 - 300 - 50 - 50 == plan.expert_bytes - 200
    capped = BudgetPlan(500, 2000, 120, memory, (120,) * 20, 1.0, expert_cap=240).for_context(100, 50)
    assert capped.expert_bytes == 240  # an expert budget still caps what the memory budget leaves
    with pytest.raises(BudgetError, match=r"the minimum budget is 1090 bytes"):
        plan.for_context(kv_cache_bytes=570, activation=50)  # 300 + 570 + 50 + 50 + one expert of 120
    assert BudgetPlan(None, 2000, 120).for_context(10**9, 10**9).expert_bytes is None  # no memory budget
