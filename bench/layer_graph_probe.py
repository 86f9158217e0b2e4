"""Probe: one ORT session per MoE layer (every expert of the layer merged into one graph) against one
session per expert, on a real bundle. Prints the decode-step time of each way and checks the outputs
are bit-identical.

    python bench/layer_graph_probe.py BUNDLE [--layer N] [--active 6] [--repeat 200]

The merged graph keeps each expert's nodes and weights exactly (names prefixed `e{k}.`), with inputs
x{k} [n_k, H] and outputs y{k} [n_k, H]; experts not used by a step get zero rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgemoe.bundle import Bundle
from edgemoe.keys import ExpertKey
from edgemoe.offload.sessions import session_options


def merged_layer(bundle: Bundle, layer: int, experts: int) -> onnx.ModelProto:
    graphs, inputs, outputs, inits, nodes, opsets = [], [], [], [], [], {}
    for k in range(experts):
        m = onnx.load(str(bundle.path_of(bundle.manifest.expert(ExpertKey(layer, k)))))
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        ren = {}
        for v in list(m.graph.input) + list(m.graph.output):
            ren[v.name] = f"{v.name}{k}"
        for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
            for d in v.type.tensor_type.shape.dim:  # each expert its own row count: no shared dim names
                if d.dim_param:
                    d.dim_param = f"{d.dim_param}_{k}"
        def name(n: str) -> str:
            return ren.get(n, f"e{k}.{n}") if n else n
        for t in m.graph.initializer:
            t.name = name(t.name)
            inits.append(t)
        for n in m.graph.node:
            n.input[:] = [name(i) for i in n.input]
            n.output[:] = [name(o) for o in n.output]
            n.name = f"e{k}.{n.name}"
            nodes.append(n)
        for v in m.graph.input:
            v.name = name(v.name)
            inputs.append(v)
        for v in m.graph.output:
            v.name = name(v.name)
            outputs.append(v)
        graphs.append(m)
    g = onnx.helper.make_graph(nodes, f"layer{layer}", inputs, outputs, initializer=inits)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = graphs[0].ir_version
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--active", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    cfg = bundle.manifest.model_config()
    experts, hidden = cfg.moe.experts_in(args.layer), cfg.hidden_size
    model = merged_layer(bundle, args.layer, experts)
    t0 = time.perf_counter()
    merged = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    print(f"merged session: {time.perf_counter() - t0:.2f} s to create, {len(model.graph.node)} nodes")
    singles = {k: ort.InferenceSession(str(bundle.path_of(bundle.manifest.expert(ExpertKey(args.layer, k)))),
                                       session_options(), providers=["CPUExecutionProvider"])
               for k in range(args.active)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, hidden), dtype=np.float32)
    empty = np.zeros((0, hidden), np.float32)
    feeds = {f"x{k}": (x if k < args.active else empty) for k in range(experts)}
    want = [singles[k].run(None, {"x": x})[0] for k in range(args.active)]
    got = merged.run([f"y{k}" for k in range(args.active)], feeds)
    print("bit-identical:", all(np.array_equal(a, b) for a, b in zip(got, want)))
    for label, fn in (("per-expert sessions", lambda: [singles[k].run(None, {"x": x}) for k in range(args.active)]),
                      ("merged layer session", lambda: merged.run([f"y{k}" for k in range(args.active)], feeds))):
        fn()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        print(f"{label}: {(time.perf_counter() - t0) / args.repeat * 1e3:.3f} ms per decode step "
              f"({args.active} of {experts} experts)")


if __name__ == "__main__":
    main()
