"""Prepacked expert graphs: ORT's packed weight layout for this machine, written once, mapped on every run.

Contract: `PrepackedGraphs.ensure(sha256, source)` returns the path of a graph equivalent to the
bundle's expert graph `source` (same outputs, bit for bit) whose weights are the blobs ONNX Runtime's
kernels pack them into (`session.save_external_prepacked_constant_initializers`). A session opened
on it maps those blobs from the file instead of packing a private copy, which is what lets the
runtime page an expert's weights in and out (`edgemoe.offload.mapped`) without ever building a
session again. The packed layout depends on the CPU's kernels and on ORT's version, so the files
live in a per-machine cache (`machine_signature()`), keyed by the expert file's sha256: produced on
the machine that runs them (a first-run step), never at export time, and shared by every bundle
holding the same expert. A graph is written into a temporary directory and renamed into place, its
data file first, and then both files' stat identities are recorded in the directory's `HashLedger`
as made from `sha256`: a twin counts as present only while both files are exactly as written (an
interrupted preparation, a truncated or rewritten file, or a cache from before the ledger is
prepared again), so the file that runs is checked on every run for the price of two `stat`s.

Where: `$EDGEMOE_CACHE_DIR`, else `$XDG_CACHE_HOME/edgemoe`, else `~/.cache/edgemoe`, under
`prepacked/<signature>/`. The data file holds the original quantized weights as well as the packed
ones (ORT reads the originals at session creation): about twice the expert's bytes on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from edgemoe.bundle.ledger import HashLedger, file_identity
from edgemoe.bundle.onnx_wire import external_data
from edgemoe.cache_dir import cache_root
from edgemoe.page_cache import drop_cached, sync_and_drop

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PREPACKED_KEY = "prepacked"  # external_data keys ORT writes for packed blobs: "prepacked_0", ...
SESSION_OVERHEAD = 1 << 20  # private bytes of one idle expert session (measured ~0.5 MB for int4)

SessionOptionsFactory = Callable[[], Any]


def cpu_description() -> str:
    """The CPU model and feature flags (Linux: /proc/cpuinfo), which decide the packed layout."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model.startswith("model:"):
                    model = "model:" + value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if flags and model.startswith("model:"):
                    break
    except OSError:
        pass
    return f"{platform.machine()} {model} {flags}"


def machine_signature() -> str:
    """16 hex digits naming this machine's packed layout: ORT version, CPU model and flags."""
    import onnxruntime as ort

    text = f"onnxruntime {ort.__version__} | {cpu_description()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pages_spanned(offset: int, length: int) -> int:
    """Bytes of the whole pages that `length` bytes at `offset` of a file lie on (what a mapping holds)."""
    first, end = offset // PAGE, -(-(offset + length) // PAGE)
    return (end - first) * PAGE


class PrepackedGraphs:
    """The per-machine directory of prepacked expert graphs (module docstring)."""

    def __init__(self, root: Path | None = None, signature: str | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "prepacked" / (signature or machine_signature())

    @cached_property
    def ledger(self) -> HashLedger:
        """The twins' record, read on first use (callers that only need paths never parse it)."""
        return HashLedger(self.root / "ledger.jsonl")

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.onnx"

    def exists(self, sha256: str) -> bool:
        """Whether the twin of `sha256` is complete and unchanged since it was written."""
        try:
            return all(self.ledger.attests(f, file_identity(f), sha256) for f in self._files(sha256))
        except OSError:
            return False

    def _files(self, sha256: str) -> tuple[Path, Path]:
        graph = self.path(sha256)
        return graph, data_file(graph)

    def ensure(self, sha256: str, source: Path, options: SessionOptionsFactory) -> Path:
        """The prepacked graph for expert file `source` (content `sha256`), written if missing."""
        target = self.path(sha256)
        if self.exists(sha256):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".prepack-", dir=target.parent))
        try:
            graph, data = write_prepacked(Path(source), tmp, sha256, options)
            os.replace(data, target.parent / data.name)  # data first: a graph file implies its data
            os.replace(graph, target)
            # Written pages are dirty in the page cache: write them out and drop them, so a first run
            # does not hold the whole prepacked cache (about twice the experts) beyond its budget.
            sync_and_drop([target.parent / data.name, target])
            drop_cached(source)  # ORT read the bundle's graph to pack it
            for f in self._files(sha256):
                self.ledger.record(f, file_identity(f), sha256)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.debug("prepacked %s -> %s", source, target)
        return target


def write_prepacked(source: Path, directory: Path, stem: str, options: SessionOptionsFactory) -> tuple[Path, Path]:
    """Open `source` once with ORT's prepacked-saving options; returns (graph, data) in `directory`."""
    import onnxruntime as ort

    graph, data = directory / f"{stem}.onnx", directory / f"{stem}.bin"
    so = options()
    so.optimized_model_filepath = str(graph)
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "0")
    ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    if not graph.is_file() or not data.is_file():
        raise OSError(f"onnxruntime did not write a prepacked graph for {source.name}")
    return graph, data


def data_file(graph: Path) -> Path:
    """The data file a prepacked graph's weights live in."""
    return graph.with_suffix(".bin")


def mapped_bytes(graph: Path) -> int:
    """Bytes a session on `graph` maps from its data file, page-rounded: each packed blob, and each
    external tensor that no packed blob replaces (ORT maps those as they are)."""
    total = 0
    for _, entries in external_data(graph):
        packed = [v for k, v in entries.items() if k.startswith(PREPACKED_KEY)]
        if packed:
            total += sum(pages_spanned(*part) for v in packed for part in packed_parts(v))
        elif "length" in entries:
            total += pages_spanned(int(entries.get("offset", 0)), int(entries["length"]))
    return total


def packed_parts(value: str) -> list[tuple[int, int]]:
    """(offset, length) of every buffer of one of ORT's prepacked entries, "<kernel>+hash|offset;length;..|..":
    a kernel may pack one weight into several (MatMulNBits: one; QMoE: the experts' packed weights, then
    a 56-byte header)."""
    return [(int(fields[0]), int(fields[1])) for fields in (part.split(";") for part in value.split("|")[1:])]
