"""manifest.json: the versioned description of a bundle, and the queries the runtime asks of it.

Contract: a `Manifest` is frozen and self-checking: a schema version this edgemoe reads, a known
target, plain-JSON metadata blocks, and a file list without duplicate paths, without duplicate expert
keys, and whose `external_data` references name entries of the list. `to_json()`/`from_json()`
round-trip exactly (dataclass equality). Reading is strict: a newer schema, a missing key, a wrong
type or a duplicate raises a one-line `BundleError`. Keys this schema does not know are ignored, so a
writer may add optional keys without a schema bump; anything that changes a key's meaning bumps it.

The metadata blocks are free-form JSON owned by their producers: `model` is `ModelConfig.to_dict()`,
`vision`/`processor` the tower's `to_dict()`, `prompt` the conversation template and image token
index, `tokenizer` its family, files and special ids, `policy` the export's quantization policy.
They are normalised through JSON on construction (tuples become lists), which is what makes a
round trip compare equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable

from edgemoe import __version__
from edgemoe.bundle.entries import BundleError, FileEntry, take
from edgemoe.keys import ExpertKey

if TYPE_CHECKING:
    from edgemoe.model.config import ModelConfig
    from edgemoe.model.towers import ImageProcessorConfig, VisionTowerConfig

SCHEMA_VERSION = 1
TARGETS = ("cpu", "cuda")
_BLOCKS = ("model", "vision", "processor", "prompt", "tokenizer", "policy")


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def check_schema(version: Any) -> int:
    """`version` if this edgemoe reads it; a BundleError telling the user what to do otherwise."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"bundle schema_version must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise BundleError(f"bundle schema {version} is newer than this edgemoe (reads {SCHEMA_VERSION}); "
                          "upgrade edgemoe")
    if version != SCHEMA_VERSION:
        raise BundleError(f"bundle schema {version} is not one this edgemoe reads ({SCHEMA_VERSION}); "
                          "re-export the bundle")
    return version


def _plain_json(value: Any, name: str) -> dict[str, Any]:
    """A deep, JSON-normalised copy of a metadata block (also isolates it from the caller's dict)."""
    if not isinstance(value, dict):
        raise BundleError(f"bundle manifest key {name!r} must be an object, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise BundleError(f"bundle manifest key {name!r} is not plain JSON: {e}") from None


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything the runtime needs to know about a bundle before it opens a single graph."""

    model: dict[str, Any]
    target: str  # "cpu" | "cuda": the execution provider the precisions were chosen for
    files: tuple[FileEntry, ...]
    vision: dict[str, Any] = field(default_factory=dict)
    processor: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    edgemoe_version: str = __version__
    created_at: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        check_schema(self.schema_version)
        if self.target not in TARGETS:
            raise BundleError(f"bundle target {self.target!r} is not one of {', '.join(TARGETS)}")
        for name in _BLOCKS:
            object.__setattr__(self, name, _plain_json(getattr(self, name), name))
        object.__setattr__(self, "files", tuple(self.files))
        # Indexes are not fields: dataclass equality and repr ignore them.
        object.__setattr__(self, "_by_path", _index_paths(self.files))
        object.__setattr__(self, "_by_key", _index_experts(self.files))
        _check_external_refs(self.files, self._by_path)

    # --- queries -------------------------------------------------------------------------------

    def entry(self, path: str) -> FileEntry:
        try:
            return self._by_path[path]
        except KeyError:
            raise BundleError(f"bundle has no file {path!r}") from None

    def experts(self) -> dict[ExpertKey, FileEntry]:
        """Every expert graph, in key order."""
        return dict(self._by_key)

    def expert(self, key: ExpertKey) -> FileEntry:
        try:
            return self._by_key[key]
        except KeyError:
            raise BundleError(f"bundle has no expert {key}") from None

    def graph(self, name: str) -> FileEntry:
        """The trunk graph `graphs/<name>.onnx` (e.g. "vision", "layer3.attn", "head")."""
        entry = self._by_path.get(f"graphs/{name}.onnx")
        if entry is None:
            raise BundleError(f"bundle has no graph {name!r} (graphs/{name}.onnx)")
        return entry

    def by_role(self, role: str) -> tuple[FileEntry, ...]:
        return tuple(e for e in self.files if e.role == role)

    def data_of(self, entry: FileEntry) -> FileEntry | None:
        """The external-data entry holding `entry`'s weights, if it has one."""
        return None if entry.external_data is None else self._by_path[entry.external_data]

    def files_of(self, entry: FileEntry) -> tuple[FileEntry, ...]:
        """`entry` and the files it needs on disk: what loading it reads, what verifying it checks."""
        data = self.data_of(entry)
        return (entry,) if data is None else (entry, data)

    def bytes_of(self, entry: FileEntry) -> int:
        """Bytes on disk for `entry`, its external data included (what paging it in reads)."""
        return sum(e.size for e in self.files_of(entry))

    @property
    def expert_bytes_total(self) -> int:
        return sum(self.bytes_of(e) for e in self._by_key.values())

    @property
    def total_bytes(self) -> int:
        """Every listed file (manifest.json itself is not listed)."""
        return sum(e.size for e in self.files)

    @property
    def kv_value_bytes(self) -> int:
        """Bytes of one KV cache value in the attention graphs (the export's plan; fp32 before it said)."""
        return 2 if self.policy.get("plan", {}).get("kv_cache") == "fp16" else 4

    def model_config(self) -> "ModelConfig":
        from edgemoe.model.config import ModelConfig  # lazy: the manifest alone stays import-light
        return ModelConfig.from_dict(self.model)

    def vision_config(self) -> "VisionTowerConfig":
        from edgemoe.model.towers import VisionTowerConfig
        return VisionTowerConfig.from_dict(self.vision)

    def processor_config(self) -> "ImageProcessorConfig":
        from edgemoe.model.towers import ImageProcessorConfig
        return ImageProcessorConfig.from_dict(self.processor)

    # --- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        head = {"schema_version": self.schema_version, "edgemoe_version": self.edgemoe_version,
                "created_at": self.created_at, "target": self.target}
        return {**head, **{name: getattr(self, name) for name in _BLOCKS},
                "files": [e.to_dict() for e in self.files]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"bundle manifest must be a JSON object, got {type(d).__name__}")
        # The version first: a newer manifest may lack keys, and "upgrade" is the useful message.
        version = check_schema(take(d, "schema_version", int, ""))
        files = take(d, "files", list, "")
        blocks = {name: take(d, name, dict, "") for name in _BLOCKS}
        return cls(schema_version=version, edgemoe_version=take(d, "edgemoe_version", str, ""),
                   created_at=take(d, "created_at", str, ""), target=take(d, "target", str, ""),
                   files=tuple(FileEntry.from_dict(f, f"files[{i}]") for i, f in enumerate(files)), **blocks)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest.json") -> "Manifest":
        try:
            raw = json.loads(text)
        except UnicodeDecodeError as e:
            raise BundleError(f"{source} is not UTF-8 text: {e.reason}") from None
        except json.JSONDecodeError as e:
            raise BundleError(f"{source} is not valid JSON: {e.msg} (line {e.lineno})") from None
        return cls.from_dict(raw)


def _index_paths(files: Iterable[FileEntry]) -> dict[str, FileEntry]:
    by_path: dict[str, FileEntry] = {}
    for e in files:
        if e.path in by_path:
            raise BundleError(f"bundle manifest lists {e.path} twice")
        by_path[e.path] = e
    return by_path


def _index_experts(files: Iterable[FileEntry]) -> dict[ExpertKey, FileEntry]:
    by_key: dict[ExpertKey, FileEntry] = {}
    for e in files:
        if e.expert is None:
            continue
        if e.expert in by_key:
            raise BundleError(f"bundle manifest lists expert {e.expert} twice ({by_key[e.expert].path}, {e.path})")
        by_key[e.expert] = e
    return dict(sorted(by_key.items()))


def _check_external_refs(files: Iterable[FileEntry], by_path: dict[str, FileEntry]) -> None:
    owners: dict[str, str] = {}
    for e in files:
        if e.external_data is None:
            continue
        data = by_path.get(e.external_data)
        if data is None or data.role != "external_data":
            raise BundleError(f"{e.path}: external_data {e.external_data!r} is not an external_data entry")
        # One data file per graph: a shared one would make per-expert paging and checks lie.
        if e.external_data in owners:
            raise BundleError(f"{e.external_data} is the external data of both {owners[e.external_data]} and {e.path}")
        owners[e.external_data] = e.path
