"""The sweep end to end: a stand-in `edgemoe ask` (fast, offline), the CLI, and the real runtime when it exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.bench.errors import BenchError

from edgemoe.bench.limits import token_bytes
from edgemoe.bench.results import BenchReport
from edgemoe.bench.sweep import BenchOptions, ask_command, run_bench
from edgemoe.bundle import Manifest
from test_bench_limits import synthetic_manifest

MB = 1 << 20
# Stands in for `python -m edgemoe.cli ask ... --json`: touches (20 + budget%) MB, reports stats that
# depend on the budget, and fails like the runtime would for the lfu policy at 25%.
FAKE_ASK = r'''#!{python}
import json, sys, time
args = sys.argv[1:]
assert args[:3] == ["-m", "edgemoe.cli", "ask"], args
opt = lambda name: args[args.index(name) + 1] if name in args else None
budget, policy, n = opt("--expert-budget"), opt("--policy"), int(opt("--max-tokens"))
pct = float(budget.rstrip("%"))
if policy == "lfu" and pct < 30:
    sys.stderr.write("error: memory budget too small for the working set\n")
    sys.exit(2)
block = b"x" * int((20 + pct) * (1 << 20))
time.sleep(0.1)
hits = int(pct)
print(json.dumps({{"answer": "a fake answer", "token_ids": list(range(n)), "stop_reason": "length",
                  "stats": {{"time_to_first_token_s": 0.5, "decode_tokens_per_s": 2.0 + pct / 10,
                            "cache_hits": hits, "cache_misses": 100 - hits, "prediction_precision": 0.75,
                            "prediction_recall": None, "bytes_paged": int((100 - pct) * 1000), "prompt_tokens": 60,
                            "peak_rss_bytes": len(block), "expert_budget_bytes": None, "policy": policy}}}}))
'''


def write_bundle(root: Path, manifest: Manifest) -> Path:
    """A bundle directory whose files have the manifest's sizes (zeros: nothing opens them here)."""
    for entry in manifest.files:
        path = root / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(entry.size))
    (root / "manifest.json").write_text(manifest.to_json())
    return root


@pytest.fixture()
def fake_python(tmp_path: Path) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(FAKE_ASK.format(python=sys.executable))
    path.chmod(0o755)
    return path


def test_sweep_with_a_stand_in_runtime(tmp_path: Path, fake_python: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", synthetic_manifest())
    options = BenchOptions.parse("100%,25%", None, "lru,lfu", tokens=5, python=str(fake_python),
                                 memory_probe_bytes=4 * MB, disk_probe_bytes=MB)
    steps = []
    report = run_bench(bundle, options, lambda phase, done, total, label: steps.append((done, total, label)))
    assert [r.label for r in report.runs] == ["edgemoe lru 100%", "edgemoe lfu 100%", "edgemoe lru 25%",
                                              "edgemoe lfu 25%"]
    assert [s[:2] for s in steps] == [(i, 6) for i in range(1, 7)] and steps[0][2] == "bandwidth probes"
    ok, failed = report.runs[2], report.runs[3]
    assert failed.error == "error: memory budget too small for the working set" and failed.bound is None
    assert ok.ok and ok.token_ids == tuple(range(5)) and ok.answer == "a fake answer"
    assert ok.peak_rss_bytes >= 45 * MB  # ru_maxrss, measured outside the child
    assert ok.stats.cache_hits == 25 and ok.hit_rate == pytest.approx(0.25)
    assert ok.stats.prediction_recall is None and ok.stats.get("policy") == "lru"
    assert ok.budget_bytes == 0.25 * report.token_bytes.expert_bytes_total
    assert ok.bytes_paged_per_token == pytest.approx(75_000 / 5) and ok.paged_scope == "total"
    # The run's own limit: trunk + embedding row + top-2 experts + KV at its mean context (prompt 60 + 5 // 2).
    assert ok.bound.resident_bytes == token_bytes(synthetic_manifest(), 62).resident_bytes
    assert ok.bound.paged_bytes_per_token == pytest.approx(75_000 / 5)
    assert 0 < ok.fraction_of_bound and ok.bound.link == "page cache" and report.cold  # decode re-reads RAM
    assert report.image == "synthetic" and report.expert_precisions == (("?", 8),)
    assert BenchReport.from_json(report.to_json()) == report


def test_ask_command_passes_budgets_as_given(tmp_path: Path) -> None:
    from edgemoe.bench.budgets import parse_budget
    from edgemoe.bench.sweep import SweepContext
    from edgemoe.bundle import Bundle

    bundle = Bundle.open(write_bundle(tmp_path / "b", synthetic_manifest()))
    ctx = SweepContext(bundle, BenchOptions(tokens=8), tmp_path / "img.png", None, None)
    cmd = ask_command(ctx, parse_budget("50%"), parse_budget("2GB"), "edgemoe")
    assert cmd[1:5] == ["-m", "edgemoe.cli", "ask", str(bundle.root)]
    assert cmd[cmd.index("--expert-budget") + 1] == "50%" and cmd[cmd.index("--memory-budget") + 1] == "2GB"
    assert cmd[cmd.index("--policy") + 1] == "edgemoe" and "--json" in cmd and cmd[cmd.index("--max-tokens") + 1] == "8"
    assert cmd[cmd.index("--expert-store") + 1] == "auto"
    sessions = ask_command(ctx, None, None, None, "sessions")
    assert sessions[sessions.index("--expert-store") + 1] == "sessions"
    assert cmd[cmd.index("--routing") + 1] == "model"
    uniform = SweepContext(bundle, BenchOptions(tokens=8, routing="uniform"), tmp_path / "img.png", None, None)
    assert ask_command(uniform, None, None, None)[-2:] == ["--routing", "uniform"]
    with pytest.raises(BenchError, match="--routing"):
        BenchOptions(routing="zipf")


def test_expert_stores_run_side_by_side(tmp_path: Path, fake_python: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", synthetic_manifest())
    options = BenchOptions.parse("100%", None, "lru", "mapped,sessions", tokens=5, python=str(fake_python),
                                 memory_probe_bytes=4 * MB, disk_probe_bytes=MB)
    report = run_bench(bundle, options)
    assert [r.label for r in report.runs] == ["edgemoe lru (mapped) 100%", "edgemoe lru (sessions) 100%"]
    assert [r.command[r.command.index("--expert-store") + 1] for r in report.runs] == ["mapped", "sessions"]
    assert BenchReport.from_json(report.to_json()) == report
    with pytest.raises(BenchError, match="--expert-stores"):
        BenchOptions.parse("100%", None, "lru", "mapped,disk")


def test_torch_peer_dtypes_parse_and_none_skips_them() -> None:
    assert BenchOptions.parse("100%").peer_dtypes == ("fp32", "bf16")
    assert BenchOptions.parse("100%", torch_dtypes="bf16").peer_dtypes == ("bf16",)
    assert BenchOptions.parse("100%", torch_dtypes="none").peer_dtypes == ()
    with pytest.raises(BenchError, match="--torch-dtypes"):
        BenchOptions.parse("100%", torch_dtypes="fp8")
    assert BenchOptions.parse("100%").transformers_dtypes == ("bf16",)
    assert BenchOptions.parse("100%", transformers_dtypes="none").transformers_dtypes == ()
    with pytest.raises(BenchError, match="--transformers-dtypes"):
        BenchOptions.parse("100%", transformers_dtypes="int4")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_budget_is_one_line(tmp_path: Path) -> None:
    result = run_cli("bench", str(tmp_path), "--expert-budgets", "50%,abc")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --expert-budgets item: cannot read size 'abc'")


def test_tiny_end_to_end(tmp_path: Path) -> None:
    ckpt, bundle = tmp_path / "tiny", tmp_path / "bundle"
    for args in (("create-checkpoint", str(ckpt), "--size", "tiny"),
                 ("export", str(ckpt), "-o", str(bundle), "--precision", "fp32")):
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
    out, plot = tmp_path / "report.json", tmp_path / "report.png"
    result = run_cli("bench", str(bundle), "--expert-budgets", "100%,50%", "--tokens", "4", "--json",
                     "--out", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    report = BenchReport.from_json(result.stdout)
    assert len(report.runs) == 2 and all(r.ok for r in report.runs), [r.error for r in report.runs]
    assert all(r.peak_rss_bytes and r.stats.decode_tokens_per_s and r.bound for r in report.runs)
    assert BenchReport.from_json(out.read_text()) == report and plot.stat().st_size > 0
    assert json.loads(result.stdout)["runs"][1]["expert_budget"] == "50%"
    assert os.path.isfile(plot)


def test_every_store_runs_at_every_budget_in_order() -> None:
    from edgemoe.bench.sweep import planned_runs

    options = BenchOptions.parse("100%,50%", None, "lru", "mapped,fused", tokens=5)
    plan = [(expert.text, store) for expert, _, store, _ in planned_runs(options)]
    assert plan == [("100%", "mapped"), ("100%", "fused"), ("50%", "mapped"), ("50%", "fused")]
    memory = BenchOptions.parse(None, "2GB", "lru", "fused", tokens=5)
    assert [(m.text, store) for _, m, store, _ in planned_runs(memory)] == [("2GB", "fused")]
