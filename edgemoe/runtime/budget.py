"""From the user's budgets to the expert cache's capacity, with the process measured, not guessed.

Contract: `plan_budget(bundle, memory_budget, expert_budget, ...)` returns a `BudgetPlan` whose
`expert_bytes` is the expert cache capacity (None: no budget given, every expert resident):

  --expert-budget SIZE|PCT   bounds the expert cache alone; a percentage is of all expert bytes
                             (`edgemoe.offload.budget.ExpertBudget.for_experts`).
  --memory-budget SIZE       bounds the whole process's footprint. A budget below what start-up
                             already took (`startup_peak`: loading, the first image's vision pass) is
                             refused naming that peak as the minimum. The caller measures RSS once the trunk
                             sessions are open, the KV cache is allocated and a warm-up token has run
                             (`baseline_rss`); the experts get what is left after that baseline, the
                             KV cache's untouched pages (np.zeros is lazily backed, so RSS does not yet
                             show them), the prefill's activations (estimated from the prompt length)
                             and a slack for expert loads in flight (for the prefetcher and a demand
                             load at once, what the store says one load holds outside the cache:
                             a file's bytes plus the session built from them for session stores, a
                             session being built for the mapped store, whose pages the cache reserved)
                             (`edgemoe.offload.budget.MemoryBudget`).
  both                       the smaller capacity.

The plan follows the run: `BudgetPlan.for_context(kv_cache_bytes, activation)` re-plans when the KV
cache grows (a long chat, a longer prompt) or a prompt needs more activation memory, and the caller
resizes the expert cache to it; a conversation that no longer fits is refused, naming the minimum.

Either way the capacity must hold one expert (the largest): below that the refusal is a one-line
`BudgetError` naming the minimum. Capacities are in the units the expert store counts: the bundle's
file bytes for session stores (converted from RSS by `SESSION_BYTES_PER_FILE_BYTE`), or, when the
caller passes the store's `sizes`, the resident bytes each expert adds (a mapped store measures them
exactly: its mapped weights), with no conversion; `fixed_bytes` is what such a store holds whatever
the cache does (its sessions), set aside from a memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgemoe.bundle import Bundle
from edgemoe.model.config import ModelConfig
from edgemoe.offload.budget import ExpertBudget, MemoryBudget, format_bytes, minimum_capacity
from edgemoe.runtime.engine import PREFILL_CHUNK

FIXED_SLACK = 16 << 20  # interpreter and allocator noise between the measurement and the run
# Resident bytes of an ORT CPU session (made from the file's path) per byte of its expert file,
# measured on StableLM-sized experts after a 300-token run, ORT 1.32: 1.24 for int4 (MatMulNBits
# keeps a prepacked copy beside the file's blocks), 1.08 for int8. fp32/fp16 are not measured yet:
# taken as int4's, the larger. The cache counts file bytes, so a memory budget divides by this.
SESSION_BYTES_PER_FILE_BYTE = {"int4": 1.26, "int8": 1.08, "fp16": 1.26, "fp32": 1.26}
LOADS_IN_FLIGHT = 2  # the prefetcher's load and a demand load on the caller's thread


@dataclass(frozen=True)
class BudgetPlan:
    """The expert cache capacity and how it was arrived at."""

    expert_bytes: int | None  # None: no budget, every expert resident
    all_expert_bytes: int
    largest_expert_bytes: int
    memory_budget: MemoryBudget | None = None
    resident_sizes: tuple[int, ...] = ()  # each expert's resident bytes (a memory budget's units)
    factor: float = 1.0  # resident bytes per counted byte
    expert_cap: int | None = None  # --expert-budget's capacity, which a memory budget never raises
    together: int = 1  # experts a layer needs resident at once (largest_expert_bytes counts them all)

    def for_context(self, kv_cache_bytes: int, activation: int) -> "BudgetPlan":
        """This plan once the KV cache takes `kv_cache_bytes` and a prefill `activation` bytes: the
        expert cache gets what the memory budget then leaves (a BudgetError naming the minimum when
        that is less than one expert). Without a memory budget the plan does not change."""
        if self.memory_budget is None:
            return self
        memory = replace(self.memory_budget, kv_cache_bytes=int(kv_cache_bytes), activation_bytes=int(activation))
        capacity = max(int(memory.expert_budget(self.resident_sizes, self.together).capacity_bytes / self.factor),
                       self.largest_expert_bytes)
        if self.expert_cap is not None:
            capacity = min(capacity, self.expert_cap)
        return replace(self, expert_bytes=capacity, memory_budget=memory)

    @property
    def offloading(self) -> bool:
        return self.expert_bytes is not None

    def describe(self) -> str:
        if self.expert_bytes is None:
            return f"all experts resident ({format_bytes(self.all_expert_bytes)})"
        text = (f"expert cache {format_bytes(self.expert_bytes)} of {format_bytes(self.all_expert_bytes)} "
                f"({self.expert_bytes / self.all_expert_bytes:.0%})")
        if self.memory_budget is not None:
            text += (f" within a memory budget of {format_bytes(self.memory_budget.total_bytes)} "
                     f"(baseline {format_bytes(self.memory_budget.baseline_bytes)})")
        return text


def expert_sizes(bundle: Bundle) -> dict:
    """Bytes of each expert as paging it reads them (graph + external data)."""
    manifest = bundle.manifest
    return {key: manifest.bytes_of(entry) for key, entry in manifest.experts().items()}


def session_factor(bundle: Bundle) -> float:
    """Resident session bytes per file byte for the bundle's experts (the largest of its precisions)."""
    precisions = {entry.precision for entry in bundle.manifest.experts().values()}
    return max(SESSION_BYTES_PER_FILE_BYTE.get(str(p), 1.0) for p in precisions)


def activation_bytes(cfg: ModelConfig, positions: int, vision_tokens: int, vision_hidden: int) -> int:
    """A generous estimate of the largest transient of a prefill over `positions` tokens, computed in
    chunks of at most PREFILL_CHUNK (engine).

    Decoder layer, per chunk of C: q|k|v, attention scores (heads x C x P, fp32), h and m, the MLP's
    three [C, ffn] activations and the host's routed copies; the vision tower's pass the same way."""
    t = vision_tokens
    vision = t * 14 * vision_hidden + 16 * t * t
    return max(_decoder_transient(cfg, min(positions, PREFILL_CHUNK), positions), 4 * vision)


def decode_activation(cfg: ModelConfig, positions: int) -> int:
    """The largest transient of decoding one token at `positions` of context: a prefill chunk of one row
    (the warm-up token's are in the baseline already; counted again, small)."""
    return _decoder_transient(cfg, 1, positions)


def _decoder_transient(cfg: ModelConfig, chunk: int, positions: int) -> int:
    """Bytes (fp32) a decoder layer holds for a chunk of `chunk` rows over `positions` of context.

    The attention graph's per-row query-side tensors are heads x the cached row's width: the hidden
    size for MHA/GQA, but 16 x 576 = 9,216 for MLA's absorbed form (each head's query, attention output
    and weighted latent are as wide as a cached latent row). Three such tensors live at once beyond what
    10 x hidden covers: the attention graph of full-size DeepSeek-VL2-Small held 89.0 MB above its
    baseline over a chunked 1,040-position prefill (this formula gives 93.6 MB; without the term 71.6),
    StableLM-2's GQA graph 46.3 MB at 650 positions (59.6 MB; the term is 0 there)."""
    wide = max(0, cfg.num_heads * cfg.kv_layout.dim - cfg.hidden_size)
    rows = 10 * cfg.hidden_size + 3 * cfg.intermediate_size + 3 * wide
    return 4 * (chunk * rows + cfg.num_heads * chunk * positions)


def prefill_activation(bundle: Bundle, positions: int) -> int:
    """`activation_bytes` for a prefill of `positions` with this bundle's model and vision tower."""
    vision = bundle.manifest.vision
    tokens = int(vision.get("image_size", 336) // vision.get("patch_size", 14)) ** 2 + 1
    return activation_bytes(bundle.manifest.model_config(), positions, tokens, int(vision.get("hidden_size", 1024)))


def plan_budget(bundle: Bundle, memory_budget: str | int | None, expert_budget: str | int | None, *,
                baseline_rss: int = 0, kv_cache_bytes: int = 0, prompt_positions: int = 0,
                sizes: dict | None = None, fixed_bytes: int = 0, startup_peak: int = 0,
                load_transient: int | None = None, together: int = 1) -> BudgetPlan:
    """The expert cache capacity for these budgets (module docstring). `load_transient`: what one
    expert load holds outside the cache's reservation (the store says; default a file's bytes plus
    the session built from them). `together`: experts a layer needs resident at once (a fused store:
    its top-k), so the cache's minimum is the `together` largest."""
    factor = 1.0 if sizes is not None else session_factor(bundle)
    sizes = sizes if sizes is not None else expert_sizes(bundle)
    largest, total = minimum_capacity(sizes.values(), together), sum(sizes.values())
    transient = int(largest * factor) if load_transient is None else int(load_transient)
    capacities: list[int] = []
    memory = None
    cap = None
    if expert_budget is not None:
        cap = ExpertBudget.for_experts(expert_budget, sizes, together).capacity_bytes
        capacities.append(cap)
    if memory_budget is not None:
        memory = MemoryBudget.parse(
            memory_budget, trunk_bytes=int(baseline_rss), kv_cache_bytes=int(kv_cache_bytes),
            activation_bytes=prefill_activation(bundle, prompt_positions),
            slack_bytes=FIXED_SLACK + int(fixed_bytes) + LOADS_IN_FLIGHT * transient,
            startup_peak_bytes=int(startup_peak))
        resident = {k: int(v * factor) for k, v in sizes.items()}
        capacity = int(memory.expert_budget(resident, together).capacity_bytes / factor)
        capacities.append(max(capacity, largest))
    return BudgetPlan(min(capacities) if capacities else None, total, largest, memory,
                      tuple(int(v * factor) for v in sizes.values()), factor, cap, together)
