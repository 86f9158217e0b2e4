"""`edgemoe ask` and `edgemoe chat` as a user runs them: fresh processes, stdout and exit codes."""

from __future__ import annotations

import json

from edgemoe.runtime import ask
from test_runtime_fixtures import edgemoe_cli, per_expert_store, tiny  # noqa: F401 (fixture)

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


def test_stream_json_prints_one_event_per_token_then_the_answer(tiny) -> None:
    bundle = tiny.bundle("stablelm")
    args = ("ask", str(bundle), "What is in the image?", "--image", str(tiny.image), "--max-tokens", "7")
    run = edgemoe_cli(*args, "--stream-json")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    tokens, done = events[:-1], events[-1]
    plain = json.loads(edgemoe_cli(*args, "--json").stdout)
    assert [e["type"] for e in tokens] == ["token"] * len(plain["token_ids"]) and done["type"] == "done"
    assert [e["id"] for e in tokens] == plain["token_ids"] == done["token_ids"]
    assert "".join(e["text"] for e in tokens) == plain["answer"] == done["answer"]
    assert STATS_KEYS <= set(done["stats"])


def test_stdin_takes_the_image_or_the_question(tiny) -> None:
    bundle = tiny.bundle("phi")
    want = ask(bundle, "What is in the image?", tiny.image, max_tokens=5)
    image_bytes = tiny.image.read_bytes()
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "edgemoe.cli", "ask", str(bundle), "What is in the image?", "--image",
                          "-", "--max-tokens", "5", "--json"], input=image_bytes, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == list(want.token_ids)
    run = edgemoe_cli("ask", str(bundle), "-", "--image", str(tiny.image), "--max-tokens", "5", "--json",
                      stdin="What is in the image?\n")
    assert json.loads(run.stdout)["token_ids"] == list(want.token_ids)
    run = edgemoe_cli("ask", str(bundle), "-", "--image", "-", stdin="What?")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "stdin is already" in run.stderr


def test_sampling_knobs_and_threads_keep_their_promises(tiny) -> None:
    bundle = tiny.bundle("qwen")
    base = ("ask", str(bundle), "What is in the image?", "--image", str(tiny.image), "--max-tokens", "6", "--json")
    greedy = json.loads(edgemoe_cli(*base).stdout)
    for extra in (("--temperature", "1.5", "--top-k", "1", "--seed", "3"),  # one candidate: the argmax
                  ("--temperature", "1.5", "--min-p", "0.999999"),  # nothing but the most likely survives
                  ("--threads", "1"),
                  ("--memory-budget", "auto")):
        run = edgemoe_cli(*base, *extra)
        assert run.returncode == 0, (extra, run.stderr)
        assert json.loads(run.stdout)["token_ids"] == greedy["token_ids"], extra
    auto = edgemoe_cli(*base, "--memory-budget", "auto")
    assert auto.stderr.splitlines()[0].startswith("memory budget auto: ")
    system = json.loads(edgemoe_cli(*base, "--system", "Answer in one word.").stdout)
    assert system["stats"]["prompt_tokens"] != greedy["stats"]["prompt_tokens"]
    short = edgemoe_cli(*base, "--ctx-size", "8")
    assert short.returncode == 2 and "context of 8" in short.stderr and short.stderr.strip().count("\n") == 0


def test_a_checkpoint_given_as_a_bundle_says_to_export_it(tiny) -> None:
    run = edgemoe_cli("ask", str(tiny.checkpoint("stablelm")), "What?")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0
    assert "is a model checkpoint, not a bundle" in run.stderr and "edgemoe export" in run.stderr


def test_the_library_and_the_cli_default_to_the_same_policy() -> None:
    import inspect as pyinspect

    from edgemoe.cli import ask as ask_command
    from edgemoe.offload.policies import DEFAULT_POLICY
    from edgemoe.runtime import GenerationOptions

    cli_default = pyinspect.signature(ask_command).parameters["policy"].default.default
    library_default = pyinspect.signature(ask).parameters["policy"].default
    assert cli_default == library_default == GenerationOptions().policy == DEFAULT_POLICY


def test_time_to_first_token_is_image_encoding_plus_prefill(tiny) -> None:
    result = ask(tiny.bundle("stablelm", "int4"), "What is in the image?", tiny.image, max_tokens=3,
                 expert_budget="30%")
    s = result.stats
    assert s.image_encode_s > 0 and s.cache_misses > 0 and s.prefill_expert_load_s > 0
    assert abs(s.time_to_first_token_s - (s.image_encode_s + s.prefill_s)) < 0.02
    assert 0 <= s.prefill_hash_s <= s.prefill_expert_load_s + 0.01  # hashing happens inside expert loads


def test_prefetched_in_time_counts_only_hinted_loads(tiny) -> None:
    kwargs = dict(max_tokens=8, expert_budget="50%", expert_store=per_expert_store())  # below a fused layer's minimum
    hinted = ask(tiny.bundle("deepseek-vl2-tiny", "int4"), "What is in the image?", tiny.image, **kwargs).stats
    plain = ask(tiny.bundle("deepseek-vl2-tiny", "int4"), "What is in the image?", tiny.image, prefetch=False,
                **kwargs).stats
    assert 0 < hinted.prefetched_in_time <= hinted.cache_hits
    assert plain.prefetched_in_time == plain.prefetched_late == 0  # no hints: nothing can arrive early


def test_answers_do_not_depend_on_how_far_ahead_experts_are_paged(tiny) -> None:
    bundle = tiny.bundle("deepseek-vl2-tiny", "int4")
    base = ("ask", str(bundle), "What is in the image?", "--image", str(tiny.image), "--max-tokens", "6",
            "--expert-budget", "40%", "--expert-store", per_expert_store(), "--json")  # below a fused layer's minimum
    runs = [json.loads(edgemoe_cli(*base, "--lookahead", str(n)).stdout) for n in (1, 2)]
    assert runs[0]["token_ids"] == runs[1]["token_ids"]
    assert runs[1]["stats"]["cache_misses"] > 0
