"""The public API: `ask` (one question) and `ChatSession` (a conversation, or a server's requests).

Contract: the mlx-lm split. `Engine.generate_step` yields ids; `ChatSession.reply` turns them into
text through `TextStream` (streamed to `on_text`, pieces that join to exactly the answer's text) and
returns a `GenerationResult` with `GenerationStats`; `ask` is one turn of a fresh session. Prompts
follow the bundle's family template (upstream's; `GenerationOptions.system` replaces its system
prompt). `ChatSession.ask` appends a turn to the session's own conversation; `reply` answers any
conversation with its images (what `edgemoe serve` does per request). The engine reuses the cached
prefix of the previous prompt and computes only the rest, unless `reuse=False` asks for a cold
prefill (a server's unrelated requests then answer exactly as a fresh `ask`).

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
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edgemoe.bundle import Bundle
from edgemoe.bundle.entries import MANIFEST_NAME
from edgemoe.bundle.ledger import HashLedger
from edgemoe.cache_dir import cache_root
from edgemoe.errors import EdgeMoEError
from edgemoe.model.image import ImageSource
from edgemoe.model.prompt import Conversation
from edgemoe.model.tokenizer import Tokenizer, load_tokenizer
from edgemoe.offload.policies import DEFAULT_POLICY
from edgemoe.runtime.budget import BudgetPlan, plan_budget
from edgemoe.runtime.image_encoder import ImageEncoder
from edgemoe.runtime.live_budget import LiveBudget
from edgemoe.runtime.detokenize import TextStream
from edgemoe.runtime.engine import Engine, splice_positions
from edgemoe.runtime.moe import MoELayer
from edgemoe.runtime.prompt_cache import PromptCache
from edgemoe.runtime.options import DEFAULT_MAX_TOKENS, GenerationOptions, resolve_memory_budget
from edgemoe.runtime.providers import (make_provider, open_expert_store, prepare_expert_store, resident_sizes,
                                      store_kind)
from edgemoe.runtime.routing import Routers, routers_for
from edgemoe.runtime.routing_trace import RoutingTrace
from edgemoe.runtime.sampling import Sampler
from edgemoe.runtime.sessions import configure_process
from edgemoe.runtime.stats import (Clock, CounterSnapshot, GenerationResult, GenerationStats, RssSampler,
                                   max_rss_bytes, ratio, rss_high_water)
from edgemoe.runtime.transcript import read_transcript, write_transcript
from edgemoe.runtime.trunk import Trunk

log = logging.getLogger(__name__)

TextCallback = Callable[[str], None]
TokenCallback = Callable[[int, str], None]  # each generated id and the text it released
StopCheck = Callable[[], bool]
CHAT_TURNS_RESERVED = 4  # a chat's first KV allocation: its first prompt + this many answers

__all__ = ["ChatSession", "GenerationOptions", "ask", "DEFAULT_MAX_TOKENS"]


class ChatSession:
    """A conversation about its images, its KV cache kept across turns; or one engine for many.

    Images given up front go with the first question; `add_image` adds one to the next question
    (or, where the family takes one image, replaces it). The engine is built on the first answer,
    whose prompt length sizes the KV cache (that prompt plus `reserve_turns` answers, or
    `context_tokens` / `ctx_size` positions; it grows by one copy if a long chat outgrows it).
    `close()` (or `with`) releases the expert provider.
    """

    def __init__(self, bundle_path: str | Path, image: ImageSource | Sequence[ImageSource] | None = None,
                 options: GenerationOptions = GenerationOptions(), *, context_tokens: int | None = None,
                 reserve_turns: int = CHAT_TURNS_RESERVED,
                 prepare_progress: Callable[[int, int], None] | None = None) -> None:
        t0 = time.monotonic()
        configure_process(threads=options.threads)  # before the first session: one thread policy
        self.options = options
        self.memory_budget, self.budget_note = resolve_memory_budget(options.memory_budget)
        self.images: list[ImageSource] = [] if image is None else (
            list(image) if isinstance(image, (list, tuple)) else [image])
        self._pending = len(self.images)  # images not yet placed in a question
        self._context_tokens = context_tokens or options.ctx_size
        self._reserve_turns = max(1, reserve_turns)
        self._prepare_progress = prepare_progress  # experts packed for this CPU on a first run
        # Experts are hashed on first use; the ledger remembers them across runs (a cold start re-hashes
        # only files that changed since, which used to cost 1.4-3 s of time to first token).
        self.bundle = Bundle.open(bundle_path, ledger=HashLedger.for_directory(bundle_path))
        manifest = self.bundle.manifest
        self.config = manifest.model_config()
        self.family = manifest.tokenizer.get("family", self.config.family)
        self.tokenizer: Tokenizer = load_tokenizer(self.bundle.root / "tokenizer", self.family)
        self.logit_limit = int(manifest.tokenizer.get("len_tokenizer", len(self.tokenizer)))
        eos = manifest.tokenizer.get("eos_token_id", self.tokenizer.eos_token_id)
        self.stop_ids = () if eos is None else (int(eos),)
        self.conversation = self.new_conversation()
        self._check_image_count(len(self.images))
        # A first run on this machine packs the fused experts now, while the process holds least (under a
        # memory budget that step must fit it: `providers.prepare_expert_store`).
        prepare_expert_store(self.bundle, options.expert_store, prepare_progress, self.memory_budget)
        # Under a memory budget the first image is encoded before the language model loads (start-up
        # then peaks at the larger of the two, not their sum).
        self.trunk = Trunk.open(self.bundle, language_model=self.memory_budget is None)
        self.routers = routers_for(Routers.load(self.bundle.path_of("routers.safetensors"), self.config.moe.layers,
                                                self.config.moe.routing), options.routing, options.seed)
        self.sampler = options.sampler()
        self.engine: Engine | None = None
        self.provider: Any = None
        self.budget: BudgetPlan | None = None
        self._live: LiveBudget | None = None  # the plan kept true as the conversation grows
        self.prompt_cache = (PromptCache.for_bundle(cache_root() / "prompts", self.bundle.root / MANIFEST_NAME)
                             if options.prompt_cache else None)  # image prefixes on disk (runtime.prompt_cache)
        self.encoder = ImageEncoder(self.bundle, self.trunk, self.prompt_cache, self.memory_budget is not None)
        self._encode_mark = 0.0  # the encoder's seconds before this answer
        self._load_s = time.monotonic() - t0

    # -- the conversation -------------------------------------------------------------------------

    def new_conversation(self) -> Conversation:
        """An empty conversation in this bundle's template (with the options' system prompt)."""
        return Conversation.for_family(self.family).with_system(self.options.system)

    @property
    def max_images(self) -> int | None:
        """Images one conversation may hold (None: any number)."""
        return self.conversation.template.max_images

    def _check_image_count(self, count: int) -> None:
        if self.max_images is not None and count > self.max_images:
            raise EdgeMoEError(f"this model takes {self.max_images} image(s) per conversation, got {count}")

    def add_image(self, source: ImageSource) -> None:
        """Add an image to the next question; where the family takes no more, replace the last one
        (its place in the conversation stays; the cache recomputes from there)."""
        if self.max_images is not None and len(self.images) >= self.max_images:
            self.images[-1] = source
        else:
            self.images.append(source)
            self._pending += 1

    def clear(self) -> None:
        """Start the conversation over, about the same images (they go with the next question)."""
        self.conversation = self.new_conversation()
        self._pending = len(self.images)

    def save(self, path: str | Path) -> Path:
        """Write the conversation and its image paths as JSON (`runtime.transcript`)."""
        return write_transcript(path, self.conversation, self.images, self._pending)

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved one; the next answer reuses what the cache shares."""
        conversation, images, pending = read_transcript(path, self.new_conversation())
        self._check_image_count(len(images))
        self.conversation, self.images, self._pending = conversation, list(images), pending

    def ask(self, question: str, on_text: TextCallback | None = None, max_tokens: int | None = None,
            should_stop: StopCheck | None = None, on_token: TokenCallback | None = None) -> GenerationResult:
        """Answer `question` (with the images not yet asked about), streaming text to `on_text`."""
        try:
            conv = self.conversation.add_user(question, images=self._pending)
        except ValueError as exc:
            raise EdgeMoEError(str(exc)) from None
        result = self.reply(conv, self.images, on_text=on_text, max_tokens=max_tokens, should_stop=should_stop,
                            on_token=on_token)
        self._pending = 0
        self.conversation = conv.add_assistant(result.text)
        return result

    # -- answering --------------------------------------------------------------------------------

    def reply(self, conversation: Conversation, images: Sequence[ImageSource] = (), *,
              on_text: TextCallback | None = None, max_tokens: int | None = None, sampler: Sampler | None = None,
              stops: Sequence[str] = (), should_stop: StopCheck | None = None, reuse: bool = True,
              on_token: TokenCallback | None = None) -> GenerationResult:
        """The assistant's next answer to `conversation` (its last turn a question), whose `<image>`
        markers take `images` in order. `stops`: strings that also end the answer; `should_stop`:
        checked after each token (True: stop there, reason "cancelled"); `on_token(id, text)`: each
        id with the text it released (the last id also gets the held-back rest), so the texts join
        to the answer."""
        t0 = time.monotonic()
        self._encode_mark = self.encoder.encode_s
        self._check_image_count(len(images))
        self.images = list(images)
        ids = conversation.encode(self.tokenizer)
        positions = len(splice_positions(ids, self.image_tokens))  # the images' encoding counts in TTFT
        if self.engine is None:
            set_up = time.monotonic()
            self.start(positions)
            t0 += time.monotonic() - set_up  # one-off set-up is load_s, not time to first token
        elif not reuse:
            self.engine.forget()
        engine = self.engine
        limit = max_tokens or self.options.max_tokens
        if self._live is not None:
            self._live.fit_prompt(positions, limit)
        before = CounterSnapshot.take(self.provider, engine.moe.predictions, self.bundle.hash_seconds)
        with RssSampler() as rss:
            return self._generate(engine, ids, limit, _Emitter(on_text, on_token),
                                  t0, rss, before, sampler or self.sampler, (conversation.stop_str, *stops),
                                  should_stop)

    @property
    def image_tokens(self) -> list[int]:
        """Prompt rows of each of the conversation's images; tiled layouts depend on the image."""
        return [int(rows.shape[0]) for rows in self.image_features() or []]

    def image_features(self) -> list[np.ndarray] | None:
        """The conversation's images, preprocessed and projected, [N_i, H] each (each image encoded
        once while it stays in the conversation; `runtime.image_encoder`)."""
        return self.encoder.features(self.images)

    def _generate(self, engine: Engine, ids: list[int], limit: int, emit: "_Emitter", t0: float,
                  rss: RssSampler, before: CounterSnapshot, sampler: Sampler, stops: Sequence[str],
                  should_stop: StopCheck | None) -> GenerationResult:
        stream = TextStream(self.tokenizer, stops)
        clock = Clock(time.monotonic())  # prefill_s: the LLM prefill (the image is encoded before)
        tokens: list[int] = []
        stop = ""
        for token in engine.generate_step(ids, self.image_features(), limit, sampler, self.stop_ids):
            clock.token()
            if not tokens:
                clock.at_first = CounterSnapshot.take(self.provider, engine.moe.predictions, self.bundle.hash_seconds)
                if self._live is not None:
                    self._live.prefilled()
            tokens.append(token)
            emit(token, stream.push(token) if token not in self.stop_ids else "")
            rss.sample()
            if stream.stopped:
                stop = "stop"
                break
            if should_stop is not None and should_stop():
                stop = "cancelled"
                break
        emit.finish(stream.finish())
        if not stop:
            if tokens and tokens[-1] in self.stop_ids:
                stop = "eos"
            else:
                stop = "length" if len(tokens) >= limit else "context"
        stats = self._stats(engine, t0, clock, len(tokens), rss, before)
        return GenerationResult(stream.text, tuple(tokens), stop, stats)

    # -- set-up -----------------------------------------------------------------------------------

    def start(self, prompt_positions: int) -> Engine:
        """The engine, built on first use for a prompt of `prompt_positions`: KV cache, warm-up,
        baseline, budget, provider, in that order (module docstring). A server calls it up front."""
        if self.engine is not None:
            return self.engine
        # Encode the images before the baseline is measured: the vision pass's retained memory
        # then counts in the baseline instead of surprising the memory budget later.
        self.image_features()
        t0 = time.monotonic()
        self.trunk.load_language_model()
        opts = self.options
        capacity = self._context_tokens or prompt_positions + self._reserve_turns * opts.max_tokens
        moe = MoELayer(self.routers, _NoProvider(), self.config.moe.layers, self.config.moe.top_k,
                       prefetch=opts.prefetch, lookahead=opts.lookahead, hint_floor=opts.hint_floor)
        engine = Engine(self.trunk, moe, self.logit_limit, capacity, context_limit=opts.ctx_size)
        engine.prompt_cache = self.prompt_cache
        if opts.routing_trace:
            moe.trace = RoutingTrace(opts.routing_trace)
        engine.warm_up()
        store = open_expert_store(self.bundle, opts.expert_store, self._prepare_progress)  # before the baseline
        self.provider = moe.provider = self._provider(store, engine, prompt_positions)
        self.engine = engine
        self._load_s += time.monotonic() - t0
        log.info("ready in %.2f s: %s", self._load_s, self.budget.describe())
        return engine

    def _provider(self, store: Any, engine: Engine, prompt_positions: int) -> Any:
        """The budget, planned from the measured baseline, and a resident or offloading provider over
        the store."""
        opts = self.options
        self.budget = plan_budget(self.bundle, self.memory_budget, opts.expert_budget,
                                  # the cache's pages a first token wrote count once, as the KV cache
                                  baseline_rss=psutil.Process().memory_info().rss - engine.cache.resident_bytes(),
                                  kv_cache_bytes=engine.cache.nbytes, prompt_positions=prompt_positions,
                                  sizes=resident_sizes(store), fixed_bytes=getattr(store, "session_overhead_bytes", 0),
                                  load_transient=getattr(store, "load_transient_bytes", None),
                                  together=getattr(store, "experts_together", 1),
                                  startup_peak=rss_high_water())
        provider = make_provider(self.bundle, self.budget.expert_bytes, opts.policy, store, opts.loaders)
        if self.budget.memory_budget is not None and hasattr(provider, "cache"):
            self._live = LiveBudget(self.budget, self.bundle, provider.cache, engine, self.trunk,
                                    self.encoder.vision_bytes)
            self.encoder.live = self._live
        return provider

    def _stats(self, engine: Engine, t0: float, clock: Clock, n: int, rss: RssSampler,
               before: CounterSnapshot) -> GenerationStats:
        info = engine.last_prefill
        now = CounterSnapshot.take(self.provider, engine.moe.predictions, self.bundle.hash_seconds)
        delta = now - before
        decode = (now - clock.at_first) if clock.at_first else None
        prefill = (clock.at_first - before) if clock.at_first else delta
        decode_paged = decode.counters.bytes_paged if decode else 0
        first = clock.first or time.monotonic()
        decode_s = (clock.last or first) - first
        budget = self._live.plan if self._live is not None else self.budget
        return GenerationStats(
            prompt_tokens=info.prompt_tokens if info else 0, image_tokens=info.image_tokens if info else 0,
            prefill_tokens=info.computed if info else 0, new_tokens=n, load_s=self._load_s,
            prefill_s=first - clock.start, time_to_first_token_s=first - t0, decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            cache_hits=delta.counters.hits, cache_misses=delta.counters.misses,
            prediction_precision=ratio(delta.correct, delta.predicted),
            prediction_recall=ratio(delta.correct, delta.needed),
            bytes_paged=delta.counters.bytes_paged, decode_bytes_paged=decode_paged,
            peak_rss_bytes=rss.peak, max_rss_bytes=max_rss_bytes(),
            expert_budget_bytes=budget.expert_bytes if budget else None,
            policy=self.options.policy if budget and budget.offloading else "resident",
            expert_store=store_kind(getattr(self.provider, "store", self.provider)),
            expert_cache_fraction=budget.expert_bytes / budget.all_expert_bytes
            if budget and budget.offloading else None,
            disk_read_bytes=delta.disk_read, decode_disk_read_bytes=decode.disk_read if decode else None,
            image_encode_s=self.encoder.encode_s - self._encode_mark, prefill_expert_load_s=prefill.counters.load_seconds,
            prefill_hash_s=prefill.hash_seconds, prefetched_in_time=delta.counters.in_time,
            prefetched_late=delta.counters.late, hints_withheld=delta.withheld, routing=self.options.routing)

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        if self.provider is not None:
            self.provider.close()
            self.provider = None
        if self.engine is not None and self.engine.moe.trace is not None:
            self.engine.moe.trace.close()

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask(bundle_path: str | Path, question: str, image: ImageSource | Sequence[ImageSource] | None = None, *,
        max_tokens: int = DEFAULT_MAX_TOKENS, memory_budget: str | int | None = None,
        expert_budget: str | int | None = None, policy: str = DEFAULT_POLICY, temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0, on_text: TextCallback | None = None,
        prefetch: bool = True, expert_store: str = "auto") -> GenerationResult:
    """Answer one question about one image with the bundle at `bundle_path` (greedy by default)."""
    options = GenerationOptions(max_tokens, memory_budget, expert_budget, policy, temperature, top_p, seed, prefetch,
                                expert_store)
    with ChatSession(bundle_path, image, options, reserve_turns=1) as session:
        return session.ask(question, on_text)


class _Emitter:
    """Text to `on_text` as soon as it is certain; (id, text) to `on_token` one id late, so the last
    id can carry the text held back until the end."""

    def __init__(self, on_text: TextCallback | None, on_token: TokenCallback | None) -> None:
        self.on_text, self.on_token = on_text, on_token
        self._held: tuple[int, str] | None = None

    def __call__(self, token: int, piece: str) -> None:
        if piece and self.on_text is not None:
            self.on_text(piece)
        if self._held is not None and self.on_token is not None:
            self.on_token(*self._held)
        self._held = (token, piece)

    def finish(self, tail: str) -> None:
        if tail and self.on_text is not None:
            self.on_text(tail)
        if self._held is not None and self.on_token is not None:
            self.on_token(self._held[0], self._held[1] + tail)
        self._held = None


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
