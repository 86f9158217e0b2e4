"""BundleWriter: builds a bundle in a hidden sibling directory and moves it into place only when complete.

Contract: used as a context manager, in order: `__enter__` -> `add_*` (any number) -> `finish(...)`.
Files go into `.{name}.partial-<random>` next to the target; each is hashed and counted as it is
written (`HashingWriter`) and fsynced. `finish` writes manifest.json last, fsyncs the directories and
renames the whole tree into place, so a reader sees either no bundle or a complete one, never a
half bundle. An existing non-empty target is refused unless `overwrite=True`, and then only if it is
itself a bundle (has manifest.json): it is renamed aside, the new one renamed in, the old one deleted.
Any exception (KeyboardInterrupt included) before `finish` completes removes the temporary directory
and leaves the target as it was. Leaving the block without `finish` is an error, not a silent no-op.

Graphs whose weights exceed protobuf's 2 GB limit (or any graph, with `external_data=True`) are
written as `<stem>.onnx` + `<stem>.data` with 4 KiB-aligned offsets; the `.data` file is its own
entry (role "external_data"), named by the graph entry's `external_data` field.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from onnx import ModelProto, TensorProto, ValueInfoProto

from edgemoe.bundle.entries import MANIFEST_NAME, BundleError, FileEntry, TensorDecl, Validation, check_relpath
from edgemoe.bundle.external_data import check_self_contained, move_to_external, needs_external, parse_model
from edgemoe.bundle.hashing import HashingWriter, fsync_dir
from edgemoe.bundle.manifest import Manifest
from edgemoe.keys import ExpertKey

log = logging.getLogger(__name__)
_UNHASHED = "0" * 64  # placeholder while an entry is planned but not yet written


def expert_path(key: ExpertKey) -> str:
    return f"experts/{key}.onnx"


def graph_path(name: str) -> str:
    return f"graphs/{name}.onnx"


def data_path(graph: str) -> str:
    """The external-data file of a graph: experts/L2/E1.onnx -> experts/L2/E1.data."""
    return str(PurePosixPath(graph).with_suffix(".data"))


def declared(values: Iterable[ValueInfoProto], skip: set[str] = frozenset()) -> tuple[TensorDecl, ...]:
    """TensorDecls of graph inputs/outputs: dtype as ORT names it, symbolic dims as strings."""
    decls = []
    for v in values:
        if v.name in skip:
            continue
        tt = v.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        decls.append(TensorDecl(v.name, TensorProto.DataType.Name(tt.elem_type).lower(), shape))
    return tuple(decls)


class BundleWriter:
    """Writes one bundle atomically. See the module docstring for the order of calls."""

    def __init__(self, target: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.target = Path(os.path.abspath(target))
        self.overwrite = overwrite
        self.manifest: Manifest | None = None
        self._tmp: Path | None = None
        self._state = "new"  # new -> open -> finished | discarded
        self._entries: list[FileEntry] = []
        self._paths: set[str] = set()
        self._experts: set[ExpertKey] = set()
        self._dirs: set[Path] = set()

    # --- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> "BundleWriter":
        if self._state != "new":
            raise BundleError("a BundleWriter is entered once")
        _check_target(self.target, self.overwrite)  # fail before hours of export, not after
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _make_temp(self.target)
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state == "open":
            self._discard()
            if exc_type is None:
                raise BundleError(f"BundleWriter for {self.target} closed without finish(): nothing was written")
        return False  # never swallow the exception (KeyboardInterrupt included)

    def _discard(self) -> None:
        self._state = "discarded"
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _check_open(self) -> None:
        if self._state != "open":
            raise BundleError(f"BundleWriter is {self._state}: add files inside `with BundleWriter(...)`, "
                              "before finish()")

    # --- adding files --------------------------------------------------------------------------

    def add_onnx(self, relpath: str, model: ModelProto | bytes, *, role: str, layer: int | None = None,
                 expert: ExpertKey | None = None, precision: str | None = None,
                 inputs: Iterable[TensorDecl] | None = None, outputs: Iterable[TensorDecl] | None = None,
                 validation: Validation | None = None, external_data: bool | None = None) -> FileEntry:
        """Write a graph. inputs/outputs default to the graph's own declarations. external_data:
        None = only when the graph exceeds protobuf's 2 GB limit. Modifies `model` when external."""
        self._check_open()
        if isinstance(model, (bytes, bytearray)) and (inputs is None or outputs is None or external_data):
            model = parse_model(bytes(model), relpath)
        external = False
        if isinstance(model, ModelProto):
            check_self_contained(model, relpath)
            skip = {t.name for t in model.graph.initializer}  # IR < 4 lists initializers as inputs
            inputs = declared(model.graph.input, skip) if inputs is None else inputs
            outputs = declared(model.graph.output) if outputs is None else outputs
            external = needs_external(model) if external_data is None else external_data
        planned = self._reserve(FileEntry(relpath, role, 0, _UNHASHED, layer, expert, precision, tuple(inputs),
                                          tuple(outputs), validation, data_path(relpath) if external else None))
        if not external:
            return self._append(self._write_bytes(planned, model))
        data = self._reserve(FileEntry(planned.external_data, "external_data", 0, _UNHASHED))
        with self._new_file(data.path) as out:
            move_to_external(model, out, PurePosixPath(data.path).name)  # location is relative to the .onnx
            data = self._recorded(data, out)
        graph = self._write_bytes(planned, model)
        self._append(graph, data)
        return graph

    def add_expert(self, key: ExpertKey, model: ModelProto | bytes, *, precision: str | None,
                   validation: Validation | None = None, **kw: Any) -> FileEntry:
        """An expert graph at its contract path, experts/L{layer}/E{expert}.onnx."""
        return self.add_onnx(expert_path(key), model, role="expert", layer=key.layer, expert=key,
                             precision=precision, validation=validation, **kw)

    def add_graph(self, name: str, model: ModelProto | bytes, *, role: str, **kw: Any) -> FileEntry:
        """A trunk graph at graphs/<name>.onnx (what `Manifest.graph(name)` finds)."""
        return self.add_onnx(graph_path(name), model, role=role, **kw)

    def add_file(self, relpath: str, src: str | os.PathLike[str] | bytes, *, role: str = "other",
                 layer: int | None = None, precision: str | None = None) -> FileEntry:
        """Copy a file (streamed in chunks) or write bytes."""
        self._check_open()
        planned = self._reserve(FileEntry(relpath, role, 0, _UNHASHED, layer, precision=precision))
        with self._new_file(relpath) as out:
            if isinstance(src, (bytes, bytearray)):
                out.write(src)
            else:
                out.copy_from(Path(src))
            return self._append(self._recorded(planned, out))

    def add_array_file(self, relpath: str, arrays: Mapping[str, np.ndarray], *, role: str = "router",
                       precision: str | None = None) -> FileEntry:
        """Small arrays (router weights) as one safetensors file, stored as given (fp32 for routers)."""
        import safetensors.numpy  # here: only writers need it

        contiguous = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        return self.add_file(relpath, safetensors.numpy.save(contiguous), role=role, precision=precision)

    def add_tokenizer(self, src_dir: str | os.PathLike[str], names: Iterable[str]) -> list[FileEntry]:
        """Copy the named tokenizer files of a checkpoint to tokenizer/<name>."""
        return [self.add_file(f"tokenizer/{n}", Path(src_dir) / n, role="tokenizer") for n in names]

    # --- finishing -----------------------------------------------------------------------------

    def finish(self, *, model: Any, target: str, vision: Any = None, processor: Any = None,
               prompt: Any = None, tokenizer: Any = None, policy: Any = None,
               created_at: str | None = None) -> Manifest:
        """Write manifest.json and move the bundle into place. Blocks may be dicts or have to_dict()."""
        self._check_open()
        blocks = {name: _as_dict(value) for name, value in (("model", model), ("vision", vision),
                  ("processor", processor), ("prompt", prompt), ("tokenizer", tokenizer), ("policy", policy))}
        extra = {} if created_at is None else {"created_at": created_at}
        manifest = Manifest(target=target, files=tuple(self._entries), **blocks, **extra)
        with HashingWriter(self._tmp / MANIFEST_NAME) as out:  # last: its presence means complete
            out.write(manifest.to_json().encode("utf-8"))
            out.close()
        for d in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)  # the new files' directory entries, deepest first
        fsync_dir(self._tmp)
        self._install()
        self._state = "finished"
        fsync_dir(self.target.parent)
        self.manifest = manifest
        log.info("wrote bundle %s: %d files, %d bytes", self.target, len(manifest.files), manifest.total_bytes)
        return manifest

    def _install(self) -> None:
        _check_target(self.target, self.overwrite)  # again: someone may have written there meanwhile
        if not _is_nonempty_dir(self.target):
            os.replace(self._tmp, self.target)  # rename(2) replaces a missing or empty directory
            return
        old = self.target.parent / f".{self.target.name}.old-{secrets.token_hex(4)}"
        os.rename(self.target, old)
        try:
            os.rename(self._tmp, self.target)
        except BaseException:
            os.rename(old, self.target)  # put the old bundle back before reporting
            raise
        shutil.rmtree(old, ignore_errors=True)

    # --- internals -----------------------------------------------------------------------------

    def _reserve(self, entry: FileEntry) -> FileEntry:
        """Claim a path (and expert key) before writing, so duplicates fail before any bytes."""
        if entry.path in self._paths:
            raise BundleError(f"{entry.path} was added to the bundle twice")
        if entry.expert is not None and entry.expert in self._experts:
            raise BundleError(f"expert {entry.expert} was added to the bundle twice")
        self._paths.add(entry.path)
        if entry.expert is not None:
            self._experts.add(entry.expert)
        return entry

    @contextmanager
    def _new_file(self, relpath: str) -> Iterator[HashingWriter]:
        path = self._tmp / check_relpath(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._dirs.add(path.parent)
        with HashingWriter(path) as out:
            yield out

    def _write_bytes(self, planned: FileEntry, model: ModelProto | bytes) -> FileEntry:
        payload = model.SerializeToString() if isinstance(model, ModelProto) else model
        with self._new_file(planned.path) as out:
            out.write(payload)
            return self._recorded(planned, out)

    @staticmethod
    def _recorded(planned: FileEntry, out: HashingWriter) -> FileEntry:
        size, digest = out.close()
        return replace(planned, size=size, sha256=digest)

    def _append(self, *entries: FileEntry) -> FileEntry:
        self._entries.extend(entries)
        return entries[0]


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise BundleError(f"{target} exists and is not a directory")
    if not _is_nonempty_dir(target):
        return
    if not overwrite:
        raise BundleError(f"{target} exists and is not empty; pass overwrite=True to replace the bundle there")
    if not (target / MANIFEST_NAME).is_file():
        # overwrite replaces bundles, never an arbitrary directory someone pointed us at
        raise BundleError(f"{target} is not an edgemoe bundle (no manifest.json); refusing to replace it")


def _make_temp(target: Path) -> Path:
    """A fresh hidden sibling: same filesystem as the target, so the final rename is atomic."""
    while True:
        tmp = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
