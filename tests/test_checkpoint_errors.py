"""Every bad checkpoint the loader can meet gets a one-line error naming the problem."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from edgemoe.errors import CheckpointError, ConfigError, EdgeMoEError
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.create import create_checkpoint
from edgemoe.model.safetensors_io import SafetensorsFile, save_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_checkpoint(tmp_path_factory.mktemp("ck") / "stablelm", "stablelm", "tiny").path


@pytest.fixture
def copy(tiny: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ck"
    shutil.copytree(tiny, target)
    return target


def _rewrite_weights(directory: Path, edit) -> None:
    """Rewrite model.safetensors with `edit(tensors)` applied (tensors as fp32 numpy)."""
    path = directory / "model.safetensors"
    f = SafetensorsFile(path)
    tensors = {name: np.array(f.tensor(name)) for name in f.infos}
    f.close()
    edit(tensors)
    save_file(tensors, path, dtype="BF16")


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def test_missing_tensor_is_named(copy: Path) -> None:
    _rewrite_weights(copy, lambda t: t.pop("model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(copy)
    assert _one_line(info.value) == ("checkpoint is missing tensor model.layers.2.mlp.deepspeed_moe.experts."
                                     "deepspeed_experts.3.up_proj.weight (canonical layers.2.experts.3.up.weight)")


def test_wrong_shape_is_named(copy: Path) -> None:
    def edit(t: dict) -> None:
        t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"][:-1]

    _rewrite_weights(copy, edit)
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.self_attn.q_proj.weight has shape \[63, 64\], "
                                              r"expected \[64, 64\]"):
        Checkpoint.open(copy)


def test_unknown_family(copy: Path) -> None:
    raw = json.loads((copy / "config.json").read_text())
    raw["model_type"] = "moe_llava_mistral"
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unsupported model_type 'moe_llava_mistral'"):
        Checkpoint.open(copy)


def test_not_a_directory_and_no_weights(tmp_path: Path, copy: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        Checkpoint.open(tmp_path / "nope")
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        Checkpoint.open(copy)


def test_truncated_safetensors(copy: Path) -> None:
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated: tensor .* ends past the end of the file"):
        Checkpoint.open(copy)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint.open(copy)
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(CheckpointError, match="cannot read safetensors header"):
        Checkpoint.open(copy)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    made = create_checkpoint(tmp_path / "sharded", "stablelm", "tiny", shard_bytes=1_000_000)
    shards = sorted(made.path.glob("model-*.safetensors"))
    assert len(shards) > 1
    Checkpoint.open(made.path)  # the sharded layout reads back before we break it
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"names shard\\(s\\) that are missing: {shards[-1].name}"):
        Checkpoint.open(made.path)


def test_sharded_reads_equal_single_file(tmp_path: Path, tiny: Path) -> None:
    sharded = create_checkpoint(tmp_path / "sharded", "stablelm", "tiny", shard_bytes=1_000_000).path
    a, b = Checkpoint.open(tiny), Checkpoint.open(sharded)
    assert a.names == b.names
    for name in a.names:
        np.testing.assert_array_equal(a.tensor(name), b.tensor(name))


class _Exploit:
    """A pickle payload that would run a command under the full unpickler."""

    def __reduce__(self):
        return (shutil.rmtree, ("/definitely/not/a/path",))


def test_pickle_bin_with_code_is_refused(tmp_path: Path) -> None:
    made = create_checkpoint(tmp_path / "qwen", "qwen", "tiny", weights_format="bin")
    ckpt = Checkpoint.open(made.path)
    assert ckpt.tensor("layers.0.attn.q.weight").shape == (64, 64)  # the honest .bin reads fine
    shard = next(made.path.glob("pytorch_model-*.bin"))
    shard.write_bytes(pickle.dumps({"x": _Exploit()}))
    with pytest.raises(CheckpointError, match=f"refusing {shard.name}: not a plain tensor pickle"):
        Checkpoint.open(made.path)


def test_bin_and_safetensors_hold_the_same_values(tmp_path: Path, tiny: Path) -> None:
    binary = Checkpoint.open(create_checkpoint(tmp_path / "bin", "stablelm", "tiny", weights_format="bin").path)
    st = Checkpoint.open(tiny)
    for name in ("embed.weight", "layers.2.experts.1.down.weight", "vision.encoder.layers.0.mlp.fc1.bias"):
        np.testing.assert_array_equal(binary.tensor(name), st.tensor(name))


def test_tower_weights_from_tower_directory(tmp_path: Path, tiny: Path) -> None:
    separate = Checkpoint.open(create_checkpoint(tmp_path / "t", "stablelm", "tiny", tower_weights="directory").path)
    inside = Checkpoint.open(tiny)
    name = "vision.encoder.layers.1.self_attn.k_proj.weight"
    np.testing.assert_array_equal(separate.tensor(name), inside.tensor(name))


def test_tower_directory_without_weights(copy: Path) -> None:
    def edit(t: dict) -> None:
        for name in [n for n in t if ".image_tower." in n]:
            t.pop(name)

    _rewrite_weights(copy, edit)
    with pytest.raises(CheckpointError, match="vision tower weights are neither in the checkpoint"):
        Checkpoint.open(copy)


def test_all_loader_errors_are_edgemoe_errors() -> None:
    assert issubclass(CheckpointError, EdgeMoEError) and issubclass(ConfigError, EdgeMoEError)
