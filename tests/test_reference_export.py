"""The reference's stages trace with torch.onnx.export and run the same in ONNX Runtime: the
exporter depends on it. One attention stage (dynamic new and past lengths, an empty past for
prefill included) and one router; the rest of the stages are plain Linear/Conv/LayerNorm code."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import onnxscript  # noqa: F401 (torch.onnx's exporter needs it: a missing one must fail, not skip)
import torch

from edgemoe.reference.decoder import AttentionStage, RouterStage
from edgemoe.reference.model import ReferenceModel
from edgemoe.reference.tiny import random_tensors, tiny_config


def test_attention_and_router_stages_export(tmp_path):
    cfg = tiny_config("stablelm", num_key_value_heads=2)
    model = ReferenceModel.from_tensors(cfg, None, random_tensors(cfg, None, 0))
    kv = (cfg.num_kv_heads, cfg.head_dim)
    attn = AttentionStage(model.layers[0])
    new, past = torch.export.Dim("L"), torch.export.Dim("T")
    example = (torch.randn(1, 3, cfg.hidden_size), torch.arange(5, 8)[None], torch.randn(1, *kv[:1], 5, kv[1]),
               torch.randn(1, kv[0], 5, kv[1]))
    torch.onnx.export(attn, example, tmp_path / "attn.onnx", input_names=["x", "pos", "past_k", "past_v"],
                      output_names=["h", "m", "k", "v"],
                      dynamic_shapes=({1: new}, {1: new}, {2: past}, {2: past}), verbose=False)
    session = ort.InferenceSession(str(tmp_path / "attn.onnx"))
    for n, t in [(4, 0), (1, 9), (3, 5)]:
        x, pos = torch.randn(1, n, cfg.hidden_size), torch.arange(t, t + n)[None]
        pk, pv = torch.randn(1, kv[0], t, kv[1]), torch.randn(1, kv[0], t, kv[1])
        with torch.no_grad():
            want = attn(x, pos, pk, pv)
        got = session.run(None, {"x": x.numpy(), "pos": pos.numpy(), "past_k": pk.numpy(), "past_v": pv.numpy()})
        assert max(np.abs(g - w.numpy()).max() for g, w in zip(got, want)) < 1e-5

    router = RouterStage(model.layers[0])
    torch.onnx.export(router, (torch.randn(5, cfg.hidden_size),), tmp_path / "router.onnx", input_names=["m"],
                      output_names=["experts", "weights"], dynamic_shapes=({0: torch.export.Dim("N")},),
                      verbose=False)
    m = torch.randn(11, cfg.hidden_size)
    experts, weights = ort.InferenceSession(str(tmp_path / "router.onnx")).run(None, {"m": m.numpy()})
    with torch.no_grad():
        want_e, want_w = router(m)
    assert np.array_equal(experts, want_e.numpy()) and np.abs(weights - want_w.numpy()).max() < 1e-6
