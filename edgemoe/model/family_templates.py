"""config.json and generation_config.json of each MoE-LLaVA family, at published or tiny sizes.

Contract: `model_config_json(family, dims, tokens, tower_name)` returns the config.json dict a
published checkpoint of `family` has (the key set and values of docs/moe-llava-checkpoints.md §2),
with only the dimensions, token ids and tower swapped for the given ones; `generation_config_json`
does the same for generation_config.json. `dump_json` serialises them the way transformers does
(sorted keys, indent 2, trailing newline), so the full-size StableLM config is byte-exact (2,199 B).
Values not seen in a published file are marked "not seen" where they are set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.model.towers import (CLIP_L14_336, CLIP_MEAN, CLIP_STD, SIGLIP_SO400M_384, ImageProcessorConfig,
                                  VisionTowerConfig)

FAMILIES = ("stablelm", "qwen", "phi")
SIZES = ("tiny", "full")
TOWERS = ("clip", "siglip")


@dataclass(frozen=True)
class ModelDims:
    """The dimensions a generated checkpoint varies; everything else comes from the family template."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # one MLP/expert as stored (Qwen's config.json says twice this)
    vocab_size: int  # 0: pad len(tokenizer) up to a multiple of 64 (tiny)
    num_experts: int = 4
    head_dim: int | None = None  # Qwen's kv_channels; others hidden // heads

    @property
    def moe_layers(self) -> list[int]:
        # moe_mode "sparse": every other layer from 0, as all published variants.
        return list(range(0, self.num_layers, 2))


FULL_DIMS = {
    "stablelm": ModelDims(2048, 24, 32, 5632, 100352),
    "qwen": ModelDims(2048, 24, 16, 5504, 151936, head_dim=128),
    "phi": ModelDims(2560, 32, 32, 10240, 51200),
}
# Tiny: seconds to write, a few MB. Phi's head_dim 20 keeps its 0.4 partial rotary even (8 dims).
TINY_DIMS = {
    "stablelm": ModelDims(64, 4, 4, 128, 0),
    "qwen": ModelDims(64, 4, 4, 128, 0, head_dim=16),
    # head_dim 80 and rotary 32 as in Phi-2 itself; ORT's GroupQueryAttention needs head_dim % 8 == 0.
    "phi": ModelDims(160, 4, 2, 128, 0),
}

TINY_TOWERS = {
    "clip": (VisionTowerConfig("clip", 32, 64, 3, 4, 14, 56, "quick_gelu", 1e-5),
             ImageProcessorConfig("clip", 56, 56, 3, 1 / 255, CLIP_MEAN, CLIP_STD, True)),
    "siglip": (VisionTowerConfig("siglip", 32, 64, 3, 4, 14, 56, "gelu_pytorch_tanh", 1e-6),
               ImageProcessorConfig("siglip", 56, 56, 3, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False)),
}
FULL_TOWER_NAMES = {"clip": CLIP_L14_336, "siglip": SIGLIP_SO400M_384}


@dataclass(frozen=True)
class TokenIds:
    """The special ids config.json records (from the written tokenizer)."""

    eos: int
    pad: int | None
    bos: int | None


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def dump_json(d: dict[str, Any]) -> str:
    """transformers' to_json_string: sorted keys, indent 2, one trailing newline."""
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _moe_block(dims: ModelDims, train_modules: list[str]) -> dict[str, Any]:
    layers = dims.moe_layers
    return {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "moe_enable": True, "moe_layers_idx": layers, "moe_mode": "sparse",
            "num_experts": [dims.num_experts] * len(layers), "router_aux_loss_coef": 0.01, "top_k_experts": 2,
            "train_modules": train_modules, "use_residual": False}


def _llava_keys(mm_hidden: int, tower_name: str) -> dict[str, Any]:
    """The LLaVA training arguments every MoE-LLaVA config carries (seen in StableLM's)."""
    return {"freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_projector_type": "mlp2x_gelu",
            "mm_hidden_size": mm_hidden, "mm_image_tower": tower_name, "mm_projector_lr": None,
            "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_video_tower": None,
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "tokenizer_padding_side": "right",
            "torch_dtype": "bfloat16", "transformers_version": "4.37.0", "tune_mm_mlp_adapter": False,
            "use_cache": True, "use_mm_proj": True, "video_global_proj": False, "video_projector_type": "linear",
            "video_spatial_proj": False, "video_temproal_proj": False}


def _stablelm(d: ModelDims, vocab: int, tok: TokenIds) -> dict[str, Any]:
    return {
        "_name_or_path": "./checkpoints/llavastablelm-2b-other",
        "architectures": ["MoELLaVAStablelmForCausalLM"],
        "auto_map": {
            "AutoConfig": "stabilityai/stablelm-2-1_6b--configuration_stablelm_epoch.StableLMEpochConfig",
            "AutoModelForCausalLM": "stabilityai/stablelm-2-1_6b--modeling_stablelm_epoch.StableLMEpochForCausalLM",
        },
        # The published file has bos = eos = <|endoftext|> (Arcade100k has no BOS token of its own).
        "bos_token_id": tok.eos if tok.bos is None else tok.bos, "eos_token_id": tok.eos,
        "hidden_act": "silu", "hidden_size": d.hidden_size, "initializer_range": 0.02,
        "intermediate_size": d.intermediate_size, "max_position_embeddings": 4096,
        "model_type": "moe_llava_stablelm", "moe": _moe_block(d, ["gate_proj", "up_proj", "down_proj", "wg"]),
        "norm_eps": 1e-05, "num_attention_heads": d.num_heads, "num_heads": d.num_heads,
        "num_hidden_layers": d.num_layers, "num_key_value_heads": d.num_heads, "pad_token_id": tok.pad,
        "rope_pct": 0.25, "rope_theta": 10000, "rotary_scaling_factor": 1.0, "tie_word_embeddings": False,
        "use_qkv_bias": True, "vocab_size": vocab,
    }


def _qwen(d: ModelDims, vocab: int, tok: TokenIds) -> dict[str, Any]:
    # Seen (e4532ec) up to softmax_in_fp32; the rest follows Qwen-1_8B's own config (not seen here).
    return {
        "_name_or_path": "./checkpoints/llavaqwen-1.8b-finetune",  # not seen
        "architectures": ["MoELLaVAQWenForCausalLM"],
        "attn_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": "Qwen/Qwen-1_8B--configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "Qwen/Qwen-1_8B--modeling_qwen.QWenLMHeadModel"},
        # No bos/eos keys: Qwen-1_8B's config has none and upstream's train.py sets only pad_token_id
        # (byte count agrees); the stop id comes from the tokenizer / generation_config.json.
        "bf16": True, "emb_dropout_prob": 0.0,
        "fp16": False, "fp32": False, "hidden_size": d.hidden_size, "initializer_range": 0.02,
        # Qwen v1 halves this: one MLP is intermediate_size // 2 wide.
        "intermediate_size": 2 * d.intermediate_size, "kv_channels": d.head_dim,
        "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "moe_llava_qwen",
        "moe": _moe_block(d, ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"]), "no_bias": True,
        "num_attention_heads": d.num_heads, "num_hidden_layers": d.num_layers, "onnx_safe": None,
        "pad_token_id": tok.pad, "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
        "seq_length": 8192, "softmax_in_fp32": False, "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer", "use_cache_kernel": False, "use_cache_quantization": False,
        "use_dynamic_ntk": True, "use_flash_attn": False, "use_logn_attn": True, "vocab_size": vocab,
    }


def _phi(d: ModelDims, vocab: int, tok: TokenIds) -> dict[str, Any]:
    return {
        "_name_or_path": "./checkpoints/llavaphi-2.7b-finetune",  # not seen
        "architectures": ["MoELLaVAPhiForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "microsoft/phi-2--configuration_phi.PhiConfig",
                     "AutoModelForCausalLM": "microsoft/phi-2--modeling_phi.PhiForCausalLM"},
        # Published Phi configs leave bos/eos null: a runtime must take the stop id from the tokenizer.
        "bos_token_id": None, "embd_pdrop": 0.0, "eos_token_id": None,
        "hidden_act": "gelu_new", "hidden_size": d.hidden_size, "initializer_range": 0.02,
        "intermediate_size": d.intermediate_size, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
        "model_type": "moe_llava_phi", "moe": _moe_block(d, ["fc1", "fc2", "wg"]),
        "num_attention_heads": d.num_heads, "num_hidden_layers": d.num_layers,
        "num_key_value_heads": d.num_heads, "pad_token_id": tok.pad, "partial_rotary_factor": 0.4,
        "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "vocab_size": vocab,
    }


_TEMPLATES = {"stablelm": _stablelm, "qwen": _qwen, "phi": _phi}


def model_config_json(family: str, dims: ModelDims, vocab_size: int, tokens: TokenIds, mm_hidden: int,
                      tower_name: str) -> dict[str, Any]:
    """config.json of `family` with the given dimensions, vocabulary, token ids and vision tower."""
    check_choice("family", family, FAMILIES)
    return {**_llava_keys(mm_hidden, tower_name), **_TEMPLATES[family](dims, vocab_size, tokens)}


def generation_config_json(family: str, tokens: TokenIds) -> dict[str, Any]:
    """generation_config.json as published: 121 B (StableLM), 69 B (Phi), 243 B (Qwen, its base model's)."""
    check_choice("family", family, FAMILIES)
    if family == "stablelm":
        return {"_from_model_config": True, "bos_token_id": tokens.eos if tokens.bos is None else tokens.bos,
                "eos_token_id": tokens.eos, "transformers_version": "4.36.2"}
    if family == "phi":
        return {"_from_model_config": True, "transformers_version": "4.36.2"}
    # Qwen-1_8B's own generation config; its size matches the published 243 B (contents not seen).
    return {"chat_format": "raw", "do_sample": True, "eos_token_id": tokens.eos, "max_new_tokens": 512,
            "pad_token_id": tokens.eos, "stop_words_ids": [[tokens.eos]], "top_k": 0, "top_p": 0.8,
            "transformers_version": "4.31.0"}
