"""Process and session memory hygiene for many small ONNX Runtime sessions, in one place.

Contract: `configure_process()` is called once at start-up, before the first session exists; it
sets glibc's mmap threshold so that weight-sized allocations are mmapped and go back to the OS when a
session is freed (glibc otherwise keeps freed heap: 16 live int4 sessions left 292 MB retained), and,
if asked, creates ORT's global thread pools. `trim_heap()` / `HeapTrimmer` hand retained heap back
after evictions. `session_options(threads)` is the one set of options every session of the process
uses (`shared_arena_options` adds one shared arena for sessions with a large per-call scratch) (the runtime's trunk sessions import it too): no CPU arena (each session's arena keeps its peak
activations), no spinning (an idle pool spinning on the cores the next session needs measured
3.4 -> 2.5 ms per MoE layer), and either the global pool or `threads` intra-op threads.
`cache_dtype(session)` is the element type an attention graph keeps its KV cache in ("float32" or
"float16", as the export chose). Everything is a no-op where it does not apply (no glibc: macOS, musl, Windows).

What onnxruntime's Python API (1.32) offers, checked against the installed package:
  * `onnxruntime.set_global_thread_pool_sizes(intra, inter)` + `SessionOptions.use_per_session_threads
    = False`: one process-wide pool. It can be set once, before any session uses it (a second call
    fails: "Global thread pools have already been created"). Its spin control is NOT exposed (the C
    API's SetGlobalSpinControl / SetGlobalDenormalAsZero are not bound), and sessions on the global
    pool ignore "session.intra_op.allow_spinning": the global pool always spins. Measured here (2
    shared cores, 8 small sessions run back to back): per-session pools without spinning 120-150 us
    per run, the global pool 250-410 us. So the default is per-session pools with spinning off; the
    global pool is opt-in (`configure_process(global_threads=n)`), for processes with many more
    sessions than cores where idle threads cost more than spinning.
  * `create_and_register_allocator(OrtMemoryInfo, OrtArenaCfg)` + session config
    "session.use_env_allocators" = "1": one shared arena allocator. Not used: with the arena off,
    activations go to malloc, which the mmap threshold returns to the OS; a shared arena would keep
    the largest activation (an image prefill) for the life of the process.
  * `enable_cpu_mem_arena`, `add_session_config_entry`, `intra_op_num_threads` as documented.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from typing import Any, Callable

from edgemoe.attention_ports import CACHE_INPUTS
from edgemoe.offload.errors import OffloadError

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's own default before it adapts upward, pinned so it cannot
TRIM_EVERY = 64 << 20  # bytes freed between heap trims (a trim walks the heap: not free)

_state_lock = threading.Lock()
_global_threads: int | None = None  # intra-op size of the global pool, once created
_arena_registered = False  # the shared CPU arena of `shared_arena_options`
_threads: int | None = None  # the process's intra-op thread count, once a caller chose one (--threads)
_libc: Any = None


def glibc() -> Any:
    """glibc via ctypes (errno kept for `ctypes.get_errno`), or None where the C library is not glibc."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                lib.gnu_get_libc_version  # only glibc has it (musl has mallopt as a stub)
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc or None


def default_threads() -> int:
    """Intra-op threads: the count `configure_process(threads=)` chose, else EDGEMOE_THREADS, else the
    cores this process may use."""
    if _threads is not None:
        return _threads
    env = os.environ.get("EDGEMOE_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_process(mmap_threshold: int = MMAP_THRESHOLD, global_threads: int | None = None,
                      threads: int | None = None) -> bool:
    """Set the mmap threshold, the intra-op `threads` of sessions made from now on (if given), and
    create ORT's global pool of `global_threads` (if given).

    Returns whether the mmap threshold was set (False without glibc). Safe to call again.
    """
    global _threads
    if threads is not None:
        _threads = max(1, int(threads))
    lib = glibc()
    ok = bool(lib is not None and lib.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1)
    if lib is not None and not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; freed sessions may stay in the heap", mmap_threshold)
    if global_threads is not None:
        use_global_thread_pool(global_threads)
    return ok


def use_global_thread_pool(threads: int | None = None) -> bool:
    """Create ORT's process-wide intra-op pool; False if one already exists with another size."""
    global _global_threads
    import onnxruntime as ort

    threads = threads or default_threads()
    with _state_lock:
        if _global_threads is not None:
            return _global_threads == threads
        try:
            ort.set_global_thread_pool_sizes(threads, 1)
        except Exception as exc:  # ORT's Fail: pools already created by someone else
            log.warning("cannot create ORT's global thread pool: %s", str(exc).splitlines()[0])
            return False
        _global_threads = threads
        return True


def trim_heap() -> bool:
    """Return free heap to the OS (`malloc_trim(0)`); whether anything was released."""
    lib = glibc()
    return bool(lib is not None and lib.malloc_trim(0))


class HeapTrimmer:
    """An `on_evict` hook for `ExpertCache`: trims the heap once `every` bytes have been freed."""

    def __init__(self, every: int = TRIM_EVERY, trim: Callable[[], bool] = trim_heap) -> None:
        self.every, self._trim = every, trim
        self._freed = 0
        self.trims = 0
        self._lock = threading.Lock()

    def __call__(self, freed_bytes: int) -> None:
        with self._lock:
            self._freed += freed_bytes
            if self._freed < self.every:
                return
            self._freed = 0
            self.trims += 1
        self._trim()


def session_options(threads: int | None = None) -> Any:
    """Fresh `onnxruntime.SessionOptions` with the process's hygiene (module docstring)."""
    import onnxruntime as ort  # here: importing the offload package must not need onnxruntime

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 3  # ORT warns about every unused initializer; the library logs its own errors
    if _global_threads is not None and threads in (None, _global_threads):
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def shared_arena_options(threads: int | None = None) -> Any:
    """`session_options(threads)` whose sessions allocate from one process-wide CPU arena (registered on
    first use), for graphs whose every call allocates the same large scratch. The case: ORT's CPU
    GroupQueryAttention over an fp16 KV cache converts the cached keys and values to fp32 on each call
    (positions x KVH x D x 8 bytes, 10 MB per layer at 633 StableLM positions); from malloc, with the mmap
    threshold pinned, every call maps fresh memory and faults it in (measured 6.0 ms per layer against 1.1
    ms from the arena). One arena for all such sessions holds one call's scratch, not one per session;
    callers shrink it after a large call (`shrink_arena`) so a prefill's peak does not stay."""
    import onnxruntime as ort

    global _arena_registered
    with _state_lock:
        if not _arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
            _arena_registered = True
    so = session_options(threads)
    so.add_session_config_entry("session.use_env_allocators", "1")
    return so


def shrink_arena() -> Any:
    """Run options that hand the shared arena's free memory back once the call is done."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def create_session(model: bytes | str | os.PathLike[str], options: Any | None = None) -> Any:
    """An `InferenceSession` on the CPU EP from serialized bytes or a path (external data needs a path)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options or session_options(), providers=["CPUExecutionProvider"])


def session_factory(threads: int | None = None) -> Callable[[bytes | str], Any]:
    """A `session_factory` for `OnnxExpertStore`: every expert session gets `session_options(threads)`."""
    def make(model: bytes | str) -> Any:
        return create_session(model, session_options(threads))
    return make


_CACHE_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def cache_dtype(sess: Any) -> str:
    """The numpy dtype of an attention graph's KV cache (its `past_key` input, or `past_latent` for the
    rows interface of runtime.attention_call): float32 or float16."""
    kind = next(i.type for i in sess.get_inputs() if i.name in CACHE_INPUTS)
    try:
        return _CACHE_TYPES[kind]
    except KeyError:
        raise OffloadError(f"an attention graph's KV cache is {kind}; this runtime reads float and "
                           "float16") from None
