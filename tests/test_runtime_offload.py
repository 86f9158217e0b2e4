"""Offloaded == resident (every budget down to one expert, every policy), determinism, budgets, failures."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edgemoe.errors import EdgeMoEError
from edgemoe.offload import POLICIES, BudgetError, ExpertLoadError
from edgemoe.offload.mapped import PageResidency, mapped_store_supported
from edgemoe.runtime import ask
from test_runtime_fixtures import copy_bundle, edgemoe_cli, one_expert_bytes, run_engine, tiny  # noqa: F401

TOKENS = 8


STORES = ("sessions", "mapped") if mapped_store_supported() else ("sessions",)


@pytest.fixture(scope="module")
def resident(tiny):
    """Every expert resident as a session of its own: the reference every store and budget must equal."""
    return run_engine(tiny.bundle("qwen"), tiny.image, None, max_tokens=TOKENS, store="sessions")


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("policy", POLICIES)
def test_offloaded_equals_resident_at_every_budget(tiny, resident, policy: str, store: str) -> None:
    bundle = tiny.bundle("qwen")
    one = one_expert_bytes(bundle, store)
    want_tokens, want_logits, _ = resident
    for experts in (8, 5, 2, 1):  # all 8 experts of the tiny model ... exactly one
        tokens, logits, stats = run_engine(bundle, tiny.image, experts * one, policy, max_tokens=TOKENS, store=store)
        assert tokens == want_tokens, f"{experts} experts, {policy}, {store}"
        for step, (got, want) in enumerate(zip(logits, want_logits)):
            assert np.array_equal(got, want), f"{experts} experts, {policy}: logits differ at step {step}"
        assert stats.cache.peak_bytes <= experts * one
        if experts < 8:
            assert stats.cache.misses > 0 and stats.cache.evictions > 0


def test_same_answer_every_run_and_seeded_sampling(tiny) -> None:
    bundle = tiny.bundle("phi")
    first = ask(bundle, "Describe it.", tiny.image, max_tokens=TOKENS)
    second = ask(bundle, "Describe it.", tiny.image, max_tokens=TOKENS, expert_budget="30%")
    assert (first.token_ids, first.text) == (second.token_ids, second.text)
    assert first.stop_reason == "length" and len(first.token_ids) == TOKENS
    hot = dict(temperature=50.0, top_p=0.9, max_tokens=TOKENS)  # hot enough that the seed matters
    a = ask(bundle, "Describe it.", tiny.image, seed=3, **hot)
    b = ask(bundle, "Describe it.", tiny.image, seed=3, expert_budget="25%", policy="lfu", **hot)
    c = ask(bundle, "Describe it.", tiny.image, seed=4, **hot)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stats_are_filled_in(tiny) -> None:
    result = ask(tiny.bundle("stablelm"), "What is it?", tiny.image, max_tokens=TOKENS, expert_budget="25%",
                 policy="edgemoe")
    s = result.stats
    assert s.image_tokens == 16 and s.prompt_tokens == s.prefill_tokens > s.image_tokens
    assert s.new_tokens == len(result.token_ids) == TOKENS
    assert s.time_to_first_token_s > 0 and s.decode_tokens_per_s > 0
    assert s.cache_misses > 0 and s.bytes_paged >= s.cache_misses * 1000 and s.decode_bytes_paged <= s.bytes_paged
    assert 0 <= s.prediction_precision <= 1 and 0 <= s.prediction_recall <= 1
    assert s.peak_rss_bytes > 0 and s.max_rss_bytes >= s.peak_rss_bytes * 0.9
    assert s.policy == "edgemoe" and s.expert_budget_bytes > 0


def test_budgets_below_the_minimum_are_refused(tiny) -> None:
    bundle = tiny.bundle("stablelm")
    one = one_expert_bytes(bundle)
    with pytest.raises(BudgetError, match=f"minimum is {one} bytes") as info:
        ask(bundle, "What is it?", tiny.image, max_tokens=2, expert_budget=one - 1)
    assert "\n" not in str(info.value)
    with pytest.raises(BudgetError, match=r"the minimum budget is \d+ bytes") as info:
        ask(bundle, "What is it?", tiny.image, max_tokens=2, memory_budget="20MB")
    assert "\n" not in str(info.value)
    with pytest.raises(EdgeMoEError, match="policy"):
        ask(bundle, "What is it?", tiny.image, max_tokens=2, policy="fifo")


def test_memory_budget_leaves_the_rest_to_experts(tiny) -> None:
    bundle = tiny.bundle("stablelm")
    with pytest.raises(BudgetError) as info:
        ask(bundle, "What is it?", tiny.image, max_tokens=2, memory_budget="20MB")
    minimum = int(str(info.value).split("the minimum budget is ")[1].split(" bytes")[0])
    # Well above the minimum (RSS moves between sessions), the experts get what is left, capped at all.
    result = ask(bundle, "What is it?", tiny.image, max_tokens=4, memory_budget=minimum + (64 << 20))
    assert result.stats.expert_budget_bytes >= one_expert_bytes(bundle)
    assert result.token_ids == ask(bundle, "What is it?", tiny.image, max_tokens=4).token_ids


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # same size: only the sha256 check can tell
    path.write_bytes(bytes(data))


def test_corrupt_expert_file_is_a_one_line_error(tiny, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny.bundle("stablelm"), tmp_path / "corrupt")
    _corrupt(bundle / "experts" / "L2" / "E1.onnx")
    run = edgemoe_cli("ask", str(bundle), "What is it?", "--image", str(tiny.image), "--max-tokens", "4",
                      "--expert-budget", "25%", timeout=60)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot load expert L2/E1"), run.stderr
    assert "sha256" in lines[0]


def test_a_later_run_hashes_nothing_that_has_not_changed(tiny, tmp_path: Path, monkeypatch) -> None:
    from edgemoe.bundle import reader

    bundle = copy_bundle(tiny.bundle("stablelm"), tmp_path / "fresh")  # files no run has hashed yet
    hashed: list[str] = []
    real = reader.sha256_file
    monkeypatch.setattr(reader, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    first = ask(bundle, "What is it?", tiny.image, max_tokens=4, expert_budget="50%")
    assert hashed and all(name.endswith(".onnx") for name in hashed)
    hashed.clear()
    second = ask(bundle, "What is it?", tiny.image, max_tokens=4, expert_budget="50%")  # opens the bundle afresh
    assert hashed == [] and second.token_ids == first.token_ids
    _corrupt(bundle / "experts" / "L2" / "E1.onnx")  # changed since: hashed again, and caught
    run = edgemoe_cli("ask", str(bundle), "What is it?", "--image", str(tiny.image), "--max-tokens", "4",
                      "--expert-budget", "50%", timeout=60)
    assert run.returncode == 2 and "L2/E1" in run.stderr and "sha256" in run.stderr, run.stderr


def _fail_paging(monkeypatch, bundle: Path, store: str) -> None:
    """Make reading expert L0/E2 fail with EIO the way each store reads it."""
    if store == "sessions":
        real = Path.stat

        def failing_stat(path: Path, *args, **kwargs):
            if path.parts[-3:] == ("experts", "L0", "E2.onnx"):
                raise OSError(5, "Input/output error")
            return real(path, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", failing_stat)  # the store stats each expert file as it loads it
        return
    from edgemoe.bundle import Bundle
    from edgemoe.keys import ExpertKey
    from edgemoe.offload.prepacked import PrepackedGraphs

    sha = Bundle.open(bundle).manifest.expert(ExpertKey(0, 2)).sha256
    broken = PrepackedGraphs().path(sha).with_suffix(".bin")
    real_page_in = PageResidency.page_in

    def failing_page_in(self: PageResidency) -> None:
        if Path(self.path) == broken:
            raise OSError(5, "Input/output error")  # what MADV_POPULATE_READ reports for a bad read
        real_page_in(self)

    monkeypatch.setattr(PageResidency, "page_in", failing_page_in)


@pytest.mark.parametrize("store", STORES)
def test_read_error_while_paging_raises_instead_of_hanging(tiny, monkeypatch, store: str) -> None:
    bundle = tiny.bundle("qwen")
    budget = one_expert_bytes(bundle, store)
    _fail_paging(monkeypatch, bundle, store)
    outcome: dict[str, BaseException | object] = {}

    def run() -> None:
        try:
            outcome["result"] = ask(bundle, "What is it?", tiny.image, max_tokens=4, expert_budget=budget,
                                    expert_store=store)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "a failed expert read hung the runtime"
    error = outcome.get("error")
    assert isinstance(error, ExpertLoadError), outcome
    assert str(error).startswith("cannot load expert L0/E2") and "Input/output error" in str(error)
    assert "\n" not in str(error)


def test_the_prefill_reserve_goes_to_the_experts_while_decoding_and_comes_back(tiny, monkeypatch) -> None:
    """Under a memory budget the prefill's activation reserve, less an allowance for allocator noise, is
    lent to the expert cache once the prompt is in the KV cache, and taken back (evicting by policy)
    before the next prompt's prefill. A reserve smaller than the allowance is not lent at all."""
    from edgemoe.runtime import live_budget
    from edgemoe.bundle import Bundle
    from edgemoe.offload.budget import MemoryBudget
    from edgemoe.runtime.budget import FIXED_SLACK, BudgetPlan, decode_activation
    from edgemoe.runtime.live_budget import LiveBudget

    bundle = Bundle.open(tiny.bundle("stablelm"))

    class _Cache:  # what LiveBudget resizes: the capacity it is given, in order
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def resize(self, nbytes: int) -> None:
            self.sizes.append(nbytes)

    class _KV:
        capacity, nbytes = 64, 1 << 20

    class _Engine:
        cache, max_positions = _KV(), 64

    memory = MemoryBudget(1 << 30, trunk_bytes=100 << 20, slack_bytes=8 << 20)
    plan = BudgetPlan(1, 10 << 30, 1 << 20, memory, resident_sizes=(1 << 20,) * 8000, factor=1.0)
    cache = _Cache()
    live = LiveBudget(plan, bundle, cache, _Engine(), trunk=None)
    live.fit_prompt(40, 8)
    live.prefilled()
    assert cache.sizes[1] == cache.sizes[0]  # the tiny model's reserve is below the allowance: kept
    monkeypatch.setattr(live_budget, "prefill_activation", lambda bundle, positions: positions << 20)  # 1 MB each
    cache.sizes.clear()
    live.fit_prompt(40, 8)
    live.prefilled()
    live.fit_prompt(48, 8)
    live.prefilled()
    live.vision_bytes = 5 << 20
    live.vision_reopening()  # a chat's next image, encoded before its prompt is fitted
    decode = decode_activation(bundle.manifest.model_config(), 64)
    assert cache.sizes[1] - cache.sizes[0] == (40 << 20) - decode - FIXED_SLACK  # lent while decoding
    assert cache.sizes[2] == cache.sizes[0] - (8 << 20)  # taken back, and the longer prompt's 8 MB more
    assert cache.sizes[4] == cache.sizes[2] - (5 << 20)  # the vision pass gets the reserve back, and its tower

