"""The routing rule: deterministic top-k by fp32 probability, renormalised weights, ties to the lower
index; the seeded Gumbel mode; and the MoE layer's output against a dense, mask-based computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.moe import MoELayer, router_logits, top_k_gating
from edgemoe.reference.tiny import random_tensors, tiny_config


def _numpy_top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent rule: a stable sort of -p keeps the lower index first among equal probabilities."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, -1)
    return idx, (w / w.sum(-1, keepdims=True) if k > 1 else w)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_equals_independent_computation(k):
    logits = torch.randn(256, 4, generator=torch.Generator().manual_seed(k)) * 2
    r = top_k_gating(logits, k)
    idx, w = _numpy_top_k(logits.double().numpy(), k)
    assert np.array_equal(r.experts.numpy(), idx)
    assert np.abs(r.weights.numpy() - w).max() < 1e-6
    if k > 1:
        assert torch.allclose(r.weights.sum(-1), torch.ones(256))
    assert r.weights.dtype == torch.float32 and r.experts.dtype == torch.int64


def test_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                           [0.0, 2.0, 2.0, 1.0],
                           [3.0, 1.0, 3.0, 3.0],
                           [0.0, 0.0, 5.0, 0.0]])
    r = top_k_gating(logits, 2)
    assert r.experts.tolist() == [[0, 1], [1, 2], [0, 2], [2, 0]]
    assert torch.allclose(r.weights[:3], torch.full((3, 2), 0.5))
    # Same answer from the layer when two router rows are identical (exact ties in fp32).
    cfg = tiny_config("stablelm")
    layer = MoELayer(cfg, 4)
    with torch.no_grad():
        layer.router.weight[3] = layer.router.weight[1]
        layer.router.weight[0] = -10 * layer.router.weight[1]  # expert 0 never wins
        layer.router.weight[2] = -10 * layer.router.weight[1]
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    favoured = router_logits(x, layer.router.weight)[:, 1] > 0
    routes = layer.route(x).experts
    assert (routes[favoured] == torch.tensor([1, 3])).all()
    assert favoured.any()


def test_routing_and_output_are_the_same_every_run():
    cfg = tiny_config("phi")
    torch.manual_seed(0)
    layer = MoELayer(cfg, 4)
    x = torch.randn(2, 7, cfg.hidden_size)
    with torch.no_grad():
        runs = [layer.forward_routed(x) for _ in range(3)]
    for y, r in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(r.experts, runs[0][1].experts)
        assert torch.equal(r.weights, runs[0][1].weights)


def test_layer_output_equals_dense_masked_mixture():
    cfg = tiny_config("stablelm")
    torch.manual_seed(1)
    layer = MoELayer(cfg, 4)
    with torch.no_grad():
        layer.router.weight.mul_(8)
        x = torch.randn(3, 5, cfg.hidden_size)
        probs = torch.softmax(x @ layer.router.weight.T, -1)  # [3, 5, 4]
        top2 = probs.topk(2, dim=-1).indices
        mask = torch.zeros_like(probs).scatter(-1, top2, 1.0)
        weights = probs * mask / (probs * mask).sum(-1, keepdim=True)
        dense = sum(weights[..., e:e + 1] * layer.experts[e](x) for e in range(4))
        got, routing = layer.forward_routed(x)
    assert (got - dense).abs().max() < 1e-6
    assert routing.experts.shape == (15, 2) and len(routing.experts.unique()) == 4


def test_router_runs_in_fp32_inside_a_bf16_layer():
    cfg = tiny_config("qwen")
    torch.manual_seed(2)
    layer = MoELayer(cfg, 4).to(torch.bfloat16)
    x = torch.randn(10, cfg.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        r = layer.route(x)
        want = top_k_gating(x.float() @ layer.router.weight.float().T, 2)
        y = layer(x)
    assert r.probs.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.equal(r.experts, want.experts) and torch.equal(r.weights, want.weights)


def test_gumbel_mode_is_seeded_and_samples_only_the_second_expert():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]]).repeat(300, 1)
    plain = top_k_gating(logits, 2)
    assert (plain.experts[:, 1] == 1).all()  # deterministic: the tie among 1..3 goes to 1
    a = top_k_gating(logits, 2, torch.Generator().manual_seed(7))
    b = top_k_gating(logits, 2, torch.Generator().manual_seed(7))
    c = top_k_gating(logits, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a.experts, b.experts) and not torch.equal(a.experts, c.experts)
    assert (a.experts[:, 0] == 0).all()  # the first expert is never sampled
    assert set(a.experts[:, 1].tolist()) == {1, 2, 3}
    chosen = a.probs.gather(-1, a.experts)
    assert torch.allclose(a.weights, chosen / chosen.sum(-1, keepdim=True))


def test_model_level_gumbel_switch():
    cfg = tiny_config("stablelm")
    model = ReferenceModel.from_tensors(cfg, None, random_tensors(cfg, None, 0))
    x = model.embed_tokens(torch.arange(20)[None])
    with torch.no_grad():
        base = model(x)
        model.use_gumbel_routing(3)
        s1 = model(x)
        model.use_gumbel_routing(3)
        s2 = model(x)
        model.use_gumbel_routing(None)
        back = model(x)
    assert torch.equal(s1, s2) and torch.equal(back, base)
    assert not torch.equal(s1, base)
