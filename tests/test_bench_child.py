"""The fresh-process runner: peak RSS from outside (wait4's ru_maxrss and polling), JSON, failures."""

from __future__ import annotations

import sys

import pytest

from edgemoe.bench.child import failure_line, parse_json_output, run_child
from edgemoe.bench.errors import BenchError

MB = 1 << 20


def test_peak_rss_of_a_child_touching_200_mb() -> None:
    code = ("import json, time\n"
            "block = b'x' * (200 << 20)\n"  # bytes filled with 'x': every page touched
            "time.sleep(0.3)\n"
            "print('a log line before the result')\n"
            "print(json.dumps({'answer': 'ok', 'stats': {'n': len(block)}}, indent=2))\n")
    run = run_child([sys.executable, "-c", code], timeout_s=60)
    assert run.ok and run.exit_code == 0
    assert run.peak_rss_bytes is not None and run.peak_rss_bytes >= 200 * MB
    assert run.peak_rss_polled_bytes >= 150 * MB and run.samples > 0  # polled every 20 ms over 0.3 s
    assert parse_json_output(run.stdout) == {"answer": "ok", "stats": {"n": 200 * MB}}


def test_the_parents_memory_is_not_charged_to_the_child() -> None:
    """Forked straight from a big process, a child's ru_maxrss starts at the parent's size (Linux
    carries the replaced address space's high-water mark across exec): the reaper prevents that."""
    ballast = b"y" * (300 * MB)
    run = run_child([sys.executable, "-c", "pass"], timeout_s=60)
    assert len(ballast) and run.ok
    assert run.peak_rss_bytes is not None and run.peak_rss_bytes < 150 * MB


def test_failed_and_timed_out_children() -> None:
    run = run_child([sys.executable, "-c", "import sys; sys.stderr.write('error: budget too small\\n'); sys.exit(2)"])
    assert not run.ok and run.exit_code == 2 and run.failure() == "error: budget too small"
    slow = run_child([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.5)
    assert slow.timed_out and not slow.ok and slow.failure().startswith("timed out")


def test_failure_line_picks_the_telling_line() -> None:
    box = "Usage: x\n╭─ Error ──╮\n│ No such command 'ask'. │\n╰──────────╯\n"
    assert failure_line(box) == "No such command 'ask'."
    assert failure_line("Traceback (most recent call last):\n  File 'x'\nValueError: bad\n") == "ValueError: bad"
    assert failure_line("") is None


def test_parse_json_output() -> None:
    assert parse_json_output('{"a": 1}') == {"a": 1}
    assert parse_json_output('INFO loading\n{\n  "a": {\n    "b": 2\n  }\n}\n') == {"a": {"b": 2}}
    with pytest.raises(BenchError, match="no JSON object"):
        parse_json_output("just logs\n")
    with pytest.raises(BenchError):
        parse_json_output("[1, 2]")
