"""Exporter: checkpoint -> bundle (trunk graphs + one ONNX graph per expert + manifest)."""
