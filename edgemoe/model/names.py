"""Canonical tensor names and each family's map onto its on-disk names.

Contract: everything past the checkpoint reader speaks canonical names only:

    embed.weight                                   [V, H]
    lm_head.weight / lm_head.bias?                 [V, H] / [V]
    final_norm.weight / final_norm.bias?           [H]
    layers.N.attn_norm.{weight,bias?}              [H]
    layers.N.mlp_norm.{weight,bias?}               [H]     (absent in parallel blocks)
    layers.N.attn.{q,k,v}.{weight,bias?}           [heads*D, H] / [heads*D]
    layers.N.attn.o.{weight,bias?}                 [H, heads*D]
    layers.N.mlp.{gate?,up,down}.{weight,bias?}    dense layers; gate only for silu_glu
    layers.N.router.weight                         [E, H]  MoE layers
    layers.N.experts.K.{gate?,up,down}.{weight,bias?}
    projector.{0,2}.{weight,bias}
    vision.<suffix>                                the HF vision_model.<suffix> names

`family_tensors(config, tower)` returns, for every canonical name, a `TensorSpec`: its source name in
the checkpoint, an optional row range (Qwen fuses q|k|v into one `c_attn`), the expected shape and
whether the model needs it. The map is the only place that knows each family's naming.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemoe.families import family_module
from edgemoe.model.config import ModelConfig
from edgemoe.model.towers import VisionTowerConfig

VISION_PREFIX = {"stablelm": "model.image_tower.image_tower.vision_model.",
                 "phi": "model.image_tower.image_tower.vision_model.",
                 "qwen": "transformer.image_tower.image_tower.vision_model."}
# A tower directory saved by CLIPVisionModel / SiglipVisionModel.
TOWER_DIR_PREFIX = "vision_model."


@dataclass(frozen=True)
class TensorSpec:
    """Where a canonical tensor lives on disk and what shape it must have."""

    source: str  # name in the checkpoint (vision: suffix after the vision prefix)
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # slice of the source's first dim (fused tensors)
    required: bool = True
    vision: bool = False  # lives under the vision prefix (main checkpoint or tower directory)
    source_shape: tuple[int, ...] | None = None  # on-disk shape when it differs (timm's [1, N, D] pos_embed)
    used: bool = True  # False: on disk and counted, but nothing computes with it (SigLIP's unused pooling head)

    @property
    def disk_shape(self) -> tuple[int, ...]:
        return self.source_shape if self.source_shape is not None else self.shape


# Per family: canonical leaf -> on-disk leaf, inside a decoder layer.
_LAYER_NAMES = {
    "stablelm": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                 "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
                 "attn.o": "self_attn.o_proj"},
    "phi": {"attn_norm": "input_layernorm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
            "attn.v": "self_attn.v_proj", "attn.o": "self_attn.dense"},
    "qwen": {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.o": "attn.c_proj"},
}
_MLP_NAMES = {
    "stablelm": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "phi": {"up": "fc1", "down": "fc2"},
    "qwen": {"gate": "w2", "up": "w1", "down": "c_proj"},  # Qwen v1: c_proj(w1 x * silu(w2 x))
}
_TOP_NAMES = {
    "stablelm": {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head",
                 "projector": "model.mm_projector.image_spatial_proj", "layer": "model.layers"},
    "phi": {"embed": "model.embed_tokens", "final_norm": "model.final_layernorm", "lm_head": "lm_head",
            "projector": "model.mm_projector.image_spatial_proj", "layer": "model.layers"},
    "qwen": {"embed": "transformer.wte", "final_norm": "transformer.ln_f", "lm_head": "lm_head",
             "projector": "transformer.mm_projector.image_spatial_proj", "layer": "transformer.h"},
}
MOE_INFIX = "mlp.deepspeed_moe"


class _Builder:
    """Collects canonical -> TensorSpec entries for one model."""

    def __init__(self) -> None:
        self.specs: dict[str, TensorSpec] = {}

    def linear(self, canon: str, source: str, out_f: int, in_f: int, bias: bool, **kw) -> None:
        self.specs[f"{canon}.weight"] = TensorSpec(f"{source}.weight", (out_f, in_f), **kw)
        if bias:
            self.specs[f"{canon}.bias"] = TensorSpec(f"{source}.bias", (out_f,), **kw)

    def norm(self, canon: str, source: str, dim: int, bias: bool, required: bool = True) -> None:
        self.specs[f"{canon}.weight"] = TensorSpec(f"{source}.weight", (dim,), required=required)
        if bias:
            self.specs[f"{canon}.bias"] = TensorSpec(f"{source}.bias", (dim,), required=required)


def _mlp(b: _Builder, cfg: ModelConfig, canon: str, source: str) -> None:
    names = _MLP_NAMES[cfg.family]
    h, f = cfg.hidden_size, cfg.intermediate_size
    if cfg.mlp_act == "silu_glu":
        b.linear(f"{canon}.gate", f"{source}.{names['gate']}", f, h, cfg.mlp_bias)
    b.linear(f"{canon}.up", f"{source}.{names['up']}", f, h, cfg.mlp_bias)
    b.linear(f"{canon}.down", f"{source}.{names['down']}", h, f, cfg.mlp_bias)


def _attention(b: _Builder, cfg: ModelConfig, n: int, src: str) -> None:
    names = _LAYER_NAMES[cfg.family]
    h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if cfg.family == "qwen":  # one fused c_attn: rows q | k | v
        bounds = {"q": (0, q_out), "k": (q_out, q_out + kv_out), "v": (q_out + kv_out, q_out + 2 * kv_out)}
        for part, rows in bounds.items():
            b.linear(f"layers.{n}.attn.{part}", f"{src}.attn.c_attn", rows[1] - rows[0], h, True, rows=rows)
    else:
        for part, out_f in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            b.linear(f"layers.{n}.attn.{part}", f"{src}.{names['attn.' + part]}", out_f, h, cfg.qkv_bias)
    b.linear(f"layers.{n}.attn.o", f"{src}.{names['attn.o']}", h, q_out, cfg.o_bias)


def _decoder_layer(b: _Builder, cfg: ModelConfig, n: int) -> None:
    src = f"{_TOP_NAMES[cfg.family]['layer']}.{n}"
    names = _LAYER_NAMES[cfg.family]
    bias = cfg.norm == "layernorm"
    b.norm(f"layers.{n}.attn_norm", f"{src}.{names['attn_norm']}", cfg.hidden_size, bias)
    if not cfg.parallel_block:
        b.norm(f"layers.{n}.mlp_norm", f"{src}.{names['mlp_norm']}", cfg.hidden_size, bias)
    _attention(b, cfg, n, src)
    if cfg.moe.is_moe(n):
        experts = cfg.moe.experts_in(n)
        b.specs[f"layers.{n}.router.weight"] = TensorSpec(f"{src}.{MOE_INFIX}.gate.wg.weight",
                                                          (experts, cfg.hidden_size))
        for k in range(experts):
            _mlp(b, cfg, f"layers.{n}.experts.{k}", f"{src}.{MOE_INFIX}.experts.deepspeed_experts.{k}")
    else:
        _mlp(b, cfg, f"layers.{n}.mlp", f"{src}.mlp")


def _vision(b: _Builder, v: VisionTowerConfig) -> None:
    """HF CLIPVisionModel / SiglipVisionModel names, as suffixes after the vision prefix."""
    h, i = v.hidden_size, v.intermediate_size
    clip = v.kind == "clip"

    def add(canon: str, shape: tuple[int, ...], required: bool = True) -> None:
        b.specs[f"vision.{canon}"] = TensorSpec(canon, shape, required=required, vision=True)

    if clip:
        add("embeddings.class_embedding", (h,))
    add("embeddings.patch_embedding.weight", (h, v.num_channels, v.patch_size, v.patch_size))
    if not clip:
        add("embeddings.patch_embedding.bias", (h,))
    add("embeddings.position_embedding.weight", (v.num_positions, h))
    if clip:
        add("pre_layrnorm.weight", (h,))
        add("pre_layrnorm.bias", (h,))
    for m in range(v.num_layers):
        p = f"encoder.layers.{m}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(f"{p}.self_attn.{proj}.weight", (h, h))
            add(f"{p}.self_attn.{proj}.bias", (h,))
        for ln in ("layer_norm1", "layer_norm2"):
            add(f"{p}.{ln}.weight", (h,))
            add(f"{p}.{ln}.bias", (h,))
        add(f"{p}.mlp.fc1.weight", (i, h))
        add(f"{p}.mlp.fc1.bias", (i,))
        add(f"{p}.mlp.fc2.weight", (h, i))
        add(f"{p}.mlp.fc2.bias", (h,))
    # Features come from an earlier layer: the final norm (and SigLIP's pooling head) never matter.
    add("post_layernorm.weight", (h,), required=False)
    add("post_layernorm.bias", (h,), required=False)


def family_tensors(cfg: ModelConfig, vision: VisionTowerConfig | None) -> dict[str, TensorSpec]:
    """Every canonical tensor of the model, with its on-disk source and expected shape."""
    module = family_module(cfg.family)
    if module is not None:
        return module.tensors(cfg, vision)
    top = _TOP_NAMES[cfg.family]
    b = _Builder()
    b.specs["embed.weight"] = TensorSpec(f"{top['embed']}.weight", (cfg.vocab_size, cfg.hidden_size))
    for n in range(cfg.num_layers):
        _decoder_layer(b, cfg, n)
    b.norm("final_norm", top["final_norm"], cfg.hidden_size, cfg.norm == "layernorm")
    if vision is not None:  # the published state-dict order: ..., final norm, tower, projector, lm_head
        _vision(b, vision)
    b.linear("projector.0", f"{top['projector']}.0", cfg.hidden_size, cfg.mm_hidden_size, True)
    b.linear("projector.2", f"{top['projector']}.2", cfg.hidden_size, cfg.hidden_size, True)
    if not cfg.tie_word_embeddings:
        b.linear("lm_head", top["lm_head"], cfg.vocab_size, cfg.hidden_size, cfg.lm_head_bias)
    return b.specs


def expert_prefix(layer: int, expert: int) -> str:
    """Canonical prefix of one expert's tensors."""
    return f"layers.{layer}.experts.{expert}."


def is_llm_tensor(canonical: str) -> bool:
    """Tensors that count towards the LLM's parameters (published totals exclude tower and projector)."""
    return not (canonical.startswith("vision.") or canonical.startswith("projector."))
