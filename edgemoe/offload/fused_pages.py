"""Where each expert's packed weights lie inside a fused layer's mapping, and paging them one expert at a time.

Contract: `expert_spans(graph, experts)` reads a prepacked QMoE graph's external-data table and this
process's mappings of its data file (the layer's session must be open) and returns, per expert, the
page-aligned (address, length, file offset) spans of its packed weights: every prepacked blob of the
layer holds the experts one after another, `length / experts` bytes each (measured with `mincore` on
DeepSeek-VL2-Tiny: a call routed to experts {10, 20, ..., 63} faults in exactly those experts' page
spans of both blobs, and none of the original scales, which the packed blobs carry; the tests check
it on every run). A blob that does not divide evenly
is refused (`OffloadError`), since its layout would then be unknown. Neighbouring experts may share
a boundary page: each counts it, so a budget counts at most two pages per blob more than is resident.

`ExpertPages` pages one expert in and out as `offload.mapped.PageResidency` does a mapped expert's
ranges (POSIX_FADV_WILLNEED, then MADV_POPULATE_READ or reads; MADV_DONTNEED, then dropped from the
page cache). Unlike a mapped expert's own file, the layer's data file is shared: page-in drops
nothing outside the spans (another expert's pages may be arriving there) and page-out drops only
its own spans. A shared boundary page dropped while the neighbour runs is faulted back from the
file: correct, and within what the neighbour counts. `page_out_all(path)` releases every mapped
range of a data file, which a freshly built session has faulted in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemoe.bundle.onnx_wire import external_data
from edgemoe.offload.errors import OffloadError
from edgemoe.offload.mapped import MADV_DONTNEED, MADV_RANDOM, PageResidency, _madvise_fn, find_mappings
from edgemoe.offload.prepacked import PAGE, PREPACKED_KEY, data_file, packed_parts
from edgemoe.page_cache import drop_cached, resident_range_bytes

Span = tuple[int, int, int]  # (address, length, file offset), page-aligned


def _blobs(graph: Path) -> list[tuple[int, int]]:
    """(file offset, length) of the weights blob of every prepacked initializer of the graph: the largest
    of the buffers its kernel packed ("<kernel>|offset;length;..|offset;length;.."; QMoE writes the
    experts' packed weights and a 56-byte header, which stays mapped and shared)."""
    return [max(packed_parts(value), key=lambda part: part[1])
            for _, entries in external_data(graph) for key, value in entries.items() if key.startswith(PREPACKED_KEY)]


def expert_spans(graph: Path, experts: int) -> list[tuple[Span, ...]]:
    """Per expert, its page spans in the layer's mapped packed blobs (module docstring)."""
    maps = find_mappings(data_file(graph))
    per_expert: list[list[Span]] = [[] for _ in range(experts)]
    for offset, length in _blobs(graph):
        if length % experts:
            raise OffloadError(f"{graph.name}: a packed blob of {length} bytes does not hold {experts} equal experts")
        base = next(((a, o) for a, n, o in maps if o <= offset and offset + length <= o + n), None)
        if base is None:
            raise OffloadError(f"{graph.name}: the packed blob at {offset} is not mapped (is its session open?)")
        stride = length // experts
        for e in range(experts):
            start = (offset + e * stride) // PAGE * PAGE
            end = -(-(offset + (e + 1) * stride) // PAGE) * PAGE
            per_expert[e].append((base[0] + start - base[1], end - start, start))
    return [tuple(spans) for spans in per_expert]


@dataclass
class ExpertPages(PageResidency):
    """One expert's spans in a fused layer's shared data file (module docstring): paged in and out as a
    mapped expert's ranges are, but the rest of the file belongs to other experts."""

    shared: bool = True

    def resident(self) -> int:
        """Bytes of the spans in memory (`mincore`: a span is part of a larger mapping)."""
        return sum(resident_range_bytes(address, length) or 0 for address, length, _ in self.ranges)


def page_out_all(path: Path) -> None:
    """Release every range this process maps from `path` (no read-around on later faults), and drop the
    file from the page cache: a new session faulted its weights in while it was built."""
    libc: Any = _madvise_fn()
    for address, length, _ in find_mappings(path):
        libc.madvise(address, length, MADV_RANDOM)
        libc.madvise(address, length, MADV_DONTNEED)
    drop_cached(path)
