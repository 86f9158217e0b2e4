"""Reading an ONNX file's structure from its protobuf wire format, without the `onnx` package.

Contract: `fields(data, start, end)` walks one message's fields over a buffer (a memoryview of the
file's bytes, usually a read-only mapping) and yields (field number, (start, end)) for length-delimited
values, or the value itself for varints when asked; `string`, `packed_varints` decode those spans;
`external_data(path)` returns, per initializer of a model file, its name and its `external_data`
entries (key -> value), as `onnx.load(path, load_external_data=False)` would give them;
`nodes(path, op_type)` returns each such node's input count and integer attributes.

Why: the runtime reads three things from ONNX files: where an embedding table lies in embed.onnx,
where each prepacked blob lies in a prepacked graph's data file, and whether a bundle's int4 experts
can be fused (their MatMulNBits attributes). Importing `onnx` for that costs about
11.6 MB of private memory in every process (measured on Zen 4 with `anonymous_rss` before and after
the first load), which a memory budget pays for nothing. Field numbers are onnx.proto's.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# ModelProto.graph 7; GraphProto node 1, initializer 5, input 11; NodeProto input 1, output 2, op_type 4,
# attribute 5; AttributeProto name 1, i 3; TensorProto dims 1, data_type 2, name 8, raw_data 9,
# external_data 13, data_location 14; ValueInfoProto name 1; StringStringEntryProto key 1, value 2.
MODEL_GRAPH, GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT = 7, 1, 5, 11
NODE_INPUT, NODE_OP_TYPE, NODE_ATTRIBUTE, ATTRIBUTE_NAME, ATTRIBUTE_INT = 1, 4, 5, 1, 3
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14


def fields(data: memoryview, start: int, end: int, varints: bool = False) -> Iterator[tuple[int, object]]:
    """(field number, (start, end) of a length-delimited value, or the varint's value when `varints`)."""
    at = start
    while at < end:
        key, at = varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = varint(data, at)
            if varints:
                yield field, value
        elif wire == 2:
            length, at = varint(data, at)
            yield field, (at, at + length)
            at += length
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def packed_varints(data: memoryview, start: int, end: int) -> list[int]:
    out, at = [], start
    while at < end:
        value, at = varint(data, at)
        out.append(value)
    return out


def string(data: memoryview, start: int, end: int) -> str:
    return bytes(data[start:end]).decode("utf-8")


def graph_span(data: memoryview) -> tuple[int, int] | None:
    """The GraphProto inside a ModelProto, or None."""
    return next((span for field, span in fields(data, 0, len(data)) if field == MODEL_GRAPH), None)


def external_data(path: Path) -> list[tuple[str, dict[str, str]]]:
    """(name, {key: value}) of every initializer of the model at `path`, in file order."""
    out = []
    with graph_fields(path, GRAPH_INITIALIZER) as (data, spans):
        for start, end in spans:
            name, entries = "", {}
            for field, span in fields(data, start, end):
                if field == TENSOR_NAME:
                    name = string(data, *span)
                elif field == TENSOR_EXTERNAL_DATA:
                    entry = dict(fields(data, *span))
                    entries[string(data, *entry[1])] = string(data, *entry[2]) if 2 in entry else ""
            out.append((name, entries))
    return out


def nodes(path: Path, op_type: str) -> list[tuple[int, dict[str, int]]]:
    """(number of inputs, {attribute: integer value}) of every `op_type` node of the model at `path`
    (empty inputs counted, as ONNX Runtime counts them; only integer attributes are read)."""
    out = []
    with graph_fields(path, GRAPH_NODE) as (data, spans):
        for start, end in spans:
            parts = list(fields(data, start, end))
            if not any(f == NODE_OP_TYPE and string(data, *span) == op_type for f, span in parts):
                continue
            attributes = {}
            for f, span in parts:
                if f == NODE_ATTRIBUTE:
                    attribute = dict(fields(data, *span, varints=True))
                    if ATTRIBUTE_NAME in attribute and ATTRIBUTE_INT in attribute:
                        attributes[string(data, *attribute[ATTRIBUTE_NAME])] = attribute[ATTRIBUTE_INT]
            out.append((sum(f == NODE_INPUT for f, _ in parts), attributes))
    return out


@contextmanager
def graph_fields(path: Path, number: int) -> Iterator[tuple[memoryview, list[tuple[int, int]]]]:
    """The file mapped read-only (without readahead: only the pages walked are read, not the weights
    beside them) and the spans of its graph's fields numbered `number` (initializers, nodes, ...)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        if hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        data = memoryview(mapped)
        try:
            graph = graph_span(data)
            yield data, [span for field, span in (fields(data, *graph) if graph else ()) if field == number]
        finally:
            data.release()
