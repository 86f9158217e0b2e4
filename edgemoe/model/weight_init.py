"""Random weights for generated checkpoints, designed so that greedy decoding is decisive and varied.

Contract: `WeightInit(config, vision, seed, successor_ids, len_tokenizer)` gives the float32 values
of every canonical tensor (`tensor(canonical)`), or the same values as row blocks
(`blocks(canonical)`) so a 100k x 2k embedding is never held whole. Each tensor is drawn from its
own PCG64 stream seeded by (seed, canonical name) through blake2b, so values depend on nothing else:
the same seed gives the same bytes whatever the order, block size or file format.

The scheme (why each scale is what it is; the constants below carry the numbers):
- Embedding rows are N(0, 1) draws rescaled to norm exactly sqrt(H): nearly orthogonal to each
  other, and no token is weaker than another.
- A fixed random *successor* map cycles through the ordinary tokens (the base vocabulary less
  eos/pad/bos: generation neither stops nor emits undecodable ids). lm_head row j =
  SUCCESSOR_LOGIT / H * embedding of j's predecessor, plus small noise (rows of special tokens and
  of ids past len(tokenizer) are noise only): when the final hidden state still points along the
  current token's embedding, its successor's logit is ~SUCCESSOR_LOGIT while every other logit is
  ~N(0, (SUCCESSOR_LOGIT / sqrt(H))^2); 16 greedy steps from any ordinary token give 16 distinct
  ids. After a special token the next token is not designed (upstream prompts never end in one).
- Every sublayer perturbs the residual stream without swamping it: input projections give unit
  pre-activations (nonlinearities and attention do real work), output projections are scaled down
  by the number of residual writers (GPT-2's rule) so all of them together move the stream by
  about RESIDUAL_GAIN of the embedding's norm. Context and experts change the logits; the top-1
  token stays the successor by a wide margin.
- Router rows are large (logits std ROUTER_GAIN) so top-2 choices are clear-cut and, because
  routing follows the token, every expert is used.
- Norm weights ~1 and biases ~0, jittered so a loader that drops one is caught by value tests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edgemoe.model.config import ModelConfig
from edgemoe.model.names import family_tensors
from edgemoe.model.towers import VisionTowerConfig

EMBED_STD = 1.0  # token rows: norm EMBED_STD * sqrt(H), nearly orthogonal to each other
SUCCESSOR_LOGIT = 16.0  # successor's logit when h is along its predecessor's embedding
LM_HEAD_NOISE = 0.5  # std of the logits lm_head's own noise adds: far below SUCCESSOR_LOGIT
IN_GAIN = 1.0  # q/k/v, gate/up/fc1, projector: std IN_GAIN/sqrt(fan_in) -> unit pre-activations
RESIDUAL_GAIN = 1.0  # o/down/fc2: all residual writers together move the stream by ~half its norm
ROUTER_GAIN = 4.0  # router logits ~N(0, 16): decisive top-2, every expert used across tokens
NORM_JITTER = 0.05  # norm weight 1 + N(0, .05), norm bias N(0, .05)
BIAS_STD = 0.02  # linear biases: present and visible, but small
POSITION_STD = 0.5  # vision position embeddings: patch content stays the larger signal
BLOCK_ELEMENTS = 1 << 23  # rows per block are chosen to keep a block near 32 MB of float32

UNUSED_STD = 0.02  # tensors on disk that nothing computes with (SigLIP's pooling head in DeepSeek-VL2)
TAG_STD = 1.0  # DeepSeek-VL2's image_newline / view_separator embeddings: as strong as an image token

_IN_PROJ = {"q", "k", "v", "gate", "up", "q_proj", "k_proj", "v_proj", "fc1", "patch_embedding", "0", "2",
            "kv_a", "kv_b"}
_TAGS = {"image_newline", "view_separator"}
_OUT_PROJ = {"o", "down", "out_proj", "fc2"}


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """A PCG64 stream that depends only on (seed, name): stable across runs and Python versions."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


@dataclass(frozen=True)
class Normal:
    mean: float
    std: float


class WeightInit:
    """Values of every canonical tensor of one generated model (see module docstring)."""

    def __init__(self, config: ModelConfig, vision: VisionTowerConfig | None, seed: int,
                 successor_ids: Sequence[int], len_tokenizer: int) -> None:
        if len(successor_ids) < 2 or max(successor_ids) >= len_tokenizer or len_tokenizer > config.vocab_size:
            raise ValueError("successor ids must be >= 2 ids below len(tokenizer) <= vocab_size")
        self.config, self.vision, self.seed = config, vision, seed
        self.len_tokenizer = len_tokenizer
        specs = family_tensors(config, vision)
        self.shapes = {c: s.shape for c, s in specs.items()}
        self.used = {c: s.used for c, s in specs.items()}
        self.successor = self._successor_map(np.asarray(successor_ids, dtype=np.int64))  # -1: none
        self._lm_head_rows: np.ndarray | None = None

    def _successor_map(self, targets: np.ndarray) -> np.ndarray:
        """Designed next id of every id below len(tokenizer): one cycle through `targets`, else -1."""
        cycle = tensor_rng(self.seed, "successor-map").permutation(targets)
        succ = np.full(self.len_tokenizer, -1, dtype=np.int64)
        succ[cycle] = np.roll(cycle, -1)
        return succ

    # ---- per-tensor rules ------------------------------------------------------------------------

    def rule(self, canonical: str) -> Normal:
        """The distribution of every tensor except lm_head.weight (see module docstring)."""
        shape = self.shapes[canonical]
        parts = canonical.split(".")
        module, leaf = parts[-2], parts[-1]
        vision = canonical.startswith("vision.")
        if not self.used[canonical]:
            return Normal(0.0, UNUSED_STD)
        if canonical == "embed.weight":
            return Normal(0.0, EMBED_STD)  # then each row is rescaled to norm EMBED_STD * sqrt(H)
        if leaf in _TAGS:
            return Normal(0.0, TAG_STD)
        if leaf == "class_embedding":
            return Normal(0.0, EMBED_STD)
        if module == "position_embedding":
            return Normal(0.0, POSITION_STD)
        if "norm" in module or module.startswith("layer_norm") or module.endswith("layrnorm"):
            return Normal(1.0, NORM_JITTER) if leaf == "weight" else Normal(0.0, NORM_JITTER)
        if leaf == "bias":
            return Normal(0.0, BIAS_STD)
        fan_in = math.prod(shape[1:])
        if module == "router":
            return Normal(0.0, ROUTER_GAIN / math.sqrt(fan_in))
        if module in _OUT_PROJ:
            layers = self.vision.num_layers if vision else self.config.num_layers
            return Normal(0.0, RESIDUAL_GAIN / math.sqrt(fan_in * 2 * layers))
        if module in _IN_PROJ:
            return Normal(0.0, IN_GAIN / math.sqrt(fan_in))
        raise ValueError(f"no init rule for {canonical}")

    # ---- values ----------------------------------------------------------------------------------

    def blocks(self, canonical: str, max_elements: int = BLOCK_ELEMENTS) -> Iterator[np.ndarray]:
        """The tensor's values as consecutive float32 row blocks of at most ~max_elements each."""
        shape = self.shapes[canonical]
        if canonical == "lm_head.weight":
            yield from self._lm_head_blocks(shape, max_elements)
            return
        rule = self.rule(canonical)
        for block in _normal_blocks(tensor_rng(self.seed, canonical), shape, max_elements):
            if canonical == "embed.weight":
                block /= np.linalg.norm(block, axis=1, keepdims=True) / np.float32(math.sqrt(shape[1]))
            block *= np.float32(rule.std)
            if rule.mean:
                block += np.float32(rule.mean)
            yield block

    def tensor(self, canonical: str) -> np.ndarray:
        """The whole tensor (small models and tests)."""
        return np.concatenate(list(self.blocks(canonical)), axis=0)

    def _lm_head_blocks(self, shape: tuple[int, ...], max_elements: int) -> Iterator[np.ndarray]:
        rows = self._successor_rows()
        noise = np.float32(LM_HEAD_NOISE / math.sqrt(shape[1]))
        start = 0
        for block in _normal_blocks(tensor_rng(self.seed, "lm_head.weight"), shape, max_elements):
            block *= noise
            end = start + len(block)
            if start < len(rows):
                block[: min(end, len(rows)) - start] += rows[start:end]
            start = end
            yield block

    def _successor_rows(self) -> np.ndarray:
        """lm_head rows 0..len(tokenizer)-1 without noise: row j is j's predecessor's embedding."""
        if self._lm_head_rows is None:
            # Only ids in the successor cycle get a designed row; they are the ordinary tokens, the
            # lowest ids (about 1,000), so n is small even when len(tokenizer) is 129k (DeepSeek-VL2).
            hidden = self.config.hidden_size
            has = self.successor >= 0
            n = int(np.flatnonzero(has).max()) + 1
            embed = next(self.blocks("embed.weight", max_elements=n * hidden))[:n]  # rows 0..n-1
            rows = np.zeros((n, hidden), dtype=np.float32)
            rows[self.successor[:n][has[:n]]] = embed[has[:n]]
            rows *= np.float32(SUCCESSOR_LOGIT / hidden)
            self._lm_head_rows = rows
        return self._lm_head_rows


def _normal_blocks(rng: np.random.Generator, shape: tuple[int, ...], max_elements: int) -> Iterator[np.ndarray]:
    """N(0, 1) float32 in row blocks; the concatenation is the same for any block size."""
    row = math.prod(shape[1:])
    step = max(1, max_elements // max(row, 1))
    for start in range(0, shape[0], step):
        yield rng.standard_normal((min(step, shape[0] - start), *shape[1:]), dtype=np.float32)
