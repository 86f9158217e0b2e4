"""Spawn one command, wait for it with wait4, and write its exit status and ru_maxrss as JSON.

Run as `python -I -S _reaper.py RESULT.json -- COMMAND...` (stdlib only, nothing else imported).
Why a separate small process: Linux carries the high-water RSS of the address space a process
replaces at exec into its ru_maxrss, and a child forked (or vforked) from the benchmark shares the
benchmark's address space until then, so wait4 in the benchmark would report at least the
benchmark's own peak for every child. Forked from this ~10 MB process instead, the command's
ru_maxrss is its own. SIGTERM/SIGINT/SIGHUP are forwarded; a second SIGTERM sends SIGKILL.
"""

import json
import os
import signal
import sys


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.stderr.write("usage: _reaper.py RESULT.json -- COMMAND [ARGS...]\n")
        return 2
    result_path, argv = sys.argv[1], sys.argv[3:]
    pid = os.posix_spawnp(argv[0], argv, dict(os.environ))
    terms = []

    def forward(signum, frame):
        terms.append(signum)
        kill = signal.SIGKILL if signum == signal.SIGTERM and terms.count(signal.SIGTERM) > 1 else signum
        try:
            os.kill(pid, kill)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    _, status, usage = os.wait4(pid, 0)  # PEP 475: retried across the handlers above
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    result = {"pid": pid, "exit_code": os.waitstatus_to_exitcode(status),
              "ru_maxrss_bytes": usage.ru_maxrss * scale, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
