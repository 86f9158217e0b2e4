"""What a generation may do: `GenerationOptions`, and `--memory-budget auto` resolved to bytes.

Contract: `GenerationOptions` is frozen and validated on construction (a bad value is a one-line
`EdgeMoEError` before anything loads). Sizes are bytes or strings ('1.5GB', '40%'); a memory budget
may also be "auto": `resolve_memory_budget` turns that into what the machine has available now
minus a margin (`AUTO_MARGIN` of it, at least `AUTO_MARGIN_MIN` bytes) and says so in one line.
`sampler()` builds the token sampler these options describe (fields may be overridden per request,
as the server does with a request's temperature or seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from edgemoe.errors import EdgeMoEError
from edgemoe.offload.budget import format_bytes, parse_size
from edgemoe.offload.policies import DEFAULT_POLICY, POLICIES
from edgemoe.offload.predictor import HINT_FLOOR
from edgemoe.offload.prefetcher import DEFAULT_LOADERS
from edgemoe.runtime.providers import EXPERT_STORES
from edgemoe.runtime.routing import check_routing
from edgemoe.runtime.sampling import Sampler

DEFAULT_MAX_TOKENS = 128
AUTO = "auto"
AUTO_MARGIN = 0.10  # of the available memory, left to the rest of the machine
AUTO_MARGIN_MIN = 512 << 20


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate and within what memory (module docstring)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    memory_budget: str | int | None = None
    expert_budget: str | int | None = None
    policy: str = DEFAULT_POLICY
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    prefetch: bool = True  # hint the coming MoE layers' predicted experts
    expert_store: str = "auto"  # mapped | sessions | fused | auto (runtime.providers.open_expert_store)
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # 1: off
    system: str | None = None  # replaces the family template's system prompt
    threads: int | None = None  # intra-op threads of every ORT session (None: the cores this process may use)
    ctx_size: int | None = None  # context positions (prompt + answers); None: the model's own
    lookahead: int = 1  # MoE layers ahead whose experts are predicted and paged in (more: earlier, less sure)
    loaders: int = DEFAULT_LOADERS  # background threads paging experts in (several keep several reads in flight)
    hint_floor: float = HINT_FLOOR  # a layer's guesses are paged in only while its running precision is >= this
    prompt_cache: bool = False  # keep image prefixes (features and KV rows) on disk (runtime.prompt_cache)
    routing_trace: str | None = None  # a file to write every MoE layer call's routing to (runtime.routing_trace)
    routing: str = "model"  # "uniform": benchmark mode, experts drawn at random (runtime.routing.routers_for)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise EdgeMoEError(f"max tokens must be at least 1, got {self.max_tokens}")
        if self.expert_store not in EXPERT_STORES:
            raise EdgeMoEError(f"unknown expert store {self.expert_store!r}: expected one of {', '.join(EXPERT_STORES)}")
        if self.policy not in POLICIES:
            raise EdgeMoEError(f"unknown eviction policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        check_routing(self.routing)
        if not 0.0 <= self.hint_floor <= 1.0:
            raise EdgeMoEError(f"the hint floor is a precision in [0, 1], got {self.hint_floor}")
        if self.loaders < 1:
            raise EdgeMoEError(f"loaders must be at least 1 thread, got {self.loaders}")
        if self.lookahead < 1:
            raise EdgeMoEError(f"lookahead must be at least 1 MoE layer, got {self.lookahead}")
        if self.threads is not None and self.threads < 1:
            raise EdgeMoEError(f"threads must be at least 1, got {self.threads}")
        if self.ctx_size is not None and self.ctx_size < 2:
            raise EdgeMoEError(f"the context size must be at least 2 positions, got {self.ctx_size}")
        for spec in (self.expert_budget, self.memory_budget):  # a malformed budget fails before any load
            if spec is not None and spec != AUTO:
                parse_size(spec, 1 << 40)  # a percentage of any total: syntax only
        if self.expert_budget == AUTO:
            raise EdgeMoEError("--expert-budget takes a size or a percentage; 'auto' is for --memory-budget")
        self.sampler()  # validates the sampling settings now

    def sampler(self, **overrides: object) -> Sampler:
        """A fresh sampler: the same options give the same sampled tokens."""
        settings = dict(temperature=self.temperature, top_p=self.top_p, seed=self.seed, top_k=self.top_k,
                        min_p=self.min_p, repeat_penalty=self.repeat_penalty)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return Sampler(**settings)  # type: ignore[arg-type]


def resolve_memory_budget(spec: str | int | None) -> tuple[str | int | None, str | None]:
    """The budget to plan with, and a line saying what "auto" chose (None for any other spec)."""
    if spec != AUTO:
        return spec, None
    available = psutil.virtual_memory().available
    margin = max(int(available * AUTO_MARGIN), AUTO_MARGIN_MIN)
    if available <= margin:
        raise EdgeMoEError(f"--memory-budget auto: only {format_bytes(available)} is available, less than the "
                           f"{format_bytes(margin)} margin left to the rest of the machine")
    budget = available - margin
    return budget, (f"memory budget auto: {format_bytes(budget)} ({format_bytes(available)} available now, "
                    f"minus a {format_bytes(margin)} margin)")
