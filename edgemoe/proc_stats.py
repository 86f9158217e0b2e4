"""Numbers from Linux's /proc/<pid>/status and /proc/<pid>/io, in bytes.

Contract: `status_bytes(field, pid)` reads a kB field of /proc/<pid>/status (VmRSS, VmHWM,
RssAnon, ...) as bytes; `io_bytes(field, pid)` a field of /proc/<pid>/io (read_bytes, ...). Both
return None where the file or field is missing (not Linux, the process gone). `smaps_rss(pid, group)`
sums the Rss of the mappings in /proc/<pid>/smaps by `group(start address, path)` (None: skipped;
with `file_backed_only`, less their Anonymous pages),
{} where it cannot be read. A leaf module.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable


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


def smaps_rss(pid: int | str, group: Callable[[int, str], Hashable | None],
              file_backed_only: bool = False) -> dict[Hashable, int]:
    """Rss by group; `file_backed_only` leaves out each mapping's Anonymous pages (a library's written
    data pages, copied on write: RssAnon counts them, though smaps lists them under the file)."""
    out: dict[Hashable, int] = {}
    current = None
    try:
        with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's header: "start-end perms ... path"
                    parts = line.split(maxsplit=5)
                    current = group(int(head.split("-")[0], 16), parts[5].rstrip("\n") if len(parts) == 6 else "")
                elif current is not None and head == "Rss:":
                    out[current] = out.get(current, 0) + int(line.split()[1]) * 1024
                elif current is not None and file_backed_only and head == "Anonymous:":
                    out[current] = out.get(current, 0) - int(line.split()[1]) * 1024
    except OSError:
        return {}
    return out
