"""The routing trace: write -> read round trip, one record per MoE layer call of a real run, and the
replay's cache arithmetic on a trace small enough to count by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemoe.model.routing_rule import Routing
from edgemoe.runtime import ChatSession, GenerationOptions
from edgemoe.runtime.routing_trace import RoutingTrace, TraceRecord, read_trace
from test_runtime_fixtures import tiny  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _replay_module():
    spec = importlib.util.spec_from_file_location("routing_replay", ROOT / "bench" / "routing_replay.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["routing_replay"] = module
    spec.loader.exec_module(module)
    return module


def _routing(experts: list[list[int]]) -> Routing:
    e = np.asarray(experts, np.int64)
    return Routing(e, np.ones(e.shape, np.float32) / e.shape[1], np.zeros((e.shape[0], 4), np.float32))


def test_a_trace_reads_back_what_was_routed(tmp_path: Path) -> None:
    trace = RoutingTrace(tmp_path / "t.jsonl")
    trace.record(1, _routing([[0, 1], [1, 2], [1, 3]]))
    trace.record(3, _routing([[2, 0]]))
    trace.close()
    assert read_trace(tmp_path / "t.jsonl") == [TraceRecord(1, 3, {0: 1, 1: 3, 2: 1, 3: 1}), TraceRecord(3, 1, {0: 1, 2: 1})]


def test_a_run_writes_one_record_per_moe_layer_call(tiny, tmp_path: Path) -> None:
    bundle = tiny.bundle("stablelm", "int4")
    path = tmp_path / "run.trace"
    with ChatSession(bundle, tiny.image, GenerationOptions(max_tokens=5, routing_trace=str(path))) as chat:
        result = chat.ask("What is in the image?")
        layers = chat.config.moe.layers
        top_k = chat.config.moe.top_k
    records = read_trace(path)
    assert len(records) == len(layers) * len(result.token_ids)  # the prefill, then each token but the last
    prefill, decode = records[:len(layers)], records[len(layers):]
    assert [r.layer for r in prefill] == list(layers) and all(r.tokens == result.stats.prompt_tokens for r in prefill)
    assert all(r.tokens == 1 and sum(r.experts.values()) == top_k for r in decode)


def test_replay_counts_loads_as_by_hand() -> None:
    replay = _replay_module()
    one = [TraceRecord(1, 1, {0: 1, 1: 1}), TraceRecord(1, 1, {0: 1, 2: 1}), TraceRecord(1, 1, {0: 1, 1: 1})]
    assert replay.static_loads(one, {(1, 0)}) == 3  # 1, 2, 1 missing
    assert replay.static_loads(one, {(1, 0), (1, 1)}) == 1
    assert replay.lru_loads(one, 2, [(1, 0), (1, 1)]) == 2  # 2 evicts 1, then 1 comes back
    assert replay.pinned_lru_loads(one, 2, [(1, 0), (1, 1)], 1) == 2  # 0 pinned; a 1-slot LRU starting with 1: 1 hits, 2 and 1 load
    assert replay.pinned_lru_loads(one, 2, [(1, 0), (1, 1)], 2) == 1  # {0, 1} pinned: only 2 loads
    prefill = [TraceRecord(1, 9, {0: 2, 1: 9, 2: 7, 3: 0})]
    stats = {"expert_cache_fraction": 0.5, "expert_budget_bytes": 200, "new_tokens": 4, "decode_bytes_paged": 300}
    result = replay.replay(stats, prefill + one)
    assert result["cache_experts"] == 2 and result["expert_bytes"] == 100  # 4 experts of 100 bytes, 2 cached
    per = result["static_bytes_per_token"]
    assert per["static-oracle"] == pytest.approx(100 / 3)  # {0, 1}: one load (expert 2) over 3 tokens
    assert per["static-prefill"] == pytest.approx(100)  # {1, 2}: expert 0 three times over 3 tokens
    # {1} pinned, one slot (first 2): 0 loads, 2 loads, 0 loads
    assert per["static-same-memory"] == pytest.approx(100)
    assert result["edgemoe_paged_bytes_per_token"] == 100


def test_belady_and_reuse_as_by_hand() -> None:
    replay = _replay_module()
    calls = [TraceRecord(1, 1, {0: 1}), TraceRecord(1, 1, {1: 1}), TraceRecord(1, 1, {2: 1}), TraceRecord(1, 1, {0: 1}),
             TraceRecord(1, 1, {1: 1})]
    # Two slots holding {0, 1}: 2 misses and must evict; the optimum evicts 1 (used last), so 0 hits and
    # only 1 loads again: 2 loads. LRU evicts 0 first, then 1: 3 loads.
    assert replay.belady_loads(calls, 2, [(1, 0), (1, 1)]) == 2
    assert replay.lru_loads(calls, 2, [(1, 0), (1, 1)]) == 3
    # Experts 0..2: no token reuses the previous token's expert, and each is used 1/3 of the time.
    assert replay.reuse(calls, [1]) == {"p_used_again": 0.0, "p_used": pytest.approx(1 / 3)}
