"""Typed messages: frozen dataclasses checked against their annotations on receipt.

Messages cross thespian's process boundary pickled, which skips ``__init__``; the receiving
shell therefore calls :func:`validate` on every message before the core sees it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints


class InvalidMessage(ValueError):
    """A message whose fields do not have the declared types or values."""


@dataclass(frozen=True)
class Message:
    """Base of every request and notification; subclasses are frozen dataclasses."""

    def check(self) -> None:
        """Value checks beyond types; subclasses raise :class:`InvalidMessage`."""

    def __str__(self) -> str:
        """A short summary (scalar fields, sizes of containers); ``repr`` stays complete.

        thespian formats every message it sends or receives with ``str`` for a debug log line
        even when that level is off: the full dataclass repr of a heartbeat listing a hundred
        processes cost more than handling it.
        """
        parts = []
        for name, _, _ in _checked_fields(type(self)):
            value = getattr(self, name, None)
            if value is None or isinstance(value, bool | int | float):
                parts.append(f"{name}={value!r}")
            elif isinstance(value, str):
                parts.append(f"{name}={value[:40]!r}")
            elif isinstance(value, Message):
                parts.append(f"{name}={value}")
            elif hasattr(value, "__len__"):
                parts.append(f"{name}=<{type(value).__name__} of {len(value)}>")
            else:
                parts.append(f"{name}=<{type(value).__name__}>")
        return f"{type(self).__name__}({', '.join(parts)})"


Check = Callable[[Any], bool]
_fields_cache: dict[type, list[tuple[str, Any, Check]]] = {}


def _checked_fields(cls: type) -> list[tuple[str, Any, Check]]:
    """``(name, hint, check)`` for each init field of message class ``cls`` (cached)."""
    found = _fields_cache.get(cls)
    if found is None:
        if not dataclasses.is_dataclass(cls):
            return []
        hints = get_type_hints(cls)
        found = [(f.name, hints[f.name], _checker(hints[f.name])) for f in dataclasses.fields(cls) if f.init]
        _fields_cache[cls] = found
    return found


_checkers: dict[Any, Check] = {}


def _checker(hint: Any) -> Check:
    """A function testing values against ``hint``, built once per hint (validation runs for
    every message received, so the typing introspection must not)."""
    try:
        return _checkers[hint]
    except KeyError:
        pass
    except TypeError:  # an unhashable hint: build it every time
        return _build_checker(hint)
    check = _checkers[hint] = _build_checker(hint)
    return check


def _build_checker(hint: Any) -> Check:
    if hint is Any or hint is object:
        return lambda v: True
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        rest = tuple(h for h in args if h is not type(None))
        if len(rest) < len(args):  # Optional: the common case, tested without a loop
            inner = _checker(rest[0] if len(rest) == 1 else Union[rest])  # noqa: UP007
            return lambda v: v is None or inner(v)
        options = tuple(_checker(h) for h in args)
        return lambda v: any(c(v) for c in options)
    if hint is None or hint is type(None):
        return lambda v: v is None
    if origin is typing.Literal:
        allowed = get_args(hint)
        return lambda v: v in allowed
    if hint is float:
        return lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    if hint is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if origin in (list, tuple, frozenset, set):
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = tuple(_checker(a) for a in args)
            return lambda v: isinstance(v, tuple) and len(v) == len(items) and all(
                c(x) for c, x in zip(items, v, strict=True)
            )
        if not args:
            return lambda v: isinstance(v, origin)
        item = _checker(args[0])
        return lambda v: isinstance(v, origin) and all(map(item, v))
    if origin is dict:
        args = get_args(hint)
        if not args:
            return lambda v: isinstance(v, dict)
        key, val = _checker(args[0]), _checker(args[1])
        return lambda v: isinstance(v, dict) and all(key(k) and val(x) for k, x in v.items())
    if origin is ClassVar:
        return lambda v: True
    if isinstance(hint, type):
        return lambda v: isinstance(v, hint)
    return lambda v: True


def validate(message: object) -> None:
    """Raise :class:`InvalidMessage` unless ``message`` is a well-formed :class:`Message`."""
    if not isinstance(message, Message) or not dataclasses.is_dataclass(message):
        raise InvalidMessage(f"not a message: {type(message).__name__}")
    name = type(message).__name__
    for field, hint, check in _checked_fields(type(message)):
        try:
            value = getattr(message, field)
        except AttributeError:
            raise InvalidMessage(f"{name}: field {field!r} is missing") from None
        if not check(value):
            raise InvalidMessage(
                f"{name}.{field}: expected {_show(hint)}, got {type(value).__name__} {value!r:.60}"
            )
    message.check()


def _show(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# ---- replies shared by every service ---------------------------------------------------------

ERROR_CODES = ("bad_request", "not_found", "conflict", "forbidden", "unavailable", "internal")


@dataclass(frozen=True)
class ErrorReply(Message):
    """A request failed; nothing it asked for happened. ``code`` is one of ERROR_CODES."""

    code: str
    message: str
    request: str = ""


@dataclass(frozen=True)
class Ok(Message):
    """A request succeeded; ``value`` is its result (plain data)."""

    value: Any = None
