"""Ids -> text as they arrive: the thin layer above the engine that knows the tokenizer.

Contract: `TextStream(tokenizer, stops)` turns generated ids into text pieces whose
concatenation is exactly `text`: the decoded answer up to (not including) the first stop string found
(the template's, plus any a caller such as the server's `stop` adds), stripped of surrounding
whitespace as upstream strips its outputs (leading whitespace is never sent; trailing whitespace
waits until more text follows it): `push(id)` returns the new text
that is certain, `finish()` the rest, and `stopped` says a stop string has ended the answer. A piece
is held back while the decoded tail ends in U+FFFD (a multi-byte character split across tokens) or
could still be the start of a stop string, so a streamed answer never shows a broken character or
half of `<|endoftext|>`. Decoding
re-reads a short window of recent ids rather than the whole answer (tokenizers merge across token
boundaries; a window of a few ids is enough to be exact and keeps each push O(1)).
"""

from __future__ import annotations

from collections.abc import Sequence

from edgemoe.model.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental detokenizer (see module docstring)."""

    def __init__(self, tokenizer: Tokenizer, stops: str | Sequence[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in ([stops] if isinstance(stops, str) else stops or ()) if s)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already counted
        self._read = 0
        self._text = ""  # all certain text so far (before stop handling)
        self._sent = 0  # characters of the answer already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one id; the new text safe to show now ('' if none)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        full = self.tokenizer.decode(self.ids[self._prefix:])
        if full.endswith(_REPLACEMENT) or len(full) < len(prefix_text):
            return ""  # an incomplete character: wait for more ids
        self._text += full[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Everything not yet returned (held-back characters included)."""
        if not self.stopped and self._read < len(self.ids):
            tail = self.tokenizer.decode(self.ids[self._prefix:])
            self._text += tail[len(self.tokenizer.decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """The answer so far, up to the first stop string, stripped."""
        return self._answer().strip()

    def _answer(self) -> str:
        found = [at for at in (self._text.find(stop) for stop in self.stops) if at >= 0]
        if found:
            self.stopped = True
            return self._text[:min(found)]
        return self._text

    def _release(self, final: bool) -> str:
        answer = self._answer().lstrip()
        if final or self.stopped:
            end = len(answer.rstrip())
        else:  # hold back a possible start of a stop string, and whitespace until text follows it
            end = len(answer) - max((_partial_suffix(answer, stop) for stop in self.stops), default=0)
            end = len(answer[:end].rstrip())
        piece = answer[self._sent:end]
        self._sent = max(self._sent, end)
        return piece


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
