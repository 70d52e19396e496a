"""Typed, versioned JSON artifacts: frozen dataclasses to/from plain dicts with strict keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from lynxpipe.errors import LynxError

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """Recursively turn dataclasses, tuples, frozensets and dicts into JSON-ready values.

    A type may choose its own JSON form with a `__json__()` method and read it back with a
    `__from_json__(data, where)` classmethod (the compact action text of plan.json).
    """
    if hasattr(obj, "__json__") and not isinstance(obj, type):
        return obj.__json__()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, frozenset):
        return sorted(to_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build `cls` from `data`, rejecting unknown keys with a message naming them."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise LynxError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise LynxError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise LynxError(f"{where}: {exc}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _convert(hint, value, where)
    if isinstance(hint, type) and hasattr(hint, "__from_json__"):
        return hint.__from_json__(value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if origin is frozenset:
        return frozenset(_convert(args[0], v, where) for v in value)
    if origin is dict:
        key_t, val_t = args
        return {_convert(key_t, k, where): _convert(val_t, v, where) for k, v in value.items()}
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is int and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def _canonical(value: Any) -> Any:
    """Integral floats as ints, so 240e9 and 240000000000 hash alike after a JSON round trip."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def fingerprint(*parts: Any) -> str:
    """Stable short hash of dataclasses/values, used to tie artifacts to the specs they serve."""
    blob = json.dumps(_canonical([to_dict(p) for p in parts]), sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON through a temp file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def save_artifact(path: str | Path, kind: str, version: int, obj: Any) -> Path:
    """Save a dataclass as `{"kind", "version", "data"}` JSON."""
    return write_json_atomic(path, {"kind": kind, "version": version, "data": to_dict(obj)})


def load_artifact(path: str | Path, kind: str, version: int, cls: type[T]) -> T:
    """Load an artifact written by `save_artifact`, checking kind and version."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise LynxError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LynxError(f"{path}: not valid JSON ({exc}); regenerate it") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise LynxError(f"{path}: expected a {kind} artifact, found {found!r}")
    if payload.get("version") != version:
        raise LynxError(
            f"{path}: {kind} version {payload.get('version')!r} is not supported "
            f"(this lynxpipe reads version {version}); regenerate it"
        )
    return from_dict(cls, payload.get("data"), f"{path.name}")
