"""Fakes shared by the offload tests (no tests here): runners, a store whose loads the test controls, a clock.

A `FakeStore` load of a gated key blocks until the test sets that key's gate, so the prefetcher's
thread can be held mid-load deterministically; `started[key]` tells the test the load has begun.
Every wait on an Event has a generous timeout so a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from edgemoe.keys import ExpertKey
from edgemoe.offload.errors import ExpertLoadError

PATIENCE = 10.0  # seconds: only ever reached when something is broken


class FakeRunner:
    """runner(x) = x * (1 + 0.1 * expert + layer): each expert distinguishable, exact in float32."""

    def __init__(self, key: ExpertKey, nbytes: int) -> None:
        self.key, self.nbytes = key, nbytes

    def run(self, x: np.ndarray) -> np.ndarray:
        return x * np.float32(1 + 0.1 * self.key.expert + self.key.layer)

    __call__ = run


class FakeStore:
    """Sizes per key; records every load in order; gated keys block, failing keys raise."""

    def __init__(self, sizes: dict[ExpertKey, int], fail: Iterable[ExpertKey] = (), fail_times: int = 1) -> None:
        self.sizes = dict(sizes)
        self.loads: list[ExpertKey] = []
        self.gates: dict[ExpertKey, threading.Event] = {}
        self.started: dict[ExpertKey, threading.Event] = {k: threading.Event() for k in sizes}
        self.fail = {k: fail_times for k in fail}
        self.errors: list[ExpertLoadError] = []
        self.threads: list[str] = []
        self._lock = threading.Lock()

    def keys(self) -> tuple[ExpertKey, ...]:
        return tuple(sorted(self.sizes))

    def gate(self, key: ExpertKey) -> threading.Event:
        self.gates[key] = threading.Event()
        return self.gates[key]

    def size_of(self, key: ExpertKey) -> int:
        return self.sizes[key]

    def load(self, key: ExpertKey) -> FakeRunner:
        with self._lock:
            self.loads.append(key)
            self.threads.append(threading.current_thread().name)
        self.started[key].set()
        gate = self.gates.get(key)
        if gate is not None and not gate.wait(PATIENCE):
            raise AssertionError(f"test never opened the gate of {key}")
        with self._lock:
            if self.fail.get(key, 0) > 0:
                self.fail[key] -= 1
                self.errors.append(ExpertLoadError(key, "disk on fire"))
                raise self.errors[-1]
        return FakeRunner(key, self.sizes[key])


class FakeClock:
    """A clock that moves only when told (each call returns the current time)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def keys_of(layers: Iterable[int], experts: int) -> list[ExpertKey]:
    return [ExpertKey(layer, e) for layer in layers for e in range(experts)]


def expert_weights(key: ExpertKey, hidden: int, ffn: int):
    """Seeded SwiGLU weights for a real tiny expert graph (`quant.lowering.build_mlp`)."""
    from edgemoe.quant.graphs import MlpWeights

    rng = np.random.default_rng(10 * key.layer + key.expert)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return MlpWeights(up=w(ffn, hidden), down=w(hidden, ffn), gate=w(ffn, hidden))


def write_expert_bundle(root, keys: Iterable[ExpertKey], precision: dict, hidden: int, ffn: int):
    """A bundle of real expert graphs only, each at `precision.get(key, "fp32")`; returns its root."""
    from edgemoe.bundle import BundleWriter
    from edgemoe.quant.lowering import build_mlp
    from edgemoe.quant.schemes import Scheme

    with BundleWriter(root) as writer:
        for key in keys:
            p = precision.get(key, "fp32")
            writer.add_expert(key, build_mlp(expert_weights(key, hidden, ffn), "silu_glu", Scheme.default(p)),
                              precision=p)
        writer.finish(model={}, target="cpu")
    return root
