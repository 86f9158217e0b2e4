"""The reference's Qwen v1 against Qwen v1's published formulas, from an on-disk checkpoint.

transformers has no Qwen v1 class, so the test writes a tiny checkpoint in Qwen's own on-disk layout
(`transformer.h.N.attn.c_attn` holding q|k|v rows, `mlp.w1/w2/c_proj`, deepspeed expert names),
opens it with `Checkpoint.open` and builds the reference with `from_checkpoint`, then evaluates
Qwen v1's modeling_qwen.py formulas directly on the on-disk tensors: RMSNorm in fp32
(x * rsqrt(mean(x^2) + eps) * w), fused c_attn with bias, full NeoX rotary, causal softmax
attention, c_proj(w1 x * silu(w2 x)), and the top-2 gate. This checks the name map (row slices of
c_attn, w1/w2 roles) as well as the arithmetic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgemoe.model.checkpoint import Checkpoint
from edgemoe.families.moe_llava import VISION_PREFIX
from edgemoe.model.names import family_tensors
from edgemoe.model.towers import CLIP_MEAN, CLIP_STD, ImageProcessorConfig, write_tower_directory
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.tiny import random_tensors, tiny_raw_config, tiny_tower

import safetensors.numpy as safetensors_numpy  # noqa: E402


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    """A tiny Qwen-family checkpoint on disk; returns (directory, on-disk tensors by source name)."""
    root = tmp_path_factory.mktemp("qwen_ckpt")
    tower = tiny_tower("clip")
    write_tower_directory(root / "tower", tower,
                          ImageProcessorConfig("clip", 16, 16, 3, 1 / 255, CLIP_MEAN, CLIP_STD, True))
    raw = tiny_raw_config("qwen", mm_image_tower="tower")
    (root / "config.json").write_text(json.dumps(raw))
    from edgemoe.model.config import parse_config

    cfg = parse_config(raw)
    canon = random_tensors(cfg, tower, seed=3)
    disk: dict[str, np.ndarray] = {}
    fused: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, spec in family_tensors(cfg, tower).items():
        source = VISION_PREFIX["qwen"] + spec.source if spec.vision else spec.source
        if spec.rows is None:
            disk[source] = canon[name]
        else:
            fused.setdefault(source, []).append((spec.rows[0], canon[name]))
    for source, parts in fused.items():
        disk[source] = np.concatenate([a for _, a in sorted(parts, key=lambda p: p[0])], axis=0)
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in disk.items()},
                                str(root / "model.safetensors"))
    return root, {k: torch.from_numpy(v.copy()) for k, v in disk.items()}, raw


def _rms(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotary(t, pos, dim, base):
    """Qwen's RotaryEmbedding + apply_rotary_pos_emb; t [B, L, NH, D]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(pos.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]  # [1, L, 1, D]
    x1, x2 = t[..., : dim // 2], t[..., dim // 2: dim]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((t[..., :dim] * emb.cos() + rotated * emb.sin(), t[..., dim:]), dim=-1)


def qwen_v1_logits(w: dict[str, torch.Tensor], raw: dict, ids: torch.Tensor) -> torch.Tensor:
    """Qwen v1 (modeling_qwen.py) + DeepSpeed top-2 MoE, straight from the on-disk tensors."""
    hidden, heads, eps = raw["hidden_size"], raw["num_attention_heads"], raw["layer_norm_epsilon"]
    d = raw["kv_channels"]
    rot_dim = int(d * raw["rotary_pct"])
    moe_layers = raw["moe"]["moe_layers_idx"]
    x = w["transformer.wte.weight"][ids]  # [B, L, H]
    b, n, _ = x.shape
    pos = torch.arange(n)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for i in range(raw["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = _rms(x, w[p + "ln_1.weight"], eps)
        mixed = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = mixed.split(heads * d, dim=2)
        q, k, v = (t.view(b, n, heads, d) for t in (q, k, v))
        q, k = _rotary(q, pos, rot_dim, raw["rotary_emb_base"]), _rotary(k, pos, rot_dim, raw["rotary_emb_base"])
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / (d ** 0.5)
        att = torch.where(causal, att, torch.finfo(att.dtype).min).softmax(-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, n, heads * d)
        x = x + ctx @ w[p + "attn.c_proj.weight"].T
        h = _rms(x, w[p + "ln_2.weight"], eps)
        if i in moe_layers:
            m = p + "mlp.deepspeed_moe."
            gates = torch.softmax(h.float() @ w[m + "gate.wg.weight"].float().T, dim=-1)  # [B, L, E]
            first = gates.argmax(-1)
            second = gates.masked_fill(torch.nn.functional.one_hot(first, gates.shape[-1]).bool(), -1.0).argmax(-1)
            g1, g2 = gates.gather(-1, first[..., None]), gates.gather(-1, second[..., None])
            out = torch.zeros_like(h)
            for e in range(gates.shape[-1]):
                ep = f"{m}experts.deepspeed_experts.{e}."
                y = (h @ w[ep + "w1.weight"].T * torch.nn.functional.silu(h @ w[ep + "w2.weight"].T)) \
                    @ w[ep + "c_proj.weight"].T
                wt = torch.where(first[..., None] == e, g1, 0.0) + torch.where(second[..., None] == e, g2, 0.0)
                out = out + wt / (g1 + g2) * y
            x = x + out
        else:
            x = x + (h @ w[p + "mlp.w1.weight"].T * torch.nn.functional.silu(h @ w[p + "mlp.w2.weight"].T)) \
                @ w[p + "mlp.c_proj.weight"].T
    x = _rms(x, w["transformer.ln_f.weight"], eps)
    return x @ w["lm_head.weight"].T


def test_qwen_v1_checkpoint_matches_published_formulas(qwen_checkpoint):
    root, disk, raw = qwen_checkpoint
    ckpt = Checkpoint.open(root)
    model = ReferenceModel.from_checkpoint(ckpt)
    ids = torch.randint(0, raw["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = qwen_v1_logits(disk, raw, ids)
        full = model(model.embed_tokens(ids))
        cache = model.new_cache()
        inc = torch.cat([model(model.embed_tokens(ids[:, :5]), cache)]
                        + [model(model.embed_tokens(ids[:, t:t + 1]), cache) for t in range(5, 9)], dim=1)
    full_err, inc_err = (full - want).abs().max().item(), (inc - want).abs().max().item()
    print(f"qwen v1 formulas: full {full_err:.2e}, incremental {inc_err:.2e}")
    assert want.abs().max() > 0.5
    assert full_err < 1e-4 and inc_err < 1e-4


def test_qwen_checkpoint_vision_path_and_bf16(qwen_checkpoint):
    """The tower comes from the checkpoint under transformer.image_tower...; bf16 builds and stays close."""
    root, disk, raw = qwen_checkpoint
    ckpt = Checkpoint.open(root)
    model = ReferenceModel.from_checkpoint(ckpt)
    lowp = ReferenceModel.from_checkpoint(ckpt, dtype=torch.bfloat16)
    vp = VISION_PREFIX["qwen"]
    assert torch.equal(model.vision.embeddings.patch_embedding.weight, disk[vp + "embeddings.patch_embedding.weight"])
    assert torch.equal(model.projector[0].weight, disk["transformer.mm_projector.image_spatial_proj.0.weight"])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([3, 4, -200, 5])
    with torch.no_grad():
        feats = model.encode_image(pixels)
        l32 = model(model.embed(ids, feats).embeds)
        l16 = lowp(lowp.embed(ids, lowp.encode_image(pixels)).embeds)
    assert feats.shape == (1, 16, raw["hidden_size"])
    assert lowp.dtype == torch.bfloat16 and l16.dtype == torch.float32
    err = (l16 - l32).abs().max().item()
    print(f"qwen bf16 vs fp32 with image: {err:.3e}")
    assert err < 0.15
