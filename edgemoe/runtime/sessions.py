"""ORT sessions for the trunk, with the process's one session policy.

Contract: `trunk_session(path)` opens one trunk graph on the CPU EP with the options every session
of the process uses (`edgemoe.offload.sessions.session_options`: no CPU arena, no spinning, one
thread setting), so trunk and expert sessions share one thread policy and one hygiene. A graph that
cannot be opened or run is a one-line `RuntimeGraphError` naming the graph.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from edgemoe.errors import EdgeMoEError
from edgemoe.offload.errors import one_line
from edgemoe.offload.sessions import cache_dtype, configure_process, session_options, shared_arena_options, shrink_arena

__all__ = ["RuntimeGraphError", "cache_dtype", "configure_process", "one_line", "session_options",
           "shared_arena_options", "shrink_arena", "trunk_session"]


class RuntimeGraphError(EdgeMoEError):
    """A bundle graph could not be opened or run."""


def trunk_session(path: Path, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An inference session for one graph file (see module docstring)."""
    try:
        return ort.InferenceSession(str(path), options or session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises bare RuntimeErrors/Fail with multi-line text
        raise RuntimeGraphError(f"cannot open graph {path}: {one_line(exc)}") from None

