"""One call of a layer's attention graph, bound to the layer's KV cache buffer in place.

Contract: `AttentionCall(session, name)` runs S positions of a layer's attention graph starting at the
cache's length, and returns fresh (h, m) arrays [S, H]; it writes the S new rows into layer n's cache
buffer and never advances the cache. It takes either attention interface the exporter writes:

- in place (`edgemoe.export.trunk_graphs`, ORT's GroupQueryAttention): x, position_ids, seqlens_k,
  total_len, past_*/present_*. The layer's whole buffer is bound as both past and present, and ORT writes
  the new rows in place and copies nothing.
- rows (`edgemoe.export.latent_attention_graph`, MLA): x, position_ids, past_latent [1,T,W] ->
  new_latent [1,S,W]. past_latent is bound to the buffer's first T rows and new_latent to rows T..T+S-1
  of the same memory: the context is read where it lies and the new rows land in the cache, no copy.

Why two paths by length: a decoded token (S = 1) runs 24+ attention graphs, and building an IOBinding
per call (four small input OrtValues, two ORT-allocated outputs, then wrapping them) measured about
130 us of Python and allocation per layer on a 2-core Zen 4, 3 ms of a 72 ms token. So one binding per
layer is built once for S = 1, over preallocated numpy arrays that each call only writes into, and is
rebuilt only when the cache's buffers are replaced (a reserve that grows them); the rows interface
re-points its two cache ports each call (two pointer binds). Prefills (S > 1, a few calls per prompt)
bind afresh and hand the shared arena's scratch back (`shrink_arena`).

The shared arena is also shrunk by the first layer of every decoded token (`__call__(..., first=True)`):
each call's scratch is a little larger than the last (it scales with the positions), and the arena
kept growing by about 180 KB a call on DeepSeek-VL2-Small (5 MB a token, 0.3 GB over a 64-token answer,
which broke a 3 GB memory budget by 9%). One shrink per token bounds it to one token's calls, for
one re-faulted scratch a token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgemoe.attention_ports import (NEW_ROWS, PAST_KEY, PAST_ROWS, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, SEQLENS_K,
                                     TOTAL_LEN)
from edgemoe.runtime.kv_cache import KVCache
from edgemoe.runtime.sessions import RuntimeGraphError, one_line, shrink_arena

CACHE_PORTS = ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE))


def uses_rows(session: Any) -> bool:
    """Whether an attention session has the rows interface (else the in-place one)."""
    return any(i.name == PAST_ROWS for i in session.get_inputs())


class AttentionCall:
    """Calls of one layer's attention session (module docstring)."""

    def __init__(self, session: Any, name: str) -> None:
        self.session, self.name = session, name
        self.rows = uses_rows(session)
        self._decode: Any = None  # the S = 1 IOBinding, once built
        self._bound_to: tuple[Any, Any] | None = None  # the cache OrtValues it binds (in place)
        self._x = self._pos = self._seqlens = self._total = self._h = self._m = None

    def __call__(self, n: int, x: np.ndarray, cache: KVCache, first: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """x [S, H] at positions cache.length.. -> (h, m) [S, H]; writes rows into layer n's cache. `first`:
        the first attention layer of a forward pass, which hands the shared arena's free memory back."""
        s, start = x.shape[0], cache.length
        if start + s > cache.capacity:
            raise RuntimeGraphError(f"KV cache overflow: {start + s} positions > capacity {cache.capacity}")
        if s == 1:
            return self._decode_step(n, x, cache, first)
        return self._prefill(n, x, cache)

    def _run(self, binding: Any, options: Any = None) -> None:
        try:
            self.session.run_with_iobinding(binding, options)
        except Exception as exc:
            raise RuntimeGraphError(f"graph {self.name} failed: {one_line(exc)}") from None

    def _bind_cache(self, binding: Any, n: int, cache: KVCache, s: int) -> None:
        """The layer's cache ports: the whole buffers in place, or (rows) the valid rows and the next s."""
        if self.rows:
            rows = cache.keys[n].reshape(-1, cache.keys[n].shape[-1])  # [MAX, W], a view
            width, dtype = rows.shape[1], rows.dtype
            binding.bind_input(PAST_ROWS, "cpu", 0, dtype, [1, cache.length, width], rows.ctypes.data)
            binding.bind_output(NEW_ROWS, "cpu", 0, dtype, [1, s, width], rows[cache.length:].ctypes.data)
            return
        for (past, present), value in zip(CACHE_PORTS, (cache.ort_keys[n], cache.ort_values[n])):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def _prefill(self, n: int, x: np.ndarray, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
        start, total = cache.length, cache.length + x.shape[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input("x", np.ascontiguousarray(x[None], np.float32))
        binding.bind_cpu_input("position_ids", np.arange(start, total, dtype=np.int64))
        if not self.rows:
            binding.bind_cpu_input(SEQLENS_K, np.array([total - 1], np.int32))
            binding.bind_cpu_input(TOTAL_LEN, np.array(total, np.int32))
        binding.bind_output("h", "cpu")
        binding.bind_output("m", "cpu")
        self._bind_cache(binding, n, cache, x.shape[0])
        self._run(binding, shrink_arena())  # a prefill's scratch goes back to the OS
        # Only h and m: copy_outputs_to_cpu() would also copy present_key/value, i.e. the whole KV
        # cache, every call (measured 2.2 ms per layer per token at 256 positions, 7 ms at 4096).
        h, m = binding.get_outputs()[:2]
        return h.numpy()[0], m.numpy()[0]

    def _decode_step(self, n: int, x: np.ndarray, cache: KVCache,
                     shrink: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if self._decode is None or self._replaced(n, cache):
            self._build_decode(x.shape[1], n, cache)
        start = cache.length
        self._x[0] = x  # the bound arrays are read by ORT at run time: write, then run
        self._pos[0] = start
        self._seqlens[0] = start
        self._total[()] = start + 1
        if self.rows:  # this token's context and its row: two pointers into the buffer
            self._bind_cache(self._decode, n, cache, 1)
        self._run(self._decode, shrink_arena() if shrink else None)
        return self._h[0].copy(), self._m[0].copy()

    def _replaced(self, n: int, cache: KVCache) -> bool:
        """Whether the in-place binding's cache buffers were replaced (a reserve grew them); the rows
        interface re-points its ports every call instead."""
        buffers = (cache.ort_keys[n], cache.ort_values[n])
        return not self.rows and any(a is not b for a, b in zip(self._bound_to, buffers))

    def _build_decode(self, hidden: int, n: int, cache: KVCache) -> None:
        self._x, self._h, self._m = (np.zeros((1, 1, hidden), np.float32) for _ in range(3))
        self._pos, self._seqlens, self._total = np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros((), np.int32)
        binding = self.session.io_binding()
        inputs = [("x", self._x), ("position_ids", self._pos)]
        if not self.rows:
            inputs += [(SEQLENS_K, self._seqlens), (TOTAL_LEN, self._total)]
        for name, array in inputs:
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in (("h", self._h), ("m", self._m)):
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        if not self.rows:
            self._bind_cache(binding, n, cache, 1)
        self._decode, self._bound_to = binding, (cache.ort_keys[n], cache.ort_values[n])
