"""`edgemoe ask` and `edgemoe chat` as a user runs them: fresh processes, stdout and exit codes."""

from __future__ import annotations

import json

from edgemoe.runtime import ask
from test_runtime_fixtures import edgemoe_cli, tiny  # noqa: F401 (fixture)

STATS_KEYS = {"time_to_first_token_s", "decode_tokens_per_s", "cache_hits", "cache_misses", "prediction_precision",
              "prediction_recall", "bytes_paged", "peak_rss_bytes"}


def test_ask_json_prints_one_object_with_answer_ids_and_stats(tiny) -> None:
    bundle = tiny.bundle("qwen")
    run = edgemoe_cli("ask", str(bundle), "What is in the image?", "--image", str(tiny.image), "--max-tokens", "6",
                      "--expert-budget", "40%", "--policy", "edgemoe", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert STATS_KEYS <= set(report["stats"])
    assert report["stats"]["cache_misses"] > 0 and report["stats"]["bytes_paged"] > 0
    here = ask(bundle, "What is in the image?", tiny.image, max_tokens=6)
    assert report["token_ids"] == list(here.token_ids) and report["answer"] == here.text


def test_ask_streams_the_answer_to_stdout(tiny) -> None:
    run = edgemoe_cli("ask", str(tiny.bundle("phi")), "What is in the image?", "--image", str(tiny.image),
                      "--max-tokens", "5")
    assert run.returncode == 0, run.stderr
    want = ask(tiny.bundle("phi"), "What is in the image?", tiny.image, max_tokens=5).text
    assert run.stdout.strip() == want and want
    assert "tok/s" in run.stderr


def test_chat_answers_two_piped_questions(tiny) -> None:
    args = ("chat", str(tiny.bundle("stablelm")), "--image", str(tiny.image), "--max-tokens", "4")
    run = edgemoe_cli(*args, "--json", stdin="What is in the image?\nAnd what colour is it?\n")
    assert run.returncode == 0, run.stderr
    turns = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(turns) == 2 and all(t["answer"] for t in turns)
    assert turns[1]["stats"]["prefill_tokens"] < turns[1]["stats"]["prompt_tokens"]  # the KV cache was reused
    plain = edgemoe_cli(*args, stdin="What is in the image?\nexit\nnever asked\n")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == [turns[0]["answer"]]


def test_errors_are_one_line(tiny, tmp_path) -> None:
    run = edgemoe_cli("ask", str(tmp_path / "nowhere"), "What?", "--image", str(tiny.image))
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: ")
    run = edgemoe_cli("ask", str(tiny.bundle("qwen")), "What?", "--image", str(tiny.image), "--expert-budget", "1kB")
    assert run.returncode == 2 and "minimum is" in run.stderr and run.stderr.strip().count("\n") == 0
