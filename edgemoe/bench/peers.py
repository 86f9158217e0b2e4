"""Peers measured in the same sweep, on the same checkpoint, image, question and token count.

Contract: `run_peers(ctx, runs, scratch, step)` runs, each in a fresh process measured like the
edgemoe runs (`child.run_child`):

  edgemoe-resident  the same bundle with every expert resident (`--expert-budget 100%`): our ceiling.
                    A sweep run at 100% (no memory budget) is reused rather than run twice.
  torch-fp32/-bf16  the torch reference fully resident (`peer_child torch`): what a user runs
                    without DeepSpeed.
  transformers-bf16 the same model from transformers' own classes with SDPA, decoding on a StaticCache
                    (`peer_child transformers`), fully resident: the torch baseline people use.
                    Families whose language model transformers has no class for are skipped.
  accelerate-bf16   Hugging Face accelerate's disk offload of the same torch model (`peer_child
                    accelerate`), one run per budget, given the RAM edgemoe had at that budget: the
                    memory budget when one was set, else the largest peak RSS (ru_maxrss) of the
                    edgemoe runs at that expert budget. Its weight folder (an index reading the
                    checkpoint's safetensors in place, plus copies of what cannot be) is written
                    once per sweep (`accelerate-prepare`, not timed) and reused across budgets.

Peers carry no physical limit of their own (the limit is the bundle's). With `cold`, the checkpoint's
and the offload folder's pages are evicted before each peer, as the bundle's are before each run, and
a peer's footprint is sampled like edgemoe's: its RSS plus the page cache it keeps of those files.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

from edgemoe.bench.budgets import Budget, parse_budget
from edgemoe.bench.child import run_child
from edgemoe.bench.limits import evict_pages
from edgemoe.bench.results import EDGEMOE, RESIDENT_PEER, BenchRun
from edgemoe.bench.sweep import BenchOptions, SweepContext, run_edgemoe, run_from_child
from edgemoe.families import family_module
from edgemoe.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

PEER_MODULE = "edgemoe.bench.peer_child"
FULL = parse_budget("100%")


def peer_steps(options: BenchOptions) -> int:
    """Progress steps `run_peers` takes: resident, each torch and transformers dtype, the folder, one per budget."""
    return 1 + len(options.peer_dtypes) + len(options.transformers_dtypes) + 1 + len(options.budget_pairs())


def _files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file()]


def _common(ctx: SweepContext) -> list[str]:
    o = ctx.options
    return ["--checkpoint", str(o.checkpoint), "--image", str(ctx.image), "--question", o.question,
            "--tokens", str(o.tokens)]


def resident_peer(ctx: SweepContext, runs: list[BenchRun]) -> BenchRun:
    """The bundle with every expert resident: a sweep run at 100% if there is one, else a new run."""
    for run in runs:
        if run.ok and run.expert_budget == FULL.text and run.memory_budget is None:
            return replace(run, engine=RESIDENT_PEER)
    return replace(run_edgemoe(ctx, FULL, None, ctx.options.policies[0]), engine=RESIDENT_PEER)


def resident_torch_peer(ctx: SweepContext, kind: str, dtype: str) -> BenchRun:
    """A fully resident torch peer (`peer_child torch` or `peer_child transformers`), labelled kind-dtype."""
    o = ctx.options
    files = _files(o.checkpoint)
    if o.cold:
        evict_pages(files)
    cmd = [o.python, "-m", PEER_MODULE, kind, "--dtype", dtype, *_common(ctx)]
    child = run_child(cmd, timeout_s=o.timeout_s, watch_files=files)
    return run_from_child(f"{kind}-{dtype}", child, policy=None, expert=None, memory=None, budget_bytes=None,
                          tokens=o.tokens)


def has_transformers_model(ctx: SweepContext) -> bool:
    """Whether transformers has a class for this family's language model (the family module says)."""
    config = Checkpoint.open(ctx.options.checkpoint).config
    return family_module(config.family).transformers_text_model(config) is not None


def accelerate_ram(ctx: SweepContext, runs: list[BenchRun], expert: Budget | None, memory: Budget | None) -> int:
    """The RAM the accelerate peer gets at this budget (module docstring)."""
    if memory is not None:
        return memory.bytes_of(0)
    peaks = [r.peak_rss_bytes for r in runs
             if r.engine == EDGEMOE and r.ok and r.budget_key == (expert and expert.text, None) and r.peak_rss_bytes]
    if peaks:
        return max(peaks)
    manifest = ctx.bundle.manifest
    experts = manifest.expert_bytes_total if expert is None else expert.bytes_of(manifest.expert_bytes_total)
    return manifest.total_bytes - manifest.expert_bytes_total + experts


def prepare_accelerate(ctx: SweepContext, folder: Path) -> str | None:
    """Write accelerate's weight folder; None when done, else the one-line failure."""
    o = ctx.options
    cmd = [o.python, "-m", PEER_MODULE, "accelerate-prepare", "--checkpoint", str(o.checkpoint),
           "--dtype", o.accelerate_dtype, "--offload-dir", str(folder)]
    child = run_child(cmd, timeout_s=o.timeout_s)
    return None if child.ok else child.failure()


def accelerate_peer(ctx: SweepContext, folder: Path, ram: int, expert: Budget | None,
                    memory: Budget | None) -> BenchRun:
    o = ctx.options
    files = _files(folder) + _files(o.checkpoint)  # the index reads the checkpoint in place
    if o.cold:
        evict_pages(files)
    cmd = [o.python, "-m", PEER_MODULE, "accelerate", "--dtype", o.accelerate_dtype, "--offload-dir", str(folder),
           "--max-memory", str(ram), *_common(ctx)]
    child = run_child(cmd, timeout_s=o.timeout_s, watch_files=files)
    return run_from_child(f"accelerate-{o.accelerate_dtype}", child, policy=None, expert=expert, memory=memory,
                          budget_bytes=ram, tokens=o.tokens)


def run_peers(ctx: SweepContext, runs: list[BenchRun], scratch: Path, step: Callable[[str], None]
              ) -> tuple[BenchRun, ...]:
    """Every peer (module docstring), one progress step each."""
    o = ctx.options
    peers = [resident_peer(ctx, runs)]
    step(peers[-1].label)
    for dtype in o.peer_dtypes:
        peers.append(resident_torch_peer(ctx, "torch", dtype))
        step(peers[-1].label)
    for dtype in o.transformers_dtypes:
        if has_transformers_model(ctx):
            peers.append(resident_torch_peer(ctx, "transformers", dtype))
        else:
            log.info("no transformers peer: transformers has no class for this family's language model")
        step(f"transformers-{dtype}")
    folder = Path(o.offload_dir) if o.offload_dir is not None else scratch / f"accelerate-{o.accelerate_dtype}"
    failed = prepare_accelerate(ctx, folder)
    step("accelerate weight folder")
    for expert, memory in o.budget_pairs():
        ram = accelerate_ram(ctx, runs, expert, memory)
        if failed is None:
            peers.append(accelerate_peer(ctx, folder, ram, expert, memory))
        else:
            peers.append(BenchRun(f"accelerate-{o.accelerate_dtype}", None, expert and expert.text,
                                  memory and memory.text, ram, o.tokens, (), error=f"weight folder: {failed}"))
        step(peers[-1].label)
    for peer in peers:
        if peer.error:
            log.warning("%s failed: %s", peer.label, peer.error)
    return tuple(peers)
