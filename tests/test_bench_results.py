"""Report dataclasses: JSON round trip, derived values, peer ratios, the rich table and the plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from edgemoe.bench.errors import BenchError
from edgemoe.bench.limits import Bandwidths, DecodeBound, TokenBytes
from edgemoe.bench.machine import MachineInfo, machine_info
from edgemoe.bench.plot import plot_report
from edgemoe.bench.results import BenchReport, BenchRun, RunStats
from edgemoe.bench.view import render_report

TB = TokenBytes(trunk_bytes=600_000_000, embed_row_bytes=4096, experts_bytes=430_000_000, kv_bytes=200_000_000,
                context_tokens=630, expert_bytes_total=860_000_000, top_k=2, moe_layers=12)
BW = Bandwidths(memory_1t=12e9, memory_mt=20e9, memory_threads=2, memory_probe_bytes=1 << 30, disk_cold=1.5e9,
                disk_warm=8e9, disk_probe_bytes=1 << 30, disk_probe_files=3)
MACHINE = MachineInfo("AMD EPYC", ("avx2", "avx512f"), 2, 1, 24 * 10**9, "1.32.0", "3.11.9", "Linux",
                      (("numpy", "2.1"),))


def edge_run(policy: str, budget: str, fraction: float, rate: float, hits: int) -> BenchRun:
    stats = RunStats(time_to_first_token_s=20.0, decode_tokens_per_s=rate, cache_hits=hits, cache_misses=100 - hits,
                     prediction_precision=0.8, prediction_recall=0.7, bytes_paged=int(1e9 * (1 - fraction)),
                     prompt_tokens=614, load_s=1.5, peak_rss_inside_bytes=2 * 10**9,
                     expert_budget_bytes=int(860e6 * fraction), extra=(("policy", policy), ("stop_reason", "length")))
    bound = DecodeBound(TB.resident_bytes, 3e7 * (1 - fraction), BW.memory, BW.disk_cold, "disk")
    return BenchRun("edgemoe", policy, budget, None, int(860e6 * fraction), 32,
                    ("python", "-m", "edgemoe.cli", "ask"), token_ids=tuple(range(32)), answer="a picture",
                    stats=stats, peak_rss_bytes=int(2.2e9 * (0.5 + fraction)), peak_rss_polled_bytes=int(2.1e9),
                    wall_s=40.0, bound=bound)


def peer(engine: str, rate: float, rss: float, budget: str | None = None) -> BenchRun:
    return BenchRun(engine, None, budget, None, None, 32, ("python", "-m", "edgemoe.bench.peer_child"),
                    token_ids=tuple(range(32)), answer="x", stats=RunStats(time_to_first_token_s=30.0,
                                                                           decode_tokens_per_s=rate, load_s=9.0),
                    peak_rss_bytes=int(rss), peak_rss_polled_bytes=int(rss), wall_s=60.0)


def synthetic_report() -> BenchReport:
    runs = [edge_run(p, b, f, r * (1.2 if p == "edgemoe" else 1.0), int(h * 100))
            for p in ("lru", "edgemoe") for b, f, r, h in (("100%", 1.0, 8.0, 1.0), ("50%", 0.5, 3.0, 0.6),
                                                               ("25%", 0.25, 1.5, 0.35))]
    failed = BenchRun("edgemoe", "lfu", "25%", None, 215_000_000, 32, ("python",), error="error: budget too small")
    peers = (replace(runs[0], engine="edgemoe-resident"), peer("torch-fp32", 1.0, 12e9), peer("torch-bf16", 2.0, 6e9),
             peer("accelerate-bf16", 0.2, 2.5e9, "50%"))
    return BenchReport(bundle="/b/stablelm-int4", bundle_bytes=3_100_000_000,
                       expert_precisions=(("int4", 48),), machine=MACHINE, bandwidths=BW, token_bytes=TB,
                       question="Describe this image in detail.", image="synthetic", tokens=32, cold=True,
                       runs=tuple(runs) + (failed,), peers=peers, checkpoint="/c/full")


def test_json_round_trip() -> None:
    report = synthetic_report()
    text = report.to_json()
    again = BenchReport.from_json(text)
    assert again == report
    assert BenchReport.from_json(again.to_json()) == report
    raw = json.loads(text)
    assert raw["schema"] == "edgemoe-bench/1"
    assert raw["runs"][1]["derived"]["label"] == "edgemoe lru 50%"
    assert raw["runs"][1]["derived"]["hit_rate"] == pytest.approx(0.6)
    assert raw["derived"]["budget_curve"][0]["cached_fraction"] == 0.0
    assert raw["machine"]["cpu_flags"] == ["avx2", "avx512f"]


def test_bad_reports_are_refused() -> None:
    with pytest.raises(BenchError, match="not an edgemoe bench report"):
        BenchReport.from_json('{"schema": "other"}')
    with pytest.raises(BenchError, match="not valid JSON"):
        BenchReport.from_json("{")
    raw = json.loads(synthetic_report().to_json())
    del raw["machine"]["cpu_model"]
    with pytest.raises(BenchError, match="cpu_model"):
        BenchReport.from_dict(raw)


def test_derived_values() -> None:
    run = edge_run("lru", "50%", 0.5, 3.0, 60)
    assert run.label == "edgemoe lru 50%" and run.hit_rate == pytest.approx(0.6)
    assert run.paged_scope == "total" and run.bytes_paged_per_token == pytest.approx(5e8 / 32)
    assert run.fraction_of_bound == pytest.approx(3.0 / run.bound.tokens_per_s)
    split = replace(run, stats=replace(run.stats, decode_bytes_paged=31_000))
    assert split.paged_scope == "decode" and split.bytes_paged_per_token == pytest.approx(1000)
    assert RunStats.from_child({"cache_hits": 3.0, "bytes_paged": 1e6, "policy": "lru", "nested": {"x": 1},
                                "decode_tokens_per_s": float("nan")}) == \
        RunStats(cache_hits=3, bytes_paged=1_000_000, extra=(("policy", "lru"),))


def test_peer_ratios_are_peer_over_edgemoe_at_comparable_budgets() -> None:
    report = synthetic_report()
    comps = report.comparisons()
    torch_bf16 = [c for c in comps if c.peer == "torch-bf16"]
    assert len(torch_bf16) == 6  # resident peers face every successful edgemoe run (the failed one is skipped)
    at_50 = next(c for c in torch_bf16 if c.run == "edgemoe lru 50%")
    assert at_50.decode_ratio == pytest.approx(2.0 / 3.0) and at_50.ttft_ratio == pytest.approx(1.5)
    offload = [c for c in comps if c.peer.startswith("accelerate")]
    assert sorted(c.run for c in offload) == ["edgemoe edgemoe 50%", "edgemoe lru 50%"]  # its own budget only
    assert len(report.failures) == 1


def test_table_renders() -> None:
    console = Console(record=True, width=200)
    render_report(synthetic_report(), console)
    text = console.export_text()
    for fragment in ("edgemoe lru 50%", "torch-bf16", "accelerate-bf16 50%", "failed", "error: budget too small",
                     "AMD EPYC", "GB/s", "0.667x", "paged bytes include prefill"):
        assert fragment in text, fragment


def test_plot_is_written(tmp_path: Path) -> None:
    out = plot_report(synthetic_report(), tmp_path / "plots" / "sweep.png")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_machine_info_describes_this_machine() -> None:
    info = machine_info()
    assert info.logical_cores >= 1 and info.ram_bytes > 0 and info.cpu_model
    assert set(info.cpu_flags) <= {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                                    "amx_int8"}
