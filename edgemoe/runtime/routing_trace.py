"""A run's routing written down, so a benchmark can replay it through other caches.

Contract: `RoutingTrace(path)` writes one JSON line per MoE layer call, in call order:
{"layer": n, "tokens": N, "experts": {"e": tokens routed to e, ...}}. N > 1 is a prefill (or a chat
turn's prompt), N == 1 a decoded token. `read_trace(path)` returns the records as `TraceRecord`s. The
file is line-buffered and closed by `close()`; a trace that cannot be written is an `EdgeMoEError`
when it is opened (the user asked for it), never later in the middle of an answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import EdgeMoEError
from edgemoe.model.routing_rule import Routing


@dataclass(frozen=True)
class TraceRecord:
    """One MoE layer call: its layer, how many tokens it routed, and each used expert's token count."""

    layer: int
    tokens: int
    experts: dict[int, int]


class RoutingTrace:
    """Appends each MoE layer call's routing to a JSON-lines file (module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "w", buffering=1, encoding="utf-8")
        except OSError as exc:
            raise EdgeMoEError(f"cannot write the routing trace {self.path}: {exc.strerror or exc}") from None

    def record(self, layer: int, routing: Routing) -> None:
        experts, counts = np.unique(routing.experts, return_counts=True)
        self._file.write(json.dumps({"layer": int(layer), "tokens": int(routing.experts.shape[0]),
                                     "experts": {str(int(e)): int(c) for e, c in zip(experts, counts)}}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_trace(path: str | os.PathLike) -> list[TraceRecord]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            records.append(TraceRecord(int(row["layer"]), int(row["tokens"]),
                                       {int(e): int(c) for e, c in row["experts"].items()}))
    return records
