"""The reference decoder against transformers 4.57's own StableLm, Phi and Qwen2 implementations.

Each test builds a tiny random model from canonical tensors, loads the same weights into the HF
model under HF's names (the maps below are written out here, independently of edgemoe's), and
replaces the HF MLP of each MoE layer with `DenseTopKMoE`: the MoE-LLaVA top-2 rule implemented
differently (every expert computed densely, a mask of renormalised top-2 weights, HF's own MLP
classes as experts). Logits must agree within 1e-4 in fp32, for the full sequence and for
incremental decoding on the KV cache (prefill 5 tokens, then 3 single steps).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transformers  # noqa: E402 (the dev extra installs it: the parity tests fail rather than skip)
from transformers.models.phi.modeling_phi import PhiMLP  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP  # noqa: E402
from transformers.models.stablelm.modeling_stablelm import StableLmMLP  # noqa: E402

from edgemoe.reference.model import ReferenceModel  # noqa: E402
from edgemoe.reference.tiny import random_tensors, tiny_config  # noqa: E402

TOL = 1e-4
SEQ = 8


class DenseTopKMoE(nn.Module):
    """Top-k MoE computed densely: all experts run, a [.., E] weight mask picks and weights them."""

    def __init__(self, router_weight: torch.Tensor, experts: list[nn.Module], k: int = 2) -> None:
        super().__init__()
        self.router_weight = router_weight
        self.experts = nn.ModuleList(experts)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(x.float() @ self.router_weight.float().T, dim=-1)  # [B, L, E]
        top = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., : self.k]
        mask = torch.zeros_like(probs).scatter(-1, top, 1.0)
        weights = probs * mask
        weights = weights / weights.sum(-1, keepdim=True)  # [B, L, E], zero off the top-k
        outs = torch.stack([e(x).float() for e in self.experts], dim=-2)  # [B, L, E, H]
        return (weights.to(x.dtype).float()[..., None] * outs).sum(-2).to(x.dtype)


def _renamed(tensors, src: str, dst: str, leaves: dict[str, str]) -> dict[str, torch.Tensor]:
    """{dst + hf_leaf.suffix: tensor} for each canonical src + leaf.suffix present (suffix weight/bias)."""
    out = {}
    for canon_leaf, hf_leaf in leaves.items():
        for suffix in ("weight", "bias"):
            name = f"{src}{canon_leaf}.{suffix}"
            if name in tensors:
                out[f"{dst}{hf_leaf}.{suffix}"] = torch.from_numpy(tensors[name].copy())
    return out


def _load_hf(hf_model, cfg, tensors, top: dict[str, str], mlp: dict[str, str], make_mlp):
    """Load canonical tensors into an HF CausalLM, swapping in DenseTopKMoE on the MoE layers."""
    state = {hf: torch.from_numpy(tensors[canon].copy()) for canon, hf in top.items()}
    for n in range(cfg.num_layers):
        state.update(_renamed(tensors, f"layers.{n}.", f"model.layers.{n}.", LAYER_MAPS[cfg.family]))
        if not cfg.moe.is_moe(n):
            state.update(_renamed(tensors, f"layers.{n}.mlp.", f"model.layers.{n}.mlp.", mlp))
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected
    # Left at HF's init: the MoE layers' MLPs (replaced next) and Phi's lm_head.bias (zeroed next).
    assert all(k == "lm_head.bias" or int(k.split(".")[2]) in cfg.moe.layers and ".mlp." in k for k in missing)
    if getattr(hf_model.lm_head, "bias", None) is not None:
        hf_model.lm_head.bias.data.zero_()  # MoE-LLaVA's Phi has no lm_head bias
    for n in cfg.moe.layers:
        experts = []
        for k in range(cfg.moe.experts_in(n)):
            expert = make_mlp()
            expert.load_state_dict(_renamed(tensors, f"layers.{n}.experts.{k}.", "", mlp))
            experts.append(expert)
        router = torch.from_numpy(tensors[f"layers.{n}.router.weight"].copy())
        hf_model.model.layers[n].mlp = DenseTopKMoE(router, experts, cfg.moe.top_k)
    return hf_model.eval()


LAYER_MAPS = {
    "stablelm": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.q": "self_attn.q_proj",
                 "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj"},
    "phi": {"attn_norm": "input_layernorm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
            "attn.v": "self_attn.v_proj", "attn.o": "self_attn.dense"},
    # Qwen v1 -> Qwen2 (moe-llava-checkpoints.md section 5): c_attn rows q|k|v, c_proj -> o_proj, ln_* -> norms.
    "qwen": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.q": "self_attn.q_proj",
             "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj"},
}
TOP = {"embed.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}


def _stablelm():
    cfg = tiny_config("stablelm", num_key_value_heads=2)  # GQA: 2 query heads per key/value head
    hf_cfg = transformers.StableLmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu", layer_norm_eps=cfg.norm_eps, use_qkv_bias=True, partial_rotary_factor=0.25,
        rope_theta=cfg.rope_theta, qk_layernorm=False, use_parallel_residual=False, tie_word_embeddings=False,
        max_position_embeddings=256, attn_implementation="eager")
    names = {**TOP, "final_norm.weight": "model.norm.weight", "final_norm.bias": "model.norm.bias"}
    mlp = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    return cfg, transformers.StableLmForCausalLM(hf_cfg), names, mlp, lambda: StableLmMLP(hf_cfg)


def _phi():
    cfg = tiny_config("phi")
    hf_cfg = transformers.PhiConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        hidden_act="gelu_new", layer_norm_eps=cfg.norm_eps, partial_rotary_factor=0.4, rope_theta=cfg.rope_theta,
        qk_layernorm=False, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
        max_position_embeddings=256, attn_implementation="eager")
    names = {**TOP, "final_norm.weight": "model.final_layernorm.weight", "final_norm.bias": "model.final_layernorm.bias"}
    return cfg, transformers.PhiForCausalLM(hf_cfg), names, {"up": "fc1", "down": "fc2"}, lambda: PhiMLP(hf_cfg)


def _qwen2():
    cfg = tiny_config("qwen")
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu", rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        use_sliding_window=False, max_position_embeddings=256, attn_implementation="eager")
    names = {**TOP, "final_norm.weight": "model.norm.weight"}
    mlp = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # Qwen v1: w2 gate, w1 up, c_proj down
    return cfg, transformers.Qwen2ForCausalLM(hf_cfg), names, mlp, lambda: Qwen2MLP(hf_cfg)


BUILDERS = {"stablelm": _stablelm, "phi": _phi, "qwen": _qwen2}


def _pair(family: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cfg, hf, names, mlp, make_mlp = BUILDERS[family]()
    tensors = random_tensors(cfg, None, seed)
    ref = ReferenceModel.from_tensors(cfg, None, tensors, dtype=dtype)
    hf = _load_hf(hf, cfg, tensors, names, mlp, make_mlp).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(seed + 1))
    return cfg, ref, hf, ids


@pytest.mark.parametrize("family", ["stablelm", "phi", "qwen"])
def test_full_and_incremental_logits_match_transformers(family):
    cfg, ref, hf, ids = _pair(family)
    with torch.no_grad():
        want = hf(input_ids=ids).logits.float()  # [1, SEQ, V]
        routing = {}
        full = ref(ref.embed_tokens(ids), routing=routing)
        cache = ref.new_cache()
        steps = [ref(ref.embed_tokens(ids[:, :5]), cache, start_pos=0)]
        for t in range(5, SEQ):
            steps.append(ref(ref.embed_tokens(ids[:, t:t + 1]), cache, start_pos=t))
        incremental = torch.cat(steps, dim=1)
    assert want.abs().max() > 0.5  # the logits are not trivially small
    full_err = (full - want).abs().max().item()
    inc_err = (incremental - want).abs().max().item()
    print(f"{family}: full {full_err:.2e}, incremental {inc_err:.2e}")
    assert full_err < TOL and inc_err < TOL
    assert cache.length == SEQ
    # The MoE layers routed tokens to more than two experts: the comparison covered real routing.
    for layer in cfg.moe.layers:
        assert len(routing[layer].experts.unique()) >= 3


def test_logit_limit_masks_padded_vocabulary():
    cfg, ref, hf, ids = _pair("stablelm")
    with torch.no_grad():
        want = hf(input_ids=ids).logits.float()
        got = ref(ref.embed_tokens(ids), logit_limit=100)
    assert torch.isneginf(got[..., 100:]).all()
    assert (got[..., :100] - want[..., :100]).abs().max() < TOL


@pytest.mark.parametrize("family", ["stablelm", "phi", "qwen"])
def test_bfloat16_tracks_transformers_bfloat16(family):
    """In bf16 both run the same rounding points (router and softmax in fp32); errors stay at bf16 scale."""
    cfg, ref, hf, ids = _pair(family, dtype=torch.bfloat16)
    _, ref32, hf32, _ = _pair(family)
    with torch.no_grad():
        want = hf(input_ids=ids).logits.float()
        got = ref(ref.embed_tokens(ids))
        exact = hf32(input_ids=ids).logits.float()
    err = (got - want).abs().max().item()
    bf16_noise = (want - exact).abs().max().item()  # how far HF's own bf16 is from fp32
    print(f"{family} bf16: ref vs hf {err:.3e}; hf bf16 vs fp32 {bf16_noise:.3e}")
    assert got.dtype == torch.float32 and ref.dtype == torch.bfloat16
    assert err <= max(bf16_noise, 0.05)
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.75
