"""The command line end to end, in a subprocess: output, --json, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe import __version__
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.summary import summarize_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe.cli", *args], capture_output=True, text=True, timeout=120)


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"edgemoe {__version__}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "phi"
    result = run_cli("create-checkpoint", str(path), "--family", "phi", "--size", "tiny")
    assert result.returncode == 0, result.stderr
    assert f"wrote {path}" in result.stdout
    return path


def test_inspect_json_equals_library_summary(tiny: Path) -> None:
    result = run_cli("inspect", str(tiny), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    ckpt = Checkpoint.open(tiny)
    summary = summarize_checkpoint(ckpt.config, ckpt.tower).to_dict()
    assert {k: report[k] for k in ("total_params", "active_params", "family", "vision_tower")} == \
        {k: summary[k] for k in ("total_params", "active_params", "family", "vision_tower")}
    assert report["moe_layers"] == [0, 2] and report["experts_per_layer"] == [4, 4]
    assert report["expert"]["fp16_bytes"] == 2 * report["expert"]["params"]


def test_inspect_table(tiny: Path) -> None:
    result = run_cli("inspect", str(tiny))
    assert result.returncode == 0, result.stderr
    for text in ("moe_llava_phi", "MoE layers", "2: 0, 2", "one expert", "vision tower"):
        assert text in result.stdout


@pytest.mark.parametrize("args, message", [
    (("inspect", "/no/such/dir"), "error: /no/such/dir is not a directory"),
    (("create-checkpoint", "/tmp/x-edgemoe-never", "--family", "llama"), "error: unknown family 'llama'"),
])
def test_errors_are_one_line_with_exit_code_2(args: tuple, message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_create_refuses_a_non_empty_directory(tiny: Path) -> None:
    result = run_cli("create-checkpoint", str(tiny), "--family", "phi")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not empty" in result.stderr or "exists" in result.stderr
