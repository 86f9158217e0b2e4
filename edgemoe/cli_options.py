"""The options `edgemoe ask` and `edgemoe chat` share, each declared once, and what they become.

Contract: `@generation_flags(**helps)` appends the generation options (`GENERATION_FLAGS`: image, system
prompt, sampling, budgets, policy, threads, context, --json; `without=` leaves some out) to a command's signature after its own arguments, each as
`typer.Option(default, flag, help=...)`. typer reads that signature, so the command receives them as
`**flags`. Most options have one help text, given here; the few that each command words its own way
(one answer vs a conversation) have help None here and take theirs from `helps`, keyed by parameter
name: a missing or unknown key is a TypeError at import. `generation_options(flags)` turns the parsed
values into the runtime's `GenerationOptions`. `BundleDir` is the bundle argument both commands take.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, List, Mapping, Optional, TypeVar

import typer

from edgemoe.offload.policies import DEFAULT_POLICY
from edgemoe.offload.predictor import HINT_FLOOR
from edgemoe.offload.prefetcher import DEFAULT_LOADERS

if TYPE_CHECKING:
    from edgemoe.runtime import GenerationOptions

F = TypeVar("F", bound=Callable[..., Any])

BundleDir = Annotated[Path, typer.Argument(help="A bundle directory (from edgemoe export).")]


@dataclass(frozen=True)
class Flag:
    """One option: its Python type, default and flag; help None when each command gives its own."""

    annotation: Any
    default: Any
    decl: str
    help: Optional[str] = None


GENERATION_FLAGS: dict[str, Flag] = {  # in --help order
    "image": Flag(Optional[List[str]], None, "--image"),
    "system": Flag(Optional[str], None, "--system", "Replace the model's system prompt."),
    "max_tokens": Flag(int, 128, "--max-tokens"),
    "memory_budget": Flag(Optional[str], None, "--memory-budget", "Bound the whole process's RSS (e.g. 3GB, or "
                                                                  "auto: what the machine has free now, minus a "
                                                                  "margin): the experts get what the trunk and KV "
                                                                  "cache leave."),
    "expert_budget": Flag(Optional[str], None, "--expert-budget", "Bound the expert cache alone: bytes (800MB) "
                                                                  "or a percentage of all expert bytes (25%)."),
    "policy": Flag(str, DEFAULT_POLICY, "--policy", "Expert eviction policy: lru | lfu | edgemoe."),
    "expert_store": Flag(str, "auto", "--expert-store", "How experts are paged: mapped (sessions built once, "
                                                        "weight pages paged in and out; Linux) | sessions (a "
                                                        "session built per load) | fused (each layer's int4 "
                                                        "experts in one QMoE session, paged one expert at a time; Linux) | "
                                                        "auto (fused for int4 SwiGLU experts routed top-3 or more, "
                                                        "such as DeepSeek-VL2's; else mapped where the OS allows; "
                                                        "else sessions)."),
    "lookahead": Flag(int, 1, "--lookahead", "MoE layers ahead whose predicted experts are paged in while the "
                                             "current one computes (more: earlier, but less sure)."),
    "loaders": Flag(int, DEFAULT_LOADERS, "--loaders", "Background threads paging experts in under a budget "
                                                       "(several keep several disk reads in flight)."),
    "hint_floor": Flag(float, HINT_FLOOR, "--hint-floor", "Page a MoE layer's predicted experts in only while its "
                                                   "guesses of that rank (first, second, ...) have been right at "
                                                   "least this often (0: always; 0.9: the confident ones; 1.0: "
                                                   "never; wrong guesses read bytes nobody uses)."),
    "routing_trace": Flag(Optional[str], None, "--routing-trace", "Write every MoE layer call's routing to this "
                                                                  "file (JSON lines), for bench/routing_replay.py."),
    "prompt_cache": Flag(bool, False, "--prompt-cache", "Keep each image's features and prompt prefix (its KV "
                                                        "rows) on disk in the edgemoe cache, so a later question "
                                                        "about the same image skips the vision tower and the "
                                                        "image's prefill. Answers are unchanged."),
    "routing": Flag(str, "model", "--routing", "model (the router's choice) | uniform (benchmark mode: each "
                                               "token's experts drawn at random, seeded; the worst case for "
                                               "caching and prediction; the answer is not the model's)."),
    "threads": Flag(Optional[int], None, "--threads", "CPU threads per ONNX Runtime session (default: the cores "
                                                      "this process may use)."),
    "ctx_size": Flag(Optional[int], None, "--ctx-size", "Context positions (prompt, image and answers; default: "
                                                        "the model's)."),
    "temperature": Flag(float, 0.0, "--temperature"),
    "top_k": Flag(int, 0, "--top-k", "Sample from the k most likely tokens (0: off; with --temperature > 0)."),
    "top_p": Flag(float, 1.0, "--top-p", "Nucleus sampling mass (with --temperature > 0)."),
    "min_p": Flag(float, 0.0, "--min-p", "Drop tokens less likely than this times the most likely one (0: off)."),
    "repeat_penalty": Flag(float, 1.0, "--repeat-penalty", "Penalise the last 64 tokens' ids, llama.cpp's way "
                                                           "(1: off)."),
    "seed": Flag(int, 0, "--seed"),
    "as_json": Flag(bool, False, "--json"),
}
# The flags that are GenerationOptions fields.
GENERATION_FIELDS = ("max_tokens", "memory_budget", "expert_budget", "policy", "temperature", "top_p", "seed",
                     "expert_store", "top_k", "min_p", "repeat_penalty", "system", "threads", "ctx_size", "lookahead", "loaders",
                     "routing", "prompt_cache", "hint_floor", "routing_trace")


def generation_flags(*, without: tuple[str, ...] = (), **helps: str) -> Callable[[F], F]:
    """Give a command the generation options after its own parameters (module docstring), less
    those named in `without`."""
    chosen = {name: flag for name, flag in GENERATION_FLAGS.items() if name not in without}
    worded = {name for name, flag in chosen.items() if flag.help is None}
    if set(helps) != worded:
        raise TypeError(f"generation_flags needs help for exactly {sorted(worded)}, got {sorted(helps)}")

    def add(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=flag.annotation,
                                   default=typer.Option(flag.default, flag.decl, help=helps.get(name, flag.help)))
                 for name, flag in chosen.items()]
        command.__signature__ = signature.replace(parameters=own + flags)  # type: ignore[attr-defined]
        return command

    return add


def generation_options(flags: Mapping[str, Any]) -> GenerationOptions:
    """The runtime's options from a command's parsed flags."""
    from edgemoe.runtime import GenerationOptions

    return GenerationOptions(**{name: flags[name] for name in GENERATION_FIELDS if name in flags})
