"""ONNX external data with 4 KiB-aligned tensor offsets: how graphs over protobuf's 2 GB limit are stored.

Contract: `move_to_external(model, out, location)` writes every initializer of at least `INLINE_MAX`
bytes (subgraphs included) into `out` at an offset aligned to `ALIGN`, points the tensor at it and
drops its bytes from the proto: the passed `ModelProto` is modified in place, as
`onnx.save_model(save_as_external_data=True)` does, so a multi-GB graph is never held twice.
Alignment matters because ONNX Runtime maps external data with mmap only when offsets are
page-aligned, and onnx 1.23's own writer does not align (no alignment option in
`convert_model_to_external_data` or `save_model`). One data file per graph keeps per-expert paging
and per-file checksums honest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto
from onnx.external_data_helper import set_external_data

from edgemoe.bundle.entries import BundleError
from edgemoe.bundle.hashing import HashingWriter

ALIGN = 4096  # the page size ORT needs to mmap (Linux x86/ARM); Windows would want 64 KiB
INLINE_MAX = 1024  # smaller tensors stay in the .onnx, as onnx's size_threshold does
PROTOBUF_LIMIT = 2**31 - 1  # one serialized message, per protobuf
_HEADROOM = 64 << 20  # nodes, names and small tensors that are not counted below


@dataclass(frozen=True)
class ExternalTensor:
    """Where one initializer's bytes live, as the .onnx file records it."""

    name: str
    location: str
    offset: int
    length: int


def initializers(graph: GraphProto) -> Iterator[TensorProto]:
    """Initializers of `graph` and of every subgraph (If/Loop/Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from initializers(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from initializers(g)


def needs_external(model: ModelProto) -> bool:
    """Whether `model` would not fit one protobuf message with its weights inline."""
    # ByteSize per tensor: len(t.raw_data) would copy every tensor just to measure it.
    weights = sum(t.ByteSize() for t in initializers(model.graph))
    return weights + _HEADROOM > PROTOBUF_LIMIT


def check_self_contained(model: ModelProto, what: str) -> None:
    """Refuse a graph whose weights still live in files outside the bundle."""
    for t in initializers(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            raise BundleError(f"{what}: tensor {t.name!r} refers to external data not loaded into memory; "
                              "load the model with onnx.load(..., load_external_data=True)")


def move_to_external(model: ModelProto, out: HashingWriter, location: str, align: int = ALIGN) -> int:
    """Write large initializers to `out` at aligned offsets; returns how many moved."""
    moved = 0
    for t in initializers(model.graph):
        if not t.HasField("raw_data") or t.ByteSize() < INLINE_MAX:
            continue  # typed fields (float_data...) are rare in exported graphs and stay inline
        out.pad_to(align)
        offset = out.size
        data = t.raw_data
        out.write(data)
        set_external_data(t, location, offset=offset, length=len(data))
        t.ClearField("raw_data")
        moved += 1
    return moved


def external_tensors(model: ModelProto) -> list[ExternalTensor]:
    """The external-data records of a graph loaded with `load_external_data=False` (for checks and inspect)."""
    found = []
    for t in initializers(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {kv.key: kv.value for kv in t.external_data}
        found.append(ExternalTensor(t.name, info["location"], int(info.get("offset", 0)),
                                    int(info.get("length", 0))))
    return found


def parse_model(data: bytes, what: str) -> ModelProto:
    try:
        return onnx.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends: the bytes are not a model
        raise BundleError(f"{what}: not an ONNX model ({type(e).__name__}: {e})") from None
