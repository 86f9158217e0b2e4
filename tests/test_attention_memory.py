"""The attention graphs at run time: an fp16 KV cache decodes without faulting in fresh memory on every
call, and a decoded token's reused binding (runtime.attention_call) gives what a fresh binding gives.

ORT's CPU GroupQueryAttention over an fp16 cache converts the cached keys and values to fp32 scratch on
each call. From malloc, with the process's mmap threshold pinned at 128 KiB, that scratch is a fresh
mapping every call (one minor fault per page, measured 6.0 against 1.1 ms per StableLM layer at 633
positions); the trunk's attention sessions share one ORT arena instead, shrunk after each prefill and by
the first layer of each decoded token.
"""

from __future__ import annotations

import resource

import numpy as np

from edgemoe.bundle import Bundle
from edgemoe.runtime.sessions import configure_process
from edgemoe.runtime.trunk import Trunk
from test_runtime_fixtures import tiny  # noqa: F401 (fixture)

CONTEXT = 3000  # positions: the tiny model's scratch is 512 B each, 1.5 MB in all (> the mmap threshold)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_decoding_from_an_fp16_cache_reuses_its_scratch(tiny) -> None:
    """Every attention layer but a token's first reuses the arena's scratch: the first hands the arena's
    free memory back (its scratch grows with the positions; see the next tests), so it alone faults its
    scratch in again, once a token."""
    configure_process()
    trunk = Trunk.open(Bundle.open(tiny.bundle("stablelm", "int4")))
    layers = trunk.config.num_layers
    assert layers >= 2
    cache = trunk.new_cache(CONTEXT + 64)
    assert cache.dtype == np.float16  # a quantized bundle's default
    x = np.random.default_rng(0).standard_normal((CONTEXT, trunk.config.hidden_size)).astype(np.float32)
    for n in range(layers):
        trunk.attention(n, x, cache)
    cache.advance(CONTEXT)
    faults: dict[int, int] = {n: 0 for n in range(layers)}
    for token in range(21):
        for n in range(layers):
            before = _faults()
            trunk.attention(n, x[:1], cache)
            if token:  # the first decoded token sizes the arena
                faults[n] += _faults() - before
        cache.advance(1)
    scratch_pages = CONTEXT * cache.layout.heads * cache.layout.dim * 8 // 4096
    later = sum(faults[n] for n in range(1, layers)) / (20 * (layers - 1))
    assert later < scratch_pages / 10, f"{later:.1f} minor faults per call (scratch {scratch_pages} pages)"


def _fresh_binding_step(trunk: Trunk, n: int, x: np.ndarray, cache) -> tuple[np.ndarray, np.ndarray]:
    """One position through a binding built for this call alone (the prefill path with S = 1)."""
    return trunk._attention_calls[n]._prefill(n, x, cache)


def test_the_reused_decode_binding_equals_a_fresh_one_and_follows_a_grown_cache(tiny) -> None:
    trunk = Trunk.open(Bundle.open(tiny.bundle("stablelm", "int4")))
    rng = np.random.default_rng(1)
    prompt = rng.standard_normal((5, trunk.config.hidden_size)).astype(np.float32)
    steps = rng.standard_normal((4, 1, trunk.config.hidden_size)).astype(np.float32)
    caches = [trunk.new_cache(6), trunk.new_cache(6)]
    for cache in caches:
        trunk.attention(0, prompt, cache)
        cache.advance(5)
    for i, x in enumerate(steps):
        if i == 1:  # grow both caches: new buffers, which the reused binding must follow
            for cache in caches:
                cache.reserve(16)
        reused = trunk.attention(0, x, caches[0])
        fresh = _fresh_binding_step(trunk, 0, x, caches[1])
        for got, want in zip(reused, fresh):
            np.testing.assert_array_equal(got, want)
        for cache in caches:
            cache.advance(1)
        np.testing.assert_array_equal(caches[0].keys[0][:, :, :cache.length], caches[1].keys[0][:, :, :cache.length])
    assert not np.array_equal(reused[0], trunk.attention(0, steps[0], caches[0])[0])  # inputs are read per call


def test_the_first_layer_of_each_decoded_token_shrinks_the_shared_arena_and_computes_the_same(tiny) -> None:
    """Each decoded token's first attention call hands the shared arena's free memory back: its per-call
    scratch grows with the positions, and on full DeepSeek-VL2-Small the arena grew 5 MB a token without
    this (a 64-token answer crossed a 3 GB budget by 9%). The bits must not change."""
    trunk = Trunk.open(Bundle.open(tiny.bundle("stablelm", "int4")))
    rng = np.random.default_rng(2)
    prompt = rng.standard_normal((5, trunk.config.hidden_size)).astype(np.float32)
    caches = [trunk.new_cache(8), trunk.new_cache(8)]
    for cache in caches:
        for n in (0, 1):
            trunk.attention(n, prompt, cache)
        cache.advance(5)
    options: list[tuple[str, object]] = []
    for n in (0, 1):
        session = trunk.attn[n]
        run = session.run_with_iobinding

        def spy(binding, run_options=None, _run=run, _n=n):
            options.append((_n, run_options))
            return _run(binding, run_options)

        session.run_with_iobinding = spy
    x = rng.standard_normal((1, trunk.config.hidden_size)).astype(np.float32)
    for n in (0, 1):
        shrunk = trunk.attention(n, x, caches[0])  # through the trunk: layer 0 is first
        plain = trunk._attention_calls[n](n, x, caches[1], first=False)
        for got, want in zip(shrunk, plain):
            np.testing.assert_array_equal(got, want)
    shrinks = [(n, o is not None and o.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0")
               for n, o in options]
    assert shrinks == [(0, True), (0, False), (1, False), (1, False)]
