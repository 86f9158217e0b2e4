"""A preallocated KV cache the attention graphs update in place.

Contract: one C-contiguous buffer [1, KVH, MAX, D] for keys and one for values per decoder layer, in
the attention graphs' cache dtype (float16 or float32, as the export chose), allocated once; a shared layout (MLA's latent [c | k_pe], `KVLayout.shared`) has one buffer
per layer that is both (`values[n] is keys[n]`), so it costs KVH x D values a position. The attention
graph takes the buffer as past_key and writes its new rows into the same memory as present_key
(IOBinding, see `trunk.Trunk.attention`), so a decoded token copies nothing: rows 0..length-1 hold
the context, rows past it are scratch. `buffers()` lists each distinct buffer once. `length` is the
number of valid rows; `truncate(n)` forgets rows (multi-turn reuse keeps a common prefix) and
`reserve(capacity)` grows the buffers by one copy when a conversation outgrows them.

Shape legend: KVH key/value heads, MAX capacity (positions), D head dim.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgemoe.model.config import KVLayout
from edgemoe.page_cache import resident_array_bytes


class KVCache:
    """Per-layer key and value buffers plus the number of valid positions."""

    def __init__(self, num_layers: int, layout: KVLayout, capacity: int, dtype: str = "float32") -> None:
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be positive, got {capacity}")
        self.num_layers, self.layout, self.dtype = num_layers, layout, np.dtype(dtype)
        self.length = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        shape = (1, self.layout.heads, capacity, self.layout.dim)
        self.keys = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
        self.values = self.keys if self.layout.shared else [np.zeros(shape, self.dtype)
                                                              for _ in range(self.num_layers)]
        # OrtValues wrapping (not copying) the numpy buffers: bound as both past_X and present_X.
        self.ort_keys = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.keys]
        self.ort_values = self.ort_keys if self.layout.shared else [ort.OrtValue.ortvalue_from_numpy(a)
                                                                     for a in self.values]

    def buffers(self) -> list[np.ndarray]:
        """Every distinct buffer: keys then values (keys alone when shared)."""
        return self.keys if self.layout.shared else self.keys + self.values

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.buffers())

    def resident_bytes(self) -> int:
        """The buffers' bytes resident in RAM now (np.zeros is lazily backed: only written pages count)."""
        sizes = [resident_array_bytes(a) for a in self.buffers()]
        return self.nbytes if None in sizes else sum(sizes)

    def room(self) -> int:
        return self.capacity - self.length

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions, keeping the valid rows (one copy, only when growing)."""
        if capacity <= self.capacity:
            return
        old, n = self.buffers(), self.length
        self._alloc(capacity)
        for new, was in zip(self.buffers(), old):
            new[:, :, :n] = was[:, :, :n]

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions (the rest become scratch)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def advance(self, n: int) -> None:
        """Record that `n` positions were written after the valid ones."""
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} + {n} > capacity {self.capacity}")
        self.length += n
