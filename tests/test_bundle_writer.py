"""BundleWriter: real graphs written -> read -> run in onnxruntime; atomicity; overwrite; external data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.numpy
from onnx import TensorProto, helper, numpy_helper

from edgemoe.bundle import Bundle, BundleError, BundleWriter, TensorDecl, Validation
from edgemoe.bundle import external_data
from edgemoe.keys import ExpertKey

D = 8  # hidden width of the toy graphs


def expert_model(w: np.ndarray, precision: str = "fp32", bias: np.ndarray | None = None) -> onnx.ModelProto:
    """y = x @ w (+ bias), with w stored at `precision`: fp32, fp16 (Cast) or int8 (DequantizeLinear)."""
    nodes, inits = [], []
    if precision == "fp32":
        inits.append(numpy_helper.from_array(w.astype(np.float32), "w"))
    elif precision == "fp16":
        inits.append(numpy_helper.from_array(w.astype(np.float16), "w16"))
        nodes.append(helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT))
    else:
        scale = np.float32(np.abs(w).max() / 127)
        inits += [numpy_helper.from_array(np.round(w / scale).astype(np.int8), "w8"),
                  numpy_helper.from_array(np.array(scale, np.float32), "scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["w8", "scale"], ["w"]))
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y" if bias is None else "xw"]))
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", w.shape[1]])
    graph = helper.make_graph(nodes, "expert", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def run(model: str | bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def weights(seed: int, shape=(D, D)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write_small_bundle(target: Path, **writer_kw) -> dict[ExpertKey, onnx.ModelProto]:
    models = {ExpertKey(layer, e): expert_model(weights(layer * 10 + e), ("fp32", "fp16", "int8")[(layer + e) % 3])
              for layer in (0, 2) for e in range(2)}
    with BundleWriter(target, **writer_kw) as w:
        w.add_graph("layer1.mlp", expert_model(weights(99)), role="dense_mlp", layer=1, precision="fp32")
        for key, model in models.items():
            w.add_expert(key, model, precision=("fp32", "fp16", "int8")[(key.layer + key.expert) % 3],
                         validation=Validation(0.05, 0.01))
        w.add_array_file("routers.safetensors", {"layers.0.router": weights(7, (D, 2))})
        w.finish(model={"family": "toy"}, target="cpu", policy={"name": "mixed"})
    return models


def test_written_graphs_run_from_the_bundle(tmp_path: Path) -> None:
    models = write_small_bundle(tmp_path / "b")
    bundle = Bundle.open(tmp_path / "b")
    bundle.verify()
    x = weights(1, (3, D))
    for key, model in models.items():
        entry = bundle.expert_entry(key)
        assert entry.inputs == (TensorDecl("x", "float", ("tokens", D)),) and entry.layer == key.layer
        got = run(str(bundle.path_of(entry)), x)
        np.testing.assert_array_equal(got, run(model.SerializeToString(), x))  # exported == loaded
    np.testing.assert_allclose(run(str(bundle.graph_path("layer1.mlp")), x), x @ weights(99), rtol=1e-5, atol=1e-5)
    session = ort.InferenceSession(str(bundle.path_of(bundle.expert_entry(ExpertKey(0, 0)))))
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [("x", "tensor(float)", ["tokens", D])]
    assert {e.precision for e in bundle.manifest.experts().values()} == {"fp32", "fp16", "int8"}
    routers = safetensors.numpy.load_file(bundle.path_of("routers.safetensors"))
    np.testing.assert_array_equal(routers["layers.0.router"], weights(7, (D, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_tokenizer_and_plain_files(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"model": {}}')
    with BundleWriter(tmp_path / "b") as w:
        entries = w.add_tokenizer(src, ["tokenizer.json"])
        w.add_file("notes/readme.txt", b"hello", role="other")
        w.finish(model={}, target="cuda")
    bundle = Bundle.open(tmp_path / "b")
    paths = [e.path for e in bundle.manifest.by_role("tokenizer")]
    assert paths == [e.path for e in entries] == ["tokenizer/tokenizer.json"]
    assert bundle.path_of("notes/readme.txt").read_bytes() == b"hello"
    bundle.verify()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_writer_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        with BundleWriter(tmp_path / "b") as w:
            w.add_expert(ExpertKey(0, 0), expert_model(weights(0)), precision="fp32")
            assert any(p.name.startswith(".b.partial-") for p in tmp_path.iterdir())
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_failure_inside_finish_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="target 'tpu'"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_file("x.bin", b"x")
            w.finish(model={}, target="tpu")
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_finish_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="without finish"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_file("x.bin", b"x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BundleError, match="BundleWriter is discarded"):
        w.add_file("y.bin", b"y")


def test_duplicates_fail_before_writing(tmp_path: Path) -> None:
    with BundleWriter(tmp_path / "b") as w:
        w.add_expert(ExpertKey(0, 0), expert_model(weights(0)), precision="fp32")
        with pytest.raises(BundleError, match="added to the bundle twice"):
            w.add_expert(ExpertKey(0, 0), expert_model(weights(1)), precision="int8")
        with pytest.raises(BundleError, match="expert L0/E0 was added"):
            w.add_onnx("experts/other.onnx", expert_model(weights(1)), role="expert", expert=ExpertKey(0, 0))
        w.finish(model={}, target="cpu")
        with pytest.raises(BundleError, match="BundleWriter is finished"):
            w.add_file("late.bin", b"late")
    assert len(Bundle.open(tmp_path / "b").manifest.files) == 1


def test_existing_bundle_is_kept_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "b"
    write_small_bundle(target)
    before = Bundle.open(target).manifest
    with pytest.raises(BundleError, match="exists and is not empty; pass overwrite=True"):
        write_small_bundle(target)
    assert Bundle.open(target).manifest == before
    with BundleWriter(target, overwrite=True) as w:
        w.add_file("only.bin", b"new")
        w.finish(model={"v": 2}, target="cpu")
    after = Bundle.open(target)
    assert [e.path for e in after.manifest.files] == ["only.bin"] and not (target / "experts").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no .old-, no .partial- left


def test_target_filled_meanwhile_is_refused_at_finish(tmp_path: Path) -> None:
    target = tmp_path / "b"
    with pytest.raises(BundleError, match="not empty"):
        with BundleWriter(target) as w:
            w.add_file("x.bin", b"x")
            target.mkdir()
            (target / "someone-elses.txt").write_text("keep me")
            w.finish(model={}, target="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert (target / "someone-elses.txt").read_text() == "keep me"


def test_overwrite_only_replaces_bundles(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("x")
    with pytest.raises(BundleError, match="not an edgemoe bundle.*refusing"):
        BundleWriter(home, overwrite=True).__enter__()
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        BundleWriter(tmp_path / "file").__enter__()
    (tmp_path / "empty").mkdir()
    write_small_bundle(tmp_path / "empty")  # an empty directory is not "existing"
    Bundle.open(tmp_path / "empty").verify()


def test_failed_swap_restores_the_old_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "b"
    write_small_bundle(target)
    before = Bundle.open(target).manifest
    real_rename, calls = os.rename, []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> aside worked; new -> target fails
            raise OSError("disk on fire")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="disk on fire"):
        write_small_bundle(target, overwrite=True)
    monkeypatch.undo()
    assert Bundle.open(target).manifest == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _external_graph() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    w, b = weights(5, (D, 3000)), weights(6, (1, 3000))  # 96 KB of weights, 12 KB of bias: both external
    return expert_model(w, bias=b), w, b


def test_external_data_is_aligned_checksummed_and_runs(tmp_path: Path) -> None:
    model, w, b = _external_graph()
    small = expert_model(weights(8, (D, 4)))  # under INLINE_MAX: stays inline even when asked
    with BundleWriter(tmp_path / "b") as wr:
        entry = wr.add_expert(ExpertKey(1, 0), model, precision="fp32", external_data=True)
        wr.add_graph("head", small, role="head", external_data=True)
        wr.finish(model={}, target="cpu")
    bundle = Bundle.open(tmp_path / "b")
    data = bundle.manifest.data_of(entry)
    assert entry.external_data == data.path == "experts/L1/E0.data" and data.role == "external_data"
    assert bundle.manifest.bytes_of(entry) == entry.size + data.size
    records = external_data.external_tensors(onnx.load(str(bundle.path_of(entry)), load_external_data=False))
    assert {r.name for r in records} == {"w", "b"} and all(r.location == "E0.data" for r in records)
    assert all(r.offset % external_data.ALIGN == 0 for r in records)
    assert entry.size < 4096 < data.size  # the .onnx holds the graph, the weights are in the .data
    x = weights(2, (4, D))
    np.testing.assert_allclose(run(str(bundle.path_of(entry)), x), x @ w + b, rtol=1e-5, atol=1e-5)
    bundle.verify([entry])  # covers the .data file too
    with open(bundle.path_of(data), "r+b") as f:
        f.seek(records[0].offset + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match="^experts/L1/E0.data failed its sha256 check"):
        Bundle.open(tmp_path / "b").verify_file(entry)


def test_graphs_over_the_protobuf_limit_go_external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, w, b = _external_graph()
    monkeypatch.setattr(external_data, "PROTOBUF_LIMIT", 0)  # stand-in for a > 2 GB graph
    with BundleWriter(tmp_path / "b") as wr:
        entry = wr.add_expert(ExpertKey(0, 1), model, precision="fp32")
        wr.finish(model={}, target="cpu")
    assert entry.external_data == "experts/L0/E1.data"
    x = weights(3, (2, D))
    np.testing.assert_allclose(run(str(tmp_path / "b" / entry.path), x), x @ w + b, rtol=1e-5, atol=1e-5)


def test_small_graphs_stay_inline_by_default(tmp_path: Path) -> None:
    with BundleWriter(tmp_path / "b") as wr:
        entry = wr.add_expert(ExpertKey(0, 0), _external_graph()[0], precision="fp32")
        wr.finish(model={}, target="cpu")
    assert entry.external_data is None and not (tmp_path / "b" / "experts/L0/E0.data").exists()
