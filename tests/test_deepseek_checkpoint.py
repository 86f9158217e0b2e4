"""DeepSeek-VL2 checkpoints: config defaults, names, shapes, parameter counts, files, and bad inputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from edgemoe.errors import CheckpointError, ConfigError
from edgemoe.families import deepseek_vl2
from edgemoe.families.deepseek_vl2_files import SPECIAL_IDS, config_json
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.config import ModelConfig, parse_config
from edgemoe.model.names import family_tensors
from edgemoe.model.safetensors_io import SafetensorsFile
from edgemoe.model.summary import summarize_checkpoint
from edgemoe.model.tokenizer import load_tokenizer


def _summary(variant: str, size: str = "full"):
    raw = config_json(variant, size)
    return summarize_checkpoint(parse_config(raw), deepseek_vl2.tower_spec(raw))


def test_published_parameter_counts():
    # The published totals (3.37B / 16.1B) to the parameter, from the reference file's shapes.
    assert _summary("tiny").all_params == 3_370_501_440
    assert _summary("small").all_params == 16_148_349_504
    # LM parameters one decoded token reads (attention, norms, dense MLP, shared + 6 routed experts,
    # gates, lm_head, one embedding row): 574.1M and 2,451.5M in the reference file.
    assert round(_summary("tiny").token_params / 1e5) == 5741
    assert round(_summary("small").token_params / 1e5) == 24514
    assert _summary("tiny").expert.params == 3_440_640 and _summary("small").expert.params == 8_650_752


@pytest.mark.parametrize("variant,tensors", [("tiny", 2582), ("small", 5639)])
def test_on_disk_tensor_count(variant, tensors):
    raw = config_json(variant, "full")
    cfg = parse_config(raw)
    specs = family_tensors(cfg, deepseek_vl2.tower_spec(raw).vision)
    assert len({s.source for s in specs.values()}) == tensors
    assert sum(math.prod(s.disk_shape) for s in {s.source: s for s in specs.values() if not s.rows}.values()) > 0


def test_defaults_fill_absent_language_keys():
    cfg = parse_config(config_json("small", "full"))  # Small's config omits vocab, bos/eos, MLA dims
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (102400, 100000, 100001)
    assert cfg.mla is not None and (cfg.mla.kv_lora_rank, cfg.mla.qk_nope_head_dim, cfg.mla.qk_rope_head_dim,
                                    cfg.mla.v_head_dim) == (512, 128, 64, 128)
    assert cfg.moe.layers == tuple(range(1, 27)) and cfg.dense_layers == (0,)
    assert cfg.moe.routing.renorm == "none" and cfg.moe.routing.routed_scaling_factor == 1.0
    assert cfg.moe.shared_intermediate == 2 * 1408 and cfg.expert_intermediate_size == 1408
    tiny = parse_config(config_json("tiny", "full"))
    assert tiny.mla is None and tiny.head_dim == 128 and tiny.rotary_dim == 128 and tiny.vocab_size == 129280
    assert len(tiny.candidate_resolutions) == 23 and tiny.candidate_resolutions[-1] == (1152, 1152)


def test_config_round_trips_through_its_dict():
    cfg = parse_config(config_json("small", "tiny"))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_created_checkpoint_has_published_files_and_ids(deepseek_checkpoints):
    path = deepseek_checkpoints["tiny"]
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "model-00001-of-000001.safetensors", "model.safetensors.index.json",
                     "processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    st = SafetensorsFile(path / "model-00001-of-000001.safetensors")
    assert set(index["weight_map"]) == set(st.infos)
    assert index["metadata"]["total_size"] == sum(i.end - i.start for i in st.infos.values())
    assert all(i.dtype == "BF16" for i in st.infos.values())
    # state-dict order: own parameters, then vision, projector, language
    order = list(st.infos)
    assert order[:2] == ["image_newline", "view_seperator"] and order[2].startswith("vision.")
    assert order[-1] == "language.lm_head.weight"
    assert (path / "special_tokens_map.json").stat().st_size == 801  # the published file's size
    for variant, ids in SPECIAL_IDS.items():
        tok = load_tokenizer(deepseek_checkpoints[variant], "deepseek_vl2")
        assert len(tok) == parse_config(json.loads((deepseek_checkpoints[variant] / "config.json").read_text())).vocab_size
        for text, want in ids.items():
            assert tok.encode(text) == [want]
        prompt = "<|User|>: <image>\nWhat is in the picture?\n\n<|Assistant|>:"
        assert tok.decode(tok.encode(prompt)) == prompt


def test_checkpoint_reads_every_tensor_by_canonical_name(deepseek_checkpoints):
    ckpt = Checkpoint.open(deepseek_checkpoints["small"])
    assert ckpt.tensor("vision.embeddings.position_embedding.weight").shape == (9, 32)  # [1, 9, 32] on disk
    q, k = ckpt.tensor("vision.encoder.layers.0.self_attn.q_proj.weight"), ckpt.tensor(
        "vision.encoder.layers.0.self_attn.k_proj.weight")
    assert q.shape == k.shape == (32, 32) and not (q == k).all()
    assert ckpt.tensor("layers.1.attn.kv_b.weight").shape == (4 * (16 + 16), 32)
    assert ckpt.tensor("layers.2.shared.down.weight").shape == (128, 256)


def test_inspect_counts_a_created_checkpoint(deepseek_checkpoints):
    ckpt = Checkpoint.open(deepseek_checkpoints["tiny"])
    s = summarize_checkpoint(ckpt.config, ckpt.tower)
    on_disk = sum(math.prod(i.shape) for f in ckpt.directory.glob("*.safetensors")
                  for i in SafetensorsFile(f).infos.values())
    assert s.all_params == on_disk
    assert s.image_tokens == 2 * 3 + 1 + 2 * 3  # 42-pixel tiles: 3x3 patches -> 2x2 tokens; 1x1 grid


def test_missing_kv_b_proj_is_named(deepseek_checkpoints, tmp_path):
    from edgemoe.model.safetensors_io import save_file

    src = deepseek_checkpoints["small"]
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    shard = dst / "model-00001-of-000001.safetensors"
    st = SafetensorsFile(shard)
    gone = "language.model.layers.1.self_attn.kv_b_proj.weight"
    tensors = {n: st.tensor(n) for n in st.infos if n != gone}
    save_file(tensors, shard, dtype="BF16")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    del index["weight_map"][gone]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor {gone}"):
        Checkpoint.open(dst)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("language_config"), "no 'language_config' object"),
    (lambda c: c["language_config"].update(q_lora_rank=1536), "q_lora_rank 1536 is not supported"),
    (lambda c: c["language_config"].update(rope_scaling={"type": "yarn"}), "rope_scaling"),
    (lambda c: c["language_config"].update(n_routed_experts=None), "not a MoE model"),
    (lambda c: c["language_config"].update(topk_method="noaux_tc", n_group=3, topk_group=1), "n_group=3"),
    (lambda c: c["projector_config"].update(projector_type="linear"), "projector 'linear'"),
    (lambda c: c.update(candidate_resolutions=[[100, 384]]), "multiples of the tile size 384"),
])
def test_bad_configs_give_one_line_errors(edit, message):
    raw = config_json("small", "full")
    edit(raw)
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(raw)
    assert "\n" not in str(err.value)
