"""Greedy generation with the reference model: prefill once, then one token at a time on a KV cache.

Contract: deterministic (argmax, first maximum on ties; deterministic routing unless the model was
switched to Gumbel routing). Stops after an eos token (which is included in the result, as HF's
generate returns it) or after max_new_tokens. The prompt is either spliced embeddings
(`greedy_generate`) or ids with -200 markers plus pixels (`generate`, which encodes and splices).
This module knows nothing about tokenization: ids in, ids out.

Shape legend: L' spliced prompt length, H hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from edgemoe.reference.model import ReferenceModel


@dataclass(frozen=True)
class GenerationResult:
    """What greedy generation produced."""

    token_ids: tuple[int, ...]  # generated ids, the eos id last when stop_reason == "eos"
    stop_reason: str  # "eos" | "length"
    prompt_length: int  # L', the spliced prompt's length


def _stop_ids(model: ReferenceModel, eos_token_ids: Sequence[int] | None) -> frozenset[int]:
    if eos_token_ids is not None:
        return frozenset(int(i) for i in eos_token_ids)
    eos = model.config.eos_token_id
    return frozenset() if eos is None else frozenset([int(eos)])


@torch.no_grad()
def greedy_generate(model: ReferenceModel, prompt_embeds: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: Sequence[int] | None = None, logit_limit: int | None = None
                    ) -> GenerationResult:
    """prompt_embeds [1, L', H] -> greedy continuation.

    eos_token_ids: None uses config.eos_token_id (if any); an empty sequence never stops early.
    logit_limit: None uses model.logit_limit.
    """
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt [1, L, H], got {list(prompt_embeds.shape)}")
    stop = _stop_ids(model, eos_token_ids)
    cache = model.new_cache()
    logits = model(prompt_embeds, cache, logit_limit=logit_limit)  # [1, L', V]
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in stop:
            return GenerationResult(tuple(out), "eos", prompt_embeds.shape[1])
        if len(out) == max_new_tokens:
            break
        step = model.embed_tokens(torch.tensor([[token]], device=prompt_embeds.device))  # [1, 1, H]
        logits = model(step, cache, logit_limit=logit_limit)
    return GenerationResult(tuple(out), "length", prompt_embeds.shape[1])


@torch.no_grad()
def generate(model: ReferenceModel, input_ids: torch.Tensor | Sequence[int], pixels: torch.Tensor | None = None,
             max_new_tokens: int = 64, eos_token_ids: Sequence[int] | None = None,
             logit_limit: int | None = None) -> GenerationResult:
    """ids [L] (with one -200 per image) and pixels [I, 3, S, S] -> greedy continuation."""
    features = None if pixels is None else model.encode_image(pixels)
    prompt = model.embed(input_ids, features)
    return greedy_generate(model, prompt.embeds, max_new_tokens, eos_token_ids, logit_limit)
