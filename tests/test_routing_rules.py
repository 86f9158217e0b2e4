"""Every routing rule, in torch (reference) and numpy (host router), against transformers' own gate code.

transformers 4.57's DeepseekV2MoEGate implements softmax + greedy / group_limited_greedy (it ignores
norm_topk_prob) and DeepseekV3TopkRouter sigmoid + noaux_tc with the correction bias and renorm.
Both pick experts with torch.topk(sorted=False), so experts are compared as sets, with each expert's
weight.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MoEGate
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from edgemoe.errors import EdgeMoEError
from edgemoe.model.routing_rule import RoutingRule, deepspeed_top_k
from edgemoe.reference.moe import gate, top_k_gating
from edgemoe.runtime.routing import route, select

HIDDEN, TOKENS = 32, 40


def _np(x) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _by_expert(experts: np.ndarray, weights: np.ndarray) -> list[dict[int, float]]:
    return [dict(zip(e.tolist(), w.tolist())) for e, w in zip(experts, weights)]


def _assert_same(ours_e, ours_w, theirs_e, theirs_w) -> None:
    ours, theirs = _by_expert(_np(ours_e), _np(ours_w)), _by_expert(_np(theirs_e), _np(theirs_w))
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()  # the same experts, exactly
        # Weights to a few fp32 ulps: numpy and torch sum the softmax in different orders, and a
        # routed_scaling_factor of 16 carries that into the 6th digit (1.6e-6 measured on an AMD EPYC).
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=4e-6, atol=1e-7)


def _inputs(seed: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, TOKENS, HIDDEN, generator=g)
    w = torch.randn(experts, HIDDEN, generator=g) * 0.5
    return x, w


@pytest.mark.parametrize("method,groups,topk_group,scale", [
    ("greedy", 1, 1, 1.0), ("greedy", 1, 1, 2.0), ("group_limited_greedy", 4, 2, 1.0),
    ("group_limited_greedy", 8, 3, 16.0),
])
def test_softmax_rules_match_transformers_deepseek_v2_gate(method, groups, topk_group, scale):
    experts, k = 64, 6
    cfg = DeepseekV2Config(hidden_size=HIDDEN, n_routed_experts=experts, num_experts_per_tok=k, topk_method=method,
                           n_group=groups, topk_group=topk_group, routed_scaling_factor=scale, norm_topk_prob=False)
    hf = DeepseekV2MoEGate(cfg)
    x, w = _inputs(1, experts)
    hf.weight.data.copy_(w)
    with torch.no_grad():
        idx, weight = hf(x)
    rule = RoutingRule(top_k=k, scoring="softmax", method=method, renorm="none", routed_scaling_factor=scale,
                       n_group=groups, topk_group=topk_group)
    ours = gate(x[0] @ w.T, rule)
    _assert_same(ours.experts, ours.weights, idx, weight)
    host = route(x[0].numpy(), w.numpy(), rule)
    _assert_same(host.experts, host.weights, idx, weight)


@pytest.mark.parametrize("groups,topk_group,norm", [(8, 4, True), (4, 1, True), (1, 1, False)])
def test_noaux_tc_matches_transformers_deepseek_v3_router(groups, topk_group, norm):
    experts, k, scale = 64, 8, 2.5
    cfg = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=experts, num_experts_per_tok=k, n_group=groups,
                           topk_group=topk_group, routed_scaling_factor=scale, norm_topk_prob=norm)
    hf = DeepseekV3TopkRouter(cfg)
    x, w = _inputs(2, experts)
    bias = torch.randn(experts, generator=torch.Generator().manual_seed(3)) * 0.3
    hf.weight.data.copy_(w)
    hf.e_score_correction_bias.copy_(bias)
    with torch.no_grad():
        idx, weight = hf(x)
    rule = RoutingRule(top_k=k, scoring="sigmoid", method="noaux_tc", renorm="plus_tiny" if norm else "none",
                       routed_scaling_factor=scale, n_group=groups, topk_group=topk_group)
    ours = gate(x[0] @ w.T, rule, bias)
    _assert_same(ours.experts, ours.weights, idx, weight)
    host = route(x[0].numpy(), w.numpy(), rule, bias.numpy())
    _assert_same(host.experts, host.weights, idx, weight)
    # the bias steers the choice but never the weights: without it the choice differs on some token
    plain = gate(x[0] @ w.T, rule)
    assert not torch.equal(plain.experts.sort().values, ours.experts.sort().values)


def test_host_and_reference_agree_on_every_rule():
    logits = torch.randn(64, 32, generator=torch.Generator().manual_seed(4)) * 3
    bias = np.linspace(-0.2, 0.2, 32, dtype=np.float32)
    for rule in (RoutingRule(6, "softmax", "greedy", "plus_tiny"), RoutingRule(4, "sigmoid", "greedy", "none"),
                 RoutingRule(6, "softmax", "group_limited_greedy", "plus_tiny", 2.0, 4, 2),
                 RoutingRule(6, "sigmoid", "noaux_tc", "plus_tiny", 2.5, 8, 3), deepspeed_top_k(2), deepspeed_top_k(1)):
        ref = gate(logits, rule, torch.from_numpy(bias))
        host = select(logits.numpy(), rule, bias)
        np.testing.assert_array_equal(ref.experts.numpy(), host.experts)  # same order: first maximum first
        np.testing.assert_allclose(ref.weights.numpy(), host.weights, rtol=1e-6, atol=1e-7)


def test_moe_llava_rule_is_unchanged_by_generalisation():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(5))
    via_rule = gate(logits, deepspeed_top_k(2))
    old = top_k_gating(logits, 2)
    assert torch.equal(via_rule.experts, old.experts) and torch.equal(via_rule.weights, old.weights)
    assert torch.allclose(old.weights.sum(-1), torch.ones(50))


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="topk_method"):
        RoutingRule(2, method="random")
    with pytest.raises(ValueError, match="n_group"):
        RoutingRule(2, method="noaux_tc", n_group=2, topk_group=3)
    with pytest.raises(EdgeMoEError, match="cannot choose 6 of 4"):
        select(np.zeros((1, 4), np.float32), RoutingRule(6))
    with pytest.raises(EdgeMoEError, match="do not split"):
        select(np.zeros((1, 10), np.float32), RoutingRule(2, method="group_limited_greedy", n_group=4, topk_group=1))


def test_rule_round_trips_through_its_dict():
    rule = RoutingRule(6, "sigmoid", "noaux_tc", "plus_tiny", 2.5, 8, 4)
    assert RoutingRule.from_dict(rule.to_dict()) == rule
