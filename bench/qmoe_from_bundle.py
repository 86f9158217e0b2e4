"""Probe: one QMoE layer built from a bundle's own int4 expert graphs (MatMulNBits bytes and scales, gate/up rows
interleaved), against those experts' sessions: outputs and time for one decoded token, 6 experts.

    python bench/qmoe_from_bundle.py BUNDLE [LAYER]

Shows that the exporter's int4 experts need no re-quantization to run as one QMoE node per layer.
"""
import sys, time, numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
from edgemoe.bundle import Bundle
from edgemoe.keys import ExpertKey
from edgemoe.offload.sessions import session_options
b = Bundle.open(sys.argv[1]); L = int(sys.argv[2]) if len(sys.argv) > 2 else 1
cfg = b.manifest.model_config(); E = cfg.moe.experts_in(L); H = cfg.hidden_size; I = cfg.expert_intermediate_size; K = 6
fc1w, fc1s, fc2w, fc2s = [], [], [], []
for e in range(E):
    m = onnx.load(str(b.path_of(b.manifest.expert(ExpertKey(L, e)))))
    t = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    g, u = t["gate.weight_t_Q4"].reshape(I, -1), t["up.weight_t_Q4"].reshape(I, -1)  # [I, K/2] bytes
    gs, us = t["gate.weight_t_scales"].reshape(I, -1), t["up.weight_t_scales"].reshape(I, -1)
    fc1w.append(np.stack([g, u], 1).reshape(2 * I, -1)); fc1s.append(np.stack([gs, us], 1).reshape(2 * I, -1))
    fc2w.append(t["down.weight_t_Q4"].reshape(H, -1)); fc2s.append(t["down.weight_t_scales"].reshape(H, -1))
arrs = {"fc1w": np.stack(fc1w), "fc1s": np.stack(fc1s).astype(np.float32), "fc2w": np.stack(fc2w), "fc2s": np.stack(fc2s).astype(np.float32)}
node = helper.make_node("QMoE", ["x", "probs", "fc1w", "fc1s", "", "fc2w", "fc2s", "", "", "", "", "", "", "", "rw"], ["y"],
                        domain="com.microsoft", k=K, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                        activation_beta=0.0, expert_weight_bits=4, block_size=128, normalize_routing_weights=0, accuracy_level=4)
g = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H]),
    helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", E]), helper.make_tensor_value_info("rw", TensorProto.FLOAT, ["N", E])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])], [numpy_helper.from_array(v, k) for k, v in arrs.items()])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]); m.ir_version = 8
q = ort.InferenceSession(m.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
x = np.random.default_rng(1).standard_normal((1, H), dtype=np.float32)
chosen = [3, 9, 17, 30, 41, 63]; w = np.zeros((1, E), np.float32); w[0, chosen] = [0.3, 0.2, 0.15, 0.1, 0.05, 0.02]
p = np.full((1, E), -1e9, np.float32); p[0, chosen] = 1.0
singles = {e: ort.InferenceSession(str(b.path_of(b.manifest.expert(ExpertKey(L, e)))), session_options(), providers=["CPUExecutionProvider"]) for e in chosen}
want = sum(w[0, e] * singles[e].run(None, {"x": x})[0] for e in chosen)
got = q.run(None, {"x": x, "probs": p, "rw": w})[0]
print(f"QMoE from the bundle's experts vs per-expert sessions: rel max err {np.abs(got - want).max() / np.abs(want).max():.2e}")
for lab, fn in (("per-expert sessions", lambda: [singles[e].run(None, {"x": x}) for e in chosen]), ("QMoE layer", lambda: q.run(None, {"x": x, "probs": p, "rw": w}))):
    fn(); t0 = time.perf_counter()
    for _ in range(200): fn()
    print(f"{lab}: {(time.perf_counter() - t0) / 200 * 1e3:.3f} ms")
