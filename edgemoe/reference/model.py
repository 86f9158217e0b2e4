"""`ReferenceModel`: the whole MoE-LLaVA model in plain torch, the truth exports are checked against.

Contract: built from canonical tensors only (`from_checkpoint(ckpt)` or `from_tensors(config,
tower, tensors)`), strict about missing, unexpected and mis-shaped tensors. Every component the
exporter traces is a separate module: `vision` (VisionTower), `projector`, `embed_tokens`
(token embedding), `layers[i]` (with `attn` and `mlp` / `moe.router` + `moe.experts[k]`, and
`decoder.AttentionStage` / `decoder.RouterStage`), and `head` (final norm + lm_head). The pipeline is

    encode_image(pixels) -> embed(ids, features) -> forward(embeds, kv_cache, start_pos) -> logits

Logits come back in fp32 (upstream calls `.float()` on them); columns at or past `logit_limit`
(the tokenizer's length) are -inf, as upstream, which truncates the vocabulary to len(tokenizer).
Runs in fp32 or bf16 (`dtype`); see layers.py for what stays fp32 inside a bf16 model.

Shape legend: B batch, L tokens, H hidden, V vocabulary, N image tokens.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edgemoe.errors import CheckpointError, EdgeMoEError
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.config import ModelConfig
from edgemoe.model.image import ImageInput
from edgemoe.model.towers import VisionTowerConfig
from edgemoe.reference.decoder import DecoderLayer
from edgemoe.reference.kv_cache import KVCache
from edgemoe.reference.layers import Norm
from edgemoe.reference.moe import Routing
from edgemoe.reference.projector import Projector
from edgemoe.reference.splice import SplicedPrompt, splice
from edgemoe.reference.vision import VisionTower


class LMHead(nn.Module):
    """Final norm + lm_head: hidden [B, L, H] -> fp32 logits [B, L, V]."""

    def __init__(self, cfg: ModelConfig, bias: bool) -> None:
        super().__init__()
        self.norm = Norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=bias)

    def forward(self, h: torch.Tensor, logit_limit: int | None = None) -> torch.Tensor:
        logits = self.lm_head(self.norm(h)).float()
        if logit_limit is not None and logit_limit < logits.shape[-1]:
            beyond = torch.arange(logits.shape[-1], device=logits.device) >= logit_limit
            logits = logits.masked_fill(beyond, float("-inf"))
        return logits


def module_key(canonical: str) -> str:
    """The state-dict key of a canonical tensor name (they differ for the embedding, head and MoE
    parts, so that `embed` can be the splicing method and the head one exportable module)."""
    renames = (("embed.", "embed_tokens."), ("final_norm.", "head.norm."), ("lm_head.", "head.lm_head."))
    for prefix, into in renames:
        if canonical.startswith(prefix):
            return into + canonical[len(prefix):]
    parts = canonical.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[2] in ("router", "experts", "shared"):
        return ".".join(parts[:2] + ["moe"] + parts[2:])
    return canonical


class ReferenceModel(nn.Module):
    """Vision tower + projector + decoder-only LLM with MoE layers (module docstring)."""

    def __init__(self, config: ModelConfig, tower: VisionTowerConfig | None, lm_head_bias: bool = False) -> None:
        super().__init__()
        self.config, self.tower_config = config, tower
        self.vision = None if tower is None else VisionTower(tower, config.mm_vision_select_layer,
                                                             config.mm_vision_select_feature)
        self.projector = Projector.for_config(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # canonical embed.*
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.head = LMHead(config, lm_head_bias)
        self.logit_limit: int | None = None  # set to len(tokenizer) to mask the padded vocabulary

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, config: ModelConfig, tower: VisionTowerConfig | None,
                     tensors: Mapping[str, np.ndarray | torch.Tensor],
                     dtype: torch.dtype = torch.float32) -> "ReferenceModel":
        """Build from canonical tensors. Tower tensors the features never use (later layers,
        post_layernorm) are ignored; anything else unexpected is an error."""
        bias = config.lm_head_bias or "lm_head.bias" in tensors
        return cls._build(config, tower, bias, lambda wanted: tensors.items(), dtype)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> "ReferenceModel":
        """Build from a checkpoint, reading (and converting) one tensor at a time."""
        bias = ckpt.config.lm_head_bias or ckpt.has("lm_head.bias")

        def items(wanted: set[str]) -> Iterable[tuple[str, np.ndarray]]:
            return ((name, ckpt.tensor(name)) for name in ckpt.names if module_key(name) in wanted)

        return cls._build(ckpt.config, ckpt.tower.vision, bias, items, dtype)

    @classmethod
    def _build(cls, config: ModelConfig, tower: VisionTowerConfig | None, bias: bool,
               items: Callable[[set[str]], Iterable[tuple[str, np.ndarray | torch.Tensor]]],
               dtype: torch.dtype) -> "ReferenceModel":
        """Construct on the meta device, then adopt converted copies of the tensors `items` yields."""
        with torch.device("meta"):
            model = cls(config, tower, bias)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            want.pop("head.lm_head.weight")
        state: dict[str, torch.Tensor] = {}
        for name, value in items(set(want)):
            key = module_key(name)
            if key not in want:
                if name.startswith("vision."):
                    continue  # a tower tensor the selected features do not depend on
                raise CheckpointError(f"reference model has no place for tensor {name!r}")
            if tuple(value.shape) != want[key]:
                raise CheckpointError(f"tensor {name} has shape {list(value.shape)}, expected {list(want[key])}")
            # A copy either way: checkpoint arrays may be read-only maps, and callers keep theirs.
            state[key] = (torch.tensor(value, dtype=dtype) if isinstance(value, np.ndarray)
                          else value.detach().to(dtype=dtype, copy=True))
        missing = sorted(set(want) - set(state))
        if missing:
            raise CheckpointError(f"reference model is missing {len(missing)} tensor(s), first {missing[0]!r}")
        if config.tie_word_embeddings:
            state["head.lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        return model.requires_grad_(False).eval()

    # -- properties and state -----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def use_gumbel_routing(self, seed: int | None) -> None:
        """Upstream's sampled second expert from one seeded generator shared by all MoE layers;
        None restores deterministic top-k."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        for layer in self.layers:
            if layer.moe is not None:
                layer.moe.generator = gen

    # -- pipeline -----------------------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> projected image features [B, N, H] in the model dtype."""
        if self.vision is None:
            raise CheckpointError("this reference model was built without a vision tower")
        return self.projector(self.vision(pixels.to(self.dtype)))

    def encode(self, image: ImageInput) -> torch.Tensor:
        """One prepared image (edgemoe.model.image.prepare_image) -> its prompt rows [N, H], any layout."""
        pixels = torch.from_numpy(image.pixels)
        return self.encode_tiles(pixels, *image.grid) if image.tiled else self.encode_image(pixels)[0]

    def encode_tiles(self, pixels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One tiled image (tile_2d layout): pixels [1 + rows*cols, 3, S, S], global view first ->
        its prompt tokens [N, H] (global grid, separator, local grid, newlines after each row)."""
        if self.vision is None:
            raise CheckpointError("this reference model was built without a vision tower")
        tiles = self.projector(self.vision(pixels.to(self.dtype)))
        return self.projector.arrange(tiles, rows, cols)

    def embed(self, ids: torch.Tensor | Sequence[int],
              image_features: torch.Tensor | Sequence[torch.Tensor] | None = None) -> SplicedPrompt:
        """Prompt ids [L] with -200 markers + features [I, N, H] -> spliced embeddings [1, L', H]
        and the image spans; text only when there are no markers."""
        return splice(ids, image_features, self.embed_tokens)

    def forward(self, embeds: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int | None = None,
                logit_limit: int | None = None, routing: dict[int, Routing] | None = None) -> torch.Tensor:
        """embeds [B, L, H] at positions start_pos.. -> fp32 logits [B, L, V].

        With a cache, start_pos defaults to (and must equal) the cached length, and this call's
        keys/values are appended. `routing`, when given, receives each MoE layer's Routing.
        """
        b, n, _ = embeds.shape
        cached = 0 if kv_cache is None else kv_cache.length
        start = cached if start_pos is None else int(start_pos)
        if kv_cache is not None and start != cached:
            raise ValueError(f"start_pos {start} does not follow the {cached} cached tokens")
        if self.config.context_limit_strict and start + n > self.config.max_position_embeddings:
            # Past seq_length Qwen v1 switches to dynamic-NTK rotary and logn attention scaling,
            # which this reference does not implement: refuse rather than silently differ.
            raise EdgeMoEError(f"a Qwen context of {start + n} tokens exceeds seq_length "
                               f"{self.config.max_position_embeddings}, past which upstream rescales rotary")
        position_ids = (start + torch.arange(n, device=embeds.device)).expand(b, n)  # [B, L]
        h = embeds.to(self.dtype)
        for i, layer in enumerate(self.layers):
            past_k, past_v = (None, None) if kv_cache is None else kv_cache.past(i)
            h, k, v = layer(h, position_ids, past_k, past_v, routing)
            if kv_cache is not None:
                kv_cache.append(i, k, v)
        limit = self.logit_limit if logit_limit is None else logit_limit
        return self.head(h, limit)
