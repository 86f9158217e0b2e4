"""`edgemoe export` and `edgemoe inspect BUNDLE` in a subprocess: the summary line, the JSON report, the
tables, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.bundle import Bundle
from edgemoe.model.create import create_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe.cli", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("cli-export")
    ckpt = create_checkpoint(work / "tiny", "qwen", "tiny").path
    bundle = work / "bundle"
    return ckpt, bundle, run_cli("export", str(ckpt), "-o", str(bundle), "--precision", "int8")


def test_export_prints_one_summary_line(exported) -> None:
    _, bundle, result = exported
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {bundle}") and "8 int8" in lines[0]
    Bundle.open(bundle).verify()


def test_inspect_bundle_json(exported) -> None:
    _, bundle, _ = exported
    result = run_cli("inspect", str(bundle), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "bundle" and report["family"] == "qwen" and report["target"] == "cpu"
    assert report["experts"]["counts"] == {"int8": 8}
    assert [layer["layer"] for layer in report["experts"]["layers"]] == [0, 2]
    assert report["total_bytes"] == report["expert_bytes"] + report["trunk_bytes"] + report["other_bytes"]
    assert report["validation"]["passed"]
    roles = report["validation"]["by_role"]
    assert set(roles) == {"vision", "projector", "embed", "attention", "dense_mlp", "expert", "head"}
    assert 0 < roles["expert"]["max_rel_rms"] <= 0.15 and roles["expert"]["graphs"] == 8
    trunk = {g["path"]: g for g in report["trunk"]}
    assert trunk["graphs/layer1.mlp.onnx"]["validation"]["allowed_rel_max"] == 0.3
    assert report["policy"]["mode"] == "uniform" and report["policy"]["trunk"] == "int8"


def test_inspect_bundle_tables(exported) -> None:
    _, bundle, _ = exported
    result = run_cli("inspect", str(bundle))
    assert result.returncode == 0, result.stderr
    for text in ("experts: precision and size per layer", "trunk graphs", "layer1.attn", "all graphs within tolerance",
                 "worst per role", "uniform int8"):
        assert text in result.stdout, text


def test_the_expert_table_has_one_row_per_layer_that_fits_a_terminal_at_64_experts() -> None:
    """DeepSeek-VL2 has 64 experts a layer: a column per expert made the table unreadable at any width."""
    from rich.console import Console

    from edgemoe.export.bundle_report import _expert_table

    def layer(n: int, precisions: list[str]) -> dict:
        experts = [{"precision": p, "bytes": 4_600_000 + 1000 * i} for i, p in enumerate(precisions)]
        return {"layer": n, "experts": experts, "bytes": sum(e["bytes"] for e in experts)}

    report = {"experts": {"layers": [layer(1, ["int4"] * 60 + ["int8"] * 4), layer(2, ["int8", "int4", "int4", "int8"])]}}
    console = Console(width=80, record=True)
    console.print(_expert_table(report))
    lines = console.export_text().splitlines()
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == 2 and all(len(line) <= 80 for line in lines)
    assert "60 x int4, 4 x int8" in rows[0] and "4.60 MB" in rows[0] and "4.66 MB" in rows[0]
    assert "int8 int4 int4 int8" in rows[1]


@pytest.mark.parametrize("args, message", [
    (("export", "/no/such/ckpt", "-o", "/tmp/x-edgemoe-never"), "error: checkpoint directory not found"),
    (("export", "{ckpt}", "-o", "/tmp/x-edgemoe-never", "--precision", "int3"), "error: unknown precision 'int3'"),
    (("export", "{ckpt}", "-o", "/tmp/x-edgemoe-never", "--precision", "auto", "--accuracy-budget", "top5=1"),
     "error: bad accuracy budget part 'top5=1'"),
    (("export", "{ckpt}", "-o", "/tmp/x-edgemoe-never", "--precision", "auto", "--size-budget", "lots"),
     "error: cannot read size 'lots'"),
    (("export", "{parent}", "-o", "/tmp/x-edgemoe-never"), "has no config.json: not a checkpoint directory"),
])
def test_bad_input_is_one_line_and_exit_2(exported, args: tuple, message: str) -> None:
    ckpt = exported[0]
    result = run_cli(*(a.format(ckpt=ckpt, parent=ckpt.parent) for a in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not Path("/tmp/x-edgemoe-never").exists()
