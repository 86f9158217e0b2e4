"""The bundle on disk: a contract between exporter and runtime (manifest, graphs, checksums).

Layout: `manifest.json` (written last), `graphs/<name>.onnx` (trunk), `experts/L{layer}/E{expert}.onnx`,
`tokenizer/...`, `routers.safetensors`, and `<stem>.data` beside any graph stored with external data.
`BundleWriter` writes one atomically, `Bundle.open` reads one lazily, `Manifest` is what they agree on.
The writer (which needs onnx) is imported on first use, so reading a bundle never imports onnx.
"""

from typing import Any

from edgemoe.bundle.entries import BundleError, FileEntry, TensorDecl, Validation
from edgemoe.bundle.manifest import SCHEMA_VERSION, Manifest
from edgemoe.bundle.reader import Bundle

_WRITER_NAMES = ("BundleWriter", "expert_path", "graph_path")
__all__ = ["SCHEMA_VERSION", "Bundle", "BundleError", "FileEntry", "Manifest", "TensorDecl", "Validation",
           *_WRITER_NAMES]


def __getattr__(name: str) -> Any:
    if name in _WRITER_NAMES:
        from edgemoe.bundle import writer
        return getattr(writer, name)
    raise AttributeError(f"module 'edgemoe.bundle' has no attribute {name!r}")
