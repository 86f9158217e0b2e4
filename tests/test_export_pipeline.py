"""export_bundle end to end on a tiny StableLM checkpoint: every graph read back from the bundle and run in ORT
equals the torch reference (graph by graph, and composed into the whole model with the fp32 routers), the
manifest round-trips and every sha256 verifies, tampering is caught, and a failed, invalid or interrupted export
leaves nothing behind. int8/int4 bundles hold the quantized ops in trunk and expert graphs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import safetensors.numpy
import torch

from edgemoe.bundle import Bundle, BundleError, Manifest
from edgemoe.export import graph_export, pipeline
from edgemoe.export.calibration import calibration_set
from edgemoe.export.expert_graphs import cpu_session
from edgemoe.export.options import ExportOptions
from edgemoe.export.validation import GraphValidationError, run, run_attention
from edgemoe.keys import ExpertKey
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.model.config import ModelConfig
from edgemoe.model.create import create_checkpoint
from edgemoe.model.prompt import IMAGE_TOKEN_INDEX
from edgemoe.model.tokenizer import load_tokenizer
from edgemoe.quant.lowering import QUANTIZED_OPS
from edgemoe.quant.schemes import TOLERANCES, Precision
from edgemoe.reference.model import ReferenceModel

FP32 = TOLERANCES[Precision.FP32]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def ckpt_dir(work: Path) -> Path:
    return create_checkpoint(work / "tiny", "stablelm", "tiny").path


@pytest.fixture(scope="module")
def bundles(work: Path, ckpt_dir: Path) -> dict[str, pipeline.ExportResult]:
    return {p: pipeline.export_bundle(ckpt_dir, work / f"b-{p}", ExportOptions(precision=p))
            for p in ("fp32", "int8", "int4")}


@pytest.fixture(scope="module")
def reference(ckpt_dir: Path) -> ReferenceModel:
    return ReferenceModel.from_checkpoint(Checkpoint.open(ckpt_dir))


@pytest.fixture(scope="module")
def sample(ckpt_dir: Path):
    """An image prompt (the same kind export validates on, from the held-out set so it is a different one)."""
    ckpt = Checkpoint.open(ckpt_dir)
    tok = load_tokenizer(ckpt_dir, "stablelm")
    cset = calibration_set(tok, "stablelm", ckpt.tower.processor, held_out=True)
    return next(s for s in cset.samples if s.pixels is not None)


def _sess(bundle: Bundle, path: str):
    return cpu_session(bundle.root / path)


def _route(m: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic top-k rule in numpy (first maximum on ties), renormalised."""
    logits = m.astype(np.float32) @ router.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    experts = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(p, experts, -1)
    return experts, w / w.sum(-1, keepdims=True)


def _run_bundle(bundle: Bundle, cfg: ModelConfig, pixels: np.ndarray, ids: list[int]) -> tuple[np.ndarray, dict]:
    """The whole model composed from the bundle's files: logits [S, V] and each graph's real input."""
    inputs: dict[str, np.ndarray] = {"vision": pixels[None]}
    feats = run(_sess(bundle, "graphs/vision.onnx"), {"pixel_values": pixels[None]})["features"]
    inputs["projector"] = feats
    image = run(_sess(bundle, "graphs/projector.onnx"), {"features": feats})["embeds"]
    text_ids = np.array([i for i in ids if i != IMAGE_TOKEN_INDEX], np.int64)
    inputs["embed"] = text_ids
    text = run(_sess(bundle, "graphs/embed.onnx"), {"ids": text_ids})["embeds"]
    at = ids.index(IMAGE_TOKEN_INDEX)
    x = np.concatenate([text[:at], image, text[at:]])
    routers = safetensors.numpy.load_file(str(bundle.root / "routers.safetensors"))
    for n in range(cfg.num_layers):
        inputs[f"layer{n}.attn"] = x
        out = run_attention(_sess(bundle, f"graphs/layer{n}.attn.onnx"), x[None], cfg.kv_layout)
        h, m = out["h"][0], out["m"][0]
        inputs[f"layer{n}.ffn"] = m
        if cfg.moe.is_moe(n):
            experts, weights = _route(m, routers[f"layers.{n}.router.weight"], cfg.moe.top_k)
            y = np.zeros_like(m)
            for e in range(cfg.moe.experts_in(n)):
                tok, slot = np.nonzero(experts == e)
                if len(tok):
                    ye = run(_sess(bundle, f"experts/L{n}/E{e}.onnx"), {"x": m[tok]})["y"]
                    np.add.at(y, tok, ye * weights[tok, slot, None])
        else:
            y = run(_sess(bundle, f"graphs/layer{n}.mlp.onnx"), {"x": m})["y"]
        x = h + y
    inputs["head"] = x
    return run(_sess(bundle, "graphs/head.onnx"), {"h": x})["logits"], inputs


def test_fp32_bundle_composes_to_the_reference_model(bundles, reference, sample) -> None:
    bundle = Bundle.open(bundles["fp32"].path)
    logits, _ = _run_bundle(bundle, reference.config, sample.pixels, list(sample.ids))
    with torch.inference_mode():
        feats = reference.encode_image(torch.from_numpy(sample.pixels)[None])
        want = reference(reference.embed(list(sample.ids), feats).embeds)[0].numpy()
    FP32.check(logits, want, "bundle logits")
    assert (logits.argmax(-1) == want.argmax(-1)).all()


def test_every_fp32_graph_read_back_equals_its_reference_component(bundles, reference, sample) -> None:
    """Each graph file of the bundle, re-run in ORT on its real fp32 input, against the torch component."""
    bundle = Bundle.open(bundles["fp32"].path)
    cfg = reference.config
    _, inputs = _run_bundle(bundle, cfg, sample.pixels, list(sample.ids))
    checked = 0
    with torch.inference_mode():
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a))

        cases = {
            "graphs/vision.onnx": ({"pixel_values": inputs["vision"]}, reference.vision(t(inputs["vision"]))[0]),
            "graphs/projector.onnx": ({"features": inputs["projector"]}, reference.projector(t(inputs["projector"]))),
            "graphs/embed.onnx": ({"ids": inputs["embed"]}, reference.embed_tokens(t(inputs["embed"]))),
            "graphs/head.onnx": ({"h": inputs["head"]}, reference.head(t(inputs["head"]))),
        }
        for path, (feeds, want) in cases.items():
            got = next(iter(run(_sess(bundle, path), feeds).values()))
            FP32.check(got, want.numpy(), path)
            checked += 1
        for n, layer in enumerate(reference.layers):
            x, m = inputs[f"layer{n}.attn"], inputs[f"layer{n}.ffn"]
            h_want, m_want, _, _ = layer.attention_block(t(x)[None], torch.arange(len(x))[None])
            got = run_attention(_sess(bundle, f"graphs/layer{n}.attn.onnx"), x[None], cfg.kv_layout)
            FP32.check(got["h"], h_want.numpy(), f"layer{n}.attn h")
            FP32.check(got["m"], m_want.numpy(), f"layer{n}.attn m")
            modules = ({f"experts/L{n}/E{e}.onnx": ex for e, ex in enumerate(layer.moe.experts)} if layer.is_moe
                       else {f"graphs/layer{n}.mlp.onnx": layer.mlp})
            for path, module in modules.items():
                FP32.check(run(_sess(bundle, path), {"x": m})["y"], module(t(m)).numpy(), path)
            checked += 1 + len(modules)
    assert checked == len([e for e in bundle.manifest.files if e.is_graph])


def test_manifest_round_trip_and_every_checksum(bundles, ckpt_dir: Path) -> None:
    result = bundles["fp32"]
    bundle = Bundle.open(result.path)
    bundle.verify()
    m = bundle.manifest
    assert Manifest.from_json(m.to_json()) == m == result.manifest
    for entry in m.files:  # independently of Bundle.verify
        assert hashlib.sha256((result.path / entry.path).read_bytes()).hexdigest() == entry.sha256
    ckpt = Checkpoint.open(ckpt_dir)
    assert m.model_config() == ckpt.config and m.vision_config() == ckpt.tower.vision
    assert m.processor_config() == ckpt.tower.processor
    tok = load_tokenizer(ckpt_dir, "stablelm")
    assert m.tokenizer["len_tokenizer"] == len(tok) and m.tokenizer["eos_token_id"] == tok.eos_token_id
    assert all((result.path / f).is_file() for f in m.tokenizer["files"])
    assert load_tokenizer(result.path / "tokenizer", "stablelm").encode("a red cat") == tok.encode("a red cat")
    assert m.prompt["image_token_index"] == IMAGE_TOKEN_INDEX and m.prompt["roles"] == ["USER", "ASSISTANT"]
    assert m.policy["mode"] == "uniform" and m.policy["export"]["seconds"] > 0
    assert m.target == "cpu" and len(m.experts()) == 8
    routers = safetensors.numpy.load_file(str(result.path / "routers.safetensors"))
    assert sorted(routers) == ["layers.0.router.weight", "layers.2.router.weight"]
    assert all(a.dtype == np.float32 for a in routers.values())
    names = {e.path for e in m.files if e.is_graph}
    assert names >= {"graphs/vision.onnx", "graphs/projector.onnx", "graphs/embed.onnx", "graphs/head.onnx",
                      "graphs/layer0.attn.onnx", "graphs/layer1.mlp.onnx", "experts/L2/E3.onnx"}
    for e in m.files:
        if e.is_graph:
            assert e.validation is not None and e.validation.passed and e.validation.max_abs_error < 1e-3


def test_tampered_graph_fails_its_checksum(bundles, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundles["fp32"].path, copy)
    path = copy / "experts/L2/E1.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
    path.write_bytes(bytes(data))
    bundle = Bundle.open(copy)
    with pytest.raises(BundleError, match="experts/L2/E1.onnx failed its sha256"):
        bundle.verify()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_bundles_hold_the_quantized_ops(bundles, precision: str) -> None:
    bundle = Bundle.open(bundles[precision].path)
    p = Precision(precision)
    for entry in bundle.manifest.files:
        if not entry.is_graph:
            continue
        ops = {n.op_type for n in onnx.load(str(bundle.root / entry.path)).graph.node}
        if entry.role == "embed":  # a lookup table: fp16 rows, nothing to multiply
            assert entry.precision == "fp16" and "Gather" in ops
            continue
        # The vision tower of an int4 bundle is int8: a 577-token prefill is faster at 8 bits on a CPU.
        want = Precision.INT8 if entry.role == "vision" else p
        assert entry.precision == want.value, entry.path
        assert ops & QUANTIZED_OPS[want], f"{entry.path} lacks {sorted(QUANTIZED_OPS[want])}: {sorted(ops)}"
        assert "MatMul" not in ops, f"{entry.path} kept a float MatMul"
    assert bundles[precision].manifest.total_bytes < bundles["fp32"].manifest.total_bytes / 2


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


@pytest.mark.parametrize("exc", [RuntimeError("builder exploded"), KeyboardInterrupt()])
def test_interrupted_export_leaves_nothing_behind(ckpt_dir: Path, tmp_path: Path, monkeypatch, exc) -> None:
    real, calls = graph_export.build_attention, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # midway: vision, projector, embed, 2 layers and 4 experts already written
            raise exc
        return real(*args, **kw)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(graph_export, "build_attention", flaky)
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    with pytest.raises(type(exc)):
        pipeline.export_bundle(ckpt_dir, tmp_path / "out", ExportOptions(precision="int8"))
    assert len(calls) == 3
    assert _leftovers(tmp_path, "out") == []
    assert list(scratch.iterdir()) == []  # the expert graphs' scratch directory went too


def test_graph_out_of_tolerance_fails_loudly_and_leaves_nothing(ckpt_dir: Path, tmp_path: Path, monkeypatch) -> None:
    real = graph_export.build_dense_mlp

    def wrong(cfg, w, scheme):  # a plausible bug: one weight scaled wrong
        return real(cfg, {**dict(w), "down.weight": w["down.weight"] * 1.5}, scheme)

    monkeypatch.setattr(graph_export, "build_dense_mlp", wrong)
    with pytest.raises(GraphValidationError) as info:
        pipeline.export_bundle(ckpt_dir, tmp_path / "out", ExportOptions(precision="int8"))
    message = str(info.value)
    assert "layer1.mlp" in message and "(allowed 0.3)" in message and "tolerance" in message
    assert "\n" not in message
    assert _leftovers(tmp_path, "out") == []


def test_existing_bundle_is_refused_without_overwrite(bundles, ckpt_dir: Path) -> None:
    with pytest.raises(BundleError, match="overwrite"):
        pipeline.export_bundle(ckpt_dir, bundles["fp32"].path, ExportOptions(precision="fp32"))
    assert Bundle.open(bundles["fp32"].path).manifest == bundles["fp32"].manifest


def test_export_summary_and_counts(bundles) -> None:
    result = bundles["int4"]
    assert result.expert_counts() == {"int4": 8}
    line = result.summary()
    assert "\n" not in line and "8 int4" in line and str(result.path) in line
    policy = result.manifest.policy
    assert policy["plan"]["vision"]["precision"] == "int8" and policy["plan"]["embed"]["precision"] == "fp16"
    assert json.loads(json.dumps(policy)) == policy
    assert {r.name for r in result.graphs} == {e.path for e in result.manifest.files if e.is_graph}
    assert ExpertKey(0, 0) in result.manifest.experts()
