"""Quantization: schemes (how a tensor is stored) and policies (which expert gets which scheme)."""
