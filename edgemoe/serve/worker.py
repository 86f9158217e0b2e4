"""One engine, many requests: a worker thread answers chat requests one at a time.

Contract: `Worker(session, max_queue)` owns the `ChatSession` (one engine, one expert cache, one
memory budget) and a thread that takes jobs in arrival order. `submit(request, loop)` returns a
`Job`, or raises a 503 `ApiError` (with `Retry-After`) when `max_queue` jobs already wait. A job
delivers events to the asyncio loop that submitted it: ("text", piece) as the answer streams, then
("done", GenerationResult) or ("error", ApiError). `Job.cancel()` (a client that went away) stops
its generation before the next token, or skips it if it has not started. Requests share nothing but
the engine: a request that does not continue the previous conversation gets a cold prefill, so its
answer is the one a fresh `edgemoe ask` gives, whatever was served before. `close()` cancels what
waits, lets the running job stop at its next token, and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from edgemoe.errors import EdgeMoEError
from edgemoe.model.image import image_key
from edgemoe.model.prompt import Conversation
from edgemoe.runtime import ChatSession, ContextError
from edgemoe.serve.requests import ApiError, ChatRequest, bad_request

log = logging.getLogger(__name__)
RETRY_AFTER_S = 2


@dataclass
class Job:
    """One request's passage through the worker (module docstring)."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop closed: the server is shutting down, nobody listens
            self.cancel()


class Worker:
    """The thread that owns the engine (module docstring)."""

    def __init__(self, session: ChatSession, max_queue: int) -> None:
        if max_queue < 0:
            raise EdgeMoEError(f"--max-queue must be >= 0, got {max_queue}")
        self.session, self.max_queue = session, max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._previous: tuple[Conversation, list[Any]] | None = None  # last conversation + answer, image keys
        self._closed = False
        self._running = False
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="edgemoe-serve-worker")
        self._thread.start()

    def submit(self, request: ChatRequest, loop: asyncio.AbstractEventLoop) -> Job:
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", "server_error", "shutting_down")
            if self._waiting >= self.max_queue and self._busy():
                raise ApiError(503, f"{self._waiting} requests are already waiting (--max-queue {self.max_queue}); "
                               "retry later", "server_error", "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._waiting += 1
        job = Job(request, loop)
        self._jobs.put(job)
        return job

    def _busy(self) -> bool:
        return self._waiting > 0 or self._running

    def stop_accepting(self) -> None:
        """Refuse new requests, cancel the waiting ones (each told the server is stopping) and stop
        the running one at its next token. Safe from a signal handler: it only sets flags and posts
        events."""
        with self._lock:
            self._closed = True
            current = self._current
        if current is not None:
            current.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit("error", ApiError(503, "the server is shutting down", "server_error", "shutting_down"))

    def close(self) -> None:
        """Stop accepting, join the thread, release the engine's expert provider."""
        self.stop_accepting()
        self._jobs.put(None)
        self._thread.join()
        self.session.close()

    # -- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._waiting = max(0, self._waiting - 1)
                self._running = True
                self._current = job
            try:
                if not job.cancelled:
                    self._answer(job)
            finally:
                with self._lock:
                    self._running = False
                    self._current = None

    def _answer(self, job: Job) -> None:
        request = job.request
        try:
            conversation = self._conversation(request)
            images = request.images
            keys = [image_key(image) for image in images]
            reuse = self._continues(conversation, keys)
            sampler = self.session.options.sampler(
                temperature=request.temperature, top_p=request.top_p, seed=request.seed, top_k=request.top_k,
                min_p=request.min_p, repeat_penalty=request.repeat_penalty)
            result = self.session.reply(conversation, images, on_text=lambda piece: job.emit("text", piece),
                                        max_tokens=request.max_tokens, sampler=sampler, stops=request.stop,
                                        should_stop=lambda: job.cancelled, reuse=reuse)
        except ApiError as exc:
            self._previous = None
            job.emit("error", exc)
            return
        except ContextError as exc:
            self._previous = None
            job.emit("error", bad_request(str(exc), "context_length_exceeded", "messages"))
            return
        except EdgeMoEError as exc:
            self._previous = None
            job.emit("error", bad_request(str(exc)))
            return
        except Exception as exc:  # a bug: the server stays up, the client is told, the log keeps the traceback
            log.exception("request failed")
            self._previous = None
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))
            return
        self._previous = (conversation.add_assistant(result.text), keys) if result.stop_reason != "cancelled" else None
        log.info("request stopped after %d tokens: %s", len(result.token_ids), result.stop_reason)
        job.emit("done", result)

    def _conversation(self, request: ChatRequest) -> Conversation:
        conversation = self.session.new_conversation().with_system(request.system)
        try:
            for turn in request.turns:
                if turn.role == "user":
                    conversation = conversation.add_user(turn.text, images=len(turn.images))
                else:
                    conversation = conversation.add_assistant(turn.text)
        except ValueError as exc:
            raise bad_request(f"this model cannot take this conversation: {exc}", param="messages") from None
        return conversation

    def _continues(self, conversation: Conversation, keys: list[Any]) -> bool:
        """Whether this request extends the previous one's conversation (its answer included)."""
        if self._previous is None:
            return False
        before, before_keys = self._previous
        return (conversation.template == before.template and keys[:len(before_keys)] == before_keys
                and conversation.messages[:len(before.messages)] == before.messages)
