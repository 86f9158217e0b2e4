"""Trunk and vision graphs built with onnx.helper, run in ORT (CPU EP, 2 threads) against the torch reference.

fp32 graphs must equal their reference component within 1e-4; int8/int4 graphs must stay within their
precision's declared Tolerance and really hold the quantized ops. Attention runs as the runtime will:
one preallocated cache per layer bound to both past_* and present_* (IOBinding), prefill of 5 tokens,
two decode steps, then a 3-token chunk, compared with `DecoderLayer.attention_block` run incrementally.
Tiny configs: StableLM with 2 KV heads for 4 query heads (grouped), Qwen (RMSNorm, full rotary), Phi
(parallel block, partial rotary 32/80: ORT's GroupQueryAttention needs head dims divisible by 8).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgemoe.export.onnx_ops import io_signature, run_bound, run_graph, session, validate
from edgemoe.export.trunk_graphs import (
    build_attention,
    build_dense_mlp,
    build_embed,
    build_head,
    build_projector,
)
from edgemoe.export.vision_graph import build_vision, layers_needed, vision_scheme
from edgemoe.quant.lowering import QUANTIZED_OPS
from edgemoe.quant.schemes import Precision, QuantError, Scheme
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.tiny import random_tensors, tiny_config, tiny_tower
from edgemoe.reference.vision import layers_needed as reference_layers_needed

FP32_TOL = 1e-4
SCHEMES = [Scheme.default(p) for p in (Precision.FP32, Precision.INT8, Precision.INT4)]
FAMILIES = {
    "stablelm": dict(num_key_value_heads=2),
    "qwen": {},
    "phi": dict(hidden_size=160, num_attention_heads=2, num_key_value_heads=2),
}
STEPS = (5, 1, 1, 3)  # prefill, decode, decode, a later chunk
MAX = 16  # preallocated cache length
LAYER = 1  # a dense layer of the tiny models
# Rotary angles as large as a 620-token image prompt's (the cache slots still start at 0: positions are
# only rotary's input, the cache layout follows seqlens_k / total_len).
ROPE_OFFSET = 600


def _strip(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _quantized_ops(model: onnx.ModelProto, precision: Precision) -> int:
    return sum(n.op_type in QUANTIZED_OPS[precision] for n in model.graph.node)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    cfg = tiny_config(request.param, **FAMILIES[request.param])
    tensors = random_tensors(cfg, None, seed=0)
    return cfg, tensors, ReferenceModel.from_tensors(cfg, None, tensors)


def _check(got: np.ndarray, want: np.ndarray, scheme: Scheme, what: str) -> float:
    if scheme.precision is Precision.FP32:
        err = float(np.abs(got - want).max())
        assert err < FP32_TOL, f"{what}: max abs error {err:.3g}"
        return err
    scheme.tolerance.check(got, want, what)
    return 0.0


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_attention_matches_reference_incrementally(family, scheme: Scheme) -> None:
    cfg, tensors, ref = family
    model = build_attention(cfg, _strip(tensors, f"layers.{LAYER}."), scheme)
    if scheme.precision.is_integer:
        assert _quantized_ops(model, scheme.precision) == 2  # q|k|v fused, o
    sess = session(model)
    layer, rng = ref.layers[LAYER], np.random.default_rng(1)
    # NaN beyond the filled rows: GroupQueryAttention must never read them (it masks by length).
    cache = {p: np.full((1, cfg.num_kv_heads, MAX, cfg.head_dim), np.nan, np.float32)
             for p in ("past_key", "past_value")}
    past_k = past_v = None
    total = 0
    for n in STEPS:
        x = rng.standard_normal((1, n, cfg.hidden_size)).astype(np.float32)
        pos = np.arange(ROPE_OFFSET + total, ROPE_OFFSET + total + n, dtype=np.int64)
        total += n
        with torch.no_grad():
            h, m, k, v = layer.attention_block(torch.from_numpy(x), torch.from_numpy(pos)[None], past_k, past_v)
        past_k = k if past_k is None else torch.cat((past_k, k), dim=2)
        past_v = v if past_v is None else torch.cat((past_v, v), dim=2)
        feeds = {"x": x, "position_ids": pos, "seqlens_k": np.array([total - 1], np.int32),
                 "total_len": np.array(total, np.int32), **cache}
        out = run_bound(sess, feeds, cache)
        what = f"{cfg.family} {scheme.label} after {total} tokens"
        # The attention's own contribution: h alone is dominated by the residual x at int precisions.
        _check(out["h"] - x, h.numpy() - x, scheme, f"{what}: h - x")
        _check(out["m"], m.numpy(), scheme, f"{what}: m")
        _check(cache["past_key"][:, :, :total], past_k.numpy(), scheme, f"{what}: key cache")
        _check(cache["past_value"][:, :, :total], past_v.numpy(), scheme, f"{what}: value cache")
        assert np.isnan(cache["past_key"][:, :, total:]).all()  # written in place, and only rows < total


def test_attention_signature_is_the_contract(family) -> None:
    cfg, tensors, _ = family
    kv, d, hid = cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    inputs, outputs = io_signature(build_attention(cfg, _strip(tensors, "layers.1."), SCHEMES[0], max_positions=64))
    cache = ("1", str(kv), "64", str(d))
    assert inputs == (("x", "float", ("1", "S", str(hid))), ("position_ids", "int64", ("S",)),
                      ("past_key", "float", cache), ("past_value", "float", cache), ("seqlens_k", "int32", ("1",)),
                      ("total_len", "int32", ()))
    assert outputs == (("h", "float", ("1", "S", str(hid))), ("m", "float", ("1", "S", str(hid))),
                       ("present_key", "float", cache), ("present_value", "float", cache))
    symbolic = io_signature(build_attention(cfg, _strip(tensors, "layers.1."), SCHEMES[0]))[0][2]
    assert symbolic.shape[2] == "MAX"


def test_attention_rejects_head_dims_gqa_cannot_run() -> None:
    cfg = tiny_config("phi")  # head dim 20
    with pytest.raises(QuantError, match="divisible by 8"):
        build_attention(cfg, _strip(random_tensors(cfg, None), "layers.1."), SCHEMES[0])


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_dense_mlp_head_and_projector_match_reference(family, scheme: Scheme) -> None:
    cfg, tensors, ref = family
    rng = np.random.default_rng(2)
    h = rng.standard_normal((7, cfg.hidden_size)).astype(np.float32)
    features = rng.standard_normal((9, cfg.mm_hidden_size)).astype(np.float32)
    graphs = {
        "dense_mlp": (build_dense_mlp(cfg, _strip(tensors, f"layers.{LAYER}.mlp."), scheme), {"x": h},
                      ref.layers[LAYER].mlp, h, "y", 3 if cfg.mlp_act == "silu_glu" else 2),
        "head": (build_head(cfg, {k: v for k, v in tensors.items() if k.startswith(("final_norm.", "lm_head."))},
                            scheme), {"h": h}, ref.head, h, "logits", 1),
        "projector": (build_projector(cfg, _strip(tensors, "projector."), scheme), {"features": features},
                      ref.projector, features, "embeds", 2),
    }
    for name, (model, feeds, module, x, out, weight_ops) in graphs.items():
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        got = run_graph(model, feeds)[out]
        assert got.shape == want.shape and got.dtype == np.float32
        _check(got, want, scheme, f"{cfg.family} {name} {scheme.label}")
        if scheme.precision.is_integer:
            assert _quantized_ops(model, scheme.precision) == weight_ops, name


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
def test_embed_is_a_lookup(family, scheme: Scheme) -> None:
    cfg, tensors, ref = family
    model = build_embed(cfg, tensors["embed.weight"], scheme)
    ids = np.array([0, 5, cfg.vocab_size - 1, 5], np.int64)
    got = run_graph(model, {"ids": ids})["embeds"]
    with torch.no_grad():
        want = ref.embed_tokens(torch.from_numpy(ids)).numpy()
    (table,) = model.graph.initializer
    if scheme.precision is Precision.FP32:
        assert table.data_type == onnx.TensorProto.FLOAT and np.array_equal(got, want)
    else:  # an fp16 table, cast back after the lookup
        assert table.data_type == onnx.TensorProto.FLOAT16
        Scheme.default(Precision.FP16).tolerance.check(got, want, f"embed {scheme.label}")
    assert io_signature(model) == ((("ids", "int64", ("S",)),), (("embeds", "float", ("S", str(cfg.hidden_size))),))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_features_match_reference(kind: str, scheme: Scheme) -> None:
    cfg, tower = tiny_config("stablelm"), tiny_tower(kind)
    tensors = random_tensors(cfg, tower, seed=3)
    ref = ReferenceModel.from_tensors(cfg, tower, tensors)
    model = build_vision(tower, _strip(tensors, "vision."), scheme, select_layer=cfg.mm_vision_select_layer)
    pixels = np.random.default_rng(4).standard_normal((1, 3, tower.image_size, tower.image_size)).astype(np.float32)
    with torch.no_grad():
        want = ref.vision(torch.from_numpy(pixels))[0].numpy()  # [N', Hv]: 16 patches (CLIP), 15 (SigLIP quirk)
    got = run_graph(model, {"pixel_values": pixels})["features"]
    assert got.shape == want.shape == (tower.num_patches - (kind == "siglip"), tower.hidden_size)
    _check(got, want, scheme, f"{kind} tower {scheme.label}")
    layers = layers_needed(tower.num_layers, cfg.mm_vision_select_layer)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 1  # the patch embedding stays float
    if scheme.precision.is_integer:
        assert _quantized_ops(model, scheme.precision) == 4 * layers  # q|k|v, out_proj, fc1, fc2 per layer
    assert io_signature(model) == (
        (("pixel_values", "float", ("1", "3", str(tower.image_size), str(tower.image_size))),),
        (("features", "float", (str(want.shape[0]), str(tower.hidden_size))),))


def test_vision_builds_only_the_layers_features_need() -> None:
    tower = tiny_tower("clip")
    for select in (-1, -2, 0, 1):
        assert layers_needed(tower.num_layers, select) == reference_layers_needed(tower.num_layers, select)
    w = _strip(random_tensors(tiny_config("stablelm"), tower, seed=3), "vision.")
    model = build_vision(tower, w, SCHEMES[0], select_layer=-3)  # hidden_states[-3]: the first layer's output
    names = {t.name for t in model.graph.initializer}
    assert any(n.startswith("encoder.layers.0.") for n in names)
    assert not any(n.startswith(("encoder.layers.1.", "encoder.layers.2.", "post_layernorm")) for n in names)


def test_int4_trunk_gets_an_int8_tower_unless_asked() -> None:
    int4 = Scheme.default(Precision.INT4)
    assert vision_scheme(int4).precision is Precision.INT8
    assert vision_scheme(int4, int4_as_int8=False) == int4
    assert vision_scheme(Scheme.default(Precision.FP32)).precision is Precision.FP32


def test_validate_reports_the_max_error_and_binds_the_cache(family) -> None:
    cfg, tensors, ref = family
    model = build_attention(cfg, _strip(tensors, f"layers.{LAYER}."), SCHEMES[0])
    x = np.random.default_rng(5).standard_normal((1, 3, cfg.hidden_size)).astype(np.float32)
    past = np.zeros((1, cfg.num_kv_heads, 8, cfg.head_dim), np.float32)
    feeds = {"x": x, "position_ids": np.arange(3), "past_key": past, "past_value": past.copy(),
             "seqlens_k": np.array([2], np.int32), "total_len": np.array(3, np.int32)}
    with torch.no_grad():
        h, m, k, _ = ref.layers[LAYER].attention_block(torch.from_numpy(x), torch.arange(3)[None])
    key = past.copy()
    key[:, :, :3] = k.numpy()
    expected = {"h": h.numpy(), "m": m.numpy(), "present_key": key}
    assert validate(model, feeds, expected) < FP32_TOL
    assert not past.any()  # validate bound copies: the caller's arrays are untouched
    assert validate(model, feeds, {**expected, "h": h.numpy() + 0.5}) == pytest.approx(0.5, abs=FP32_TOL)
