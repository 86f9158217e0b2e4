"""Tiny random MoE-LLaVA models, for tests and export checks that must run in seconds offline.

Contract: `tiny_raw_config(family, **overrides)` is a config.json dict written with the family's
real keys (so `parse_config` reads it as it reads a published config), `tiny_tower(kind)` a small
CLIP or SigLIP, and `random_tensors(config, tower, seed)` one random float32 array for every
canonical name `family_tensors` lists (so the names are exactly those a real checkpoint maps to).
Weights are scaled so activations stay O(1) through the layers and routing is decisive rather
than uniform; the same seed gives the same arrays.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from edgemoe.model.config import ModelConfig, parse_config
from edgemoe.model.names import family_tensors
from edgemoe.model.towers import VisionTowerConfig

TINY_MOE = {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": [0, 2], "num_experts": [4, 4],
            "top_k_experts": 2, "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "use_residual": False, "router_aux_loss_coef": 0.01, "ep_size": 1}

_COMMON = {"vocab_size": 128, "num_hidden_layers": 4, "intermediate_size": 96, "mm_hidden_size": 32,
           "mm_image_tower": "tiny-tower", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
           "image_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad", "tie_word_embeddings": False}

_FAMILY = {
    "stablelm": {"architectures": ["MoELLaVAStablelmForCausalLM"], "model_type": "moe_llava_stablelm",
                 "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu",
                 "rope_pct": 0.25, "rope_theta": 10000, "norm_eps": 1e-5, "use_qkv_bias": True,
                 "max_position_embeddings": 256, "eos_token_id": 1},
    # head_dim 20: partial_rotary_factor 0.4 gives an even 8 rotary dims.
    "phi": {"architectures": ["MoELLaVAPhiForCausalLM"], "model_type": "moe_llava_phi", "hidden_size": 80,
            "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "gelu_new",
            "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "layer_norm_eps": 1e-5, "qk_layernorm": False,
            "max_position_embeddings": 256, "eos_token_id": None},
    # Qwen v1 configures twice the MLP width it builds: 192 here is a 96-wide MLP.
    "qwen": {"architectures": ["MoELLaVAQWenForCausalLM"], "model_type": "moe_llava_qwen", "hidden_size": 64,
             "num_attention_heads": 4, "kv_channels": 16, "intermediate_size": 192, "rotary_pct": 1.0,
             "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6, "no_bias": True, "seq_length": 256,
             "max_position_embeddings": 256, "eos_token_id": 1},
}


def tiny_raw_config(family: str, **overrides: Any) -> dict[str, Any]:
    """A config.json dict for a 4-layer model with MoE (4 experts, top-2) on layers 0 and 2."""
    raw = {**_COMMON, **_FAMILY[family], "moe": copy.deepcopy(TINY_MOE)}
    raw.update(overrides)
    return raw


def tiny_config(family: str, **overrides: Any) -> ModelConfig:
    return parse_config(tiny_raw_config(family, **overrides))


def tiny_tower(kind: str = "clip", **overrides: Any) -> VisionTowerConfig:
    """A 3-layer, 32-wide tower on 16x16 images with 4x4 patches (16 patches)."""
    fields = dict(kind=kind, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, patch_size=4,
                  image_size=16, hidden_act="quick_gelu" if kind == "clip" else "gelu_pytorch_tanh",
                  layer_norm_eps=1e-5 if kind == "clip" else 1e-6)
    fields.update(overrides)
    return VisionTowerConfig(**fields)


def _scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's random values, by its role."""
    if name.endswith(".bias"):
        return 0.0, 0.1
    if len(shape) == 1:  # norm weights (and CLIP's class embedding, which is fine near 1 too)
        return 1.0, 0.1
    if name == "embed.weight" or "position_embedding" in name:
        return 0.0, 1.0 if name == "embed.weight" else 0.3
    fan_in = int(np.prod(shape[1:]))
    boost = 3.0 if name.endswith("router.weight") else 1.0  # spread router logits: decisive routing
    return 0.0, boost / fan_in ** 0.5


def random_tensors(config: ModelConfig, tower: VisionTowerConfig | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every canonical tensor of the model (required and optional)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in sorted(family_tensors(config, tower).items()):
        mean, std = _scale(name, spec.shape)
        out[name] = (mean + std * torch.randn(spec.shape, generator=gen)).numpy()
    return out
