"""Expert graphs built once per (expert, precision), kept as serialized files in a scratch directory.

Contract: `ExpertGraphs(ckpt, workdir, target)` builds `experts/L{l}/E{e}` at a precision on first
request (`edgemoe.quant.lowering.build_mlp` with `Scheme.default(precision, target)`), writes the bytes
to `workdir` and drops the graph, so memory holds one expert at a time however many are built. The
same bytes serve the auto policy's measurements (`session`), its size accounting (`size`) and the
bundle (`data`): what was measured is byte for byte what ships. The directory is the caller's; it is
deleted with it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

from edgemoe.export import components
from edgemoe.keys import ExpertKey
from edgemoe.model.checkpoint import Checkpoint
from edgemoe.quant.lowering import build_mlp, to_bytes
from edgemoe.quant.schemes import Precision, Scheme

log = logging.getLogger(__name__)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """CPU sessions for measurement and validation: the machine's cores, no spinning between runs."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def cpu_session(data: bytes | str | os.PathLike[str], threads: int | None = None) -> ort.InferenceSession:
    source = data if isinstance(data, bytes) else str(data)
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


class ExpertGraphs:
    """Built expert graphs on disk, by (ExpertKey, Precision)."""

    def __init__(self, ckpt: Checkpoint, workdir: Path, target: str = "cpu") -> None:
        self.ckpt, self.workdir, self.target = ckpt, Path(workdir), target
        self._paths: dict[tuple[ExpertKey, Precision], Path] = {}
        self.builds = 0

    def scheme(self, precision: Precision) -> Scheme:
        return Scheme.default(precision, self.target)

    def path(self, key: ExpertKey, precision: Precision) -> Path:
        """The graph file, built now if it was not yet."""
        precision = Precision.parse(precision)
        found = self._paths.get((key, precision))
        if found is None:
            found = self._build(key, precision)
        return found

    def _build(self, key: ExpertKey, precision: Precision) -> Path:
        w = components.expert_weights(self.ckpt, key)
        name = f"expert_L{key.layer}_E{key.expert}"
        model = build_mlp(w, self.ckpt.config.mlp_act, self.scheme(precision), name=name)
        del w
        path = self.workdir / f"L{key.layer}_E{key.expert}.{precision.value}.onnx"
        path.write_bytes(to_bytes(model))
        self._paths[(key, precision)] = path
        self.builds += 1
        log.debug("built %s at %s: %d bytes", key, precision.value, path.stat().st_size)
        return path

    def data(self, key: ExpertKey, precision: Precision) -> bytes:
        return self.path(key, precision).read_bytes()

    def size(self, key: ExpertKey, precision: Precision) -> int:
        """Bytes the expert's file will take in the bundle (the policy's size_of)."""
        return self.path(key, precision).stat().st_size

    def session(self, key: ExpertKey, precision: Precision) -> ort.InferenceSession:
        return cpu_session(self.path(key, precision))
