"""Running the server: load, warm up, listen, and stop cleanly.

Contract: `serve(bundle, ServeOptions, GenerationOptions)` opens the bundle in a `ChatSession` and
starts its engine before listening (so `/health` answers only once the model is loaded and the
first request pays no set-up), then runs uvicorn until SIGINT or SIGTERM. On either signal the
worker stops taking requests and cancels what runs (each stops at its next token), uvicorn closes
its connections, the worker thread is joined and the expert provider closed; `serve` then returns
normally (exit status 0). `on_ready(url, note)` is called once the socket listens; `note` says what
`--memory-budget auto` chose (None otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from edgemoe.errors import EdgeMoEError
from edgemoe.runtime import ChatSession, GenerationOptions
from edgemoe.serve.app import create_app
from edgemoe.serve.remote_images import RemoteImages
from edgemoe.serve.worker import Worker

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 1024  # the KV cache a server starts with (it grows with longer conversations)
GRACEFUL_S = 5


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 32
    allow_remote_images: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise EdgeMoEError(f"--port must be in 0..65535, got {self.port}")
        if self.max_queue < 0:
            raise EdgeMoEError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise EdgeMoEError("--api-key is empty")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the worker to stop as soon as a signal arrives, and not re-raising
    the signal after a graceful stop (the process then exits 0)."""

    def __init__(self, config: uvicorn.Config, worker: Worker,
                 on_ready: Callable[[str, str | None], None] | None) -> None:
        super().__init__(config)
        self.worker, self.on_ready = worker, on_ready

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.worker.stop_accepting()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_ready(f"http://{host}:{port}", self.worker.session.budget_note)


def serve(bundle: str | Path, options: ServeOptions = ServeOptions(),
          generation: GenerationOptions = GenerationOptions(), *,
          on_ready: Callable[[str, str | None], None] | None = None,
          prepare_progress: Callable[[int, int], None] | None = None) -> None:
    """Serve `bundle` until SIGINT/SIGTERM (module docstring)."""
    session = ChatSession(bundle, None, generation, context_tokens=generation.ctx_size or DEFAULT_CONTEXT,
                          prepare_progress=prepare_progress)
    try:
        session.start(generation.ctx_size or DEFAULT_CONTEXT)
    except BaseException:
        session.close()
        raise
    worker = Worker(session, options.max_queue)
    fetch = RemoteImages() if options.allow_remote_images else None
    app = create_app(worker, Path(bundle).resolve().name, options.api_key, fetch)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_S, access_log=False)
    server = _Server(config, worker, on_ready)
    try:
        server.run()
        if not server.started:
            raise EdgeMoEError(f"cannot listen on {options.host}:{options.port} (in use, or not an address here?)")
    finally:
        worker.close()
