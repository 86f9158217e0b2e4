"""Quantization: schemes (how a tensor is stored) and policies (which expert gets which scheme).

    schemes.py   Precision, Scheme, declared validation tolerances, bytes_for(shape, scheme)
    graphs.py    float ONNX graphs of an MLP/expert or a linear, and their numpy references
    lowering.py  build_mlp / build_linear at a scheme with ORT's quantizers; check_lowered proves it
    metrics.py   OutputError of candidate logits vs the fp32 reference; AccuracyBudget
    policy.py    uniform(...) and auto(...): EdgeMoE's sensitivity-based per-expert precision

Only `lowering.py` imports onnxruntime's quantization tooling (and onnx_ir for int4); the rest is numpy.
"""
