"""Time one StableLM-sized expert (hidden 2048, ffn 5632, SwiGLU, random weights) at every scheme.

Prints the CPU (model name and the SIMD flags that pick ORT's kernels) first, then per scheme: file MB,
build s (graph + quantizer), session create ms, run ms at N=1 (decode) and N=256 (prefill), relative rms
error against a float64 numpy reference, and the ops ORT actually runs after its graph optimizations.
A second table compares Gelu(approximate="tanh") with the explicit formula at Phi-2's shape.
Usage: python bench/quant_formats.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgemoe.quant.graphs import MlpWeights, float_mlp, mlp_reference
from edgemoe.quant.lowering import build_mlp, save_model
from edgemoe.quant.schemes import Precision, Scheme

FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
         "amx_int8")
SCHEMES = [
    Scheme.default(Precision.FP32),
    Scheme.default(Precision.FP16),
    Scheme.default(Precision.INT8),
    Scheme(Precision.INT8, per_channel=False),
    Scheme.default(Precision.INT4),
    Scheme(Precision.INT4, accuracy_level=0),  # the trap: ORT's fallback path without accuracy_level
]


def cpu_summary() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    have = " ".join(f for f in FLAGS if f in flags)
    return f"CPU: {model} ({info.count('processor')} logical)\nflags: {have or 'none of ' + ' '.join(FLAGS)}"


def session(path: str, threads: int, optimized: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up: first runs allocate and pre-pack
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def runtime_ops(path: str, tmp: Path, threads: int) -> str:
    """Ops of ORT's optimized graph: what really runs (e.g. DynamicQuantizeMatMul, not MatMulInteger)."""
    out = tmp / "optimized.onnx"
    session(path, threads, optimized=str(out))
    ops = sorted({n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node} - {"Cast"})
    out.unlink()
    return ",".join(ops)


def bench_scheme(scheme: Scheme, w: MlpWeights, xs: dict[int, np.ndarray], refs: dict[int, np.ndarray],
                 tmp: Path, args: argparse.Namespace) -> str:
    t = time.perf_counter()
    model = build_mlp(w, "silu_glu", scheme)
    build_s = time.perf_counter() - t
    path = str(tmp / f"{scheme.label}.onnx")
    size = save_model(model, path)
    del model
    create = statistics.median(_create_ms(path, args.threads) for _ in range(3))
    sess = session(path, args.threads)
    runs = {n: median_ms(lambda n=n: sess.run(None, {"x": xs[n]}), args.reps if n == 1 else max(2, args.reps // 5))
            for n in xs}
    y = sess.run(None, {"x": xs[256]})[0]
    err = scheme.tolerance.errors(y, refs[256])[0]
    return (f"| {scheme.label:24s} | {size / 1e6:7.1f} | {build_s:6.2f} | {create:7.0f} | {runs[1]:7.2f} | "
            f"{runs[256]:8.1f} | {err:8.2e} | {runtime_ops(path, tmp, args.threads)} |")


def _create_ms(path: str, threads: int) -> float:
    t = time.perf_counter()
    session(path, threads)
    return (time.perf_counter() - t) * 1e3


def bench_gelu(args: argparse.Namespace) -> None:
    """Phi-2 expert shape (2560 / 10240) with biases, fp32: Gelu op (opset 20) vs the tanh formula."""
    rng = np.random.default_rng(1)
    h, f = (2560, 10240) if not args.quick else (256, 1024)

    def r(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)

    w = MlpWeights(up=r(f, h), down=r(h, f), up_bias=r(f), down_bias=r(h))
    x = rng.standard_normal((256, h)).astype(np.float32)
    print("\n| gelu_new MLP fp32 (Phi-2 shape) | N=1 ms | N=256 ms |\n|---|---|---|")
    for opset, label in ((20, "Gelu(approximate=tanh), opset 20"), (18, "explicit tanh formula, opset 18")):
        sess = ort.InferenceSession(float_mlp(w, "gelu_new", opset=opset).SerializeToString(),
                                    _opts(args.threads), providers=["CPUExecutionProvider"])
        one = median_ms(lambda: sess.run(None, {"x": x[:1]}), args.reps)
        many = median_ms(lambda: sess.run(None, {"x": x}), max(2, args.reps // 5))
        print(f"| {label} | {one:.2f} | {many:.1f} |")


def _opts(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script runs")
    args = parser.parse_args()
    print(cpu_summary())
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, intra_op_num_threads={args.threads}")
    h, f = (2048, 5632) if not args.quick else (256, 512)
    rng = np.random.default_rng(0)

    def r(*s: int) -> np.ndarray:
        return (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)

    w = MlpWeights(up=r(f, h), down=r(h, f), gate=r(f, h))
    xs = {n: rng.standard_normal((n, h)).astype(np.float32) for n in (1, 256)}
    refs = {256: mlp_reference(w, "silu_glu", xs[256])}
    print(f"\nexpert silu_glu hidden {h} ffn {f} ({3 * h * f / 1e6:.1f} M params)")
    print("| scheme | file MB | build s | create ms | N=1 ms | N=256 ms | rel rms | ORT runs |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-") as tmp:
        for scheme in SCHEMES:
            print(bench_scheme(scheme, w, xs, refs, Path(tmp), args), flush=True)
    bench_gelu(args)


if __name__ == "__main__":
    main()
