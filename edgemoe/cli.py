"""The `edgemoe` command line: thin typer commands, each one call into the library.

Contract: commands parse arguments, call the public API and print (rich tables for people, `--json`
for programs). The library logs and never prints. `main()` is the one place that turns an
`EdgeMoEError` into a one-line `error: ...` on stderr and its exit code; anything else escaping is a
bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

from edgemoe import __version__
from edgemoe.cli_options import BundleDir, generation_flags, generation_options
from edgemoe.offload.policies import DEFAULT_POLICY
from edgemoe.errors import EdgeMoEError

app = typer.Typer(
    name="edgemoe",
    help="Run sparse mixture-of-experts vision-language models (MoE-LLaVA, DeepSeek-VL2) on the CPU inside a "
         "fixed memory budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
# soft_wrap: an error message stays one line however narrow the terminal (or CI log) is.
err = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"edgemoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint directory or a bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Describe a checkpoint or bundle: family, layers, experts, parameters, bytes per expert."""
    from edgemoe.inspect_report import inspect_path, render_inspection

    report = inspect_path(path)
    if as_json:
        out.print_json(json.dumps(report))
    else:
        render_inspection(report, out)


@app.command("create-checkpoint")
def create_checkpoint(
    out_dir: Path = typer.Argument(..., help="Directory to write (must not exist or be empty)."),
    family: str = typer.Option("stablelm", "--family", help="stablelm | qwen | phi"),
    size: str = typer.Option("tiny", "--size", help="tiny (tests, seconds) | full (real shapes, random weights)"),
    seed: int = typer.Option(0, "--seed", help="Weights are a function of the seed: same seed, same bytes."),
    tower: Optional[str] = typer.Option(None, "--tower", help="Tiny only: clip (default) | siglip"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT_DIR."),
) -> None:
    """Write a MoE-LLaVA checkpoint in the exact real format, with random weights."""
    from edgemoe.offload.budget import format_bytes
    from edgemoe.model.create import create_checkpoint as create
    from edgemoe.progress import byte_progress

    with byte_progress(f"writing {family}-{size}", out) as progress:
        made = create(out_dir, family, size, seed=seed, tower=tower, overwrite=overwrite, progress=progress)
    out.print(f"wrote {made.path} ({format_bytes(made.total_bytes)}, {made.num_tensors} tensors)")


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="A checkpoint directory, or a hub id (LanguageBind/MoE-LLaVA-...)."),
    bundle: Path = typer.Option(..., "--output", "-o", help="Bundle directory to write."),
    precision: str = typer.Option("int4", "--precision", help="fp32 | fp16 | int8 | int4 | auto"),
    target: str = typer.Option("cpu", "--target", help="cpu | cuda: the execution provider formats are chosen for."),
    vision_precision: Optional[str] = typer.Option(
        None, "--vision-precision", help="Vision tower precision (default: as --precision, but int4 -> int8 on cpu, "
                                         "fp16 on cuda: its 577-token prefill is faster at 8 bits)."),
    accuracy_budget: Optional[str] = typer.Option(
        None, "--accuracy-budget", help="auto: most error vs the fp32 model, 'top1=0.98,kl=0.02' (the default)."),
    size_budget: Optional[str] = typer.Option(None, "--size-budget", help="auto: all experts, bytes or e.g. 1.5GB."),
    calibration_images: Optional[Path] = typer.Option(None, "--calibration-images", help="A directory of images."),
    calibration_prompts: Optional[Path] = typer.Option(
        None, "--calibration-prompts", help="A text file, one prompt per line."),
    max_image_tokens: Optional[int] = typer.Option(
        None, "--max-image-tokens", help="auto: keep at most this many (evenly spaced) tokens per calibration image."),
    kv_cache: Optional[str] = typer.Option(
        None, "--kv-cache", help="The KV cache's precision: fp16 (default; half the memory per position) or fp32 "
                                 "(default for --precision fp32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at BUNDLE."),
) -> None:
    """Export a checkpoint to a bundle: trunk graphs + one graph per expert, each validated against torch."""
    from edgemoe.export.options import ExportOptions

    options = ExportOptions.parse(precision, target, vision_precision, accuracy_budget, size_budget,
                                  calibration_images=calibration_images, calibration_prompts=calibration_prompts,
                                  max_image_tokens=max_image_tokens, kv_cache=kv_cache, overwrite=overwrite)
    from edgemoe.export.pipeline import export_bundle  # torch: only once the arguments are known good
    with _phase_progress() as progress:
        result = export_bundle(checkpoint, bundle, options, progress)
    out.print(result.summary(), soft_wrap=True, highlight=False)


@app.command()
def prepare(
    bundle: BundleDir,
    expert_store: str = typer.Option("auto", "--expert-store", help="The store to prepare: auto | fused | mapped "
                                                                  "(see `edgemoe ask --expert-store`)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Refuse if preparing needs more."),
) -> None:
    """Pack a bundle's experts for this CPU now, the step a first `ask` on this machine would take."""
    import time

    from edgemoe.bundle import Bundle
    from edgemoe.bundle.ledger import HashLedger
    from edgemoe.runtime.providers import open_expert_store, prepare_expert_store, store_kind

    opened = Bundle.open(bundle, ledger=HashLedger.for_directory(bundle))
    t0 = time.monotonic()
    with _prepare_progress() as progress:
        prepare_expert_store(opened, expert_store, progress, memory_budget)
        store = open_expert_store(opened, expert_store, progress)
    kind = store_kind(store)
    getattr(store, "close", lambda: None)()  # a sessions store holds nothing to release
    out.print(f"{bundle}: {kind} experts ready on this machine ({time.monotonic() - t0:.1f} s)", highlight=False,
              soft_wrap=True)


@app.command()
def bench(
    bundle: Path = typer.Argument(..., help="A bundle directory."),
    expert_budgets: Optional[str] = typer.Option(
        None, "--expert-budgets", help="Comma-separated percentages of the expert bytes or sizes "
                                       "(default 100%,75%,50%,25% unless --memory-budgets is given)."),
    memory_budgets: Optional[str] = typer.Option(None, "--memory-budgets", help="Comma-separated sizes, e.g. 2GB,3GB."),
    policies: str = typer.Option(DEFAULT_POLICY, "--policies", help="Comma-separated: lru, lfu, edgemoe."),
    expert_stores: str = typer.Option("auto", "--expert-stores", help="Comma-separated: mapped, sessions, fused, "
                                      "auto (several: side by side, see `edgemoe ask --expert-store`)."),
    image: Optional[Path] = typer.Option(None, "--image", help="The image to ask about (default: a synthetic one)."),
    question: Optional[str] = typer.Option(None, "--question", help="The question (default: describe the image)."),
    tokens: int = typer.Option(32, "--tokens", help="Tokens to generate per run."),
    peers: bool = typer.Option(False, "--peers", help="Also run the peers: torch fp32/bf16, transformers bf16 "
                               "(static cache), accelerate offload, all experts resident."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="The checkpoint the peers load."),
    torch_dtypes: str = typer.Option("fp32,bf16", "--torch-dtypes", help="The fully resident torch peers' dtypes "
                                     "(with --peers; none: skip them, for a model larger than RAM)."),
    transformers_dtypes: str = typer.Option("bf16", "--transformers-dtypes", help="The transformers peer's dtypes: "
                                            "transformers' own classes on a StaticCache (with --peers; none: skip)."),
    warm: bool = typer.Option(False, "--warm", help="Keep the bundle in the page cache between runs."),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="accelerate's weight folder (kept)."),
    timeout: float = typer.Option(3600, "--timeout", help="Seconds before a run is stopped."),
    routing: str = typer.Option("model", "--routing", help="model | uniform: every edgemoe run draws its experts "
                                "at random (benchmark mode, the worst case for caching and prediction)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON report to this file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw tokens/s and hit rate vs budget (PNG)."),
) -> None:
    """Sweep expert budgets x policies, each run a fresh process, against this machine's physical limit."""
    from edgemoe.bench import BenchOptions, plot_report, render_report, run_bench
    from edgemoe.bench.prompt import DEFAULT_QUESTION

    options = BenchOptions.parse(expert_budgets, memory_budgets, policies, expert_stores, torch_dtypes,
                                 transformers_dtypes, tokens=tokens,
                                 image=image, question=question or DEFAULT_QUESTION, peers=peers, checkpoint=checkpoint,
                                 cold=not warm, offload_dir=offload_dir, timeout_s=timeout, routing=routing)
    with _phase_progress() as progress:
        report = run_bench(bundle, options, progress)
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(report.to_json())
    if plot is not None:
        plot_report(report, plot)
    if as_json:
        sys.stdout.write(report.to_json())
    else:
        render_report(report, out)
    if report.failures:
        err.print(f"{len(report.failures)} run(s) failed: {report.failures[0].label}: {report.failures[0].error}")
        raise typer.Exit(1)


def _stream_text(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _read_stdin_once(what: str, used: list[str]) -> bytes:
    """stdin for `-` (a question or an image), which only one of them can take."""
    if used:
        raise EdgeMoEError(f"stdin is already the {used[0]}: give the {what} as an argument")
    used.append(what)
    return sys.stdin.buffer.read()


def _images(specs: Optional[list[str]], stdin_used: list[str]) -> list[Any]:
    """--image values: paths, or `-` for an image read from stdin."""
    from edgemoe.model.image import decode_image

    return [decode_image(_read_stdin_once("image", stdin_used), "the image on stdin") if spec == "-" else Path(spec)
            for spec in specs or []]


def _session(bundle: Path, flags: dict[str, Any], images: list[Any], prepare: Any, **kwargs: Any) -> Any:
    from edgemoe.runtime import ChatSession

    session = ChatSession(bundle, images, generation_options(flags), prepare_progress=prepare, **kwargs)
    if session.budget_note:  # --memory-budget auto: what it chose, before anything else is printed
        err.print(session.budget_note, highlight=False)
    return session


@app.command()
@generation_flags(image="The image to ask about: a path, or - for stdin (repeat where the model takes several, "
                        "e.g. DeepSeek-VL2).",
                  max_tokens="Most tokens to generate.",
                  temperature="0: greedy, the same answer every run.",
                  seed="Sampling seed: the same seed gives the same answer.",
                  as_json="Print one JSON object: answer, token_ids, stats.")
def ask(bundle: BundleDir, question: str = typer.Argument(..., help="The question about the image (- reads stdin)."),
        stream_json: bool = typer.Option(False, "--stream-json", help="Print one JSON event per token (NDJSON), "
                                                                     "then one with the answer and stats."),
        **flags: Any) -> None:
    """Answer a question about an image, streaming the answer as it is generated."""
    stdin_used: list[str] = []
    if question == "-":
        question = _read_stdin_once("question", stdin_used).decode("utf-8", "replace").strip()
    images = _images(flags["image"], stdin_used)
    with _prepare_progress() as prepare, _session(bundle, flags, images, prepare, reserve_turns=1) as session:
        if stream_json:
            result = session.ask(question, on_token=_token_event)
        else:
            result = session.ask(question, on_text=None if flags["as_json"] else _stream_text)
    if stream_json:
        _json_line({"type": "done", **result.to_dict()})
    elif flags["as_json"]:
        _json_line(result.to_dict())
    else:
        sys.stdout.write("\n")
        err.print(result.stats.summary(), highlight=False)


def _json_line(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _token_event(token: int, text: str) -> None:
    _json_line({"type": "token", "id": token, "text": text})


@app.command()
@generation_flags(image="The image the conversation is about (repeatable where the model takes several).",
                  max_tokens="Most tokens per answer.",
                  temperature="0: greedy, the same answers every run.", seed="Sampling seed.",
                  as_json="Print one JSON object per answer (JSON lines).")
def chat(bundle: BundleDir, **flags: Any) -> None:
    """Talk about an image: a prompt with history and /commands at a terminal (/help), or one question
    per line from a pipe."""
    from edgemoe.chat_repl import run_chat

    interactive = sys.stdin.isatty()
    with _prepare_progress() as prepare, _session(bundle, flags, _images(flags["image"], ["question"]),
                                                  prepare) as session:
        run_chat(session, interactive, flags["as_json"], err, _stream_text)


@app.command()
@generation_flags(without=("image", "as_json", "routing", "routing_trace"),
                  max_tokens="Default most tokens per answer (a request's max_tokens overrides).",
                  temperature="Default temperature (a request's overrides).", seed="Default sampling seed.")
def serve(bundle: BundleDir,
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
          port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port)."),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGEMOE_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' on /v1 requests."),
          max_queue: int = typer.Option(32, "--max-queue", help="Requests that may wait; more get 503."),
          allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                                   help="Fetch http(s) image URLs (size and time limited)."),
          **flags: Any) -> None:
    """Serve the bundle over OpenAI's chat-completions API (one engine, requests answered in turn)."""
    try:
        from edgemoe.serve import ServeOptions, serve as run_server
    except ImportError as exc:
        raise EdgeMoEError(f"edgemoe serve needs the serve extra: pip install 'edgemoe[serve]' ({exc.name} is "
                           "missing)") from None
    options = ServeOptions(host, port, api_key, max_queue, allow_remote_images)
    generation = generation_options(flags)

    def ready(url: str, note: Optional[str]) -> None:
        if note:
            err.print(note, highlight=False)
        err.print(f"serving {bundle.resolve().name} at {url}/v1 (Ctrl-C to stop)", highlight=False)

    with _prepare_progress() as prepare:
        run_server(bundle, options, generation, on_ready=ready, prepare_progress=prepare)
    err.print("stopped", highlight=False)


def _prepare_progress() -> Any:
    """The bar of a first run on this machine: experts packed for its CPU (nothing on later runs)."""
    from edgemoe.progress import count_progress

    return count_progress("preparing experts for this CPU (once)", err)


@contextmanager
def _phase_progress() -> Iterator[Callable[[str, int, int, str], None]]:
    """A `progress(phase, done, total, label)` callback: one step bar per phase, closed when the next opens."""
    from edgemoe.progress import step_progress

    current: dict[str, Any] = {}
    with ExitStack() as outer:
        def report(phase: str, done: int, total: int, label: str) -> None:
            if current.get("phase") != phase:
                if "bar" in current:
                    current["bar"].close()
                bar = outer.enter_context(ExitStack())
                current.update(phase=phase, bar=bar, step=bar.enter_context(step_progress(phase, total, err)))
            current["step"](label)

        yield report


def main() -> None:
    """Entry point: run the app; EdgeMoEError -> one line on stderr and its exit code."""
    try:
        app()
    except EdgeMoEError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
