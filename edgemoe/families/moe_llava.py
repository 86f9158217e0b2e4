"""The MoE-LLaVA families (StableLM-2, Qwen v1, Phi-2): config mapping, tensor names, vision tower.

Contract: `parse_config(raw)` reads a `moe_llava_{stablelm,qwen,phi}` config.json into the
family-neutral `ModelConfig`: each family names its keys differently (`_family_fields`), and the
`moe` block is the authority for which layers are MoE and how many experts each has. Anything else
(a missing key, an inconsistent moe block, an unsupported projector) is a one-line `ConfigError`.
`tower_spec(raw, config, checkpoint_dir)` resolves `mm_image_tower` (a known hub name or a tower
directory). `tensors(config, vision)` maps every canonical tensor (edgemoe.model.names) to its
on-disk name in the family's published state-dict order (embeddings, layers, final norm, vision
tower, projector, lm_head); Qwen's fused `c_attn` is read as row ranges. `vision_prefix(family)` is
where the tower's HF `vision_model.*` tensors sit inside the main checkpoint. `model_type` is not
registered in transformers, so nothing here asks transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.model.config import ModelConfig, MoEConfig
from edgemoe.model.names import TensorSpec
from edgemoe.model.towers import TowerSpec, VisionTowerConfig, resolve_tower

FAMILIES = ("stablelm", "qwen", "phi")

VISION_PREFIX = {"stablelm": "model.image_tower.image_tower.vision_model.",
                 "phi": "model.image_tower.image_tower.vision_model.",
                 "qwen": "transformer.image_tower.image_tower.vision_model."}
# A tower directory saved by CLIPVisionModel / SiglipVisionModel.
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


def _get(raw: dict[str, Any], *keys: str, default: Any = ConfigError) -> Any:
    """First present key among `keys`; a ConfigError naming them when none is and no default."""
    for k in keys:
        if k in raw and raw[k] is not None:
            return raw[k]
    if default is ConfigError:
        raise ConfigError(f"config.json lacks {' / '.join(repr(k) for k in keys)}")
    return default


def _parse_moe(raw: dict[str, Any], num_layers: int) -> MoEConfig:
    moe = raw.get("moe")
    if not isinstance(moe, dict) or not moe.get("moe_enable", True):
        raise ConfigError("config.json has no enabled 'moe' block: this is not a MoE-LLaVA checkpoint")
    layers = tuple(int(i) for i in _get(moe, "moe_layers_idx"))
    num_experts = _get(moe, "num_experts")
    if isinstance(num_experts, int):  # tolerate a scalar: the same count on every MoE layer
        num_experts = [num_experts] * len(layers)
    if len(num_experts) != len(layers):
        raise ConfigError(
            f"moe.num_experts has {len(num_experts)} entries but moe.moe_layers_idx names {len(layers)} layers"
        )
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"moe.moe_layers_idx {bad} outside 0..{num_layers - 1}")
    top_k = int(moe.get("top_k_experts", 2))
    if any(int(e) < top_k for e in num_experts):
        raise ConfigError(f"moe.top_k_experts={top_k} exceeds an entry of moe.num_experts {num_experts}")
    return MoEConfig(layers, tuple(int(e) for e in num_experts), top_k)


def _family_fields(family: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The keys each family names differently, translated to ModelConfig fields."""
    hidden = int(_get(raw, "hidden_size"))
    if family == "stablelm":
        heads = int(_get(raw, "num_attention_heads", "num_heads"))
        head_dim = hidden // heads
        return dict(
            num_heads=heads, num_kv_heads=int(_get(raw, "num_key_value_heads", default=heads)),
            head_dim=head_dim, rotary_dim=int(head_dim * float(_get(raw, "rope_pct", "partial_rotary_factor"))),
            rope_theta=float(_get(raw, "rope_theta", default=10000.0)), norm="layernorm",
            norm_eps=float(_get(raw, "norm_eps", "layer_norm_eps", default=1e-5)), parallel_block=False,
            mlp_act="silu_glu", qkv_bias=bool(_get(raw, "use_qkv_bias", default=False)), o_bias=False,
            mlp_bias=False, lm_head_bias=False, intermediate_size=int(_get(raw, "intermediate_size")),
            num_layers=int(_get(raw, "num_hidden_layers")),
        )
    if family == "qwen":
        heads = int(_get(raw, "num_attention_heads"))
        head_dim = int(_get(raw, "kv_channels", default=hidden // heads))
        return dict(
            num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
            rotary_dim=int(head_dim * float(_get(raw, "rotary_pct", default=1.0))),
            rope_theta=float(_get(raw, "rotary_emb_base", default=10000.0)), norm="rmsnorm",
            norm_eps=float(_get(raw, "layer_norm_epsilon", default=1e-6)), parallel_block=False,
            mlp_act="silu_glu", qkv_bias=True, o_bias=False, mlp_bias=False, lm_head_bias=False,
            rotary_fp32=True, context_limit_strict=True,
            # Qwen v1 halves its configured intermediate_size: ff_dim_in = intermediate_size // 2.
            intermediate_size=int(_get(raw, "intermediate_size")) // 2,
            num_layers=int(_get(raw, "num_hidden_layers")),
        )
    heads = int(_get(raw, "num_attention_heads"))
    head_dim = hidden // heads
    return dict(
        num_heads=heads, num_kv_heads=int(_get(raw, "num_key_value_heads", default=heads)), head_dim=head_dim,
        rotary_dim=int(head_dim * float(_get(raw, "partial_rotary_factor", default=0.4))),
        rope_theta=float(_get(raw, "rope_theta", default=10000.0)), norm="layernorm",
        norm_eps=float(_get(raw, "layer_norm_eps", default=1e-5)), parallel_block=True, mlp_act="gelu_new",
        attn_scores_fp32=True,
        qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=False,
        intermediate_size=int(_get(raw, "intermediate_size")), num_layers=int(_get(raw, "num_hidden_layers")),
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """A moe_llava_* config.json -> ModelConfig (module docstring)."""
    family = str(raw["model_type"])[len("moe_llava_"):]
    fields = _family_fields(family, raw)
    if fields["rotary_dim"] % 2 or fields["rotary_dim"] > fields["head_dim"]:
        raise ConfigError(f"rotary dims {fields['rotary_dim']} invalid for head_dim {fields['head_dim']}")
    projector = str(_get(raw, "image_projector_type", "mm_projector_type", default="mlp2x_gelu"))
    if projector != "mlp2x_gelu":
        raise ConfigError(f"image_projector_type {projector!r} is not supported (only mlp2x_gelu)")
    return ModelConfig(
        family=family,
        vocab_size=int(_get(raw, "vocab_size")),
        hidden_size=int(_get(raw, "hidden_size")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(_get(raw, "max_position_embeddings", "seq_length", default=4096)),
        moe=_parse_moe(raw, fields["num_layers"]),
        mm_hidden_size=int(_get(raw, "mm_hidden_size")),
        mm_projector_type=projector,
        mm_vision_select_layer=int(_get(raw, "mm_vision_select_layer", default=-2)),
        mm_vision_select_feature=str(_get(raw, "mm_vision_select_feature", default="patch")),
        image_aspect_ratio=str(_get(raw, "image_aspect_ratio", default="pad")),
        mm_image_tower=str(_get(raw, "mm_image_tower", "image_tower")),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        raw=raw,
        **fields,
    )


def tensors(cfg: ModelConfig, vision: VisionTowerConfig | None) -> dict[str, TensorSpec]:
    """Every canonical tensor of the model, with its on-disk source and expected shape."""
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


def model_type(family: str) -> str:
    return f"moe_llava_{family}"


def vision_prefix(family: str) -> str | None:
    return VISION_PREFIX[family]


def transformers_text_model(cfg: ModelConfig) -> dict[str, Any] | None:
    """The language model as transformers' own classes describe it (`AutoConfig.for_model` kwargs, with
    `model_type`), for the transformers peer; None when transformers has no such class. StableLM-2 and
    Phi-2 store their dense tensors under transformers' names already; Qwen v1 is remote code (its
    Qwen2 port would need the fused c_attn split), so it has none."""
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, layer_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  partial_rotary_factor=cfg.rotary_dim / cfg.head_dim, qk_layernorm=False,
                  tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings)
    if cfg.family == "stablelm":
        return dict(common, model_type="stablelm", hidden_act="silu", use_qkv_bias=cfg.qkv_bias,
                    use_parallel_residual=False)
    if cfg.family == "phi":
        return dict(common, model_type="phi", hidden_act="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                    attention_dropout=0.0)
    return None


def tower_spec(raw: dict[str, Any], config: ModelConfig, checkpoint_dir: Path) -> TowerSpec:
    """The tower `mm_image_tower` names: built-in by hub name, else a directory beside the checkpoint."""
    return resolve_tower(config.mm_image_tower, checkpoint_dir)
