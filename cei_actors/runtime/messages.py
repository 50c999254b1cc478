"""Typed messages: frozen dataclasses checked against their annotations on receipt.

Messages cross thespian's process boundary pickled, which skips ``__init__``; the receiving
shell therefore calls :func:`validate` on every message before the core sees it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
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
        for name in _field_names(type(self)):
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


_field_names_cache: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _field_names_cache.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()
        _field_names_cache[cls] = names
    return names


_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _hints_cache.get(cls)
    if hints is None:
        hints = {
            f.name: get_type_hints(cls)[f.name] for f in dataclasses.fields(cls) if f.init
        }
        _hints_cache[cls] = hints
    return hints


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any or hint is object:
        return True
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in get_args(hint))
    if hint is None or hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in get_args(hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, frozenset, set):
        if not isinstance(value, origin):
            return False
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_matches, value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        args = get_args(hint)
        return not args or all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()
        )
    if origin is ClassVar:
        return True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def validate(message: object) -> None:
    """Raise :class:`InvalidMessage` unless ``message`` is a well-formed :class:`Message`."""
    if not isinstance(message, Message) or not dataclasses.is_dataclass(message):
        raise InvalidMessage(f"not a message: {type(message).__name__}")
    name = type(message).__name__
    for field, hint in _hints(type(message)).items():
        try:
            value = getattr(message, field)
        except AttributeError:
            raise InvalidMessage(f"{name}: field {field!r} is missing") from None
        if not _matches(value, hint):
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
