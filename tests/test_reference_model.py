"""Building the reference from canonical tensors, and its exportable decomposition."""

from __future__ import annotations

import pytest
import torch

from edgemoe.errors import CheckpointError
from edgemoe.model.names import family_tensors
from edgemoe.reference.decoder import AttentionStage, RouterStage
from edgemoe.reference.model import ReferenceModel, module_key
from edgemoe.reference.tiny import random_tensors, tiny_config, tiny_tower


def test_every_canonical_tensor_has_a_place_and_is_loaded_verbatim():
    cfg, tower = tiny_config("phi"), tiny_tower("siglip")
    tensors = random_tensors(cfg, tower, 0)
    model = ReferenceModel.from_tensors(cfg, tower, tensors)
    state = model.state_dict()
    used = [n for n in tensors if module_key(n) in state]
    # Only tower tensors past the selected layer (and post_layernorm) are left out.
    assert sorted(set(tensors) - set(used)) == sorted(n for n in tensors if n.startswith("vision.")
                                                    and (".layers.2." in n or "post_layernorm" in n))
    for name in used:
        assert torch.equal(state[module_key(name)], torch.from_numpy(tensors[name])), name
    assert len(used) == len(state)


@pytest.mark.parametrize("break_it", ["missing", "shape", "unexpected"])
def test_from_tensors_is_strict(break_it):
    cfg = tiny_config("stablelm")
    tensors = random_tensors(cfg, None, 0)
    if break_it == "missing":
        del tensors["layers.2.experts.3.down.weight"]
    elif break_it == "shape":
        tensors["layers.1.attn.q.weight"] = tensors["layers.1.attn.q.weight"][:, :-1]
    else:
        tensors["layers.1.attn.o.bias"] = tensors["final_norm.bias"]
    with pytest.raises(CheckpointError):
        ReferenceModel.from_tensors(cfg, None, tensors)


def test_tied_embeddings_share_the_embedding_matrix():
    cfg = tiny_config("stablelm", tie_word_embeddings=True)
    tensors = random_tensors(cfg, None, 0)
    assert "lm_head.weight" not in family_tensors(cfg, None)
    model = ReferenceModel.from_tensors(cfg, None, tensors)
    h = torch.randn(1, 3, cfg.hidden_size)
    with torch.no_grad():
        want = model.head.norm(h) @ torch.from_numpy(tensors["embed.weight"]).T
        assert (model.head(h) - want).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["stablelm", "phi"])
def test_layer_decomposes_into_attention_block_and_ffn(family):
    """The stages an exporter traces recombine to the layer: y = h + ffn(m), k/v as appended."""
    cfg = tiny_config(family)
    model = ReferenceModel.from_tensors(cfg, None, random_tensors(cfg, None, 0))
    x = torch.randn(1, 6, cfg.hidden_size)
    pos = torch.arange(6)[None]
    with torch.no_grad():
        for index in (0, 1):  # a MoE layer and a dense one
            layer = model.layers[index]
            y, k, v = layer(x, pos)
            h, m, k2, v2 = AttentionStage(layer)(x, pos, x.new_zeros(1, cfg.num_kv_heads, 0, cfg.head_dim),
                                                  x.new_zeros(1, cfg.num_kv_heads, 0, cfg.head_dim))
            y2 = h + layer.ffn(m)
            assert torch.equal(y, y2) and torch.equal(k, k2) and torch.equal(v, v2)
            assert k.shape == (1, cfg.num_kv_heads, 6, cfg.head_dim)
            # Experts are callable one by one: the MoE output is the weighted sum of two of them.
            if layer.is_moe:
                experts, weights = RouterStage(layer)(m[0])
                assert torch.equal(experts, layer.moe.route(m).experts)
                for t in range(6):
                    e0, e1 = experts[t].tolist()
                    experts_out = [layer.moe.experts[e](m[0, t]) for e in (e0, e1)]
                    want = weights[t, 0] * experts_out[0] + weights[t, 1] * experts_out[1]
                    assert (y[0, t] - h[0, t] - want).abs().max() < 1e-5


def test_start_pos_must_follow_the_cache():
    cfg = tiny_config("qwen")
    model = ReferenceModel.from_tensors(cfg, None, random_tensors(cfg, None, 0))
    cache = model.new_cache()
    with torch.no_grad():
        model(model.embed_tokens(torch.tensor([[1, 2, 3]])), cache, start_pos=0)
        with pytest.raises(ValueError):
            model(model.embed_tokens(torch.tensor([[4]])), cache, start_pos=2)
    assert cache.length == 3


def test_qwen_refuses_context_past_its_trained_length():
    from edgemoe.errors import EdgeMoEError

    cfg = tiny_config("qwen", max_position_embeddings=8, seq_length=8)
    model = ReferenceModel.from_tensors(cfg, None, random_tensors(cfg, None, 0))
    with torch.no_grad():
        assert model(model.embed_tokens(torch.arange(8)[None])).shape == (1, 8, cfg.vocab_size)
        with pytest.raises(EdgeMoEError, match="exceeds"):
            model(model.embed_tokens(torch.arange(9)[None]))
