"""Model configuration: a checkpoint's config.json -> one frozen, family-neutral `ModelConfig`.

Contract: `ModelConfig` (with `MoEConfig`, its `RoutingRule`, and `MLAConfig` for latent attention)
is what the reference, exporter and runtime share; it round-trips through `to_dict`/`from_dict`
(the bundle manifest stores it). `parse_config(raw)` finds the family by `model_type` in the
registry (`edgemoe.families`: moe_llava_{stablelm,qwen,phi}, deepseek_vl_v2) and lets that family's
module translate its keys; an unknown model_type is a one-line `ConfigError` naming the known ones.
`load_config(dir)` also resolves the vision tower through the family. Nothing here knows a family.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.families import MODEL_TYPES, family_module
from edgemoe.model.routing_rule import RoutingRule, deepspeed_top_k
from edgemoe.model.towers import TowerSpec



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
class KVLayout:
    """What the KV cache holds per layer and position: `heads` x `dim` values for keys, the same for
    values unless `shared` (MLA caches one latent [c | k_pe] that serves as both key and value)."""

    heads: int
    dim: int
    shared: bool = False

    @property
    def values_per_position(self) -> int:
        """Cached values per position per layer."""
        return self.heads * self.dim * (1 if self.shared else 2)


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
    # Where upstream computes in fp32 inside a half-precision model (edgemoe.reference.layers):
    attn_scores_fp32: bool = False  # Phi-2 upcasts q and k "to avoid overflow"
    rotary_fp32: bool = False  # Qwen v1 applies rotary to t.float()
    context_limit_strict: bool = False  # Qwen v1 rescales rotary past seq_length, which edgemoe does not implement
    candidate_resolutions: tuple[tuple[int, int], ...] = ()  # tiled image layouts (W, H), tile_2d only
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_type(self) -> str:
        return family_module(self.family).model_type(self.family)

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe.expert_intermediate or self.intermediate_size

    @property
    def kv_layout(self) -> KVLayout:
        """The runtime's cache: GQA keys and values, or MLA's latent plus rope key, once."""
        if self.mla is None:
            return KVLayout(self.num_kv_heads, self.head_dim)
        return KVLayout(1, self.mla.kv_lora_rank + self.mla.qk_rope_head_dim, shared=True)

    @property
    def kv_values_per_position(self) -> int:
        """Values the runtime's cache holds per position, all layers together."""
        return self.num_layers * self.kv_layout.values_per_position

    @property
    def expanded_kv_values(self) -> int:
        """Values per position per layer that plain multi-head attention would cache (keys + values)."""
        if self.mla is None:
            return 2 * self.num_kv_heads * self.head_dim
        return self.num_heads * (self.mla.q_head_dim + self.mla.v_head_dim)

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


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Translate a config.json dict into a ModelConfig through its family's module."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        known = ", ".join(sorted(MODEL_TYPES))
        raise ConfigError(f"unsupported model_type {model_type!r}: edgemoe reads {known}")
    return family_module(MODEL_TYPES[model_type]).parse_config(raw)


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
    tower = family_module(config.family).tower_spec(raw, config, checkpoint_dir)
    if tower.vision.hidden_size != config.mm_hidden_size:
        raise ConfigError(
            f"mm_hidden_size {config.mm_hidden_size} != vision tower hidden size {tower.vision.hidden_size}"
        )
    return config, tower
