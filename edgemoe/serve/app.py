"""The HTTP surface of `edgemoe serve`: OpenAI's chat-completions API over one `Worker`.

Contract: `create_app(worker, model_id, ...)` returns a FastAPI app with `GET /health`,
`GET /v1/models` and `POST /v1/chat/completions` (plain JSON, or server-sent events in OpenAI's
chunk shape ending with `data: [DONE]` when `stream` is true). Every error is OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`): 400 bad request, 401 wrong or missing
`Authorization: Bearer` key (when the server has one), 404/405 unknown route, 413 body too large,
503 queue full (with `Retry-After`). A request is parsed (images decoded) off the event loop before
it queues; a client that disconnects cancels its job, which stops at its next token. Nothing here
knows about models beyond the `GenerationResult` it formats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgemoe.runtime.stats import GenerationResult
from edgemoe.serve.requests import ApiError, ChatRequest, ImageFetcher, bad_request, parse_chat_request
from edgemoe.serve.worker import Job, Worker

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 << 20
DISCONNECT_POLL_S = 0.25
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(worker: Worker, model_id: str, api_key: str | None = None, fetch_image: ImageFetcher | None = None,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="edgemoe", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)
        return JSONResponse(error.body(), status_code=exc.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "invalid_request_error",
                           "invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "edgemoe"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        chat = await run_in_threadpool(parse_chat_request, await _json_body(request, max_body), model_id, fetch_image)
        job = worker.submit(chat, asyncio.get_running_loop())
        try:
            first = await _next_event(job, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        if first[0] == "error":
            raise first[1]
        answer = _Answer(model_id)
        if chat.stream:
            return StreamingResponse(_stream(job, first, chat, answer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            result = await _collect(job, first, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        return answer.completion(result)

    return app


async def _json_body(request: Request, max_body: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, f"the request body is larger than {max_body} bytes", "invalid_request_error",
                       "request_too_large")
    raw = await request.body()
    if len(raw) > max_body:
        raise ApiError(413, f"the request body is larger than {max_body} bytes", "invalid_request_error",
                       "request_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", "invalid_json") from None


async def _next_event(job: Job, request: Request) -> tuple[str, Any]:
    """The job's next event; a client that disconnects meanwhile cancels the job (ClientGone)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone from None


async def _collect(job: Job, event: tuple[str, Any], request: Request) -> GenerationResult:
    while event[0] == "text":
        event = await _next_event(job, request)
    if event[0] == "error":
        raise event[1]
    return event[1]


async def _stream(job: Job, event: tuple[str, Any], chat: ChatRequest, answer: "_Answer") -> AsyncIterator[bytes]:
    """SSE chunks from the job's events; a disconnect (this generator cancelled) cancels the job."""
    try:
        yield answer.sse(answer.chunk({"role": "assistant", "content": ""}))
        while True:
            kind, value = event
            if kind == "text":
                yield answer.sse(answer.chunk({"content": value}))
            elif kind == "done":
                yield answer.sse(answer.chunk({}, FINISH_REASONS[value.stop_reason]))
                if chat.include_usage:
                    yield answer.sse({**answer.chunk({}), "choices": [], "usage": _usage(value)})
                yield b"data: [DONE]\n\n"
                return
            else:  # an error after the stream began: OpenAI's shape, then the end
                yield answer.sse(value.body())
                yield b"data: [DONE]\n\n"
                return
            event = await job.events.get()
    finally:
        job.cancel()  # a no-op once done; stops the generation when the client went away


class _Answer:
    """One completion's id, creation time and model, and the bodies made from them."""

    def __init__(self, model_id: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model_id

    def completion(self, result: GenerationResult) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": FINISH_REASONS[result.stop_reason]}],
                "usage": _usage(result)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    @staticmethod
    def sse(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _usage(result: GenerationResult) -> dict[str, int]:
    prompt, completion = result.stats.prompt_tokens, len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
