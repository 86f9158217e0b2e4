"""The DeepSeek-VL2 family (Tiny: MHA; Small: MLA): config mapping, tensor names, vision tower, routing.

Contract: `parse_config(raw)` reads a `model_type: deepseek_vl_v2` config.json into the family-neutral
`ModelConfig`, filling every absent `language_config` key with DeepSeek's `DeepseekV2Config` default
(vocab 102400, bos/eos 100000/100001, use_mla True, ...; see ../shared/reference/deepseek-vl2-format.md
§1.2) and refusing what edgemoe does not run (q_lora, rope scaling) in one line. `tower_spec(raw)`
gives the SigLIP tower the config describes (weights live in the main checkpoint under timm names).
`tensors(config, vision)` maps every canonical tensor to its on-disk name, in the checkpoint's
state-dict order (image_newline, view_seperator, vision, projector, language):

    language.model.layers.L.self_attn.{q,k,v,o}_proj          -> layers.L.attn.{q,k,v,o}        (MHA)
    language.model.layers.L.self_attn.{q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}
                                                              -> layers.L.attn.{q, kv_a, kv_a_norm, kv_b, o} (MLA)
    language.model.layers.L.mlp.{gate,up,down}_proj           -> layers.L.mlp.*       (dense, L < first_k_dense_replace)
    language.model.layers.L.mlp.gate.weight (+ e_score_correction_bias)  -> layers.L.router.{weight,bias}
    language.model.layers.L.mlp.experts.K.*                   -> layers.L.experts.K.*
    language.model.layers.L.mlp.shared_experts.*              -> layers.L.shared.*
    vision.blocks.N.attn.qkv (rows q|k|v)                     -> vision.encoder.layers.N.self_attn.{q,k,v}_proj
    vision.pos_embed [1, P, D]                                -> vision.embeddings.position_embedding.weight [P, D]
    image_newline / view_seperator (sic)                      -> projector.image_newline / projector.view_separator

so the vision tower reuses the SigLIP canonical names (HF SiglipVisionModel's). SigLIP's pooling head
(`vision.attn_pool.*`) is on disk and counted, but nothing computes with it (`used=False`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemoe.errors import ConfigError
from edgemoe.model.config import MLAConfig, ModelConfig, MoEConfig
from edgemoe.model.names import TensorSpec
from edgemoe.model.routing_rule import RoutingRule
from edgemoe.model.tiling import TILED
from edgemoe.model.towers import ImageProcessorConfig, TowerSpec, VisionTowerConfig

MODEL_TYPE = "deepseek_vl_v2"
FAMILY = "deepseek_vl2"


def model_type(family: str) -> str:
    return MODEL_TYPE


def vision_prefix(family: str) -> str | None:
    """None: the tower's tensors are full on-disk names (`vision.*`) in the main checkpoint."""
    return None
# DeepseekV2Config's defaults (configuration_deepseek.py), applied to keys language_config lacks.
LANGUAGE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
    "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32, "n_shared_experts": None,
    "n_routed_experts": None, "routed_scaling_factor": 1.0, "topk_method": "gready", "n_group": None,
    "topk_group": None, "num_experts_per_tok": None, "moe_layer_freq": 1, "first_k_dense_replace": 0,
    "norm_topk_prob": False, "scoring_func": "softmax", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "pad_token_id": None, "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "use_mla": True,
}
VISION_DEFAULTS: dict[str, Any] = {"image_size": 384, "patch_size": 14, "width": 1152, "layers": 27, "heads": 16,
                                   "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384"}
PROJECTOR_DEFAULTS: dict[str, Any] = {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "depth": 2,
                                      "mlp_ratio": 1, "downsample_ratio": 2, "token_pooling": False}
# The 23 layouts of the published configs, in their order: every m x n grid of 384-pixel tiles, mn <= 9.
CANDIDATE_TILES = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (1, 6), (6, 1),
                   (2, 3), (3, 2), (1, 7), (7, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 9), (9, 1), (3, 3))
IMAGE_TOKEN = "<image>"


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"config.json has no {key!r} object: a deepseek_vl_v2 config needs one")
    return value


def language_values(raw: dict[str, Any]) -> dict[str, Any]:
    """language_config with DeepSeek's defaults for absent (or null-by-default) keys."""
    given = _section(raw, "language_config")
    return {**LANGUAGE_DEFAULTS, **{k: v for k, v in given.items() if k in LANGUAGE_DEFAULTS or k in given}}


def llamacpp_text_model(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(config.json, tensor-name prefix) of the language model as llama.cpp's converter reads it: DeepSeek-V2
    (`deepseek2`, multi-head latent attention), whose tensors sit under `language.` in this checkpoint."""
    lang = language_values(raw)
    if not lang["use_mla"]:
        raise ConfigError("llama.cpp reads DeepSeek-VL2-Tiny's MHA language model only as its DeepSeek-OCR "
                          "variant; the llama.cpp peer takes DeepSeek-VL2-Small (MLA)")
    return {**lang, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "torch_dtype": "bfloat16"}, "language."


def transformers_text_model(cfg: ModelConfig) -> dict[str, Any] | None:
    """None: the transformers peer is built for MoE-LLaVA's layout (mlp.deepspeed_moe); DeepSeek-VL2's
    language model (DeepseekV2ForCausalLM) is not wired to it."""
    return None


def _routing(lang: dict[str, Any]) -> RoutingRule:
    method = "greedy" if lang["topk_method"] == "gready" else str(lang["topk_method"])  # DeepSeek's own typo
    try:
        return RoutingRule(top_k=int(lang["num_experts_per_tok"]), scoring=str(lang["scoring_func"]), method=method,
                           renorm="plus_tiny" if lang["norm_topk_prob"] else "none",
                           routed_scaling_factor=float(lang["routed_scaling_factor"]),
                           n_group=int(lang["n_group"] or 1), topk_group=int(lang["topk_group"] or 1))
    except ValueError as exc:
        raise ConfigError(f"language_config: {exc}") from None


def _moe(lang: dict[str, Any], num_layers: int) -> MoEConfig:
    experts = lang["n_routed_experts"]
    if not experts or not lang["num_experts_per_tok"]:
        raise ConfigError("language_config lacks n_routed_experts / num_experts_per_tok: not a MoE model")
    freq, first_dense = int(lang["moe_layer_freq"]), int(lang["first_k_dense_replace"])
    layers = tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
    if not layers:
        raise ConfigError(f"first_k_dense_replace {first_dense} leaves no MoE layer among {num_layers}")
    rule = _routing(lang)
    try:
        rule.check_experts(int(experts))
    except ValueError as exc:
        raise ConfigError(f"language_config: {exc}") from None
    shared = int(lang["n_shared_experts"] or 0) * int(lang["moe_intermediate_size"])
    return MoEConfig(layers, (int(experts),) * len(layers), rule.top_k, rule,
                     expert_intermediate=int(lang["moe_intermediate_size"]), shared_intermediate=shared)


def _attention(lang: dict[str, Any]) -> tuple[MLAConfig | None, int]:
    """(MLA settings or None for MHA, head_dim)."""
    if lang["rope_scaling"]:
        raise ConfigError(f"language_config.rope_scaling {lang['rope_scaling']!r} is not supported (YaRN)")
    if not lang["use_mla"]:
        return None, int(lang["hidden_size"]) // int(lang["num_attention_heads"])
    if lang["q_lora_rank"] is not None:
        raise ConfigError(f"q_lora_rank {lang['q_lora_rank']} is not supported: edgemoe runs MLA with q_proj "
                          "straight from the hidden state (q_lora_rank null, as DeepSeek-VL2-Small)")
    mla = MLAConfig(int(lang["kv_lora_rank"]), int(lang["qk_nope_head_dim"]), int(lang["qk_rope_head_dim"]),
                    int(lang["v_head_dim"]))
    return mla, mla.q_head_dim


def vision_values(raw: dict[str, Any]) -> dict[str, Any]:
    return {**VISION_DEFAULTS, **_section(raw, "vision_config")}


def tower_spec(raw: dict[str, Any], config: ModelConfig | None = None, checkpoint_dir: Path | None = None) -> TowerSpec:
    """The SigLIP tower config.json describes; its weights are `vision.*` in the checkpoint itself."""
    v = vision_values(raw)
    width = int(v["width"])
    vision = VisionTowerConfig("siglip", width, int(width * float(v["mlp_ratio"])), int(v["layers"]), int(v["heads"]),
                               int(v["patch_size"]), int(v["image_size"]), "gelu_pytorch_tanh", 1e-6)
    size = int(v["image_size"])
    processor = ImageProcessorConfig("siglip", size, size, 3, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False)
    return TowerSpec(str(v["model_name"]), vision, processor, None)


def _projector(raw: dict[str, Any], width: int) -> int:
    p = {**PROJECTOR_DEFAULTS, **_section(raw, "projector_config")}
    if p["projector_type"] != "downsample_mlp_gelu" or int(p["depth"]) != 2 or int(p["mlp_ratio"]) != 1:
        raise ConfigError(f"projector {p['projector_type']!r} depth {p['depth']} mlp_ratio {p['mlp_ratio']} is not "
                          "supported (DeepSeek-VL2's downsample_mlp_gelu, depth 2, mlp_ratio 1)")
    if int(p["downsample_ratio"]) != 2 or p["token_pooling"]:
        raise ConfigError("projector: only downsample_ratio 2 without token_pooling is supported")
    if int(p["input_dim"]) != width:
        raise ConfigError(f"projector input_dim {p['input_dim']} != vision width {width}")
    return int(p["n_embed"]) if "n_embed" in p else 0


def _candidates(raw: dict[str, Any], tile: int) -> tuple[tuple[int, int], ...]:
    given = raw.get("candidate_resolutions")
    if given is None:
        return tuple((w * tile, h * tile) for w, h in CANDIDATE_TILES)
    try:
        out = tuple((int(w), int(h)) for w, h in given)
    except (TypeError, ValueError):
        raise ConfigError(f"candidate_resolutions must be [[W, H], ...], got {given!r}") from None
    if not out or any(w % tile or h % tile or w <= 0 or h <= 0 for w, h in out):
        raise ConfigError(f"candidate_resolutions must be positive multiples of the tile size {tile}")
    return out


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """A deepseek_vl_v2 config.json -> ModelConfig (module docstring)."""
    lang = language_values(raw)
    layers, hidden = int(lang["num_hidden_layers"]), int(lang["hidden_size"])
    heads = int(lang["num_attention_heads"])
    mla, head_dim = _attention(lang)
    tower = tower_spec(raw)
    n_embed = _projector(raw, tower.vision.hidden_size)
    if n_embed and n_embed != hidden:
        raise ConfigError(f"projector n_embed {n_embed} != language hidden_size {hidden}")
    return ModelConfig(
        family=FAMILY, vocab_size=int(lang["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(lang["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=int(lang["num_key_value_heads"]) if mla is None else heads, head_dim=head_dim,
        rotary_dim=head_dim if mla is None else mla.qk_rope_head_dim, rope_theta=float(lang["rope_theta"]),
        norm="rmsnorm", norm_eps=float(lang["rms_norm_eps"]), parallel_block=False, mlp_act="silu_glu",
        qkv_bias=bool(lang["attention_bias"]), o_bias=bool(lang["attention_bias"]), mlp_bias=False,
        lm_head_bias=False, tie_word_embeddings=bool(lang["tie_word_embeddings"]),
        max_position_embeddings=int(lang["max_position_embeddings"]), moe=_moe(lang, layers),
        mm_hidden_size=tower.vision.hidden_size, mm_projector_type="downsample_mlp_gelu",
        mm_vision_select_layer=-1, mm_vision_select_feature="full_normed", image_aspect_ratio=TILED,
        mm_image_tower=tower.name, eos_token_id=lang["eos_token_id"], pad_token_id=lang["pad_token_id"],
        bos_token_id=lang["bos_token_id"], mla=mla,
        candidate_resolutions=_candidates(raw, tower.vision.image_size), raw=raw,
    )


# ---- tensor names --------------------------------------------------------------------------------


class _Specs:
    def __init__(self) -> None:
        self.specs: dict[str, TensorSpec] = {}

    def add(self, canon: str, source: str, shape: tuple[int, ...], **kw: Any) -> None:
        self.specs[canon] = TensorSpec(source, shape, **kw)

    def linear(self, canon: str, source: str, out_f: int, in_f: int, bias: bool = False) -> None:
        self.add(f"{canon}.weight", f"{source}.weight", (out_f, in_f))
        if bias:
            self.add(f"{canon}.bias", f"{source}.bias", (out_f,))


def _vision_tensors(s: _Specs, v: VisionTowerConfig) -> None:
    h, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    s.add("vision.embeddings.position_embedding.weight", "vision.pos_embed", (v.num_patches, h),
          source_shape=(1, v.num_patches, h))
    s.add("vision.embeddings.patch_embedding.weight", "vision.patch_embed.proj.weight", (h, v.num_channels, p, p))
    s.add("vision.embeddings.patch_embedding.bias", "vision.patch_embed.proj.bias", (h,))
    for n in range(v.num_layers):
        src, canon = f"vision.blocks.{n}", f"vision.encoder.layers.{n}"
        s.add(f"{canon}.layer_norm1.weight", f"{src}.norm1.weight", (h,))
        s.add(f"{canon}.layer_norm1.bias", f"{src}.norm1.bias", (h,))
        for k, part in enumerate(("q_proj", "k_proj", "v_proj")):  # timm's fused qkv, rows q | k | v
            rows = (k * h, (k + 1) * h)
            s.add(f"{canon}.self_attn.{part}.weight", f"{src}.attn.qkv.weight", (h, h), rows=rows)
            s.add(f"{canon}.self_attn.{part}.bias", f"{src}.attn.qkv.bias", (h,), rows=rows)
        s.linear(f"{canon}.self_attn.out_proj", f"{src}.attn.proj", h, h, bias=True)
        s.add(f"{canon}.layer_norm2.weight", f"{src}.norm2.weight", (h,))
        s.add(f"{canon}.layer_norm2.bias", f"{src}.norm2.bias", (h,))
        s.linear(f"{canon}.mlp.fc1", f"{src}.mlp.fc1", i, h, bias=True)
        s.linear(f"{canon}.mlp.fc2", f"{src}.mlp.fc2", h, i, bias=True)
    s.add("vision.post_layernorm.weight", "vision.norm.weight", (h,))
    s.add("vision.post_layernorm.bias", "vision.norm.bias", (h,))
    pool = {"latent": (1, 1, h), "q.weight": (h, h), "q.bias": (h,), "kv.weight": (2 * h, h), "kv.bias": (2 * h,),
            "proj.weight": (h, h), "proj.bias": (h,), "norm.weight": (h,), "norm.bias": (h,),
            "mlp.fc1.weight": (i, h), "mlp.fc1.bias": (i,), "mlp.fc2.weight": (h, i), "mlp.fc2.bias": (h,)}
    for leaf, shape in pool.items():
        s.add(f"vision.attn_pool.{leaf}", f"vision.attn_pool.{leaf}", shape, used=False)


def _attention_tensors(s: _Specs, cfg: ModelConfig, canon: str, src: str) -> None:
    h, bias = cfg.hidden_size, cfg.qkv_bias
    if cfg.mla is None:
        for part in ("q", "k", "v"):
            s.linear(f"{canon}.{part}", f"{src}.{part}_proj", cfg.num_heads * cfg.head_dim, h, bias)
        s.linear(f"{canon}.o", f"{src}.o_proj", h, cfg.num_heads * cfg.head_dim, cfg.o_bias)
        return
    m = cfg.mla
    s.linear(f"{canon}.q", f"{src}.q_proj", cfg.num_heads * m.q_head_dim, h)
    s.linear(f"{canon}.kv_a", f"{src}.kv_a_proj_with_mqa", m.kv_lora_rank + m.qk_rope_head_dim, h)
    s.add(f"{canon}.kv_a_norm.weight", f"{src}.kv_a_layernorm.weight", (m.kv_lora_rank,))
    s.linear(f"{canon}.kv_b", f"{src}.kv_b_proj", cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    s.linear(f"{canon}.o", f"{src}.o_proj", h, cfg.num_heads * m.v_head_dim)


def _mlp(s: _Specs, canon: str, src: str, hidden: int, width: int) -> None:
    s.linear(f"{canon}.gate", f"{src}.gate_proj", width, hidden)
    s.linear(f"{canon}.up", f"{src}.up_proj", width, hidden)
    s.linear(f"{canon}.down", f"{src}.down_proj", hidden, width)


def _layer_tensors(s: _Specs, cfg: ModelConfig, n: int) -> None:
    src, canon, h = f"language.model.layers.{n}", f"layers.{n}", cfg.hidden_size
    _attention_tensors(s, cfg, f"{canon}.attn", f"{src}.self_attn")
    if cfg.moe.is_moe(n):  # DeepseekV2MoE's order: experts, gate, shared_experts
        experts = cfg.moe.experts_in(n)
        for k in range(experts):
            _mlp(s, f"{canon}.experts.{k}", f"{src}.mlp.experts.{k}", h, cfg.expert_intermediate_size)
        s.add(f"{canon}.router.weight", f"{src}.mlp.gate.weight", (experts, h))
        if cfg.moe.routing.uses_bias:
            s.add(f"{canon}.router.bias", f"{src}.mlp.gate.e_score_correction_bias", (experts,))
        if cfg.moe.shared_intermediate:
            _mlp(s, f"{canon}.shared", f"{src}.mlp.shared_experts", h, cfg.moe.shared_intermediate)
    else:
        _mlp(s, f"{canon}.mlp", f"{src}.mlp", h, cfg.intermediate_size)
    s.add(f"{canon}.attn_norm.weight", f"{src}.input_layernorm.weight", (h,))
    s.add(f"{canon}.mlp_norm.weight", f"{src}.post_attention_layernorm.weight", (h,))


def tensors(cfg: ModelConfig, vision: VisionTowerConfig | None) -> dict[str, TensorSpec]:
    """Every canonical tensor with its on-disk name and shape, in state-dict order (module docstring)."""
    s, h = _Specs(), cfg.hidden_size
    s.add("projector.image_newline", "image_newline", (h,))
    s.add("projector.view_separator", "view_seperator", (h,))  # sic: the on-disk name keeps upstream's typo
    if vision is not None:
        _vision_tensors(s, vision)
    s.linear("projector.0", "projector.layers.0", h, 4 * cfg.mm_hidden_size, bias=True)
    s.linear("projector.2", "projector.layers.2", h, h, bias=True)
    s.add("embed.weight", "language.model.embed_tokens.weight", (cfg.vocab_size, h))
    for n in range(cfg.num_layers):
        _layer_tensors(s, cfg, n)
    s.add("final_norm.weight", "language.model.norm.weight", (h,))
    if not cfg.tie_word_embeddings:
        s.add("lm_head.weight", "language.lm_head.weight", (cfg.vocab_size, h))
    return s.specs
