"""Model configuration: config.json of a MoE-LLaVA checkpoint -> one frozen `ModelConfig`.

Contract: `parse_config(raw, checkpoint_dir)` accepts the three published families
(`moe_llava_stablelm`, `moe_llava_qwen`, `moe_llava_phi`), each with its own key names, and returns a
family-neutral `ModelConfig` the reference, exporter and runtime share. The `moe` block is the
authority for which layers are MoE and how many experts each has. Anything else (an unknown family,
a missing key, an inconsistent moe block) is a `ConfigError` naming the problem. `model_type` is not
registered in transformers, so nothing here asks transformers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.families import MODEL_TYPES as FAMILY_MODEL_TYPES
from edgemoe.families import family_module
from edgemoe.model.routing_rule import RoutingRule, deepspeed_top_k
from edgemoe.model.towers import TowerSpec, resolve_tower

FAMILIES = {"moe_llava_stablelm": "stablelm", "moe_llava_qwen": "qwen", "moe_llava_phi": "phi",
            **FAMILY_MODEL_TYPES}


@dataclass(frozen=True)
class MoEConfig:
    """Which decoder layers are MoE, how many experts each has, and how tokens are routed to them."""

    layers: tuple[int, ...]
    num_experts: tuple[int, ...]  # one entry per MoE layer, as config.json's moe.num_experts
    top_k: int = 2
    rule: RoutingRule | None = None  # None: MoE-LLaVA's DeepSpeed top-k (deepspeed_top_k(top_k))
    expert_intermediate: int = 0  # width of one routed expert; 0: the model's intermediate_size
    shared_intermediate: int = 0  # width of the always-on shared experts' fused MLP; 0: none

    @property
    def routing(self) -> RoutingRule:
        return self.rule if self.rule is not None else deepspeed_top_k(self.top_k)

    def experts_in(self, layer: int) -> int:
        return self.num_experts[self.layers.index(layer)]

    def is_moe(self, layer: int) -> bool:
        return layer in self.layers

    @classmethod
    def from_dict(cls, m: dict[str, Any]) -> "MoEConfig":
        rule = m.get("rule")
        return cls(tuple(m["layers"]), tuple(m["num_experts"]), int(m["top_k"]),
                   None if rule is None else RoutingRule.from_dict(rule),
                   int(m.get("expert_intermediate", 0)), int(m.get("shared_intermediate", 0)))


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2): queries and a compressed, shared key/value latent."""

    kv_lora_rank: int  # latent width cached per position (plus qk_rope_head_dim for the shared rope key)
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: q_proj straight from the hidden state

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """Family-neutral description of a MoE-LLaVA model (the LLM, projector and tower choice)."""

    family: str  # "stablelm" | "qwen" | "phi"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of one MLP/expert as stored (Qwen's config value is twice this)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # leading dims of each head that get rotary embedding (NeoX half-split)
    rope_theta: float
    norm: str  # "layernorm" (weight + bias) | "rmsnorm" (weight only)
    norm_eps: float
    parallel_block: bool  # Phi-2: x + attn(ln x) + mlp(ln x)
    mlp_act: str  # "silu_glu": down(silu(gate x) * up x) | "gelu_new": down(gelu_new(up x))
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    lm_head_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    moe: MoEConfig
    mm_hidden_size: int
    mm_projector_type: str
    mm_vision_select_layer: int
    mm_vision_select_feature: str
    image_aspect_ratio: str
    mm_image_tower: str
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    mla: MLAConfig | None = None  # None: multi-head (GQA-ready) attention with q/k/v/o
    candidate_resolutions: tuple[tuple[int, int], ...] = ()  # tiled image layouts (W, H), tile_2d only
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_type(self) -> str:
        module = family_module(self.family)
        return module.MODEL_TYPE if module is not None else f"moe_llava_{self.family}"

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe.expert_intermediate or self.intermediate_size

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.moe.is_moe(i))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "raw"}
        d["moe"] = MoEConfig.from_dict(d["moe"])
        if d.get("mla") is not None:
            d["mla"] = MLAConfig(**d["mla"])
        d["candidate_resolutions"] = tuple(tuple(int(v) for v in r) for r in d.get("candidate_resolutions", ()))
        return cls(**d)


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
        qkv_bias=True, o_bias=True, mlp_bias=True, lm_head_bias=False,
        intermediate_size=int(_get(raw, "intermediate_size")), num_layers=int(_get(raw, "num_hidden_layers")),
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Translate a config.json dict into a ModelConfig (see module docstring)."""
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ConfigError(f"unsupported model_type {model_type!r}: edgemoe reads {known}")
    family = FAMILIES[model_type]
    module = family_module(family)
    if module is not None:
        return module.parse_config(raw)
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


def load_config(checkpoint_dir: Path) -> tuple[ModelConfig, TowerSpec]:
    """Read `checkpoint_dir/config.json` and resolve its vision tower."""
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{checkpoint_dir} has no config.json: not a checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a JSON object")
    config = parse_config(raw)
    module = family_module(config.family)
    tower = module.tower_spec(raw) if module is not None else resolve_tower(config.mm_image_tower, checkpoint_dir)
    if tower.vision.hidden_size != config.mm_hidden_size:
        raise ConfigError(
            f"mm_hidden_size {config.mm_hidden_size} != vision tower hidden size {tower.vision.hidden_size}"
        )
    return config, tower
