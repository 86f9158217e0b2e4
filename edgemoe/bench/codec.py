"""Frozen dataclasses <-> plain JSON values, driven by their type hints.

Contract: `encode(obj)` turns a dataclass (nested dataclasses, tuples, scalars) into dicts and lists;
`decode(cls, value)` rebuilds it from the field annotations: `X | None`, `tuple[X, ...]`, fixed
tuples, nested dataclasses, scalars (an int where a float is declared is accepted). Keys a class does
not declare are ignored, so a report may carry derived values (`"derived": {...}`) for readers that
do not run Python, and `decode(encode(x)) == x` for every report dataclass. A missing field falls back
to its default; one without a default is a `BenchError` naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from edgemoe.bench.errors import BenchError


def encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(cls: Any, value: Any, where: str = "report") -> Any:
    """`value` (from JSON) as an instance of the annotation `cls`."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(cls)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return decode(inner[0], value, where)
    if origin is tuple:
        args = typing.get_args(cls)
        if not isinstance(value, (list, tuple)):
            raise BenchError(f"{where} must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(cls):
        return _decode_dataclass(cls, value, where)
    if cls is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if cls in (int, float, str, bool) and not isinstance(value, cls):
        raise BenchError(f"{where} must be {cls.__name__}, got {value!r}")
    return value


def _decode_dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise BenchError(f"{where} must be an object, got {type(value).__name__}")
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = decode(hints[f.name], value[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BenchError(f"{where} lacks {f.name!r}")
    return cls(**kwargs)
