"""The engine: prefill and decode over the trunk, the MoE layers and the KV cache. Ids in, ids out.

Contract: the engine knows nothing about tokenization. `prefill(ids, images)` takes prompt ids with
one IMAGE_TOKEN_INDEX marker per image (upstream's `tokenizer_image_token` output) and each image's
projected rows, splices them exactly as upstream (text embedded, the i-th marker replaced by all N_i
rows of the i-th image, positions 0..L'-1 over the spliced sequence), runs every layer over the prompt
in chunks of at most `PREFILL_CHUNK` positions (each chunk attends to the cache the earlier ones
wrote: the same result, with activations bounded by the chunk rather than the prompt; a fixed size,
so every budget computes the same way) and returns the last position's logits. `decode(token)` runs one token at the next
position. Logits at or past `logit_limit` (len(tokenizer); upstream truncates the vocabulary to it)
are -inf. `generate_step` chains them: prefill, then sample, yield, decode, until a stop id (which
is yielded, as HF's generate returns it) or `max_tokens`.

The engine remembers which token sits at each cached position (`context`, image rows marked, plus
a digest of the image features they hold). A later `prefill` reuses the longest common prefix of
the cache and the new prompt and computes only the rest (multi-turn chat: the earlier turns stay
cached); a different image or a changed turn truncates there and recomputes. With a `prompt_cache`
(`runtime.prompt_cache.PromptCache`), a prompt whose image prefix (every position up to the end of its
last image) is not cached here is looked up on disk and, if found, read into the cache instead of
computed; a prefix computed here is saved there.

Shape legend: S positions in this call, H hidden, V vocabulary, N image tokens, L' spliced length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.model.prompt import IMAGE_TOKEN_INDEX
from edgemoe.runtime.kv_cache import KVCache
from edgemoe.runtime.moe import MoELayer
from edgemoe.runtime.prompt_cache import PromptCache
from edgemoe.runtime.sampling import Sampler
from edgemoe.runtime.trunk import Trunk

def _digest(images: list[np.ndarray]) -> bytes | None:
    """Which images the cached image rows hold (None: no image)."""
    if not images:
        return None
    h = hashlib.blake2b(digest_size=16)
    for rows in images:
        h.update(np.ascontiguousarray(rows).data)
    return h.digest()


class ContextError(EdgeMoEError):
    """A prompt (plus its answer) does not fit the model's context."""


@dataclass(frozen=True)
class PrefillInfo:
    """What the last prefill did: spliced prompt length, image tokens, positions computed."""

    prompt_tokens: int  # L'
    image_tokens: int
    computed: int  # L' minus the reused cached prefix


Images = Union[np.ndarray, Sequence[np.ndarray], None]  # one image's rows [N, H], several, or none


def as_image_list(images: Images) -> list[np.ndarray]:
    if images is None:
        return []
    return [images] if isinstance(images, np.ndarray) else list(images)


def splice_positions(ids: Sequence[int], image_tokens: int | Sequence[int]) -> list[int]:
    """The token at each spliced position: ids with the i-th marker expanded to image_tokens[i]
    markers (an int: every image the same)."""
    counts = iter(image_tokens) if not isinstance(image_tokens, int) else None
    out: list[int] = []
    for i in ids:
        if i == IMAGE_TOKEN_INDEX:
            out.extend([IMAGE_TOKEN_INDEX] * (image_tokens if counts is None else next(counts)))
        else:
            out.append(int(i))
    return out


def image_prefix_end(positions: Sequence[int]) -> int:
    """Spliced positions up to and including the last image row (0: no image)."""
    for i in range(len(positions) - 1, -1, -1):
        if positions[i] == IMAGE_TOKEN_INDEX:
            return i + 1
    return 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# Positions per prefill pass. Why 256: it bounds a prefill's activations (for StableLM-2, 146 -> 62 MB
# at 632 positions, what a memory budget sets aside) while a chunk still fills the int4 GEMMs; a
# smaller chunk re-reads more experts under a small expert cache (every chunk routes to most of them).
PREFILL_CHUNK = 256


class Engine:
    """Trunk + MoE layers + KV cache for one conversation at a time."""

    def __init__(self, trunk: Trunk, moe: MoELayer, logit_limit: int | None, capacity: int,
                 context_limit: int | None = None) -> None:
        self.trunk, self.moe, self.config = trunk, moe, trunk.config
        self.logit_limit = logit_limit
        self._context_limit = context_limit  # --ctx-size: fewer positions than the model's own
        self.cache: KVCache = trunk.new_cache(min(capacity, self.max_positions))
        self.context: list[int] = []  # token per cached position (IMAGE_TOKEN_INDEX for image rows)
        self._image_digest: bytes | None = None  # which image the cached image rows hold
        self.last_prefill: PrefillInfo | None = None
        self.prompt_cache: PromptCache | None = None  # image prefixes on disk (module docstring)

    @property
    def max_positions(self) -> int:
        """The context: the model's positions, or fewer if the caller limited it."""
        own = self.config.max_position_embeddings
        return own if self._context_limit is None else min(own, self._context_limit)

    def forget(self) -> None:
        """Drop the cached context: the next prefill computes every position (answers then do not
        depend on what was asked before)."""
        self.cache.truncate(0)
        self.context.clear()
        self._image_digest = None

    # -- one forward pass ---------------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x [S, H] at the next S positions -> final hidden [S, H]; the cache grows by S."""
        moe_layers = self.config.moe
        for n in range(self.config.num_layers):
            h, m = self.trunk.attention(n, x, self.cache)
            if moe_layers.is_moe(n):
                x = self.moe.forward(n, h, m, self.trunk.shared_mlp(n, m))
            else:
                x = h + self.trunk.dense_mlp(n, m)
        self.cache.advance(x.shape[0])
        return x

    def logits(self, hidden_last: np.ndarray) -> np.ndarray:
        """[1, H] -> masked fp32 logits [V]."""
        logits = self.trunk.head(hidden_last)[0]
        if self.logit_limit is not None and self.logit_limit < logits.shape[0]:
            logits[self.logit_limit:] = -np.inf
        return logits

    def warm_up(self) -> None:
        """One token through every trunk graph (MoE layers pass their input through, no expert is
        asked for), so what a first run allocates is in the RSS the memory budget measures. The
        cache rows it writes are scratch again afterwards."""
        x = self.trunk.embed(np.zeros(1, np.int64))
        for n in range(self.config.num_layers):
            h, m = self.trunk.attention(n, x, self.cache)
            if self.config.moe.is_moe(n):
                shared = self.trunk.shared_mlp(n, m)
                x = h if shared is None else h + shared
            else:
                x = h + self.trunk.dense_mlp(n, m)
        self.trunk.head(x)

    # -- prefill and decode -------------------------------------------------------------------------

    def embed_prompt(self, ids: Sequence[int], images: Images) -> np.ndarray:
        """ids [L] with markers + each image's rows [N_i, H] -> spliced embeddings [L', H] (upstream's
        splice: the i-th marker is replaced by the i-th image's rows)."""
        ids = np.asarray(ids, dtype=np.int64)
        features = as_image_list(images)
        marks = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
        if len(marks) != len(features):
            raise EdgeMoEError(f"prompt has {len(marks)} image marker(s) but {len(features)} image(s)")
        text = self.trunk.embed(np.where(ids == IMAGE_TOKEN_INDEX, 0, ids))  # [L, H]; marker rows unused
        parts, start = [], 0
        for at, rows in zip(marks, features):
            parts += [text[start:at], rows.astype(np.float32)]
            start = int(at) + 1
        return np.concatenate(parts + [text[start:]]) if features else text

    def reserve(self, positions: int) -> None:
        """Make the cache hold `positions` (at most the model's context: generation stops there)."""
        self.cache.reserve(min(positions, self.max_positions))

    @property
    def full(self) -> bool:
        """No position left in the model's context."""
        return self.cache.length >= self.max_positions

    def prefill(self, ids: Sequence[int], image: Images = None, reserve_after: int = 0) -> np.ndarray:
        """Prompt ids (+ each image's rows) -> last position's logits [V], reusing a cached prefix."""
        images = as_image_list(image)
        counts = [int(rows.shape[0]) for rows in images]
        positions = splice_positions(ids, counts)
        if not positions:
            raise EdgeMoEError("empty prompt")
        if len(positions) > self.max_positions:
            raise ContextError(f"the prompt takes {len(positions)} positions, more than the model's context of "
                               f"{self.max_positions}")
        keep = min(common_prefix(self.context, positions), len(positions) - 1)  # compute >= 1 position
        digest = _digest(images)
        if digest != self._image_digest and IMAGE_TOKEN_INDEX in self.context[:keep]:
            keep = self.context.index(IMAGE_TOKEN_INDEX)  # other images: their rows must be recomputed
        if images:
            self._image_digest = digest
        self.reserve(len(positions) + reserve_after)
        self.cache.truncate(keep)
        del self.context[keep:]
        end = image_prefix_end(positions)
        restored = self.prompt_cache is not None and keep < end < len(positions) \
            and self.prompt_cache.restore(self.cache, positions[:end], digest)
        keep = end if restored else min(keep, self.cache.length)  # a restore that failed part-way emptied it
        self.context[:] = positions[:keep]
        self.moe.reset_hints()
        x = self.embed_prompt(ids, images)[keep:]
        for start in range(0, len(x), PREFILL_CHUNK):
            hidden = self.forward(x[start:start + PREFILL_CHUNK])
        self.context.extend(positions[keep:])
        if self.prompt_cache is not None and end and not restored:
            self.prompt_cache.save(self.cache, positions[:end], digest)
        self.last_prefill = PrefillInfo(len(positions), sum(counts), len(positions) - keep)
        return self.logits(hidden[-1:])

    def decode(self, token: int) -> np.ndarray:
        """One token at the next position -> logits [V]."""
        if self.full:
            raise ContextError(f"the conversation filled the model's context of {self.max_positions} positions")
        if self.cache.room() < 1:  # a chat outgrew its cache: grow geometrically, one copy
            self.reserve(max(self.cache.capacity * 2, self.cache.capacity + 64))
        hidden = self.forward(self.trunk.embed(np.array([token], np.int64)))
        self.context.append(int(token))
        return self.logits(hidden)

    def generate_step(self, ids: Sequence[int], image: Images, max_tokens: int,
                      sampler: Sampler | None = None, stop_ids: Sequence[int] = (),
                      on_logits: Callable[[np.ndarray], None] | None = None) -> Iterator[int]:
        """Yield generated ids: prefill, then one decode per token until a stop id or max_tokens.
        `on_logits` sees the logits each id is chosen from (the prefill's first; tests compare them
        with the reference). Generation also ends, without a stop id, when the context is full."""
        if max_tokens < 1:
            raise EdgeMoEError(f"max tokens must be at least 1, got {max_tokens}")
        sampler = sampler or Sampler()
        stop = frozenset(int(i) for i in stop_ids)
        logits = self.prefill(ids, image, reserve_after=max_tokens - 1)
        for i in range(max_tokens):
            if on_logits is not None:
                on_logits(logits)
            token = sampler(logits, self.context)
            yield token
            if token in stop or i == max_tokens - 1 or self.full:
                return
            logits = self.decode(token)
