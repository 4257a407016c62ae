"""Typed records read from JSON: dataclasses checked key by key, with one-line errors.

:func:`from_dict` builds a dataclass instance from a parsed JSON object, checking every field
against its type annotation (``int``, ``float``, ``str``, ``bool``, ``list``, ``dict``,
``Optional[...]``, ``List[...]``, ``Dict[str, ...]`` and nested dataclasses). A missing key or
a wrong type raises :class:`~edgecl.core.errors.EdgeclError` naming the file, the dotted key
and the fix. A dataclass with a field named ``extra`` (a dict) keeps the keys it does not
declare there, so a record round-trips what a newer writer added; :func:`to_dict` puts them
back. The artifact formats (:mod:`edgecl.core.formats`) and the configuration
(:mod:`edgecl.config`) use the same checks. Standard library only.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from .errors import EdgeclError

EXTRA = "extra"


class RecordError(EdgeclError):
    """A key of a record is missing or has the wrong type (the message names both)."""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{type_name(args[0])} or null"
    if dataclasses.is_dataclass(tp):
        return "an object"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def check_type(value: Any, tp: Any) -> tuple:
    """``(ok, value)``: whether ``value`` has the type ``tp`` (an int is a fine float; a tuple a
    fine list), and the value converted (float for float, list for a tuple). Containers are
    checked at the top level only; :func:`from_dict` checks their items."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (True, None) if value is None else check_type(value, args[0])
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        return isinstance(value, list), value
    if tp is dict or origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict), value
    raise TypeError(f"records: unsupported annotation {tp!r}")


class _Where:
    def __init__(self, source: str, fix: str):
        self.source, self.fix = source, fix

    def fail(self, key: str, what: str) -> RecordError:
        fix = f"; {self.fix}" if self.fix else ""
        return RecordError(f"{self.source}: {what if not key else f'key {key!r} {what}'}{fix}")


def _convert(value: Any, tp: Any, key: str, where: _Where) -> Any:
    ok, value = check_type(value, tp)
    if not ok:
        raise where.fail(key, f"must be {type_name(tp)}, got {_short(value)}")
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, f"{key}.")
    args = typing.get_args(tp)
    if origin is list and args:
        return [_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict and len(args) == 2:
        return {k: _convert(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _build(cls, data: dict, where: _Where, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs, extra = {}, {}
    for name, value in data.items():
        if name in fields and name != EXTRA:
            kwargs[name] = _convert(value, hints[name], f"{prefix}{name}", where)
        else:
            extra[name] = value
    for name, f in fields.items():
        if name == EXTRA or name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise where.fail(f"{prefix}{name}", "is missing")
    if EXTRA in fields:
        kwargs[EXTRA] = extra
    return cls(**kwargs)


def from_dict(cls, data: Any, source: str, fix: str = ""):
    """``cls`` built from the JSON object ``data``; ``source`` names the file in messages and
    ``fix`` says what makes a good one."""
    where = _Where(source, fix)
    if not isinstance(data, dict):
        raise where.fail("", f"must hold a JSON object, not {type(data).__name__}")
    return _build(cls, data, where)


def to_dict(record) -> dict:
    """The JSON object of a record (nested records included; ``extra`` keys merged back)."""
    out: dict = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == EXTRA:
            continue
        out[f.name] = _plain(value)
    if EXTRA in {f.name for f in dataclasses.fields(record)}:
        for k, v in (getattr(record, EXTRA) or {}).items():
            out.setdefault(k, v)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def optional_get(record, name: str, default: Optional[Any] = None) -> Any:
    """A declared field or an ``extra`` key of ``record``, else ``default``."""
    if hasattr(record, name):
        return getattr(record, name)
    return (getattr(record, EXTRA, None) or {}).get(name, default)
