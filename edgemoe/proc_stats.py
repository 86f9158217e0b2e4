"""Numbers from Linux's /proc/<pid>/status and /proc/<pid>/io, in bytes.

Contract: `status_bytes(field, pid)` reads a kB field of /proc/<pid>/status (VmRSS, VmHWM,
RssAnon, ...) as bytes; `io_bytes(field, pid)` a field of /proc/<pid>/io (read_bytes, ...). Both
return None where the file or field is missing (not Linux, the process gone). A leaf module.
"""

from __future__ import annotations


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    return _field(f"/proc/{pid}/status", field, 1024)


def io_bytes(field: str, pid: int | str = "self") -> int | None:
    return _field(f"/proc/{pid}/io", field, 1)


def _field(path: str, field: str, unit: int) -> int | None:
    prefix = field + ":"
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line.split()[1]) * unit
    except (OSError, ValueError):
        return None
    return None
