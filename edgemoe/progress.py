"""Progress bars for long work, drawn by the CLI from the library's progress callbacks.

Contract: the library reports progress through plain callables (`progress(done, total, label)`), so
it never depends on a terminal; `byte_progress` turns such a callback into a rich bar showing bytes,
rate and time left, and draws nothing when stderr is not a terminal (CI logs stay readable).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

ProgressFn = Callable[[int, int, str], None]


@contextmanager
def byte_progress(title: str, console: Console | None = None) -> Iterator[ProgressFn]:
    """A `progress(done_bytes, total_bytes, label)` callback backed by a rich progress bar."""
    console = console or Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[label]}"), console=console,
                   disable=not console.is_terminal, transient=False)
    task = bar.add_task(title, total=None, label="")

    def update(done: int, total: int, label: str) -> None:
        bar.update(task, completed=done, total=total, label=label)

    with bar:
        yield update


@contextmanager
def step_progress(title: str, total: int, console: Console | None = None) -> Iterator[Callable[[str], None]]:
    """A `step(label)` callback advancing a bar of `total` steps."""
    console = console or Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), TextColumn("{task.fields[label]}"), console=console,
                   disable=not console.is_terminal)
    task = bar.add_task(title, total=total, label="")

    def step(label: str) -> None:
        bar.update(task, advance=1, label=label)

    with bar:
        yield step


@contextmanager
def count_progress(title: str, console: Console | None = None) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback whose bar appears only once work is reported (a first-run
    step that usually has nothing to do shows nothing)."""
    console = console or Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), console=console, disable=not console.is_terminal, transient=True)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(title, total=total)
        bar.update(task, completed=done, total=total)
        if done >= total:  # gone before whatever streams next to the terminal
            bar.stop()

    try:
        yield update
    finally:
        bar.stop()
