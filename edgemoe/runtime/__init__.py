"""The engine: runs a bundle with ONNX Runtime, layer by layer, asking a provider for experts."""
