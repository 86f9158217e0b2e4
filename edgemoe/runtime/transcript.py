"""A conversation as JSON (`edgemoe chat`'s /save and /load), and back.

Contract: `write_transcript(path, conversation, images, pending)` writes
`{"format": "edgemoe-chat/1", "system", "images": [absolute paths], "pending_images", "messages":
[{"role": "user" | "assistant", "content"}]}` atomically (a temporary file renamed into place, so a
failure never leaves half a file); message contents keep their `<image>` markers, so the i-th
marker takes the i-th image. `read_transcript(path, empty)` rebuilds the conversation on `empty`'s
template and checks what a hand-edited file could break (roles alternating from the user, markers
matching images). Images must be files: one given as pixels (stdin) cannot be saved. Errors are
one-line `EdgeMoEError`s.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgemoe.errors import EdgeMoEError
from edgemoe.model.image import ImageSource
from edgemoe.model.prompt import IMAGE_TOKEN, Conversation

FORMAT = "edgemoe-chat/1"


def write_transcript(path: str | os.PathLike, conversation: Conversation, images: list[ImageSource],
                     pending: int) -> Path:
    files = []
    for image in images:
        if not isinstance(image, (str, os.PathLike)):
            raise EdgeMoEError("an image given as pixels (from stdin) cannot be saved: give it as a file")
        files.append(str(Path(image).resolve()))
    user = conversation.template.roles[0]
    data = {"format": FORMAT, "system": conversation.template.system, "images": files, "pending_images": pending,
            "messages": [{"role": "user" if role == user else "assistant", "content": text}
                         for role, text in conversation.messages]}
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        raise EdgeMoEError(f"cannot save the conversation to {path}: {exc.strerror or exc}") from None
    return path


def read_transcript(path: str | os.PathLike, empty: Conversation) -> tuple[Conversation, list[str], int]:
    """(conversation, image paths, images not yet asked about) from a /save file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise EdgeMoEError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgeMoEError(f"{path} is not a saved conversation (not JSON)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EdgeMoEError(f"{path} is not a saved conversation (format is not {FORMAT!r})")
    images, pending = data.get("images", []), data.get("pending_images", 0)
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images) or not isinstance(pending, int):
        raise EdgeMoEError(f"{path}: 'images' must be a list of paths and 'pending_images' a number")
    system = data.get("system")
    conversation = empty.with_system(system if isinstance(system, str) else None)
    conversation = replace(conversation, messages=_messages(data.get("messages"), conversation, path))
    placed = conversation.image_count
    if placed + pending != len(images) or pending < 0:
        raise EdgeMoEError(f"{path}: {placed} image marker(s) and {pending} pending image(s) for {len(images)} image(s)")
    return conversation, images, pending


def _messages(messages: Any, conversation: Conversation, path: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list):
        raise EdgeMoEError(f"{path}: 'messages' must be a list")
    roles = {"user": conversation.template.roles[0], "assistant": conversation.template.roles[1]}
    out = []
    for i, message in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != want or not isinstance(message.get("content"), str):
            raise EdgeMoEError(f"{path}: message {i} must be a {want} message with text content")
        if want == "assistant" and IMAGE_TOKEN in message["content"]:
            raise EdgeMoEError(f"{path}: message {i} is an answer holding an image marker")
        out.append((roles[want], message["content"]))
    if out and len(out) % 2:
        raise EdgeMoEError(f"{path}: the conversation ends with an unanswered question")
    return tuple(out)
