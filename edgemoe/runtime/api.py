"""The public API: `ask` (one question about one image) and `ChatSession` (several turns).

Contract: the mlx-lm split. `Engine.generate_step` yields ids; `ChatSession.ask` turns them into
text through `TextStream` (streamed to `on_text`) and returns a `GenerationResult` with
`GenerationStats`; `ask` is one turn of a fresh session. Prompts follow the bundle's family template
(upstream's): turn one is `<system> USER: <image>\\n{q} ASSISTANT:`, later turns append
`{answer}<|endoftext|>USER: {q} ASSISTANT:`; the engine reuses the cached prefix of the conversation
and computes only the new turn.

Set-up order matters for the memory budget (`budget.plan_budget`): open the trunk sessions,
allocate the KV cache for the conversation, run one warm-up token through the trunk, measure RSS
(the baseline), and only then give the experts what is left. The expert provider (resident, or
offloading with a byte-bounded cache) comes from `providers.make_provider`; nothing else here knows
where experts live. Errors are one-line `EdgeMoEError`s (budget refusals name the minimum).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edgemoe.bundle import Bundle
from edgemoe.errors import EdgeMoEError
from edgemoe.model.image import ImageSource, prepare_image
from edgemoe.model.prompt import Conversation, cut_at_stop
from edgemoe.model.tokenizer import Tokenizer, load_tokenizer
from edgemoe.offload.budget import parse_size
from edgemoe.offload.policies import POLICIES
from edgemoe.offload.predictor import PredictionSummary
from edgemoe.runtime.budget import BudgetPlan, plan_budget
from edgemoe.runtime.detokenize import TextStream
from edgemoe.runtime.engine import Engine, splice_positions
from edgemoe.runtime.moe import MoELayer
from edgemoe.runtime.providers import (EXPERT_STORES, ProviderCounters, make_provider, open_expert_store,
                                       provider_counters, resident_sizes, store_kind)
from edgemoe.runtime.routing import Routers
from edgemoe.runtime.sampling import Sampler
from edgemoe.runtime.sessions import configure_process
from edgemoe.runtime.stats import GenerationResult, GenerationStats, RssSampler, max_rss_bytes
from edgemoe.runtime.trunk import Trunk

log = logging.getLogger(__name__)

TextCallback = Callable[[str], None]
DEFAULT_MAX_TOKENS = 128
CHAT_TURNS_RESERVED = 4  # a chat's first KV allocation: its first prompt + this many answers


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate and within what memory (sizes as bytes or strings: '1.5GB', '40%')."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    memory_budget: str | int | None = None
    expert_budget: str | int | None = None
    policy: str = "lru"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    prefetch: bool = True  # hint the next MoE layer's predicted experts
    expert_store: str = "auto"  # mapped | sessions | auto (runtime.providers.open_expert_store)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise EdgeMoEError(f"max tokens must be at least 1, got {self.max_tokens}")
        if self.expert_store not in EXPERT_STORES:
            raise EdgeMoEError(f"unknown expert store {self.expert_store!r}: expected one of {', '.join(EXPERT_STORES)}")
        if self.expert_store == "fused" and (self.expert_budget is not None or self.memory_budget is not None):
            raise EdgeMoEError("--expert-store fused keeps every expert resident: an expert or memory budget needs "
                               "--expert-store mapped, sessions or auto")
        if self.policy not in POLICIES:
            raise EdgeMoEError(f"unknown eviction policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        self.sampler()  # validates the sampling settings now

    def sampler(self) -> Sampler:
        """A fresh sampler: the same options give the same sampled tokens."""
        return Sampler(self.temperature, self.top_p, self.seed)


class ChatSession:
    """A conversation about its images (given up front, asked about in the first turn), its KV cache
    kept across turns.

    The engine is built on the first `ask`, whose prompt length sizes the KV cache (that prompt plus
    `reserve_turns` answers, or `context_tokens` positions; it grows by one copy if a long chat
    outgrows it). `close()` (or `with`) releases the expert provider.
    """

    def __init__(self, bundle_path: str | Path, image: ImageSource | Sequence[ImageSource] | None = None,
                 options: GenerationOptions = GenerationOptions(), *, context_tokens: int | None = None,
                 reserve_turns: int = CHAT_TURNS_RESERVED,
                 prepare_progress: Callable[[int, int], None] | None = None) -> None:
        t0 = time.monotonic()
        configure_process()  # before the first session: freed sessions go back to the OS
        self.options = options
        self.images: list[ImageSource] = [] if image is None else (
            list(image) if isinstance(image, (list, tuple)) else [image])
        self._context_tokens, self._reserve_turns = context_tokens, max(1, reserve_turns)
        self._prepare_progress = prepare_progress  # experts packed for this CPU on a first run
        self.bundle = Bundle.open(bundle_path)
        manifest = self.bundle.manifest
        self.config = manifest.model_config()
        family = manifest.tokenizer.get("family", self.config.family)
        self.tokenizer: Tokenizer = load_tokenizer(self.bundle.root / "tokenizer", family)
        self.logit_limit = int(manifest.tokenizer.get("len_tokenizer", len(self.tokenizer)))
        eos = manifest.tokenizer.get("eos_token_id", self.tokenizer.eos_token_id)
        self.stop_ids = () if eos is None else (int(eos),)
        self.conversation = Conversation.for_family(family)
        most = self.conversation.template.max_images
        if most is not None and len(self.images) > most:
            raise EdgeMoEError(f"this model takes {most} image(s) per conversation, got {len(self.images)}")
        for spec in (options.expert_budget, options.memory_budget):  # a malformed budget fails before any load
            if spec is not None:
                parse_size(spec, 1 << 40)  # a percentage of any total: syntax only
        self.trunk = Trunk.open(self.bundle)
        self.routers = Routers.load(self.bundle.path_of("routers.safetensors"), self.config.moe.layers,
                                    self.config.moe.routing)
        self.sampler = options.sampler()
        self.engine: Engine | None = None
        self.provider: Any = None
        self.budget: BudgetPlan | None = None
        self._features: list[np.ndarray] | None = None
        self._load_s = time.monotonic() - t0

    # -- set-up -----------------------------------------------------------------------------------

    @property
    def image_tokens(self) -> list[int]:
        """Prompt rows of each of the conversation's images; tiled layouts depend on the image."""
        return [int(rows.shape[0]) for rows in self.image_features() or []]

    def _start(self, prompt_positions: int) -> Engine:
        """KV cache, warm-up, baseline, budget, provider: in that order (module docstring)."""
        t0 = time.monotonic()
        opts = self.options
        capacity = self._context_tokens or prompt_positions + self._reserve_turns * opts.max_tokens
        moe = MoELayer(self.routers, _NoProvider(), self.config.moe.layers, self.config.moe.top_k,
                       prefetch=opts.prefetch)
        engine = Engine(self.trunk, moe, self.logit_limit, capacity)
        engine.warm_up()
        store = open_expert_store(self.bundle, opts.expert_store, self._prepare_progress)  # before the baseline
        self.provider = moe.provider = self._provider(store, engine, prompt_positions)
        self.engine = engine
        self._load_s += time.monotonic() - t0
        log.info("ready in %.2f s: %s", self._load_s, self.budget.describe() if self.budget else "fused experts")
        return engine

    def _provider(self, store: Any, engine: Engine, prompt_positions: int) -> Any:
        """The store itself for fused experts (all resident, no budget); else the budget is planned
        from the measured baseline and a resident or offloading provider made over the store."""
        if store_kind(store) == "fused":
            return store
        opts = self.options
        self.budget = plan_budget(self.bundle, opts.memory_budget, opts.expert_budget,
                                  baseline_rss=psutil.Process().memory_info().rss,
                                  kv_cache_bytes=engine.cache.nbytes, prompt_positions=prompt_positions,
                                  sizes=resident_sizes(store), fixed_bytes=getattr(store, "session_overhead_bytes", 0))
        return make_provider(self.bundle, self.budget.expert_bytes, opts.policy, store)

    def image_features(self) -> list[np.ndarray] | None:
        """The conversation's images, preprocessed and projected, [N_i, H] each (encoded once)."""
        if not self.images:
            return None
        if self._features is None:  # encoded once, reused by later turns
            manifest = self.bundle.manifest
            aspect = manifest.processor.get("image_aspect_ratio", self.config.image_aspect_ratio)
            tiled = len(self.images) <= 2  # upstream tiles one or two images, more go in as one view each
            self._features = [self.trunk.encode_image(prepare_image(
                source, manifest.processor_config(), aspect, self.config.candidate_resolutions, tiled))
                for source in self.images]
        return self._features

    # -- turns ------------------------------------------------------------------------------------

    def ask(self, question: str, on_text: TextCallback | None = None, max_tokens: int | None = None
            ) -> GenerationResult:
        """Answer `question` (the image goes with the first turn), streaming text to `on_text`."""
        t0 = time.monotonic()
        first = not self.conversation.messages
        conv = self.conversation.add_user(question, images=len(self.images) if first else 0)
        ids = conv.encode(self.tokenizer)
        if self.engine is None:
            # Encode the image before the baseline is measured: the vision pass's retained memory
            # then counts in the baseline instead of surprising the memory budget later.
            self.image_features()
            set_up = time.monotonic()
            self._start(len(splice_positions(ids, self.image_tokens)))
            t0 += time.monotonic() - set_up  # one-off set-up is load_s, not time to first token
        engine = self.engine
        before = _Snapshot.take(self.provider, engine)
        with RssSampler() as rss:
            result = self._generate(engine, ids, max_tokens or self.options.max_tokens, on_text, t0, rss, before)
        self.conversation = conv.add_assistant(result.text)
        return result

    def _generate(self, engine: Engine, ids: list[int], limit: int, on_text: TextCallback | None, t0: float,
                  rss: RssSampler, before: "_Snapshot") -> GenerationResult:
        emit = on_text or (lambda piece: None)
        stream = TextStream(self.tokenizer, self.conversation.stop_str)
        clock = _Clock(time.monotonic())  # prefill_s: the LLM prefill (the image is encoded before)
        features = self.image_features()
        tokens: list[int] = []
        for token in engine.generate_step(ids, features, limit, self.sampler, self.stop_ids):
            clock.token()
            if not tokens:
                clock.at_first = _Snapshot.take(self.provider, engine)
            tokens.append(token)
            if token not in self.stop_ids:
                piece = stream.push(token)
                if piece:
                    emit(piece)
            rss.sample()
        tail = stream.finish()
        if tail:
            emit(tail)
        if tokens and tokens[-1] in self.stop_ids:
            stop = "eos"
        else:
            stop = "length" if len(tokens) >= limit else "context"
        stats = self._stats(engine, t0, clock, len(tokens), rss, before)
        return GenerationResult(cut_at_stop(stream.text, self.conversation.stop_str), tuple(tokens), stop, stats)

    def _stats(self, engine: Engine, t0: float, clock: "_Clock", n: int, rss: RssSampler,
               before: "_Snapshot") -> GenerationStats:
        info = engine.last_prefill
        now = _Snapshot.take(self.provider, engine)
        delta = now - before
        decode_paged = (now - clock.at_first).counters.bytes_paged if clock.at_first else 0
        first = clock.first or time.monotonic()
        decode_s = (clock.last or first) - first
        return GenerationStats(
            prompt_tokens=info.prompt_tokens if info else 0, image_tokens=info.image_tokens if info else 0,
            prefill_tokens=info.computed if info else 0, new_tokens=n, load_s=self._load_s,
            prefill_s=first - clock.start, time_to_first_token_s=first - t0, decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            cache_hits=delta.counters.hits, cache_misses=delta.counters.misses,
            prediction_precision=_ratio(delta.correct, delta.predicted),
            prediction_recall=_ratio(delta.correct, delta.needed),
            bytes_paged=delta.counters.bytes_paged, decode_bytes_paged=decode_paged,
            peak_rss_bytes=rss.peak, max_rss_bytes=max_rss_bytes(),
            expert_budget_bytes=self.budget.expert_bytes if self.budget else None,
            policy=self.options.policy if self.budget and self.budget.offloading else "resident",
            expert_store=store_kind(getattr(self.provider, "store", self.provider)),
            expert_cache_fraction=self.budget.expert_bytes / self.budget.all_expert_bytes
            if self.budget and self.budget.offloading else None)

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        if self.provider is not None:
            self.provider.close()
            self.provider = None

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask(bundle_path: str | Path, question: str, image: ImageSource | Sequence[ImageSource] | None = None, *,
        max_tokens: int = DEFAULT_MAX_TOKENS, memory_budget: str | int | None = None,
        expert_budget: str | int | None = None, policy: str = "lru", temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0, on_text: TextCallback | None = None,
        prefetch: bool = True, expert_store: str = "auto") -> GenerationResult:
    """Answer one question about one image with the bundle at `bundle_path` (greedy by default)."""
    options = GenerationOptions(max_tokens, memory_budget, expert_budget, policy, temperature, top_p, seed, prefetch,
                                expert_store)
    with ChatSession(bundle_path, image, options, reserve_turns=1) as session:
        return session.ask(question, on_text)


# -- bookkeeping -------------------------------------------------------------------------------------

@dataclass
class _Clock:
    """When generation started and when the first and latest token came out."""

    start: float
    first: float | None = None
    last: float | None = None
    at_first: "_Snapshot | None" = None  # counters when the first token came out

    def token(self) -> None:
        self.last = time.monotonic()
        self.first = self.first or self.last


@dataclass(frozen=True)
class _Snapshot:
    """Cumulative provider and prediction counters, to subtract per generation."""

    counters: ProviderCounters
    predicted: int
    needed: int
    correct: int

    @classmethod
    def take(cls, provider: Any, engine: Engine) -> "_Snapshot":
        p: PredictionSummary = engine.moe.predictions.summary()
        return cls(provider_counters(provider), p.predicted, p.needed, p.correct)

    def __sub__(self, other: "_Snapshot") -> "_Snapshot":
        return _Snapshot(self.counters - other.counters, self.predicted - other.predicted,
                         self.needed - other.needed, self.correct - other.correct)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


class _NoProvider:
    """Stands in until the real provider exists: the warm-up pass asks for no expert."""

    def experts(self, layer: int, needed: Any) -> Any:
        raise EdgeMoEError("experts were requested before the expert provider was set up")

    def hint(self, layer: int, predicted: Any) -> None:
        pass

    def stats(self) -> None:
        return None

    def close(self) -> None:
        pass
