"""Probe: ORT's QMoE op (one node per MoE layer, experts stacked) against per-expert MatMulNBits graphs,
at DeepSeek-VL2-Tiny's expert shape (hidden 1280, expert width 896, 64 experts, top-6), int4 block 128.

    python bench/qmoe_probe.py [WEIGHTS_PREPACKED]      # e.g. 0 (raw layout), 1, -1; default: the op's default

Last, it saves the layer with ORT's prepacked-weights saving and opens a session on the result, to see
whether the packed experts are mapped from a file (pageable per expert, as the mapped store needs) or
copied into private memory.

It checks the layout against a numpy reference of the dequantized weights (gate and up rows interleaved:
CPU QMoE takes only swiglu_fusion=1), routes with `router_weights` (so the weights are DeepSeek's own,
not QMoE's softmax) and times one decoded token and a 1,024-token prefill per layer. Random weights.
"""
import time, numpy as np, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
H, I, E, K, B = 1280, 896, 64, 6, 128
rng = np.random.default_rng(0)
def quant(w):  # w [N, K] -> packed uint8 [N, K/2], scales [N, K/B]; symmetric, zero point 8
    n, k = w.shape
    blocks = w.reshape(n, k // B, B)
    scale = np.abs(blocks).max(-1) / 7.0 + 1e-12
    q = np.clip(np.round(blocks / scale[..., None]) + 8, 0, 15).astype(np.uint8).reshape(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    deq = ((q.astype(np.float32) - 8).reshape(n, k // B, B) * scale[..., None]).reshape(n, k)
    return packed, scale.astype(np.float32), deq
g = rng.standard_normal((E, I, H), dtype=np.float32) * 0.03
u = rng.standard_normal((E, I, H), dtype=np.float32) * 0.03
d = rng.standard_normal((E, H, I), dtype=np.float32) * 0.03
fc1w, fc1s, fc1d, fc2w, fc2s, fc2d = [], [], [], [], [], []
for e in range(E):
    pw, ps, pd = quant(np.stack([g[e], u[e]], axis=1).reshape(2 * I, H))
    pd = pd.reshape(I, 2, H).transpose(1, 0, 2).reshape(2 * I, H)  # back to [gate | up] for the reference
    fc1w.append(pw); fc1s.append(ps); fc1d.append(pd)
    pw, ps, pd = quant(d[e]); fc2w.append(pw); fc2s.append(ps); fc2d.append(pd)
fc1w, fc1s, fc2w, fc2s = map(np.stack, (fc1w, fc1s, fc2w, fc2s))
inits = [numpy_helper.from_array(fc1w, "fc1w"), numpy_helper.from_array(fc1s, "fc1s"),
         numpy_helper.from_array(fc2w, "fc2w"), numpy_helper.from_array(fc2s, "fc2s")]
def layer_model(fusion, acc):
    node = helper.make_node("QMoE", ["x", "probs", "fc1w", "fc1s", "", "fc2w", "fc2s", "", "", "", "", "", "", "", "rw"], ["y"],
                            domain="com.microsoft", k=K, activation_type="swiglu", swiglu_fusion=fusion,
                            activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=4, block_size=B,
                            normalize_routing_weights=0, accuracy_level=acc, **PACK)
    graph = helper.make_graph([node], "qmoe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H]),
        helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", E]),
        helper.make_tensor_value_info("rw", TensorProto.FLOAT, ["N", E])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def build(fusion, acc):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(layer_model(fusion, acc).SerializeToString(), so, providers=["CPUExecutionProvider"])
import sys
PACK = {} if len(sys.argv) < 2 else {"weights_prepacked": int(sys.argv[1])}
x = rng.standard_normal((1, H), dtype=np.float32)
chosen = rng.choice(E, K, replace=False)
w = np.zeros((1, E), np.float32); w[0, chosen] = rng.uniform(0.05, 0.3, K)
probs = np.full((1, E), -1e9, np.float32); probs[0, chosen] = 1.0 + np.arange(K)  # choice only
ref = np.zeros((1, H), np.float32)
for e in chosen:
    h = x @ fc1d[e].T
    gg, uu = h[:, :I], h[:, I:]
    ref += w[0, e] * ((gg / (1 + np.exp(-gg)) * uu) @ fc2d[e].T)
for fusion in (1,):
    for acc in (0, 4):
        try:
            s = build(fusion, acc)
            y = s.run(None, {"x": x, "probs": probs, "rw": w})[0]
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            for _ in range(5): s.run(None, {"x": x, "probs": probs, "rw": w})
            t0 = time.perf_counter()
            for _ in range(200): s.run(None, {"x": x, "probs": probs, "rw": w})
            print(f"fusion {fusion} acc {acc}: rel err {err:.3g}, {(time.perf_counter()-t0)/200*1e3:.3f} ms per layer (6 of 64 experts, 1 token)")
        except Exception as exc:
            print(f"fusion {fusion} acc {acc}: {str(exc)[:300]}")

# prefill-sized: 1024 tokens, each routed to 6 random experts
N = 1024
xs = rng.standard_normal((N, H), dtype=np.float32)
wsel = np.zeros((N, E), np.float32); psel = np.full((N, E), -1e9, np.float32)
for t in range(N):
    c = rng.choice(E, K, replace=False); wsel[t, c] = 0.1; psel[t, c] = 1.0
s = build(1, 4)
s.run(None, {"x": xs, "probs": psel, "rw": wsel})
t0 = time.perf_counter()
for _ in range(3): s.run(None, {"x": xs, "probs": psel, "rw": wsel})
print(f"prefill 1024 tokens, acc 4: {(time.perf_counter()-t0)/3*1e3:.1f} ms per layer")

# Paging: does the op keep its packed weights in a file ORT maps (so an expert's pages can be dropped
# and faulted back, as the mapped store does for MatMulNBits), or in private memory? Save the layer
# with ORT's prepacked-weights saving, open a session on the result and watch RssAnon / RssFile.
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import onnx  # noqa: E402

from edgemoe.offload.prepacked import write_prepacked  # noqa: E402
from edgemoe.offload.sessions import session_options  # noqa: E402


def _rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f if line.startswith(("RssAnon", "RssFile"))}


work = Path(tempfile.mkdtemp(prefix="qmoe-"))
proto = layer_model(1, 4)
onnx.save_model(proto, str(work / "layer.onnx"))
packed_graph, packed_data = write_prepacked(work / "layer.onnx", work, "packed", session_options)
for t in onnx.load(str(packed_graph), load_external_data=False).graph.initializer:
    print(t.name, {e.key: e.value[:70] for e in t.external_data if e.key.startswith("prepacked")})
before = _rss()
packed_session = ort.InferenceSession(str(packed_graph), session_options(), providers=["CPUExecutionProvider"])
print(f"session on the prepacked layer: RSS MB before {before}, after {_rss()} (weights {packed_data.stat().st_size >> 20} MB on disk)")
feeds = {"x": x, "probs": probs, "rw": w}
assert np.array_equal(packed_session.run(None, feeds)[0], build(1, 4).run(None, feeds)[0])
t0 = time.perf_counter()
for _ in range(200):
    packed_session.run(None, feeds)
print(f"mapped prepacked layer: {(time.perf_counter() - t0) / 200 * 1e3:.3f} ms per decoded token, bit-identical to the in-memory one")
