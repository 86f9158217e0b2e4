"""Safetensors files read lazily with numpy, bf16 included, and written tensor by tensor.

Contract: `SafetensorsFile(path)` parses only the header at open; `tensor(name)` reads that one tensor
into a fresh numpy array (bf16 widened to fp32), so a 6 GB checkpoint never sits in memory at once. `ShardedWriter` streams planned tensors into
shards of a bounded size and writes HF's `model.safetensors.index.json`, so a full-size checkpoint is
written with one tensor in memory at a time. The `safetensors` package's numpy loader rejects bf16, which is
what the published checkpoints store; hence this small reader of the (simple, documented) format.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import CheckpointError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int8): "I8",
          np.dtype(np.uint8): "U8"}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bf16 (stored as uint16) to fp32: bf16 is the top half of an fp32's bits."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round fp32 to bf16 (round-to-nearest-even), returned as uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One .safetensors file: header parsed at open, data mapped on first access."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.infos = self._read_header(path)

    @staticmethod
    def _read_header(path: Path) -> dict[str, TensorInfo]:
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise CheckpointError(f"{path} is not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER:
                    raise CheckpointError(f"{path} is not a safetensors file (header length {n})")
                header = json.loads(f.read(n))
            size = os.path.getsize(path)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read safetensors header of {path}: {exc}") from None
        infos = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = (8 + n + int(o) for o in meta["data_offsets"])
            if end > size:
                raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
            infos[name] = TensorInfo(meta["dtype"], tuple(meta["shape"]), start, end)
        return infos

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a fresh numpy array (fp32 for bf16).

        Read with pread, not mmap: a mapped file's touched pages count in the process's RSS until
        unmapped, and the exporter walks a whole 6 GB checkpoint under a memory limit.
        """
        info = self.infos[name]
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info.dtype}")
        count = int(np.prod(info.shape, dtype=np.int64))
        arr = np.empty(count, dtype=_DTYPES[info.dtype])
        view = memoryview(arr).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < view.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{self.path} is truncated while reading tensor {name}")
                done += n
        arr = arr.reshape(info.shape)
        return bf16_to_f32(arr) if info.dtype == "BF16" else arr

    def close(self) -> None:
        """Nothing to release: every read opens and closes the file."""


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]],
                  metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align data to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def _as_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return f32_to_bf16(x)
    return np.ascontiguousarray(x, dtype={"F32": np.float32, "F16": np.float16}.get(dtype, x.dtype))


ShardNameFn = Callable[[str, int, int], str]  # (prefix, shard index from 0, shard count) -> file name


class ShardedWriter:
    """Streams tensors, in a planned order, into shards of at most `shard_bytes` plus HF's index.

    The plan (name, shape, dtype of every tensor) is known up front, so each shard's header is
    written before its data and memory never holds more than the tensor being added.
    """

    def __init__(self, directory: Path, plan: list[tuple[str, tuple[int, ...], str]],
                 shard_bytes: int = 5 * 10**9, prefix: str = "model",
                 metadata: dict[str, str] | None = None, shard_name: ShardNameFn | None = None,
                 always_index: bool = False) -> None:
        self.directory = directory
        self.metadata = metadata  # the header's "__metadata__" (HF writes {"format": "pt"})
        self.shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
            if size and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        n = len(self.shards)
        self.always_index = always_index
        if shard_name is not None:  # a family's own naming (DeepSeek-VL2: -00001-of-000001, always indexed)
            self.files = [shard_name(prefix, i, n) for i in range(n)]
        else:
            self.files = [f"{prefix}.safetensors"] if n == 1 else \
                [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_size = sum(e[3] for shard in self.shards for e in shard)
        self.prefix = prefix
        self._order = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self._next = 0
        self._rows_done = 0  # rows of the next planned tensor already written by add_rows
        self._shard = -1
        self._out = None

    def add(self, name: str, x: np.ndarray) -> None:
        """Write the next planned tensor; names and shapes must follow the plan."""
        if self._rows_done:
            raise ValueError(f"writer is inside {self._order[self._next][1][0]} (add_rows); finish it first")
        i, (want, dtype, shape, nbytes) = self._order[self._next]
        if name != want or tuple(x.shape) != shape:
            raise ValueError(f"writer expected {want} {shape}, got {name} {tuple(x.shape)}")
        if i != self._shard:
            self._open_shard(i)
        data = _as_storage(x, dtype)
        assert data.nbytes == nbytes
        self._out.write(memoryview(data).cast("B"))
        self._next += 1

    def add_rows(self, name: str, block: np.ndarray) -> None:
        """Append the next rows (first dim) of the next planned tensor: tensors too big to hold whole
        (a 100k-row embedding) are written block by block; the plan check covers every block."""
        i, (want, dtype, shape, _) = self._order[self._next]
        end = self._rows_done + (block.shape[0] if block.ndim else 0)
        if name != want or block.ndim != len(shape) or tuple(block.shape[1:]) != shape[1:] or end > shape[0]:
            raise ValueError(f"writer expected rows {self._rows_done}.. of {want} {shape}, "
                             f"got {name} block {tuple(block.shape)}")
        if i != self._shard:
            self._open_shard(i)
        data = _as_storage(block, dtype)
        self._out.write(memoryview(data).cast("B"))
        self._rows_done = end
        if end == shape[0]:
            self._next += 1
            self._rows_done = 0

    def abort(self) -> None:
        """Close the open shard without finishing (the caller discards the partial files)."""
        if self._out is not None:
            self._out.close()
            self._out = None

    def _open_shard(self, i: int) -> None:
        if self._out is not None:
            self._out.close()
        self._out = open(self.directory / self.files[i], "wb")
        self._out.write(_header_bytes(self.shards[i], self.metadata))
        self._shard = i

    def close(self) -> list[Path]:
        """Finish the last shard and, when sharded, write the index."""
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} planned tensors")
        if self._out is not None:
            self._out.close()
        if len(self.files) > 1 or self.always_index:
            weight_map = {e[0]: self.files[i] for i, shard in enumerate(self.shards) for e in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            text = json.dumps(index, indent=2) + "\n"
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(text)
        return [self.directory / f for f in self.files]


def storage_dtype(x: np.ndarray, float_dtype: str) -> str:
    """The safetensors dtype a tensor is stored as: `float_dtype` for floats, else its own."""
    return float_dtype if np.issubdtype(x.dtype, np.floating) else _NAMES[np.dtype(x.dtype)]


def save_file(tensors: dict[str, np.ndarray], path: Path, dtype: str = "F32") -> None:
    """Write a small dict of tensors to one safetensors file (tests, tower directories)."""
    plan = [(name, tuple(x.shape), storage_dtype(x, dtype)) for name, x in tensors.items()]
    writer = ShardedWriter(path.parent, plan, shard_bytes=1 << 62, prefix=path.name.removesuffix(".safetensors"))
    for name, x in tensors.items():
        writer.add(name, x)
    writer.close()
