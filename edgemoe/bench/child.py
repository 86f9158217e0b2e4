"""Run one command in a fresh process and measure its peak memory from outside.

Contract: `run_child(command)` starts `command` under `_reaper.py` (see there for why a small
intermediate process is needed for an honest ru_maxrss), polls the resident set of the command's
process tree with psutil every `interval_s` (20 ms) while it runs, and returns a `ChildRun`: exit
code, wall time, `peak_rss_bytes` (the command's ru_maxrss from wait4: exact, the kernel's own
high-water mark), `peak_rss_polled_bytes` (the largest sample: can miss a peak shorter than the
interval, but sums a tree), with `watch_files` the peak footprint (the command's memory plus the
watched files' page cache, `offload.footprint`, plus any other descendants' RSS, sampled as often as
a 10% share of one core allows: `footprint_due`), its stdout and the tail of its stderr. `parse_json_output` finds the one JSON object a child printed
(`edgemoe ask --json`), tolerating log lines before it. A child that outlives `timeout_s` is
terminated (then killed) and reported with `timed_out`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import psutil

from edgemoe.bench.errors import BenchError

REAPER = Path(__file__).with_name("_reaper.py")
POLL_S = 0.02
# A footprint sample costs ~5 ms with cachestat (189 files, StableLM) but 0.1-0.2 s where the kernel lacks it
# (mincore over 4-32 GB of files), plus smaps once a second. Sampled every 100 ms, the slow kind kept one of
# the two cores busy beside the run it measured (seen on Small); so the next sample waits FOOTPRINT_IDLE
# times as long as the last one took, at least FOOTPRINT_MIN_S.
FOOTPRINT_MIN_S = 0.05
FOOTPRINT_IDLE = 9  # <= 10% of one core
STDERR_TAIL = 4000


def footprint_due(last_took_s: float) -> float:
    """Seconds until the next footprint sample, after one that took `last_took_s`."""
    return max(FOOTPRINT_MIN_S, FOOTPRINT_IDLE * last_took_s)


@dataclass(frozen=True)
class ChildRun:
    """One finished child process (module docstring)."""

    command: tuple[str, ...]
    exit_code: int
    wall_s: float
    peak_rss_bytes: int | None  # ru_maxrss via wait4; None if the reaper could not report
    peak_rss_polled_bytes: int
    samples: int
    stdout: str
    stderr_tail: str
    timed_out: bool = False
    peak_footprint_bytes: int | None = None  # offload.footprint's total, sampled (None: not watched)
    peak_file_cache_bytes: int | None = None  # the part of that peak beyond RSS (cached, not mapped)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def failure(self) -> str:
        """One line saying why the child failed (module docstring of `failure_line`)."""
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        return failure_line(self.stderr_tail) or f"exit code {self.exit_code}"


_BOX = "│╭╮╰╯─┃━ "
_ERROR = re.compile(r"^(error:|[\w.]*(Error|Exception): |MemoryError$|Killed)")


def failure_line(stderr: str) -> str | None:
    """The most telling line of a failed child's stderr: its last `error: ...` (edgemoe's one-line
    errors) or `XxxError: ...` line, else its last line with text, rich's box drawing stripped."""
    lines = [line.strip(_BOX) for line in stderr.splitlines()]
    lines = [line for line in lines if any(c.isalnum() for c in line)]
    for line in reversed(lines):
        if _ERROR.match(line):
            return line
    return lines[-1] if lines else None


class _RssPoller:
    """Samples the summed RSS of a process's descendants (not the process itself) on a thread, and,
    when `files` are given, the footprint as often as `footprint_due` allows: that RSS plus the files'
    page-cache bytes the command (the first descendant) does not map (`offload.footprint`)."""

    def __init__(self, pid: int, interval_s: float, files: Sequence[Path] | None = None) -> None:
        self.interval_s, self.peak, self.samples = interval_s, 0, 0
        self.files = list(files) if files else None
        self.peak_footprint: tuple[int, int] | None = None  # (footprint, its page-cache part)
        self._next_footprint = 0.0  # monotonic time of the next footprint sample
        self._probe: Any = None  # a FootprintProbe of the command, kept open while it runs
        self._root = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgemoe-bench-rss", daemon=True)

    def _sample(self) -> None:
        try:
            children = self._root.children(recursive=True)
        except psutil.Error:
            return
        sizes = []
        for child in children:
            try:
                sizes.append(child.memory_info().rss)
            except psutil.Error:
                sizes.append(0)  # exited between listing and reading
        if children:
            total = sum(sizes)
            self.peak, self.samples = max(self.peak, total), self.samples + 1
            if self.files and time.monotonic() >= self._next_footprint:
                t0 = time.monotonic()
                self._footprint(children[0].pid, total - sizes[0])
                self._next_footprint = time.monotonic() + footprint_due(time.monotonic() - t0)

    def _footprint(self, pid: int, others: int) -> None:
        """The command's own footprint (`offload.footprint`) plus `others`, its descendants' RSS (read in
        the same pass as one another; the command's own RSS is read again by the probe, so that an
        expert evicted in between is not counted twice)."""
        from edgemoe.offload.footprint import FootprintProbe

        if self._probe is None or self._probe.pid != pid:
            self._close_probe()
            self._probe = FootprintProbe(pid, self.files)
        now = self._probe.measure()
        if now is None:
            return
        total = now.total_bytes + others
        if self.peak_footprint is None or total > self.peak_footprint[0]:
            self.peak_footprint = (total, now.file_cache_bytes)

    def _close_probe(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def start(self) -> "_RssPoller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._close_probe()


def _reader(stream, sink: list[bytes]) -> threading.Thread:
    thread = threading.Thread(target=lambda: sink.append(stream.read()), daemon=True)
    thread.start()
    return thread


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM through the reaper (forwarded), then SIGKILL to the whole tree."""
    proc.terminate()
    try:
        proc.wait(10)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
    except psutil.Error:
        pass
    proc.kill()
    proc.wait()


def run_child(command: Sequence[str], timeout_s: float | None = None, interval_s: float = POLL_S,
              env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
              watch_files: Sequence[Path] | None = None) -> ChildRun:
    """Run `command` to completion in a fresh process, measuring its peak RSS (module docstring)."""
    command = tuple(str(c) for c in command)
    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-") as tmp:
        result_path = Path(tmp) / "reaper.json"
        argv = [sys.executable, "-I", "-S", str(REAPER), str(result_path), "--", *command]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=None if env is None else dict(env), cwd=cwd)
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [_reader(proc.stdout, out), _reader(proc.stderr, err)]
        poller = _RssPoller(proc.pid, interval_s, watch_files).start()
        timed_out = False
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        except BaseException:  # Ctrl-C: never leave a multi-GB child behind
            _stop(proc)
            raise
        finally:
            poller.stop()
        wall = time.perf_counter() - t0
        for r in readers:
            r.join()
        reaped = json.loads(result_path.read_text()) if result_path.is_file() else {}
    stderr = (err[0] if err else b"").decode("utf-8", "replace")
    exit_code = reaped.get("exit_code", proc.returncode)
    footprint, cached = poller.peak_footprint or (None, None)
    return ChildRun(command, int(exit_code), wall, reaped.get("ru_maxrss_bytes"), poller.peak, poller.samples,
                    (out[0] if out else b"").decode("utf-8", "replace"), stderr[-STDERR_TAIL:], timed_out,
                    footprint, cached)


def parse_json_output(stdout: str, what: str = "child") -> dict[str, Any]:
    """The JSON object a child printed last; log lines before it are skipped."""
    text = stdout.strip()
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    except json.JSONDecodeError:
        pass
    lines = text.splitlines()
    # A top-level object opens at column 0 (pretty-printed nested ones are indented).
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                value = json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    snippet = text[-200:].replace("\n", " ") if text else "nothing"
    raise BenchError(f"{what} printed no JSON object (its output ends: {snippet!r})")
