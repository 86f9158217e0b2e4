"""Greedy generation on the KV cache == greedy by re-running the whole sequence each step, per family."""

from __future__ import annotations

import pytest
import torch

from edgemoe.reference.generate import generate, greedy_generate
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.tiny import random_tensors, tiny_config, tiny_tower

STEPS = 10


def _model(family: str, seed: int = 0) -> ReferenceModel:
    cfg, tower = tiny_config(family), tiny_tower("clip")
    return ReferenceModel.from_tensors(cfg, tower, random_tensors(cfg, tower, seed))


def _prompt(model: ReferenceModel) -> torch.Tensor:
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return model.embed([7, 8, 9, -200, 10, 11], model.encode_image(pixels)).embeds  # [1, 21, H]


def _greedy_without_cache(model: ReferenceModel, embeds: torch.Tensor, steps: int, limit=None) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            seq = embeds if not out else torch.cat((embeds, model.embed_tokens(torch.tensor([out]))), dim=1)
            logits = model(seq, logit_limit=limit)
            out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("family", ["stablelm", "phi", "qwen"])
def test_cached_greedy_equals_full_recompute(family):
    model = _model(family)
    embeds = _prompt(model)
    want = _greedy_without_cache(model, embeds, STEPS)
    got = greedy_generate(model, embeds, STEPS, eos_token_ids=())
    assert list(got.token_ids) == want
    assert got.stop_reason == "length" and got.prompt_length == embeds.shape[1]
    assert len(set(want)) > 1  # a non-degenerate continuation
    again = greedy_generate(model, embeds, STEPS, eos_token_ids=())
    assert again == got


def test_stops_after_eos_and_includes_it():
    model = _model("stablelm", seed=1)
    embeds = _prompt(model)
    free = _greedy_without_cache(model, embeds, STEPS)
    cut = next(i for i in range(1, STEPS) if free[i] not in free[:i])  # first fresh token after the first
    got = greedy_generate(model, embeds, STEPS, eos_token_ids=[free[cut]])
    assert list(got.token_ids) == free[:cut + 1] and got.stop_reason == "eos"


def test_config_eos_is_the_default_stop():
    free_model = _model("qwen")
    embeds = _prompt(free_model)
    free = _greedy_without_cache(free_model, embeds, STEPS)
    cut = next(i for i in range(2, STEPS) if free[i] not in free[:i])
    cfg, tower = tiny_config("qwen", eos_token_id=free[cut]), tiny_tower("clip")
    model = ReferenceModel.from_tensors(cfg, tower, random_tensors(cfg, tower, 0))  # same weights
    got = greedy_generate(model, embeds, STEPS)
    assert list(got.token_ids) == free[:cut + 1] and got.stop_reason == "eos"


def test_logit_limit_restricts_generated_ids():
    model = _model("phi")
    embeds = _prompt(model)
    free = _greedy_without_cache(model, embeds, STEPS)
    limit = min(free)  # every unconstrained choice is now out of range
    assert limit > 0
    got = greedy_generate(model, embeds, STEPS, eos_token_ids=(), logit_limit=limit)
    assert all(t < limit for t in got.token_ids)
    assert list(got.token_ids) == _greedy_without_cache(model, embeds, STEPS, limit=limit)


def test_generate_from_ids_and_pixels_matches_manual_pipeline():
    model = _model("phi", seed=4)
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    got = generate(model, [7, 8, 9, -200, 10, 11], pixels, max_new_tokens=6, eos_token_ids=())
    want = greedy_generate(model, _prompt(model), 6, eos_token_ids=())
    assert got == want and got.prompt_length == 5 + 16
