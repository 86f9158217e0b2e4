"""The token embedding table read in place from the bundle's `embed.onnx`, one row per token.

Contract: `MappedEmbedding.open(path)` recognises the embed graphs the exporter writes (a `Gather` of
a 2-D fp16/fp32 initializer by the graph's `ids` input, then a `Cast` to fp32; or a bare `Gather` of
an fp32 table) and maps the
initializer's bytes where they lie inside the .onnx file (`numpy.memmap`), found by walking the
protobuf's wire format over a read-only mapping (nothing is copied or parsed into memory). `rows(ids)`
then reads only the rows a prompt uses, equal value for value to running the graph (a gather and an
fp16 -> fp32 cast are exact). Any other graph (a quantized table, external data, other ops) gives
None and the caller keeps the ORT session. Why: ORT copies the whole table into the process (411 MB
of fp16 for StableLM-2's 100,352 x 2,048) although a token reads one row; mapped, only the rows used
are resident, and they count in RSS like any mapped page.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.bundle.onnx_wire import (GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_NODE, TENSOR_DATA_LOCATION,
                                      TENSOR_EXTERNAL_DATA, TENSOR_NAME, fields, graph_span, packed_varints, string)
from edgemoe.page_cache import will_need

_DTYPES = {10: np.float16, 1: np.float32}  # onnx.TensorProto.FLOAT16, FLOAT
# Field numbers: edgemoe.bundle.onnx_wire.


@dataclass(frozen=True)
class MappedEmbedding:
    table: np.memmap  # [V, H] in the file's dtype
    path: Path
    offset: int  # of row 0 in the file

    @classmethod
    def open(cls, path: Path) -> "MappedEmbedding | None":
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = _table(memoryview(data))
        if found is None:
            return None
        offset, dtype, rows, cols = found
        table = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=offset, shape=(rows, cols))
        mapping = getattr(table, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
            mapping.madvise(mmap.MADV_RANDOM)  # a row's fault reads its pages, not an 8 MB window around them
        return cls(table, path, offset)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """ids [S] -> fp32 [S, H] (the graph's Gather then Cast)."""
        ids = np.asarray(ids, np.int64)
        if ids.size > 1:
            self._prefetch(np.unique(ids))
        return np.asarray(self.table[ids], dtype=np.float32)

    def _prefetch(self, ids: np.ndarray) -> None:
        """Ask for every row a prompt needs at once (the reads go out together instead of one page
        fault at a time, which MADV_RANDOM makes a 4 KiB read each)."""
        row = self.table.shape[1] * self.table.dtype.itemsize
        valid = ids[(ids >= 0) & (ids < self.table.shape[0])]
        will_need(self.path, [(self.offset + i * row, row) for i in valid.tolist()])


def _table(data: memoryview) -> tuple[int, type, int, int] | None:
    """(offset of raw_data, dtype, rows, cols) when the file is the plain Gather -> Cast graph."""
    graph = graph_span(data)
    if graph is None:
        return None
    nodes, inits, inputs = [], [], []
    for field, (start, end) in fields(data, *graph):
        {GRAPH_NODE: nodes, GRAPH_INITIALIZER: inits, GRAPH_INPUT: inputs}.get(field, []).append((start, end))
    ops = [_node(data, *n) for n in nodes]
    kinds = [op for op, _, _ in ops]
    if kinds not in (["Gather"], ["Gather", "Cast"]) or len(inits) != 1 or len(inputs) != 1:
        return None
    _, gather_in, gather_out = ops[0]
    ids_name = string(data, *next(s for f, s in fields(data, *inputs[0]) if f == 1))
    tensor = _tensor(data, *inits[0])
    if (len(ops) == 2 and ops[1][1] != gather_out[:1]) or len(gather_in) != 2 or gather_in[1] != ids_name \
            or tensor is None or gather_in[0] != tensor[0]:
        return None
    _, dtype, dims, raw = tensor
    if len(ops) == 1 and dtype != 1:  # a bare Gather returns the table's dtype: only fp32 is the graph's output
        return None
    if dtype not in _DTYPES or len(dims) != 2 or raw is None or raw[1] - raw[0] != dims[0] * dims[1] * \
            np.dtype(_DTYPES[dtype]).itemsize:
        return None
    return raw[0], _DTYPES[dtype], dims[0], dims[1]


def _node(data: memoryview, start: int, end: int) -> tuple[str, list[str], list[str]]:
    op, inputs, outputs = "", [], []
    for field, span in fields(data, start, end):
        if field == 4:
            op = string(data, *span)
        elif field in (1, 2):
            (inputs if field == 1 else outputs).append(string(data, *span))
    return op, inputs, outputs


def _tensor(data: memoryview, start: int, end: int) -> tuple[str, int, list[int], tuple[int, int] | None] | None:
    name, dtype, dims, raw = "", 0, [], None
    for field, span in fields(data, start, end, varints=True):
        if field == TENSOR_NAME:
            name = string(data, *span)
        elif field == 2:
            dtype = span
        elif field == 1:  # dims: one varint each, or packed
            dims += [span] if isinstance(span, int) else packed_varints(data, *span)
        elif field == 9:
            raw = span
        elif field in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION):  # external data: not in this file
            return None
    return name, dtype, dims, raw
