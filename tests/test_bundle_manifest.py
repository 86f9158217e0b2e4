"""manifest.json: exact round trips, strict reading, and the queries the runtime relies on."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace

import pytest

from edgemoe.bundle import SCHEMA_VERSION, BundleError, FileEntry, Manifest, TensorDecl, Validation
from edgemoe.keys import ExpertKey
from edgemoe.model.config import parse_config
from edgemoe.model.prompt import CONV_STABLELM, IMAGE_TOKEN_INDEX
from edgemoe.model.towers import CLIP_L14_336, resolve_tower
from real_configs import STABLELM_1_6B_4E

PRECISIONS = ("fp32", "fp16", "int8", "int4")


def _sha(i: int) -> str:
    return f"{i:064x}"


def _expert(layer: int, expert: int, precision: str, size: int = 100, **kw) -> FileEntry:
    key = ExpertKey(layer, expert)
    return FileEntry(f"experts/{key}.onnx", "expert", size, _sha(layer * 10 + expert), expert=key,
                     precision=precision, inputs=(TensorDecl("x", "float", ("tokens", 64)),),
                     outputs=(TensorDecl("y", "float", ("tokens", 64)),),
                     validation=Validation(0.02, 0.0031, "max_abs"), **kw)


def make_manifest(**changes) -> Manifest:
    config = parse_config(STABLELM_1_6B_4E)
    tower = resolve_tower(CLIP_L14_336, None)
    experts = [_expert(layer, e, PRECISIONS[(layer + e) % 4]) for layer in (0, 2) for e in range(4)]
    files = [
        FileEntry("graphs/vision.onnx", "vision", 5000, _sha(900), precision="fp16",
                  inputs=(TensorDecl("pixel_values", "float", ("batch", 3, 336, 336)),),
                  outputs=(TensorDecl("features", "float", ("batch", 576, 1024)),)),
        FileEntry("graphs/layer1.mlp.onnx", "dense_mlp", 300, _sha(901), layer=1, precision="int8"),
        *experts,
        FileEntry("routers.safetensors", "router", 64, _sha(902), precision="fp32"),
        FileEntry("tokenizer/tokenizer.json", "tokenizer", 7, _sha(903)),
    ]
    fields = dict(
        model=config.to_dict(), vision=tower.vision.to_dict(), processor=tower.processor.to_dict(),
        prompt={**asdict(CONV_STABLELM), "image_token_index": IMAGE_TOKEN_INDEX},
        tokenizer={"family": "stablelm", "files": ["tokenizer.json"], "len_tokenizer": 100289,
                   "eos_id": 100257, "pad_id": 100280, "bos_id": None},
        target="cpu", policy={"name": "budget", "accuracy_budget": 0.01, "sensitivity": {"L0/E1": 0.3}},
        files=tuple(files), created_at="2025-01-02T03:04:05Z",
    )
    return Manifest(**{**fields, **changes})


def test_round_trip_is_exact_with_mixed_precisions() -> None:
    m = make_manifest()
    text = m.to_json()
    back = Manifest.from_json(text)
    assert back == m
    assert back.to_json() == text
    assert {e.precision for e in back.experts().values()} == set(PRECISIONS)
    assert back.model_config() == parse_config(STABLELM_1_6B_4E)
    tower = resolve_tower(CLIP_L14_336, None)
    assert back.vision_config() == tower.vision and back.processor_config() == tower.processor


def test_json_shape() -> None:
    d = json.loads(make_manifest().to_json())
    assert list(d)[:4] == ["schema_version", "edgemoe_version", "created_at", "target"]
    assert d["schema_version"] == SCHEMA_VERSION
    expert = next(f for f in d["files"] if f["role"] == "expert")
    assert expert["expert"] == "L0/E0" and expert["layer"] == 0
    assert expert["inputs"] == [{"name": "x", "dtype": "float", "shape": ["tokens", 64]}]
    assert expert["validation"] == {"tolerance": 0.02, "max_abs_error": 0.0031, "metric": "max_abs"}


def test_queries() -> None:
    m = make_manifest()
    assert list(m.experts()) == sorted(ExpertKey(layer, e) for layer in (0, 2) for e in range(4))
    assert m.expert(ExpertKey(2, 3)).path == "experts/L2/E3.onnx"
    assert m.graph("layer1.mlp").role == "dense_mlp"
    assert [e.path for e in m.by_role("router")] == ["routers.safetensors"]
    assert m.expert_bytes_total == 8 * 100
    assert m.total_bytes == 5000 + 300 + 800 + 64 + 7
    with pytest.raises(BundleError, match="no expert L5/E0"):
        m.expert(ExpertKey(5, 0))
    with pytest.raises(BundleError, match="no graph 'head'"):
        m.graph("head")


def test_external_data_counts_towards_its_graph() -> None:
    base = make_manifest()
    big = _expert(4, 0, "fp32", size=10, external_data="experts/L4/E0.data")
    data = FileEntry("experts/L4/E0.data", "external_data", 4096, _sha(999))
    m = replace(base, files=(*base.files, big, data))
    assert m.bytes_of(big) == 4106 and m.files_of(big) == (big, data)
    assert m.expert_bytes_total == base.expert_bytes_total + 4106
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(BundleError, match="not an external_data entry"):
        replace(base, files=(*base.files, big))


def test_newer_schema_is_refused() -> None:
    d = json.loads(make_manifest().to_json())
    d["schema_version"] = 2
    del d["files"]  # a newer manifest may look different: the version is what gets reported
    with pytest.raises(BundleError, match=r"^bundle schema 2 is newer than this edgemoe \(reads 1\); upgrade edgemoe$"):
        Manifest.from_json(json.dumps(d))


@pytest.mark.parametrize("version", [0, "1", True])
def test_bad_schema_is_refused(version) -> None:
    d = json.loads(make_manifest().to_json())
    d["schema_version"] = version
    with pytest.raises(BundleError, match="schema"):
        Manifest.from_json(json.dumps(d))


@pytest.mark.parametrize("drop, name", [("target", "'target'"), ("model", "'model'"),
                                        ("files.3.sha256", "'files[3].sha256'"), ("files.0.path", "'files[0].path'")])
def test_missing_key_is_named(drop: str, name: str) -> None:
    d = json.loads(make_manifest().to_json())
    *where, key = drop.split(".")
    obj = d if not where else d[where[0]][int(where[1])]
    del obj[key]
    with pytest.raises(BundleError, match=re.escape(f"lacks {name}")):
        Manifest.from_json(json.dumps(d))


def test_wrong_type_is_named() -> None:
    d = json.loads(make_manifest().to_json())
    d["files"][2]["size"] = "100"
    with pytest.raises(BundleError, match=r"'files\[2\].size' must be int"):
        Manifest.from_json(json.dumps(d))


def test_duplicate_expert_keys_are_refused() -> None:
    d = json.loads(make_manifest().to_json())
    twin = dict(d["files"][2], path="experts/L0/E0-copy.onnx")
    d["files"].append(twin)
    with pytest.raises(BundleError, match="expert L0/E0 twice"):
        Manifest.from_json(json.dumps(d))


def test_duplicate_paths_are_refused() -> None:
    d = json.loads(make_manifest().to_json())
    d["files"].append(dict(d["files"][0]))
    with pytest.raises(BundleError, match="graphs/vision.onnx twice"):
        Manifest.from_json(json.dumps(d))


@pytest.mark.parametrize("path", ["../outside.onnx", "/abs/x.onnx", "a//b.onnx", "a/./b.onnx", "a\\b.onnx",
                                  "manifest.json", ""])
def test_paths_must_stay_inside_the_bundle(path: str) -> None:
    with pytest.raises(BundleError):
        FileEntry(path, "other", 1, _sha(1))


def test_entry_consistency() -> None:
    with pytest.raises(BundleError, match="unknown role"):
        FileEntry("x.onnx", "experts", 1, _sha(1))
    with pytest.raises(BundleError, match="expert key go together"):
        FileEntry("x.onnx", "expert", 1, _sha(1))
    with pytest.raises(BundleError, match="disagrees"):
        FileEntry("x.onnx", "expert", 1, _sha(1), layer=3, expert=ExpertKey(2, 0))
    with pytest.raises(BundleError, match="sha256"):
        FileEntry("x.onnx", "other", 1, "ABC")
    with pytest.raises(BundleError, match="finite"):
        Validation(0.1, float("nan"))


def test_invalid_json_and_bad_blocks() -> None:
    with pytest.raises(BundleError, match=r"^m.json is not valid JSON: .*\(line 1\)$"):
        Manifest.from_json("{oops", source="m.json")
    with pytest.raises(BundleError, match="must be a JSON object"):
        Manifest.from_json("[]")
    with pytest.raises(BundleError, match="'policy' is not plain JSON"):
        make_manifest(policy={"f": object()})
    with pytest.raises(BundleError, match="target 'tpu'"):
        make_manifest(target="tpu")


def test_unknown_keys_are_ignored() -> None:
    m = make_manifest()
    d = json.loads(m.to_json())
    d["future_optional"] = 1
    d["files"][0]["future_optional"] = 2
    assert Manifest.from_json(json.dumps(d)) == m
