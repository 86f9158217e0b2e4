"""config.json parsing and the parameter counts derived from it, on the published configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from edgemoe.errors import ConfigError
from edgemoe.model.config import ModelConfig, load_config, parse_config
from edgemoe.model.names import family_tensors
from edgemoe.model.summary import summarize_checkpoint
from edgemoe.model.towers import CLIP_L14_336, SIGLIP_SO400M_384, resolve_tower
from real_configs import PHI2_2_7B_4E, QWEN_1_8B_4E, STABLELM_1_6B_4E

# Published LLM sizes (moe-llava-format.md, "Sizes of the published variants").
PUBLISHED = {
    "stablelm": (STABLELM_1_6B_4E, 2.89e9, 2.06e9, 69e6, 18e6),
    "qwen": (QWEN_1_8B_4E, 3.05e9, 2.24e9, 68e6, 18e6),
    "phi": (PHI2_2_7B_4E, 5.30e9, 3.62e9, 105e6, 27e6),
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_parameter_counts_match_published(family: str) -> None:
    raw, total, active, fp16, int4 = PUBLISHED[family]
    config = parse_config(raw)
    summary = summarize_checkpoint(config, resolve_tower(config.mm_image_tower, Path(".")))
    assert summary.total_params == pytest.approx(total, rel=0.02)
    assert summary.active_params == pytest.approx(active, rel=0.02)
    assert summary.expert.fp16_bytes == pytest.approx(fp16, rel=0.02)
    assert summary.expert.int4_bytes == pytest.approx(int4, rel=0.04)  # published figures are rounded down
    assert summary.image_tokens == 576


def test_family_specific_keys() -> None:
    s, q, p = (parse_config(r) for r in (STABLELM_1_6B_4E, QWEN_1_8B_4E, PHI2_2_7B_4E))
    assert (s.head_dim, s.rotary_dim, s.norm, s.qkv_bias, s.parallel_block) == (64, 16, "layernorm", True, False)
    assert (q.head_dim, q.rotary_dim, q.norm, q.intermediate_size) == (128, 128, "rmsnorm", 5504)
    assert (p.head_dim, p.rotary_dim, p.parallel_block, p.mlp_act, p.o_bias) == (80, 32, True, "gelu_new", True)
    assert s.moe.layers == tuple(range(0, 24, 2)) and s.moe.num_experts == (4,) * 12 and s.moe.top_k == 2
    assert s.dense_layers == tuple(range(1, 24, 2))


def test_config_dict_round_trip() -> None:
    config = parse_config(STABLELM_1_6B_4E)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_qwen_fused_attention_is_sliced_by_rows() -> None:
    specs = family_tensors(parse_config(QWEN_1_8B_4E), None)
    q, k, v = (specs[f"layers.3.attn.{p}.weight"] for p in "qkv")
    assert q.source == k.source == v.source == "transformer.h.3.attn.c_attn.weight"
    assert (q.rows, k.rows, v.rows) == ((0, 2048), (2048, 4096), (4096, 6144))
    assert specs["layers.2.experts.1.gate.weight"].source == \
        "transformer.h.2.mlp.deepspeed_moe.experts.deepspeed_experts.1.w2.weight"


def test_stablelm_names_are_the_published_ones() -> None:
    config = parse_config(STABLELM_1_6B_4E)
    specs = family_tensors(config, resolve_tower(CLIP_L14_336, Path(".")).vision)
    sources = {s.source for s in specs.values() if not s.vision}
    assert "model.layers.22.mlp.deepspeed_moe.gate.wg.weight" in sources
    assert "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.down_proj.weight" in sources
    assert "model.layers.23.mlp.up_proj.weight" in sources
    assert "model.mm_projector.image_spatial_proj.2.bias" in sources
    # 855 LLM+projector+CLIP tensors in the published index (moe-llava-checkpoints.md section 3).
    assert len(specs) == 855


def test_siglip_tower_has_no_class_token() -> None:
    vision = resolve_tower(SIGLIP_SO400M_384, Path(".")).vision
    assert (vision.num_patches, vision.num_positions) == (729, 729)


def _bad(raw: dict, **changes) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("raw, message", [
    (_bad(STABLELM_1_6B_4E, model_type="llava_mistral"), "unsupported model_type 'llava_mistral'"),
    (_bad(STABLELM_1_6B_4E, model_type=None), "unsupported model_type None"),
    (_bad(STABLELM_1_6B_4E, moe=None), "no enabled 'moe' block"),
    (_bad(STABLELM_1_6B_4E, hidden_size=None), "lacks 'hidden_size'"),
    (_bad(STABLELM_1_6B_4E, image_projector_type="linear"), "image_projector_type 'linear' is not supported"),
    (_bad(STABLELM_1_6B_4E, moe={**STABLELM_1_6B_4E["moe"], "num_experts": [4] * 11}),
     "moe.num_experts has 11 entries but moe.moe_layers_idx names 12 layers"),
    (_bad(STABLELM_1_6B_4E, moe={**STABLELM_1_6B_4E["moe"], "moe_layers_idx": [0, 24], "num_experts": [4, 4]}), "outside 0..23"),
    (_bad(STABLELM_1_6B_4E, moe={**STABLELM_1_6B_4E["moe"], "num_experts": [1] * 12}), "top_k_experts=2 exceeds"),
])
def test_bad_config_is_refused_with_a_clear_message(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_bad(STABLELM_1_6B_4E, mm_image_tower="nowhere/tower")))
    with pytest.raises(ConfigError, match="neither a known tower"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_bad(STABLELM_1_6B_4E, mm_hidden_size=768)))
    with pytest.raises(ConfigError, match="mm_hidden_size 768 != vision tower hidden size 1024"):
        load_config(tmp_path)
