"""An OpenAI chat-completions request body -> a validated `ChatRequest`, or an `ApiError`.

Contract: `parse_chat_request(body, model_id, fetch_image)` accepts OpenAI's request shape:
`messages` (roles system / developer / user / assistant; `content` a string or a list of
`{"type": "text"}` and `{"type": "image_url"}` parts), `model`, `max_tokens` or
`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop` (a string or up to 4), `stream`,
`stream_options.include_usage`, and llama.cpp's extensions `top_k`, `min_p`, `repeat_penalty`.
Images are decoded here, before the request queues: `data:image/png|jpeg|webp;base64,...` URLs
inline, `http(s)://` ones through `fetch_image` (None: refused). Everything a client can get wrong
is an `ApiError` carrying the HTTP status and OpenAI's error fields; nothing here touches the model.
Consecutive messages of one role are joined with a newline (the templates alternate user and
assistant); system and developer messages become the system prompt.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from edgemoe.errors import EdgeMoEError
from edgemoe.model.image import decode_image

DATA_URL_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
MAX_STOPS = 4  # OpenAI's limit
ImageFetcher = Callable[[str], bytes]


class ApiError(Exception):
    """A request the server answers with an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, code: str | None = None, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


@dataclass(frozen=True)
class Turn:
    """One turn of the conversation: "user" or "assistant", its text and (user turns) its images."""

    role: str
    text: str
    images: tuple[Image.Image, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    """What a chat-completions request asks for, validated (module docstring)."""

    turns: tuple[Turn, ...]
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @property
    def images(self) -> list[Image.Image]:
        return [image for turn in self.turns for image in turn.images]


def parse_chat_request(body: Any, model_id: str, fetch_image: ImageFetcher | None = None) -> ChatRequest:
    """The request in `body` (parsed JSON), or an ApiError saying what is wrong with it."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(400, f"unknown model {model!r}: this server serves {model_id!r}", "invalid_request_error",
                       "model_not_found", "model")
    system, turns = _conversation(body.get("messages"), fetch_image)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    options = body.get("stream_options") or {}
    return ChatRequest(
        turns=turns, system=system,
        max_tokens=_number(max_tokens, "max_tokens", int, low=1),
        temperature=_number(body.get("temperature"), "temperature", float, low=0.0, high=2.0),
        top_p=_number(body.get("top_p"), "top_p", float, low=0.0, high=1.0, open_low=True),
        top_k=_number(body.get("top_k"), "top_k", int, low=0),
        min_p=_number(body.get("min_p"), "min_p", float, low=0.0, high=1.0),
        repeat_penalty=_number(body.get("repeat_penalty"), "repeat_penalty", float, low=0.0, open_low=True),
        seed=_number(body.get("seed"), "seed", int),
        stop=_stops(body.get("stop")),
        stream=_flag(body.get("stream"), "stream"),
        include_usage=_flag(options.get("include_usage") if isinstance(options, dict) else None,
                            "stream_options.include_usage"))


def _conversation(messages: Any, fetch_image: ImageFetcher | None) -> tuple[str | None, tuple[Turn, ...]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        text, images = _content(message.get("content"), i, fetch_image)
        if role in ("system", "developer"):
            if images:
                raise bad_request(f"messages[{i}]: a {role} message cannot hold images", param=f"messages[{i}]")
            system.append(text)
        elif role in ("user", "assistant"):
            if role == "assistant" and images:
                raise bad_request(f"messages[{i}]: an assistant message cannot hold images", param=f"messages[{i}]")
            if turns and turns[-1].role == role:  # the templates alternate: join runs of one role
                last = turns.pop()
                turns.append(Turn(role, f"{last.text}\n{text}", last.images + images))
            else:
                turns.append(Turn(role, text, images))
        else:
            raise bad_request(f"messages[{i}]: unsupported role {role!r} (system, developer, user or assistant)",
                              param=f"messages[{i}].role")
    if not turns or turns[-1].role != "user":
        raise bad_request("the last message must be the user's", param="messages")
    if turns[0].role != "user":
        turns.insert(0, Turn("user", ""))  # an assistant opening: an empty question before it
    return ("\n".join(system) if system else None), tuple(turns)


def _content(content: Any, i: int, fetch_image: ImageFetcher | None) -> tuple[str, tuple[Image.Image, ...]]:
    if isinstance(content, str):
        return content, ()
    if content is None:
        return "", ()
    if not isinstance(content, list):
        raise bad_request(f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content")
    texts: list[str] = []
    images: list[Image.Image] = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad_request(f"{where}: image_url needs a url", param=where)
            images.append(_image(url, where, fetch_image))
        else:
            raise bad_request(f"{where}: expected a text or image_url part", param=where)
    return "\n".join(texts), tuple(images)


def _image(url: str, where: str, fetch_image: ImageFetcher | None) -> Image.Image:
    if url.startswith("data:"):
        data = _data_url(url, where)
    elif url.startswith(("http://", "https://")):
        if fetch_image is None:
            raise bad_request(f"{where}: remote image URLs are off on this server (start it with "
                              "--allow-remote-images, or send the image as a data: URL)", "remote_images_disabled",
                              where)
        data = fetch_image(url)
    else:
        raise bad_request(f"{where}: an image URL must be a data: URL or http(s)://", param=where)
    try:
        return decode_image(data, where)
    except EdgeMoEError as exc:
        raise bad_request(str(exc), "invalid_image", where) from None


def _data_url(url: str, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    media = header[len("data:"):].split(";")
    if not comma or media[-1] != "base64":
        raise bad_request(f"{where}: a data URL must be base64 (data:image/png;base64,...)", "invalid_image", where)
    if media[0].lower() not in DATA_URL_TYPES:
        raise bad_request(f"{where}: unsupported image type {media[0]!r}: png, jpeg or webp", "invalid_image", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the image's base64 is malformed", "invalid_image", where) from None


def _number(value: Any, name: str, kind: type, low: float | None = None, high: float | None = None,
            open_low: bool = False) -> Any:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        span = "" if low is None else f" {'>' if open_low else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise bad_request(f"'{name}' must be {'an integer' if kind is int else 'a number'}{span}, got {value!r}",
                          "invalid_value", name)
    return kind(value)


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' must be a string or a list of up to {MAX_STOPS} strings", "invalid_value", "stop")
    return tuple(s for s in stops if s)


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {value!r}", "invalid_value", name)
    return value
