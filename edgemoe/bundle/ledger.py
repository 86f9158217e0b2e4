"""HashLedger: which files were hashed, to what, as they stood then; remembered across processes.

Contract: `record(path, identity, sha256)` notes that the file at `path`, while its stat identity was
`identity` (size, mtime in ns, inode, device), hashed to `sha256`. `attests(path, identity, sha256)` is
true only when that exact identity was recorded with that exact digest. A file rewritten, truncated,
replaced or copied has a new identity, so it is hashed again; a digest the caller no longer expects
(a re-exported bundle) is not attested either.

Why: a cold start used to hash every expert it touched (1.4-3 s of a StableLM int4 time to first
token), although nothing had changed since the last run hashed them. What this trusts is what make,
rsync's quick check and git's index trust: a file modified in place with its size, inode and mtime
forged back passes unchecked. `Bundle.verify()` always re-reads.

The ledger is a JSON-lines file appended one record at a time (O_APPEND: two processes recording at
once interleave whole lines), read once at open, the last record of a path winning. A torn or foreign
line is skipped, and a missing or unreadable ledger is an empty one: the cost of a lost ledger is
hashing again, never a wrong answer. Once superseded lines outnumber live ones, opening rewrites it
(temp + rename). Nothing here hashes: callers do, and record what they found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from edgemoe.cache_dir import cache_root

log = logging.getLogger(__name__)

Identity = tuple[int, int, int, int]  # size, mtime_ns, inode, device

LEDGER_SUFFIX = ".jsonl"


def file_identity(path: str | os.PathLike[str]) -> Identity:
    """The stat identity a record is keyed by (FileNotFoundError when missing)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


class HashLedger:
    """An append-only record of hashed files (module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries, lines = self._load()
        if lines > 2 * max(1, len(self._entries)):
            self._compact()

    @classmethod
    def for_directory(cls, directory: str | os.PathLike[str], root: Path | None = None) -> "HashLedger":
        """The ledger for the files of `directory` (named by its resolved path), kept under `root`
        (default: the user's cache, `verified/`)."""
        name = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:16]
        return cls((cache_root() / "verified" if root is None else Path(root)) / f"{name}{LEDGER_SUFFIX}")

    def attests(self, path: str | os.PathLike[str], identity: Identity, sha256: str) -> bool:
        with self._lock:
            return self._entries.get(_key(path)) == (tuple(identity), sha256)

    def record(self, path: str | os.PathLike[str], identity: Identity, sha256: str) -> None:
        """Note a hash result; best effort (a ledger that cannot be written only costs a re-hash)."""
        key, value = _key(path), (tuple(int(x) for x in identity), sha256)
        line = json.dumps({"path": key, "identity": list(value[0]), "sha256": sha256}) + "\n"
        with self._lock:
            if self._entries.get(key) == value:
                return
            self._entries[key] = value
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("cannot record a hash in %s (%s): it will be hashed again next time", self.path, exc)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _load(self) -> tuple[dict[str, tuple[Identity, str]], int]:
        entries: dict[str, tuple[Identity, str]] = {}
        lines = 0
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return entries, 0
        for line in text.splitlines():
            lines += 1
            try:
                item = json.loads(line)
                identity = tuple(int(x) for x in item["identity"])
                if len(identity) != 4 or not isinstance(item["sha256"], str):
                    continue
                entries[str(item["path"])] = (identity, item["sha256"])  # type: ignore[assignment]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line, or not ours
        return entries, lines

    def _compact(self) -> None:
        """Rewrite the ledger with its live records only (temp + rename: readers see old or new)."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".ledger-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for key, (identity, sha) in self._entries.items():
                    f.write(json.dumps({"path": key, "identity": list(identity), "sha256": sha}) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.debug("cannot compact %s: %s", self.path, exc)


def _key(path: str | os.PathLike[str]) -> str:
    """A file's record key: its path with every symlink resolved, so the same file reached through a
    linked directory (the bench's temporary cache links to the user's prepacked twins) is recognised."""
    return os.path.realpath(path)
