"""create_checkpoint writes the published on-disk format, and the reader gets back what it wrote.

Tiny checkpoints only (a few MB each); the full-size layout is checked from the plan, which decides
names, shapes and shard boundaries without writing a byte.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from real_configs import PHI2_2_7B_4E, QWEN_1_8B_4E, STABLELM_1_6B_4E

from edgemoe.errors import CheckpointError, ConfigError
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.config import load_config, parse_config
from edgemoe.model.create import (BIN_SHARD_BYTES, CreatedCheckpoint, bf16_round, create_checkpoint, plan_tensors,
                                  successor_ids)
from edgemoe.model.family_templates import FULL_DIMS, TokenIds, dump_json, model_config_json
from edgemoe.families.moe_llava import VISION_PREFIX
from edgemoe.model.names import TOWER_DIR_PREFIX, family_tensors
from edgemoe.model.safetensors_io import SafetensorsFile, ShardedWriter
from edgemoe.model.tokenizer_files import write_tokenizer_files
from edgemoe.model.towers import BUILTIN_TOWERS, CLIP_L14_336
from edgemoe.model.weight_init import SUCCESSOR_LOGIT, WeightInit

FAMILIES = ("stablelm", "qwen", "phi")
REAL = {"stablelm": STABLELM_1_6B_4E, "qwen": QWEN_1_8B_4E, "phi": PHI2_2_7B_4E}
# Keys whose values a tiny checkpoint changes on purpose (dimensions, vocabulary, tower, token ids).
SIZED = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_heads",
         "num_key_value_heads", "kv_channels", "vocab_size", "mm_hidden_size", "mm_image_tower", "moe",
         "bos_token_id", "eos_token_id", "pad_token_id"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, CreatedCheckpoint]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: create_checkpoint(root / f, f, "tiny") for f in FAMILIES}


def _init_for(ck: Checkpoint, family: str, seed: int, tmp_path: Path) -> WeightInit:
    """The generator's own values for `ck`, rebuilt independently of the files."""
    info = write_tokenizer_files(family, tmp_path / f"tok-{family}")
    return WeightInit(ck.config, ck.tower.vision, seed, successor_ids(info), info.len_tokenizer)


def _disk_names(directory: Path) -> set[str]:
    names = set()
    for path in directory.glob("*.safetensors"):
        names |= set(SafetensorsFile(path).infos)
    return names


def _files_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- format -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_finds_every_required_tensor_with_its_shape(tiny, family):
    ck = Checkpoint.open(tiny[family].path)
    specs = family_tensors(ck.config, ck.tower.vision)
    assert {c for c, s in specs.items() if s.required} <= set(ck.names)
    assert set(ck.names) == set(specs)  # optional post_layernorm is written too
    for canon, spec in specs.items():
        assert ck.tensor(canon).shape == spec.shape, canon
    assert tiny[family].num_tensors == len({s.source for s in specs.values()})


@pytest.mark.parametrize("family", FAMILIES)
def test_names_on_disk_are_the_family_tensors_sources(tiny, family):
    ck = Checkpoint.open(tiny[family].path)
    specs = family_tensors(ck.config, ck.tower.vision).values()
    want = {VISION_PREFIX[family] + s.source if s.vision else s.source for s in specs}
    assert _disk_names(ck.directory) == want


def test_stablelm_names_match_the_published_index(tiny):
    names = _disk_names(tiny["stablelm"].path)
    assert "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.down_proj.weight" in names
    assert "model.layers.0.mlp.deepspeed_moe.gate.wg.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert "model.image_tower.image_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "model.image_tower.image_tower.vision_model.post_layernorm.bias" in names
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names


def test_qwen_fuses_qkv_into_c_attn(tiny):
    ck = Checkpoint.open(tiny["qwen"].path)
    header = SafetensorsFile(ck.directory / "model.safetensors").infos
    h = ck.config.hidden_size
    assert header["transformer.h.0.attn.c_attn.weight"].shape == (3 * h, h)
    assert header["transformer.h.0.attn.c_attn.bias"].shape == (3 * h,)
    assert not any(".q_proj" in n for n in header if n.startswith("transformer.h."))


@pytest.mark.parametrize("family", FAMILIES)
def test_values_read_back_are_the_generated_ones_in_bf16(tiny, family, tmp_path):
    ck = Checkpoint.open(tiny[family].path)
    init = _init_for(ck, family, 0, tmp_path)
    for canon in ck.names:
        np.testing.assert_array_equal(ck.tensor(canon), bf16_round(init.tensor(canon)), err_msg=canon)


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_package_loads_the_files(tiny, family):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = tiny[family].path / "model.safetensors"
    tensors = load_file(path)
    ck = Checkpoint.open(tiny[family].path)
    assert set(tensors) == _disk_names(ck.directory)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    src = family_tensors(ck.config, ck.tower.vision)["embed.weight"].source
    np.testing.assert_array_equal(tensors[src].float().numpy(), ck.tensor("embed.weight"))
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}


# ---- config files --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_config_has_the_published_keys_and_parses_back(tiny, family):
    path = tiny[family].path / "config.json"
    text = path.read_text()
    raw = json.loads(text)
    assert text == dump_json(raw)  # sorted keys, indent 2: transformers' layout
    real = REAL[family]
    assert set(real) <= set(raw)
    assert {k: raw[k] for k in real if k not in SIZED} == {k: v for k, v in real.items() if k not in SIZED}
    assert raw["moe"].keys() == real["moe"].keys()
    if family == "stablelm":
        assert set(raw) == set(real)
    cfg = parse_config(raw)
    assert (cfg.family, cfg.num_layers, cfg.moe.layers, cfg.moe.num_experts) == (family, 4, (0, 2), (4, 4))
    assert cfg.intermediate_size == 128 and cfg.rotary_dim % 2 == 0
    assert cfg.mm_hidden_size == 32 and raw["mm_image_tower"] == "vision_tower"
    info = write_tokenizer_files(family, path.parent.parent / f"tok-{family}")
    assert cfg.vocab_size % 64 == 0 and info.len_tokenizer <= cfg.vocab_size < info.len_tokenizer + 64
    assert cfg.pad_token_id == info.pad_token_id
    config, tower = load_config(path.parent)
    assert config == cfg and tower.directory == path.parent / "vision_tower"


def test_token_ids_follow_the_published_configs(tiny):
    sl = json.loads((tiny["stablelm"].path / "config.json").read_text())
    assert sl["bos_token_id"] == sl["eos_token_id"] != sl["pad_token_id"]  # as 100257 / 100280
    phi = json.loads((tiny["phi"].path / "config.json").read_text())
    assert phi["bos_token_id"] is None and phi["eos_token_id"] is None  # as published
    qwen = json.loads((tiny["qwen"].path / "config.json").read_text())
    assert "eos_token_id" not in qwen
    gen = json.loads((tiny["qwen"].path / "generation_config.json").read_text())
    assert gen["stop_words_ids"] == [[gen["eos_token_id"]]]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_config_reproduces_the_published_one(family):
    real = REAL[family]
    tokens = TokenIds(real.get("eos_token_id") or 0, real["pad_token_id"], real.get("bos_token_id"))
    if family == "phi":
        tokens = TokenIds(50256, 50256, None)
    raw = model_config_json(family, FULL_DIMS[family], real["vocab_size"], tokens, 1024, CLIP_L14_336)
    assert {k: raw[k] for k in real} == real
    if family == "stablelm":
        assert raw == real
        assert len(dump_json(raw).encode()) == 2199  # the published file's size


def test_full_size_plan_matches_the_published_index():
    """Names, total size and shard boundaries of StableLM-1.6B-4e, without writing anything."""
    cfg = parse_config(STABLELM_1_6B_4E)
    main, tower = plan_tensors(cfg, BUILTIN_TOWERS[CLIP_L14_336][0])
    assert len(main) == 855 and not tower
    writer = ShardedWriter(Path("/nonexistent"), [(t.name, t.shape, "BF16") for t in main])
    assert writer.total_size == 6_400_249_856
    assert writer.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shard_of = {e[0]: i for i, shard in enumerate(writer.shards) for e in shard}
    assert shard_of["model.embed_tokens.weight"] == 0 and shard_of["lm_head.weight"] == 1
    assert shard_of["model.image_tower.image_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] == 1
    sizes = [sum(e[3] for e in shard) for shard in writer.shards]
    assert [round(s / 1e9, 2) for s in sizes] == [4.99, 1.41]


# ---- determinism, sharding, formats ---------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = create_checkpoint(tmp_path / "again", "stablelm", "tiny")
    assert _files_bytes(again.path) == _files_bytes(tiny["stablelm"].path)
    other = create_checkpoint(tmp_path / "other", "stablelm", "tiny", seed=1)
    a, b = _files_bytes(other.path), _files_bytes(again.path)
    assert a["config.json"] == b["config.json"]
    assert a["model.safetensors"] != b["model.safetensors"]


def test_sharded_safetensors_with_index(tiny, tmp_path):
    made = create_checkpoint(tmp_path / "sharded", "phi", "tiny", shard_bytes=300_000)
    files = sorted(p.name for p in made.path.glob("model-*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (made.path / "model.safetensors").exists()
    index = json.loads((made.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(i.end - i.start for f in files
                                                  for i in SafetensorsFile(made.path / f).infos.values())
    sharded, single = Checkpoint.open(made.path), Checkpoint.open(tiny["phi"].path)
    assert set(index["weight_map"]) == _disk_names(single.directory)
    for canon in single.names:
        np.testing.assert_array_equal(sharded.tensor(canon), single.tensor(canon))


@pytest.mark.parametrize("shard_bytes", [BIN_SHARD_BYTES, 1_000_000])
def test_bin_shards_load_through_the_restricted_loader(tiny, tmp_path, shard_bytes):
    made = create_checkpoint(tmp_path / "bin", "qwen", "tiny", weights_format="bin", shard_bytes=shard_bytes)
    bins = sorted(p.name for p in made.path.glob("*.bin"))
    n = len(bins)
    assert bins == [f"pytorch_model-{i:05d}-of-{n:05d}.bin" for i in range(1, n + 1)]
    assert (n > 1) == (shard_bytes < BIN_SHARD_BYTES)
    assert not list(made.path.glob("*.safetensors"))
    index = json.loads((made.path / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == _disk_names(tiny["qwen"].path)
    from_bin, from_st = Checkpoint.open(made.path), Checkpoint.open(tiny["qwen"].path)
    for canon in from_st.names:
        np.testing.assert_array_equal(from_bin.tensor(canon), from_st.tensor(canon))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tower_weights_in_the_tower_directory(tmp_path, kind):
    made = create_checkpoint(tmp_path / kind, "stablelm", "tiny", tower=kind, tower_weights="directory")
    ck = Checkpoint.open(made.path)
    assert ck.tower.vision.kind == kind and ck.tower.directory == made.path / "vision_tower"
    tower_names = set(SafetensorsFile(made.path / "vision_tower" / "model.safetensors").infos)
    specs = family_tensors(ck.config, ck.tower.vision)
    assert tower_names == {TOWER_DIR_PREFIX + s.source for s in specs.values() if s.vision}
    assert not any(n.startswith(VISION_PREFIX["stablelm"]) for n in _disk_names(made.path))
    init = _init_for(ck, "stablelm", 0, tmp_path)
    for canon in (c for c in ck.names if c.startswith("vision.")):
        np.testing.assert_array_equal(ck.tensor(canon), bf16_round(init.tensor(canon)), err_msg=canon)


def test_clip_tower_directory_loads_in_transformers(tmp_path):
    from transformers import CLIPVisionModel

    made = create_checkpoint(tmp_path / "t", "qwen", "tiny", tower_weights="directory")
    model, info = CLIPVisionModel.from_pretrained(made.path / "vision_tower", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ck = Checkpoint.open(made.path)
    got = model.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(got, ck.tensor("vision.encoder.layers.0.self_attn.q_proj.weight"))


# ---- the init scheme ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_successor_map_is_one_cycle_that_lm_head_decodes(tiny, family, tmp_path):
    """Zero-layer check of the design: lm_head(norm(embed[t])) picks successor[t], decisively."""
    ck = Checkpoint.open(tiny[family].path)
    init = _init_for(ck, family, 0, tmp_path)
    info = write_tokenizer_files(family, tmp_path / "tok")
    ordinary = np.array(successor_ids(info))
    assert info.eos_token_id not in ordinary and len(ordinary) > 900
    succ = init.successor
    seen, t = set(), int(ordinary[0])
    for _ in range(len(ordinary)):
        seen.add(t)
        t = int(succ[t])
    assert seen == set(ordinary.tolist()) and t == ordinary[0]
    embed, head = ck.tensor("embed.weight"), ck.tensor("lm_head.weight")
    x = embed[ordinary]
    x = x / np.sqrt((x * x).mean(-1, keepdims=True))  # what a final norm does to a pure embedding
    logits = (x @ head.T)[:, : info.len_tokenizer]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    np.testing.assert_array_equal(logits.argmax(-1), succ[ordinary])
    assert np.median(top2[:, 1]) > 0.9 * SUCCESSOR_LOGIT and (top2[:, 1] - top2[:, 0]).min() > 4


def test_blocks_concatenate_to_the_same_tensor(tiny, tmp_path):
    ck = Checkpoint.open(tiny["stablelm"].path)
    init = _init_for(ck, "stablelm", 0, tmp_path)
    for canon in ("embed.weight", "lm_head.weight", "layers.0.experts.1.down.weight"):
        small = np.concatenate(list(init.blocks(canon, max_elements=1000)), axis=0)
        np.testing.assert_array_equal(small, init.tensor(canon), err_msg=canon)


# ---- atomicity and refusal ------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch, error):
    calls = {"n": 0}
    original = ShardedWriter.add_rows

    def failing(self, name, block):
        calls["n"] += 1
        if calls["n"] == 20:
            raise error("interrupted")
        original(self, name, block)

    monkeypatch.setattr(ShardedWriter, "add_rows", failing)
    with pytest.raises(error):
        create_checkpoint(tmp_path / "ck", "stablelm", "tiny")
    assert calls["n"] == 20 and list(tmp_path.iterdir()) == []


def test_existing_directory_refused_unless_overwrite(tmp_path):
    target = tmp_path / "ck"
    target.mkdir()
    create_checkpoint(target, "phi", "tiny")  # empty: fine
    (target / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError) as err:
        create_checkpoint(target, "phi", "tiny")
    assert "\n" not in str(err.value) and (target / "mine.txt").read_text() == "keep"
    made = create_checkpoint(target, "qwen", "tiny", overwrite=True)
    assert not (target / "mine.txt").exists() and json.loads((target / "config.json").read_text())[
        "model_type"] == "moe_llava_qwen"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and made.path == target


def test_bad_options_are_config_errors(tmp_path):
    for kwargs in ({"family": "llama", "size": "tiny"}, {"family": "phi", "size": "huge"},
                   {"family": "phi", "size": "full", "tower_weights": "directory"},
                   {"family": "phi", "size": "tiny", "weights_format": "gguf"}):
        with pytest.raises(ConfigError):
            create_checkpoint(tmp_path / "x", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_result_and_progress(tmp_path):
    seen = []
    made = create_checkpoint(tmp_path / "p", "qwen", "tiny", tower="siglip",
                             progress=lambda done, total, name: seen.append((done, total, name)))
    assert made.family == "qwen" and made.size == "tiny" and "model.safetensors" in made.files
    assert made.total_bytes == sum((made.path / f).stat().st_size for f in made.files)
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][1]
    header = SafetensorsFile(made.path / "model.safetensors").infos
    assert seen[-1][1] == sum(i.end - i.start for i in header.values())
    assert {name for _, _, name in seen} == set(header)


def test_writer_add_rows_keeps_the_plan(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", (4, 3), "F32"), ("b", (2,), "BF16")])
    writer.add_rows("a", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError):
        writer.add("a", np.zeros((4, 3), np.float32))  # inside a: whole adds refused
    with pytest.raises(ValueError):
        writer.add_rows("a", np.zeros((2, 3), np.float32))  # past the planned rows
    with pytest.raises(ValueError):
        writer.add_rows("b", np.zeros((2,), np.float32))  # a is not finished
    writer.add_rows("a", np.ones((1, 3), np.float32))
    writer.add("b", np.array([1.5, -2.0], np.float32))
    writer.close()
    f = SafetensorsFile(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(f.tensor("a"), np.r_[np.zeros((3, 3)), np.ones((1, 3))])
    np.testing.assert_array_equal(f.tensor("b"), [1.5, -2.0])
    assert math.isclose(float(f.tensor("b")[0]), 1.5)
