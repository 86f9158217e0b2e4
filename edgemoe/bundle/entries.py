"""One manifest entry per bundle file: what the file is, its size and sha256, and what a graph declares.

Contract: every file of a bundle except manifest.json is described by a frozen `FileEntry`: its path
(relative, POSIX, normalised, inside the bundle), its role, its size and sha256, and for graphs the
declared inputs/outputs (`TensorDecl`), the precision it was stored at and the validation result
export measured (`Validation`). Entries check themselves when built, so a manifest holding a bad one
cannot exist; `to_dict`/`from_dict` round-trip exactly through JSON, and parsing raises a
`BundleError` naming the key at fault (`files[3].sha256`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from edgemoe.errors import EdgeMoEError
from edgemoe.keys import ExpertKey

# Graph roles are the trunk's pieces plus the experts; the rest are data files.
GRAPH_ROLES = frozenset({"vision", "projector", "embed", "attention", "dense_mlp", "shared_mlp", "head", "expert"})
ROLES = GRAPH_ROLES | {"router", "image_layout", "tokenizer", "external_data", "other"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_NAME = "manifest.json"


class BundleError(EdgeMoEError):
    """A bundle is missing, malformed, from a newer edgemoe, or fails its checksums."""


def check_relpath(path: Any, where: str = "path") -> str:
    """`path` if it names a file inside a bundle: relative, POSIX, normalised, no `..`."""
    if not isinstance(path, str) or not path:
        raise BundleError(f"{where} must be a non-empty string, got {path!r}")
    p = PurePosixPath(path)
    # str(p) != path catches "a//b", "a/./b" and a trailing "/": one file, one spelling.
    if "\\" in path or p.is_absolute() or ".." in p.parts or str(p) != path or path == MANIFEST_NAME:
        raise BundleError(f"{where} {path!r} is not a plain relative path inside the bundle")
    return path


def take(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    """`d[key]` checked against `kind` (bool is not an int here); BundleError naming `where.key`."""
    name = f"{where}.{key}" if where else key
    if key not in d or (optional and d[key] is None):
        if optional:
            return None
        raise BundleError(f"bundle manifest lacks {name!r}")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise BundleError(f"bundle manifest key {name!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                          f"got {value!r}")
    return value


@dataclass(frozen=True)
class TensorDecl:
    """A declared graph input or output."""

    name: str
    dtype: str  # ONNX element type as ORT spells it inside "tensor(...)": "float", "float16", "int64"
    shape: tuple[int | str, ...] | None  # str = a symbolic (dynamic) dim; None = rank unknown

    def __post_init__(self) -> None:
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
            bad = [d for d in self.shape if isinstance(d, bool) or not isinstance(d, (int, str))]
            if bad:
                raise BundleError(f"tensor {self.name!r} has dims {bad}: each must be an int or a name")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "TensorDecl":
        d = _as_object(d, where)
        shape = take(d, "shape", list, where, optional=True)
        return cls(take(d, "name", str, where), take(d, "dtype", str, where),
                   None if shape is None else tuple(shape))


@dataclass(frozen=True)
class Validation:
    """What export measured against the torch reference for one graph."""

    tolerance: float
    max_abs_error: float
    metric: str = "max_abs"

    def __post_init__(self) -> None:
        # JSON has no NaN/inf, and a NaN error means the check itself broke: refuse it here.
        if not (math.isfinite(self.tolerance) and math.isfinite(self.max_abs_error)):
            raise BundleError(f"validation numbers must be finite, got {self.tolerance}, {self.max_abs_error}")

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "max_abs_error": self.max_abs_error, "metric": self.metric}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "Validation":
        d = _as_object(d, where)
        return cls(float(take(d, "tolerance", (int, float), where)),
                   float(take(d, "max_abs_error", (int, float), where)), take(d, "metric", str, where))


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle. Graph files may keep their weights in a separate `external_data` entry."""

    path: str
    role: str
    size: int
    sha256: str
    layer: int | None = None
    expert: ExpertKey | None = None
    precision: str | None = None  # "fp32" | "fp16" | "int8" | "int4" ...: free text, set by the quantizer
    inputs: tuple[TensorDecl, ...] = ()
    outputs: tuple[TensorDecl, ...] = ()
    validation: Validation | None = None
    external_data: str | None = None  # path of the role="external_data" entry holding this graph's weights

    def __post_init__(self) -> None:
        check_relpath(self.path)
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if self.role not in ROLES:
            raise BundleError(f"{self.path}: unknown role {self.role!r} (one of {', '.join(sorted(ROLES))})")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise BundleError(f"{self.path}: size must be a non-negative int, got {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise BundleError(f"{self.path}: sha256 must be 64 lower-case hex digits, got {self.sha256!r}")
        self._check_expert()
        if self.external_data is not None:
            check_relpath(self.external_data, f"{self.path}: external_data")
            if self.role not in GRAPH_ROLES:
                raise BundleError(f"{self.path}: only graphs have external data, not role {self.role!r}")

    def _check_expert(self) -> None:
        # An expert graph is named by its key; a key on anything else would make experts() ambiguous.
        if (self.role == "expert") != (self.expert is not None):
            raise BundleError(f"{self.path}: role 'expert' and an expert key go together")
        if self.expert is not None:
            if self.layer is None:
                object.__setattr__(self, "layer", self.expert.layer)
            if self.layer != self.expert.layer:
                raise BundleError(f"{self.path}: layer {self.layer} disagrees with expert {self.expert}")

    @property
    def is_graph(self) -> bool:
        return self.role in GRAPH_ROLES

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "role": self.role, "layer": self.layer,
            "expert": None if self.expert is None else str(self.expert), "precision": self.precision,
            "size": self.size, "sha256": self.sha256, "external_data": self.external_data,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "validation": None if self.validation is None else self.validation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "FileEntry":
        """Strict on path/role/size/sha256; the graph-only keys may be absent (null)."""
        d = _as_object(d, where)
        expert = take(d, "expert", str, where, optional=True)
        validation = take(d, "validation", dict, where, optional=True)
        return cls(
            path=take(d, "path", str, where), role=take(d, "role", str, where),
            size=take(d, "size", int, where), sha256=take(d, "sha256", str, where),
            layer=take(d, "layer", int, where, optional=True),
            expert=None if expert is None else _parse_key(expert, f"{where}.expert"),
            precision=take(d, "precision", str, where, optional=True),
            inputs=_decls(d, "inputs", where), outputs=_decls(d, "outputs", where),
            validation=None if validation is None else Validation.from_dict(validation, f"{where}.validation"),
            external_data=take(d, "external_data", str, where, optional=True),
        )


def _as_object(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise BundleError(f"bundle manifest key {where!r} must be an object, got {type(d).__name__}")
    return d


def _decls(d: dict[str, Any], key: str, where: str) -> tuple[TensorDecl, ...]:
    items = take(d, key, list, where, optional=True) or []
    return tuple(TensorDecl.from_dict(t, f"{where}.{key}[{i}]") for i, t in enumerate(items))


def _parse_key(text: str, where: str) -> ExpertKey:
    try:
        return ExpertKey.parse(text)
    except ValueError as e:
        raise BundleError(f"bundle manifest key {where!r}: {e}") from None
