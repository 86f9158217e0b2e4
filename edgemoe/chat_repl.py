"""`edgemoe chat` at a terminal: line editing, history, multi-line input, slash commands, Ctrl-C.

Contract: `run_chat(session, interactive, ...)` reads questions until EOF, `/exit` or two Ctrl-C in a
row at the prompt. At a terminal, input goes through readline (arrow keys, a history kept in
`~/.edgemoe_history`); a line ending in a backslash continues on the next, and a `\"\"\"` line opens
and closes a multi-line block. Ctrl-C while an answer streams stops that answer at its next token
(the partial answer stays in the conversation) and returns to the prompt. Slash commands: /image
PATH, /clear, /save FILE, /load FILE, /stats, /help, /exit. A command's failure is one line and
the chat goes on. Piped input (not a terminal) reads one question per line and never prompts.
This module prints (it is the CLI's); the library it drives only logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from edgemoe.errors import EdgeMoEError

HISTORY = Path(os.environ.get("EDGEMOE_HISTORY", Path.home() / ".edgemoe_history"))
PROMPT = ">>> "
MORE = "... "
HELP = """commands:
  /image PATH   add an image to the next question (or replace the image, for models that take one)
  /clear        forget the conversation (the images stay, for the next question)
  /save FILE    save the conversation as JSON        /load FILE   continue a saved conversation
  /stats        the last answer's speed, experts and memory
  /help         this help                            /exit        leave (or Ctrl-D; Ctrl-C twice)
  end a line with \\ to continue it; a \"\"\" line starts and ends a multi-line question
  Ctrl-C while an answer streams stops it"""


class _Interrupt:
    """SIGINT while an answer streams: a flag the generation checks after each token."""

    def __init__(self) -> None:
        self.fired = False

    def __enter__(self) -> "_Interrupt":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.fired = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def run_chat(session: Any, interactive: bool, as_json: bool, err: Console, write: Callable[[str], None]) -> None:
    """The chat loop (module docstring)."""
    if interactive:
        _enable_line_editing()
        err.print("type a question, /help for commands", highlight=False)
    last: Any = None
    for line in _lines(interactive):
        if line.startswith("/"):
            try:
                if _command(line, session, last, err) == "exit":
                    break
            except EdgeMoEError as exc:
                err.print(f"error: {exc}", highlight=False)
            continue
        with _Interrupt() as interrupt:
            try:
                last = session.ask(line, on_text=None if as_json else write, should_stop=lambda: interrupt.fired)
            except EdgeMoEError as exc:  # e.g. the conversation outgrew the memory budget
                if not interactive:
                    raise  # a script gets the error and the exit code
                err.print(f"error: {exc}", highlight=False)  # a person can /clear and go on
                continue
        if as_json:
            write(json.dumps(last.to_dict(), ensure_ascii=False) + "\n")
        else:
            write("\n")
        if interrupt.fired:
            err.print("(stopped)", highlight=False)
        elif interactive:
            err.print(last.stats.summary(), highlight=False)


def _command(line: str, session: Any, last: Any, err: Console) -> str | None:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return "exit"
    if name == "/help":
        err.print(HELP, highlight=False, markup=False)
    elif name == "/clear":
        session.clear()
        err.print("conversation cleared", highlight=False)
    elif name == "/image":
        if not arg:
            raise EdgeMoEError("/image needs a path")
        from edgemoe.model.image import load_image

        load_image(arg)  # a bad path fails now, in one line, not at the next question
        session.add_image(Path(arg))
        err.print(f"image {arg} goes with the next question", highlight=False)
    elif name in ("/save", "/load"):
        if not arg:
            raise EdgeMoEError(f"{name} needs a file name")
        if name == "/save":
            err.print(f"saved to {session.save(arg)}", highlight=False)
        else:
            session.load(arg)
            err.print(f"loaded {arg}: {len(session.conversation.messages) // 2} turn(s)", highlight=False)
    elif name == "/stats":
        err.print(last.stats.summary() if last is not None else "no answer yet", highlight=False)
    else:
        raise EdgeMoEError(f"unknown command {name} (/help lists them)")
    return None


def _lines(interactive: bool) -> Iterator[str]:
    """Questions and commands: piped, one per line until EOF or exit/quit; at a terminal, with
    continuation lines, \"\"\" blocks and Ctrl-C handling."""
    if not interactive:
        for raw in sys.stdin:
            line = raw.strip()
            if line.lower() in ("exit", "quit"):
                return
            if line:
                yield line
        return
    interrupted = False
    while True:
        try:
            line = _read_question()
        except EOFError:
            sys.stdout.write("\n")
            return
        except KeyboardInterrupt:
            if interrupted:
                sys.stdout.write("\n")
                return
            interrupted = True
            sys.stdout.write("\n(Ctrl-C again to exit)\n")
            continue
        interrupted = False
        line = line.strip()
        if line.lower() in ("exit", "quit"):
            return
        if line:
            yield line


def _read_question() -> str:
    line = input(PROMPT)
    if line.strip() == '"""':
        lines = []
        while (more := input(MORE)).strip() != '"""':
            lines.append(more)
        return "\n".join(lines)
    while line.endswith("\\"):
        line = line[:-1] + "\n" + input(MORE)
    return line


def _enable_line_editing() -> None:
    """readline: editing keys, and a history file read now and written at exit."""
    try:
        import atexit
        import readline
    except ImportError:  # Windows without pyreadline: plain input still works
        return
    try:
        readline.read_history_file(HISTORY)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(HISTORY)
        except OSError:
            pass

    atexit.register(save)
