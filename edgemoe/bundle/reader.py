"""Bundle: an exported bundle opened for reading: the manifest parsed at once, the files checked on demand.

Contract: `Bundle.open(path)` reads and validates manifest.json and stats every listed file (present,
right size: cheap, and it catches a truncated copy before a session is created), but hashes
nothing: hashing gigabytes belongs to `verify()` (all or some entries, with a progress callback) or
to `verify_file(entry)`, which the runtime calls when it pages a file from disk. `verify_file`
remembers what it hashed, keyed by the file's (size, mtime, inode), so asking again is one `stat`
unless the file changed or `recheck=True`; given a `HashLedger`, it also remembers across processes
(a later run hashes only what changed since: `edgemoe.bundle.ledger`). Every failure is a one-line
`BundleError` naming the path: not a directory, not a bundle, bad JSON, a newer schema, a missing
file, a wrong size, a bad sha256. Verifying a graph also verifies its external-data file. Nothing
here imports onnx or onnxruntime.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from edgemoe.bundle.entries import MANIFEST_NAME, BundleError, FileEntry
from edgemoe.bundle.hashing import sha256_file
from edgemoe.bundle.ledger import HashLedger, Identity, file_identity
from edgemoe.bundle.manifest import Manifest
from edgemoe.keys import ExpertKey
from edgemoe.page_cache import drop_cached

if TYPE_CHECKING:  # edgemoe.progress imports rich, which the runtime path does not need
    from edgemoe.progress import ProgressFn

_MAX_MANIFEST = 64 << 20  # a manifest of thousands of experts is well under a MB; refuse absurd files


class Bundle:
    """A bundle directory and its manifest. Build with `Bundle.open(path)`."""

    def __init__(self, root: Path, manifest: Manifest, ledger: HashLedger | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.ledger = ledger  # hashes remembered across processes (None: this process only)
        self._verified: dict[str, Identity] = {}  # path -> stat identity when hashed
        self._lock = threading.Lock()  # the runtime verifies from a paging thread
        self.hash_seconds = 0.0  # time spent hashing files (a TTFT component on a first touch)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, check_sizes: bool = True,
             ledger: HashLedger | None = None) -> "Bundle":
        """Parse and validate manifest.json; with check_sizes, stat every listed file too."""
        root = Path(path)
        manifest = Manifest.from_json(_read_manifest(root), source=str(root / MANIFEST_NAME))
        bundle = cls(root, manifest, ledger)
        if check_sizes:
            for entry in manifest.files:
                bundle._stat(entry)
        return bundle

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({str(self.root)!r}, {len(m.files)} files, {len(m.experts())} experts, {m.total_bytes} bytes)"

    # --- lookups -------------------------------------------------------------------------------

    def path_of(self, entry: FileEntry | str) -> Path:
        """Where an entry (or a listed relative path) lives on disk."""
        relpath = entry.path if isinstance(entry, FileEntry) else self.manifest.entry(entry).path
        return self.root / relpath

    def expert_entry(self, key: ExpertKey) -> FileEntry:
        return self.manifest.expert(key)

    def graph_path(self, name: str) -> Path:
        """Path of trunk graph `graphs/<name>.onnx`, ready for `onnxruntime.InferenceSession`."""
        return self.path_of(self.manifest.graph(name))

    # --- checks --------------------------------------------------------------------------------

    def verify(self, entries: Iterable[FileEntry] | None = None, progress: ProgressFn | None = None) -> None:
        """Hash `entries` (default: every file) and compare with the manifest; raise at the first bad one.

        Always re-reads the files; `progress(done_bytes, total_bytes, path)` is called as it goes.
        """
        todo = self._with_data(self.manifest.files if entries is None else entries)
        total = sum(e.size for e in todo)
        done = 0
        for entry in todo:
            def tick(n: int, label: str = entry.path) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(done, total, label)
            self._check(entry, tick)

    def verify_file(self, entry: FileEntry, *, recheck: bool = False) -> None:
        """Check one entry (and its external data) once; later calls cost a stat unless `recheck`. The
        file's pages are dropped from the OS page cache after hashing (they would count in the run's
        footprint, and a later read of the file should come from disk as it would on a small machine)."""
        for e in self.manifest.files_of(entry):
            identity = self._stat(e)
            if not recheck and self._known(e, identity):
                continue
            self._check(e)

    def _known(self, entry: FileEntry, identity: Identity) -> bool:
        """Whether this file, as it stands (`identity`), was hashed to the manifest's digest: by this
        process, or by an earlier one according to the ledger (then remembered here too)."""
        if self._verified.get(entry.path) == identity:
            return True
        if self.ledger is None or not self.ledger.attests(self.path_of(entry), identity, entry.sha256):
            return False
        with self._lock:
            self._verified[entry.path] = identity
        return True

    def is_verified(self, entry: FileEntry) -> bool:
        """Whether `verify`/`verify_file` hashed this file and it has not changed since (by stat)."""
        return all(self._known(e, self._stat(e)) for e in self.manifest.files_of(entry))

    def _check(self, entry: FileEntry, on_bytes: Callable[[int], None] | None = None) -> None:
        before = self._stat(entry)
        start = time.perf_counter()
        size, digest = sha256_file(self.path_of(entry), on_bytes)
        with self._lock:
            self.hash_seconds += time.perf_counter() - start
        drop_cached(self.path_of(entry))  # hashing must not leave the bundle in the page cache
        if size != entry.size:  # changed under us since the stat
            raise _size_error(entry, size)
        if digest != entry.sha256:
            raise BundleError(f"{entry.path} failed its sha256 check: the bundle is corrupt or was modified")
        with self._lock:
            self._verified[entry.path] = before
        if self.ledger is not None:
            self.ledger.record(self.path_of(entry), before, digest)

    def _stat(self, entry: FileEntry) -> Identity:
        """The file's identity; BundleError when it is missing or has the wrong size."""
        try:
            identity = file_identity(self.path_of(entry))
        except FileNotFoundError:
            raise BundleError(f"{entry.path} is listed in the manifest but missing from {self.root}") from None
        if identity[0] != entry.size:
            raise _size_error(entry, identity[0])
        return identity

    def _with_data(self, entries: Iterable[FileEntry]) -> list[FileEntry]:
        """Entries plus the external-data files they need, each once, in order."""
        seen: dict[str, FileEntry] = {}
        for entry in entries:
            for e in self.manifest.files_of(entry):
                seen.setdefault(e.path, e)
        return list(seen.values())


def _size_error(entry: FileEntry, actual: int) -> BundleError:
    return BundleError(f"{entry.path} is {actual} bytes but the manifest says {entry.size}: "
                       "the bundle is truncated or was modified")


def _read_manifest(root: Path) -> bytes:
    if not root.exists():
        raise BundleError(f"{root} does not exist")
    if not root.is_dir():
        raise BundleError(f"{root} is not a directory (a bundle is a directory holding {MANIFEST_NAME})")
    path = root / MANIFEST_NAME
    if not path.is_file():
        if (root / "config.json").is_file():  # a model checkpoint: say what turns it into a bundle
            raise BundleError(f"{root} is a model checkpoint, not a bundle: export it first, e.g. "
                              f"`edgemoe export {root} -o {root.name}-int4 --precision int4`")
        raise BundleError(f"{root} is not an edgemoe bundle (no {MANIFEST_NAME})")
    if path.stat().st_size > _MAX_MANIFEST:
        raise BundleError(f"{path} is larger than {_MAX_MANIFEST >> 20} MiB: not a bundle manifest")
    return path.read_bytes()
