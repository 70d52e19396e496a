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

from lynxpipe.checks import MAX_INT
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
    """Build `cls` from `data`, rejecting unknown keys and values of the wrong JSON type with a
    message naming the key path (`plan.json.layers[3].dropped: expected a list, got str`)."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise LynxError(f"{where}: expected an object, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise LynxError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise LynxError(f"{where}: {exc}") from None
    except LynxError as exc:  # a rule of the type itself: say where the value came from
        if where in str(exc):
            raise
        raise LynxError(f"{where}: {exc}") from None


def _kind(value: Any) -> str:
    """JSON name of a value's type, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object", type(None): "null"}
    shown = repr(value) if isinstance(value, (str, int, float)) and len(repr(value)) < 30 else ""
    return names.get(type(value), type(value).__name__) + (f" ({shown})" if shown else "")


def _expect(ok: bool, value: Any, where: str, expected: str) -> None:
    if not ok:
        raise LynxError(f"{where}: expected {expected}, got {_kind(value)}")


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _convert(hint, value, where)
    if origin is typing.Literal:
        _expect(value in args and type(value) in {type(a) for a in args}, value, where,
                "one of " + ", ".join(map(str, args)))
        return value
    if isinstance(hint, type) and hasattr(hint, "__from_json__"):
        return hint.__from_json__(value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (tuple, frozenset, list):
        _expect(isinstance(value, list), value, where, "a list")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            _expect(len(value) == len(args), value, where, f"a list of {len(args)} values")
            return tuple(_convert(a, v, f"{where}[{i}]")
                         for i, (a, v) in enumerate(zip(args, value)))
        items = [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return frozenset(items) if origin is frozenset else origin(items)
    if origin is dict:
        _expect(isinstance(value, dict), value, where, "an object")
        key_t, val_t = args
        return {_convert(key_t, k, where): _convert(val_t, v, f"{where}.{k}")
                for k, v in value.items()}
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        _expect(isinstance(value, bool), value, where, "true or false")
    elif hint is int:
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)  # a dict key: JSON keys are strings
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 40e9 written for bytes
        _expect(isinstance(value, int) and not isinstance(value, bool)
                and abs(value) <= MAX_INT, value, where, "an integer (at most 2**53)")
    elif hint is float:
        # NaN and infinities pass here: the type's own rules say which fields may hold them
        _expect(isinstance(value, float) or isinstance(value, int) and not isinstance(
            value, bool) and abs(value) <= 1e308, value, where, "a number")
        return float(value)
    elif hint is str:
        _expect(isinstance(value, str), value, where, "a string")
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


def file_mode() -> int:
    """Mode of a newly created file under this process's umask (0644 under the usual 022):
    mkstemp creates 0600, which would hide plans and results from the rest of a team."""
    umask = 0o022
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o666 & ~umask


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON through a temp file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=False)
            fh.write("\n")
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_artifact(path: str | Path, kind: str, version: int, obj: Any) -> Path:
    """Save a dataclass as `{"kind", "version", "data"}` JSON."""
    return write_json_atomic(path, {"kind": kind, "version": version, "data": to_dict(obj)})


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in a file; a missing file, a directory, unreadable bytes, non-UTF-8 text
    or broken JSON is a one-line LynxError naming the file and what it should hold."""
    path = Path(path)
    if path.is_dir():
        raise LynxError(f"{path}: is a directory; give the path of a {what} file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LynxError(f"{path}: no such file") from None
    except OSError as exc:
        raise LynxError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise LynxError(f"{path}: not UTF-8 text; a {what} file is JSON text") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LynxError(f"{path}: not valid JSON ({exc}); give a {what} file") from None


def load_artifact(path: str | Path, kind: str, version: int, cls: type[T]) -> T:
    """Load an artifact written by `save_artifact`, checking kind and version."""
    path = Path(path)
    payload = read_json(path, kind)
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise LynxError(f"{path}: expected a {kind} artifact, found {found!r}")
    if payload.get("version") != version:
        raise LynxError(
            f"{path}: {kind} version {payload.get('version')!r} is not supported "
            f"(this lynxpipe reads version {version}); regenerate it"
        )
    extra = sorted(set(payload) - {"kind", "version", "data"})
    if extra:
        raise LynxError(f"{path}: unknown top-level key(s) {', '.join(map(str, extra))}; an "
                        f"artifact holds kind, version and data")
    return from_dict(cls, payload.get("data"), f"{path.name}")
