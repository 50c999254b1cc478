"""Typed messages: frozen dataclasses checked against their annotations on receipt.

Messages cross thespian's process boundary pickled, which skips ``__init__``; the receiving
shell therefore calls :func:`validate` on every message before the core sees it.

Besides the declared types, :func:`validate` holds every message to two rules that keep a
request from producing an event that cannot be stored or read back (docs/decisions.md):

- Plain data: free-form content (fields typed ``Any``, bare ``dict``/``list``/``tuple``, and
  their items) must be msgpack data that reads back equal (``eventlog.batch.is_plain``: no
  tuples, sets, objects or NaN inside, ints in [-2**63, 2**64), str valid UTF-8); typed ``int``
  fields hold ints in that range, ``float`` fields no NaN, ``str`` fields valid UTF-8.
  Messages that never reach a log and carry actor addresses (the runtime's control messages)
  set ``plain_data = False``.
- Size: the fields of one message encode to at most ``max_bytes`` (default
  :data:`MAX_REQUEST_BYTES`, 256 KiB); over it the request is refused naming its largest field.
  Each event is also held to ``eventlog.batch.MAX_EVENT_BYTES`` (512 KiB) by the runner.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import msgpack

from ..eventlog.batch import is_plain, packb, why_not_plain

#: Largest encoded size (msgpack) of one message's fields, unless its class sets ``max_bytes``.
#: Half of ``eventlog.batch.MAX_EVENT_BYTES``, so the event a request becomes fits its limit.
MAX_REQUEST_BYTES = 256 * 1024

_INT_MIN, _INT_END = -(2**63), 2**64


class InvalidMessage(ValueError):
    """A message whose fields do not have the declared types or values."""


@dataclass(frozen=True)
class Message:
    """Base of every request and notification; subclasses are frozen dataclasses."""

    #: Free-form fields hold only plain msgpack data (see the module docstring).
    plain_data: ClassVar[bool] = True
    #: Largest encoded size of the fields in bytes; None: not limited here (content sized by
    #: the system, not by a client; its events are still held to the event limit).
    max_bytes: ClassVar[int | None] = MAX_REQUEST_BYTES
    #: False for a message holding secrets: a runner recording inputs (docs/decisions.md DBG6)
    #: stores only that it came, and ``cei log verify`` folds its events unchecked.
    recordable: ClassVar[bool] = True

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
        plain = bool(getattr(cls, "plain_data", False))
        found = [
            (f.name, hints[f.name], _checker(hints[f.name], plain))
            for f in dataclasses.fields(cls)
            if f.init
        ]
        _fields_cache[cls] = found
    return found


_Shape = tuple[list[str], list[tuple[str, Any, Check, bool]], Callable[[Any], tuple]]
_shapes: dict[type, _Shape] = {}


def _shape_of(cls: type, fields: list[tuple[str, Any, Check]]) -> _Shape:
    """The names of the fields of ``cls`` (as :func:`_checked_fields` gives them), each field's
    ``(name, hint, check, whether check accepts None)`` (checks are pure functions of the
    value: asked once per class), and a function reading every field of a message at once
    (into a tuple, in that order; an ``AttributeError`` for a missing one). :func:`validate`
    keeps it per message class in ``_shapes``."""
    names = [f for f, _, _ in fields]
    if len(names) >= 2:
        read = operator.attrgetter(*names)
    elif names:
        one = operator.attrgetter(names[0])

        def read(message: Any) -> tuple:
            return (one(message),)
    else:
        def read(message: Any) -> tuple:
            return ()
    return names, [(f, hint, check, _accepts_none(check)) for f, hint, check in fields], read


def _accepts_none(check: Check) -> bool:
    try:
        return bool(check(None))
    except Exception:  # noqa: BLE001 - a check that fails on None is asked each time, as before
        return False


_checkers: dict[tuple[Any, bool], Check] = {}


def _checker(hint: Any, plain: bool) -> Check:
    """A function testing values against ``hint`` (and, if ``plain``, the plain-data rule),
    built once per hint (validation runs for every message received, so the typing
    introspection must not)."""
    try:
        return _checkers[(hint, plain)]
    except KeyError:
        pass
    except TypeError:  # an unhashable hint: build it every time
        return _build_checker(hint, plain)
    check = _checkers[(hint, plain)] = _build_checker(hint, plain)
    return check


def _utf8(v: str) -> bool:
    if v.isascii():
        return True
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _build_checker(hint: Any, plain: bool) -> Check:  # noqa: PLR0911, PLR0912
    if hint is Any or hint is object:
        return is_plain if plain else lambda v: True
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        rest = tuple(h for h in args if h is not type(None))
        if len(rest) < len(args):  # Optional: the common case, tested without a loop
            inner = _checker(rest[0] if len(rest) == 1 else Union[rest], plain)  # noqa: UP007
            return lambda v: v is None or inner(v)
        options = tuple(_checker(h, plain) for h in args)
        return lambda v: any(c(v) for c in options)
    if hint is None or hint is type(None):
        return lambda v: v is None
    if origin is typing.Literal:
        allowed = get_args(hint)
        return lambda v: v in allowed
    if hint is float:
        if plain:
            return lambda v: (type(v) is float and v == v) or (
                type(v) is int and _INT_MIN <= v < _INT_END
            )
        return lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    if hint is int:
        if plain:
            return lambda v: type(v) is int and _INT_MIN <= v < _INT_END
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if hint is str and plain:
        return lambda v: type(v) is str and _utf8(v)
    if origin in (list, tuple, frozenset, set) or hint in (list, tuple, frozenset, set):
        origin = origin or hint
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = tuple(_checker(a, plain) for a in args)
            return lambda v: isinstance(v, tuple) and len(v) == len(items) and all(
                c(x) for c, x in zip(items, v, strict=True)
            )
        if not args:
            if plain and origin is list:
                return lambda v: type(v) is list and is_plain(v)
            if plain:
                return lambda v: isinstance(v, origin) and all(map(is_plain, v))
            return lambda v: isinstance(v, origin)
        if plain and origin is list and args[0] in (dict, list, Any):  # one round trip for all
            kind = None if args[0] is Any else args[0]
            return lambda v: (
                type(v) is list and (kind is None or all(type(x) is kind for x in v)) and is_plain(v)
            )
        item = _checker(args[0], plain)
        return lambda v: isinstance(v, origin) and all(map(item, v))
    if origin is dict or hint is dict:
        args = get_args(hint)
        if not args:
            if plain:
                return lambda v: type(v) is dict and is_plain(v)
            return lambda v: isinstance(v, dict)
        key, val = _checker(args[0], plain), _checker(args[1], plain)
        return lambda v: isinstance(v, dict) and all(key(k) and val(x) for k, x in v.items())
    if origin is ClassVar:
        return lambda v: True
    if isinstance(hint, type):
        return lambda v: isinstance(v, hint)
    return lambda v: True


def validate(message: object) -> None:
    """Raise :class:`InvalidMessage` unless ``message`` is a well-formed :class:`Message`."""
    cls = type(message)
    found = _shapes.get(cls)  # only a Message dataclass's shape is kept (RT16)
    if found is None:
        if not isinstance(message, Message) or not dataclasses.is_dataclass(message):
            raise InvalidMessage(f"not a message: {cls.__name__}")
        if not (issubclass(cls, Message) and dataclasses.is_dataclass(cls)):  # not by its type
            found = _shape_of(cls, _checked_fields(cls))
        else:
            found = _shapes[cls] = _shape_of(cls, _checked_fields(cls))
    name = cls.__name__
    names, shape, read = found
    try:
        values = read(message)  # every field at once (RT16)
    except AttributeError:  # unpickled without a field: the first field in error, in order
        for field, hint, check, _ in shape:
            if not hasattr(message, field):
                raise InvalidMessage(f"{name}: field {field!r} is missing") from None
            if not check(getattr(message, field)):
                raise _bad_field(cls, field, hint, getattr(message, field)) from None
        raise
    for (field, hint, check, nullable), value in zip(shape, values, strict=True):
        if value is None and nullable:  # what ``check`` says of None, asked once (RT10)
            continue
        if not check(value):
            raise _bad_field(cls, field, hint, value)
    limit = cls.max_bytes
    if limit is not None:
        _check_size(name, names, values, limit)
    message.check()


def _bad_field(cls: type, field: str, hint: Any, value: Any) -> InvalidMessage:
    """The refusal of ``value`` in ``field`` of a ``cls`` message, its check having failed."""
    name = cls.__name__
    if getattr(cls, "plain_data", False) and _checker(hint, False)(value):  # the type is right, the data not
        why = why_not_plain(value, f"{name}.{field}") or f"{name}.{field}: does not read back equal"
        return InvalidMessage(f"{why} (requests hold plain msgpack data only)")
    return InvalidMessage(f"{name}.{field}: expected {_show(hint)}, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    try:
        return f"{value!r:.60}"
    except Exception:  # a hostile __repr__ must not turn a bad request into a crash
        return "(unprintable)"


def _packable(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return [getattr(o, f.name) for f in dataclasses.fields(o)]
    if isinstance(o, set | frozenset):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not msgpack data")


def _encoded_size(value: Any) -> int:
    try:  # plain data: the reused packer (RT10), the same bytes
        return len(packb(value))
    except Exception:  # noqa: BLE001 - messages inside, a set, or not msgpack data at all
        return len(msgpack.packb(value, use_bin_type=True, default=_packable))


def _check_size(name: str, fields: list[str], values: Sequence[Any], limit: int) -> None:
    """Refuse the message whose field ``values`` encode to more than ``limit`` bytes, naming
    its largest field."""
    try:
        size = _encoded_size(values)
    except Exception as exc:  # not plain though typed (a declared non-msgpack type): not ours to size
        raise InvalidMessage(f"{name}: cannot be encoded: {exc}") from None
    if size > limit:
        sizes = {f: _encoded_size(v) for f, v in zip(fields, values, strict=True)}
        big = max(sizes, key=sizes.__getitem__)
        raise InvalidMessage(
            f"{name}.{big}: {sizes[big]} bytes encoded; the whole request is {size} bytes, over "
            f"the limit of {limit} bytes for one {name}"
        )


def _show(hint: Any) -> str:
    if get_args(hint):  # list[dict] has the __name__ "list"
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# ---- replies shared by every service ---------------------------------------------------------

ERROR_CODES = ("bad_request", "not_found", "conflict", "forbidden", "unavailable", "internal")


@dataclass(frozen=True)
class ErrorReply(Message):
    """A request failed; nothing it asked for happened. ``code`` is one of ERROR_CODES."""

    code: str
    message: str
    request: str = ""

    max_bytes = None  # a reply, never stored


@dataclass(frozen=True)
class Ok(Message):
    """A request succeeded; ``value`` is its result (plain data)."""

    value: Any = None

    plain_data = False  # a reply, never stored: its value may be any picklable result
    max_bytes = None
