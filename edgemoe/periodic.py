"""A `sample()` called every `interval_s` on a daemon thread while a `with` block runs.

Contract: subclasses implement `sample()`; `with Periodic(...)` starts the thread and, on exit,
stops and joins it and takes one last sample. A leaf module: the runtime's RSS sampler and the
footprint sampler both build on it.
"""

from __future__ import annotations

import threading


class Periodic:
    def __init__(self, interval_s: float, name: str) -> None:
        self.interval_s, self._name = interval_s, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> object:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
