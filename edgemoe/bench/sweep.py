"""`run_bench`: a budget x policy sweep of one bundle, each run a fresh `edgemoe ask` process, plus peers.

Contract: `run_bench(bundle, options, progress)` measures the machine's bandwidths first (while
nothing else of ours runs), then for every (budget, policy) starts `python -m edgemoe.cli ask BUNDLE
Q --image IMG --max-tokens N [--expert-budget B] [--memory-budget M] [--policy P] --json` through
`child.run_child` (peak RSS from outside: wait4's ru_maxrss and 20 ms psutil polling), reads the
child's JSON stats, and sets each run against its physical limit (`limits.decode_bound`, with the
paged bytes per token the run itself reported, over the page cache: the prefill has read every
expert). With `cold` (the default) the bundle's pages (and this machine's prepacked expert graphs,
prepared once before the first run, which also records the experts' hashes in the ledger every run
reads) are evicted before each run, so every run reads the bundle from disk as a user's second and
later runs do (neither packs nor hashes an unchanged expert again). Several `expert_stores` run side
by side at every budget. With `options.peers` the peers run afterwards (`peers.run_peers`). A run that fails is recorded with its error and the
sweep goes on. Progress: `progress(phase, done, total, label)`, one step per probe, run and peer.
The library never prints.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from edgemoe.bench.budgets import DEFAULT_EXPERT_BUDGETS, Budget, parse_budgets
from edgemoe.bench.child import ChildRun, parse_json_output, run_child
from edgemoe.bench.errors import BenchError
from edgemoe.bench.limits import (Bandwidths, TokenBytes, decode_bound, evict_pages, measure_bandwidths, token_bytes,
                                  uniform_paged_bytes)
from edgemoe.bench.machine import machine_info
from edgemoe.bench.peer_child import DTYPES as PEER_DTYPES
from edgemoe.bench.prompt import DEFAULT_QUESTION, estimate_prompt_tokens, synthetic_image
from edgemoe.bench.results import EDGEMOE, BenchReport, BenchRun, RunStats
from edgemoe.bundle import Bundle
from edgemoe.bundle.ledger import HashLedger
from edgemoe.errors import EdgeMoEError
from edgemoe.offload.footprint import model_files
from edgemoe.offload.policies import DEFAULT_POLICY, POLICIES
from edgemoe.runtime.providers import EXPERT_STORES
from edgemoe.runtime.routing import check_routing

log = logging.getLogger(__name__)

BenchProgress = Callable[[str, int, int, str], None]  # (phase, done, total, label), as export's
PHASE = "benchmarking"


def known_policies() -> tuple[str, ...]:
    return tuple(POLICIES)


def _dtypes(text: str, flag: str) -> tuple[str, ...]:
    """A peer's comma-separated dtypes; "none" runs none."""
    dtypes = () if text.strip() == "none" else tuple(d.strip() for d in text.split(",") if d.strip())
    if any(d not in PEER_DTYPES for d in dtypes):
        raise BenchError(f"{flag}: expected some of {', '.join(PEER_DTYPES)} or none, got {text!r}")
    return dtypes


@dataclass(frozen=True)
class BenchOptions:
    """What to sweep and how. Build from CLI strings with `BenchOptions.parse`."""

    expert_budgets: tuple[Budget, ...] = parse_budgets(DEFAULT_EXPERT_BUDGETS)
    memory_budgets: tuple[Budget, ...] = ()
    policies: tuple[str, ...] = (DEFAULT_POLICY,)
    expert_stores: tuple[str, ...] = ("auto",)  # runtime.providers.EXPERT_STORES; several: side by side
    tokens: int = 32
    question: str = DEFAULT_QUESTION
    image: Path | None = None  # None: a synthetic image
    peers: bool = False
    checkpoint: Path | None = None
    peer_dtypes: tuple[str, ...] = ("fp32", "bf16")  # the torch reference, fully resident
    transformers_dtypes: tuple[str, ...] = ("bf16",)  # transformers' own classes on a StaticCache
    accelerate_dtype: str = "bf16"
    offload_dir: Path | None = None  # accelerate's weight folder; None: a temporary one
    cold: bool = True
    timeout_s: float | None = 3600.0
    memory_probe_bytes: int = 1 << 30
    disk_probe_bytes: int = 1 << 30
    python: str = sys.executable
    routing: str = "model"  # edgemoe runs' --routing ("uniform": the worst case, runtime.routing)

    def __post_init__(self) -> None:
        if self.tokens < 2:
            raise BenchError(f"--tokens must be at least 2 (decode speed needs a token after the first), "
                             f"got {self.tokens}")
        if not self.policies:
            raise BenchError("--policies is empty")
        bad = [s for s in self.expert_stores if s not in EXPERT_STORES]
        if bad or not self.expert_stores:
            raise BenchError(f"--expert-stores: expected some of {', '.join(EXPERT_STORES)}, got "
                             f"{','.join(self.expert_stores) or 'nothing'}")
        if self.peers and self.checkpoint is None:
            raise BenchError("--peers needs --checkpoint CKPT (the checkpoint the bundle was exported from)")
        if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
            raise BenchError(f"--checkpoint {self.checkpoint} is not a directory")
        try:
            check_routing(self.routing)
        except EdgeMoEError as exc:
            raise BenchError(f"--routing: {exc}") from None
        if self.image is not None and not Path(self.image).is_file():
            raise BenchError(f"--image {self.image} is not a file")

    @classmethod
    def parse(cls, expert_budgets: str | None = None, memory_budgets: str | None = None,
              policies: str = DEFAULT_POLICY, expert_stores: str = "auto", torch_dtypes: str = "fp32,bf16",
              transformers_dtypes: str = "bf16", **kwargs) -> "BenchOptions":
        """From the CLI's strings; expert budgets default to 100%,75%,50%,25% unless memory budgets are given."""
        if expert_budgets is None and memory_budgets is None:
            expert_budgets = DEFAULT_EXPERT_BUDGETS
        names = tuple(p.strip() for p in policies.split(","))
        known = known_policies()
        bad = [p for p in names if p not in known]
        if bad:
            raise BenchError(f"--policies: unknown policy {bad[0]!r} (known: {', '.join(known)})")
        return cls(expert_budgets=parse_budgets(expert_budgets, "--expert-budgets"),
                   memory_budgets=parse_budgets(memory_budgets, "--memory-budgets", allow_percent=False),
                   policies=names, expert_stores=tuple(p.strip() for p in expert_stores.split(",") if p.strip()),
                   peer_dtypes=_dtypes(torch_dtypes, "--torch-dtypes"),
                   transformers_dtypes=_dtypes(transformers_dtypes, "--transformers-dtypes"), **kwargs)

    def budget_pairs(self) -> list[tuple[Budget | None, Budget | None]]:
        """Every (expert budget, memory budget) to run: the product of the two lists."""
        experts: list[Budget | None] = list(self.expert_budgets) or [None]
        memories: list[Budget | None] = list(self.memory_budgets) or [None]
        return [(e, m) for e in experts for m in memories]


@dataclass(frozen=True)
class SweepContext:
    """What every run of one sweep shares."""

    bundle: Bundle
    options: BenchOptions
    image: Path
    bandwidths: Bandwidths
    prompt_tokens: int | None  # estimated from the bundle's tokenizer; a run's own report wins

    @property
    def expert_bytes_total(self) -> int:
        return self.bundle.manifest.expert_bytes_total

    def bundle_files(self) -> list[Path]:
        """The bundle's files and this machine's prepacked expert graphs: what a cold run must read."""
        return model_files(self.bundle.root)

    def token_bytes_at(self, prompt_tokens: int | None, tokens: int) -> TokenBytes:
        """Bytes a token touches at the mean context of a decode of `tokens` after this prompt (a run's
        reported prompt length first, then the estimate)."""
        prompt = prompt_tokens or self.prompt_tokens or 0
        return token_bytes(self.bundle.manifest, prompt + tokens // 2)


def ask_command(ctx: SweepContext, expert: Budget | None, memory: Budget | None, policy: str | None,
                store: str = "auto") -> list[str]:
    o = ctx.options
    cmd = [o.python, "-m", "edgemoe.cli", "ask", str(ctx.bundle.root), o.question, "--image", str(ctx.image),
           "--max-tokens", str(o.tokens), "--json", "--expert-store", store, "--routing", o.routing]
    if expert is not None:
        cmd += ["--expert-budget", expert.text]
    if memory is not None:
        cmd += ["--memory-budget", memory.text]
    if policy is not None:
        cmd += ["--policy", policy]
    return cmd


def _cached_fraction(ctx: SweepContext, run: BenchRun) -> float:
    """Fraction of the expert bytes the run's cache could hold (the runtime's figure when it gave one)."""
    total = ctx.expert_bytes_total
    budget = run.stats.expert_budget_bytes if run.stats.expert_budget_bytes is not None else run.budget_bytes
    if budget is None or total == 0:
        return 1.0 if run.memory_budget is None else 0.0
    return min(budget / total, 1.0)


def with_bound(ctx: SweepContext, run: BenchRun) -> BenchRun:
    """`run` with its physical limit: the bytes its own decode touched and paged (module docstring)."""
    if not run.ok or not run.token_ids:
        return run
    tb = ctx.token_bytes_at(run.stats.prompt_tokens, len(run.token_ids))
    paged = run.bytes_paged_per_token
    if paged is None:  # the child reported no paging: assume the uniform-routing expectation
        paged = uniform_paged_bytes(tb, _cached_fraction(ctx, run))
    # Decode pages over the page cache even in a cold run: the prefill has read every expert once
    # (an image activates all of them), and evicting an expert drops it from the process, not the OS.
    return replace(run, bound=decode_bound(tb, paged, ctx.bandwidths, cold=False,
                                           mapped=run.stats.get("expert_store") == "mapped"))


def run_from_child(engine: str, child: ChildRun, *, policy: str | None, expert: Budget | None,
                   memory: Budget | None, budget_bytes: int | None, tokens: int) -> BenchRun:
    """A `BenchRun` from a finished child: its JSON stats, or its one-line failure."""
    base = BenchRun(engine=engine, policy=policy, expert_budget=None if expert is None else expert.text,
                    memory_budget=None if memory is None else memory.text, budget_bytes=budget_bytes,
                    tokens_requested=tokens, command=child.command, peak_rss_bytes=child.peak_rss_bytes,
                    peak_rss_polled_bytes=child.peak_rss_polled_bytes, wall_s=child.wall_s,
                    peak_footprint_bytes=child.peak_footprint_bytes, peak_file_cache_bytes=child.peak_file_cache_bytes)
    if not child.ok:
        return replace(base, error=child.failure())
    try:
        payload = parse_json_output(child.stdout, f"{engine} run")
    except BenchError as exc:
        return replace(base, error=str(exc))
    stats = payload.get("stats")
    return replace(base, token_ids=tuple(int(t) for t in payload.get("token_ids") or ()),
                   answer=str(payload.get("answer") or ""), stop_reason=payload.get("stop_reason"),
                   stats=RunStats.from_child(stats if isinstance(stats, dict) else {}))


def run_edgemoe(ctx: SweepContext, expert: Budget | None, memory: Budget | None, policy: str | None,
                store: str = "auto") -> BenchRun:
    """One `edgemoe ask` in a fresh process, cold if asked, set against its bound."""
    files = ctx.bundle_files()  # dropped for a cold start, and watched for the footprint
    if ctx.options.cold:
        evict_pages(files)
    child = run_child(ask_command(ctx, expert, memory, policy, store), timeout_s=ctx.options.timeout_s,
                      watch_files=files)
    budget_bytes = None if expert is None else expert.bytes_of(ctx.expert_bytes_total)
    run = run_from_child(EDGEMOE, child, policy=policy, expert=expert, memory=memory, budget_bytes=budget_bytes,
                         tokens=ctx.options.tokens)
    if len(ctx.options.expert_stores) > 1 or store != "auto":
        run = replace(run, expert_store=store)
    if run.error:
        log.warning("%s failed: %s", run.label, run.error)
    return with_bound(ctx, run)


def prepare_experts(bundle: Bundle, stores: tuple[str, ...]) -> None:
    """Write the prepacked graphs mapped and fused runs need (a first-run step, not a timed one)."""
    from edgemoe.runtime.providers import open_expert_store, resolve_store

    for kind in sorted({resolve_store(bundle, s) for s in stores} - {"sessions"}):
        try:
            open_expert_store(bundle, kind).close()
        except EdgeMoEError as exc:  # each run reports it (or falls back) on its own
            log.warning("cannot prepare the %s experts for this machine: %s", kind, exc)


def planned_runs(options: BenchOptions) -> list[tuple[Budget | None, Budget | None, str, str]]:
    """(expert budget, memory budget, store, policy) of every edgemoe run, in order."""
    return [(expert, memory, store, policy) for expert, memory in options.budget_pairs()
            for store in options.expert_stores for policy in options.policies]


def _steps(options: BenchOptions) -> int:
    from edgemoe.bench.peers import peer_steps

    return 2 + len(planned_runs(options)) + (peer_steps(options) if options.peers else 0)


def _reported_prompt(runs: list[BenchRun]) -> int | None:
    """The prompt length a run reported (used when the bundle's tokenizer gave no estimate)."""
    return next((r.stats.prompt_tokens for r in runs if r.ok and r.stats.prompt_tokens), None)


def _expert_precisions(bundle: Bundle) -> tuple[tuple[str, int], ...]:
    counts: dict[str, int] = {}
    for entry in bundle.manifest.experts().values():
        counts[entry.precision or "?"] = counts.get(entry.precision or "?", 0) + 1
    return tuple(sorted(counts.items()))


def run_bench(bundle_path: str | Path, options: BenchOptions = BenchOptions(),
              progress: BenchProgress | None = None) -> BenchReport:
    """Sweep `bundle_path` (module docstring); returns the report."""
    from edgemoe.bench.peers import run_peers

    bundle = Bundle.open(bundle_path, ledger=HashLedger.for_directory(bundle_path))  # as the runs open it
    total, done = _steps(options), 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(PHASE, done, total, label)

    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-") as scratch:
        image = Path(options.image) if options.image is not None else synthetic_image(Path(scratch) / "image.png")
        files = [bundle.path_of(e) for e in bundle.manifest.files]
        bandwidths = measure_bandwidths(files, options.memory_probe_bytes, options.disk_probe_bytes)
        step("bandwidth probes")
        prepare_experts(bundle, options.expert_stores)  # once per machine, before any run is timed
        step("experts prepared for this machine")
        with Image.open(image) as img:
            size = img.size
        ctx = SweepContext(bundle, options, image, bandwidths, estimate_prompt_tokens(bundle, options.question, size))
        runs = []
        for expert, memory, store, policy in planned_runs(options):
            runs.append(run_edgemoe(ctx, expert, memory, policy, store))
            step(runs[-1].label)
        peers = run_peers(ctx, runs, Path(scratch), step) if options.peers else ()
    return BenchReport(
        bundle=str(bundle.root), bundle_bytes=bundle.manifest.total_bytes,
        expert_precisions=_expert_precisions(bundle), machine=machine_info(), bandwidths=bandwidths,
        token_bytes=ctx.token_bytes_at(_reported_prompt(runs), options.tokens), question=options.question,
        image=str(options.image) if options.image is not None else "synthetic", tokens=options.tokens,
        cold=options.cold, runs=tuple(runs), peers=tuple(peers),
        checkpoint=None if options.checkpoint is None else str(options.checkpoint), routing=options.routing)
