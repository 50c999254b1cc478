"""Domain events as frozen dataclasses, and the registry that turns them into records and back.

A component declares its events once::

    events = EventRegistry("provisioner")

    @events.register("NodeRequested", version=2)
    @dataclass(frozen=True, slots=True)
    class NodeRequested:
        node_id: str
        site: str

    @events.upcaster("NodeRequested", from_version=1)
    def _add_site(body: dict) -> dict:
        return {**body, "site": "default"}

Field values must be plain msgpack data (see :func:`~.batch.is_plain`): an event that would
not read back equal is refused before it is written (:meth:`EventRegistry.to_checked`).
Older stored versions are upcast step by step; unknown types and newer versions are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, cast

import msgpack

from .batch import MAX_EVENT_BYTES, packb, why_not_plain
from .errors import CorruptLog, NewerEventVersion, UnknownEventType
from .records import PendingEvent, Record

E = TypeVar("E")
_unpackb = msgpack.unpackb
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class UnstorableEvent(ValueError):
    """An event that would not read back equal, or is over :data:`~.batch.MAX_EVENT_BYTES`."""


@dataclasses.dataclass(frozen=True, slots=True)
class _EventType:
    name: str
    version: int
    cls: type
    fields: tuple[str, ...]
    #: built and compared field by field, as its body is (see :func:`_plain_dataclass`)
    plain: bool
    #: ``event -> (body, scalar)``: its fields as a dict, and whether a row of them is known to
    #: read back equal once it packs (see :func:`_body_builder`)
    body: Callable[[Any], tuple[dict[str, Any], bool]]


#: Values whose msgpack round trip is exact once they pack (decision RT8): ``None``, ``bool``,
#: ``int`` (packing refuses one out of range), ``float`` (not NaN, tested apart), ``str``
#: (packing refuses one that is not UTF-8); exact types only (a subclass may compare otherwise).
_SCALARS = frozenset((type(None), bool, int, float, str))


def _body_builder(fields: tuple[str, ...], exact: bool) -> Callable[[Any], tuple[dict[str, Any], bool]]:
    """A function of an event giving its body (``{field: value}`` in field order) and True
    when every value is of a type in :data:`_SCALARS` and equal to itself (no NaN); always
    False unless ``exact``. Generated per class, as ``dataclasses`` generates ``__init__``."""
    names = [f"_{i}" for i in range(len(fields))]
    loads = "".join(f"    {n} = e.{f}\n" for n, f in zip(names, fields, strict=True))
    body = ", ".join(f"{f!r}: {n}" for n, f in zip(names, fields, strict=True))
    scalar = " and ".join(f"type({n}) in S and {n} == {n}" for n in names) if exact else "False"
    src = f"def body(e):\n{loads}    return {{{body}}}, ({scalar or 'True'})\n"
    namespace: dict[str, Any] = {"S": _SCALARS}
    exec(src, namespace)  # noqa: S102 - built from a dataclass's own field names only
    return cast(Callable[[Any], tuple[dict[str, Any], bool]], namespace["body"])


_new = object.__new__
_SET_PENDING = tuple(
    PendingEvent.__dict__[f.name].__set__ for f in dataclasses.fields(PendingEvent)  # type: ignore[arg-type]
)
assert [f.name for f in dataclasses.fields(PendingEvent)] == ["type", "version", "timestamp", "body", "input", "row"]


def _pending(name: str, version: int, timestamp: float, body: dict[str, Any], row: bytes) -> PendingEvent:
    """``PendingEvent(name, version, timestamp, body, None, row)``, its slots set directly
    (a frozen dataclass's ``__init__`` sets each through ``object.__setattr__``: half the cost)."""
    p = _new(PendingEvent)
    s_type, s_version, s_timestamp, s_body, s_input, s_row = _SET_PENDING
    s_type(p, name)
    s_version(p, version)
    s_timestamp(p, timestamp)
    s_body(p, body)
    s_input(p, None)
    s_row(p, row)
    return p


def _generated(cls: type, name: str) -> bool:
    """``cls`` has a ``name`` method that ``dataclasses`` generated for it (not inherited, not
    written by hand)."""
    fn = cls.__dict__.get(name)
    code = getattr(fn, "__code__", None)
    return code is not None and code.co_filename == "<string>" and fn.__qualname__ == f"{cls.__qualname__}.{name}"


def _plain_dataclass(cls: type) -> bool:
    """True if ``cls(**body) == event`` holds exactly when ``body`` equals ``event``'s fields
    as a dict, compared value by value in field order (decision RT1): ``dataclasses``'
    own ``__init__`` and ``__eq__``, no ``__post_init__``, every field set by ``__init__`` and
    compared, no init-only pseudo-fields."""
    fields = dataclasses.fields(cls)
    return (
        _generated(cls, "__init__") and _generated(cls, "__eq__") and not hasattr(cls, "__post_init__")
        and len(fields) == len(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        and all(f.init and f.compare for f in fields)
    )


class EventRegistry:
    """Maps event type names to dataclasses, with schema versions and upcasters."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._by_name: dict[str, _EventType] = {}
        self._by_class: dict[type, _EventType] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, name: str, version: int = 1) -> Callable[[type[E]], type[E]]:
        """Class decorator: register a frozen dataclass as event type ``name`` at ``version``."""

        def decorate(cls: type[E]) -> type[E]:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"event {name!r}: {cls.__name__} must be a dataclass")
            if name in self._by_name:
                raise ValueError(f"event type {name!r} is registered twice in {self.namespace!r}")
            fields = tuple(f.name for f in dataclasses.fields(cls))
            plain = _plain_dataclass(cls)
            exact = plain and type(name) is str and type(version) is int and all(type(f) is str for f in fields)
            entry = _EventType(name, version, cls, fields, plain, _body_builder(fields, exact))
            self._by_name[name] = entry
            self._by_class[cls] = entry
            return cls

        return decorate

    def upcaster(self, name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: a function turning a ``from_version`` body into a ``from_version + 1`` body."""

        def decorate(fn: Upcaster) -> Upcaster:
            self._upcasters[(name, from_version)] = fn
            return fn

        return decorate

    def type_name(self, event: object) -> str:
        """The registered name of ``event``'s class."""
        return self._entry_for(event).name

    def _entry_for(self, event: object) -> _EventType:
        try:
            return self._by_class[type(event)]
        except KeyError:
            raise TypeError(
                f"{type(event).__name__} is not an event registered in {self.namespace!r}"
            ) from None

    def to_pending(self, event: object, timestamp: float) -> PendingEvent:
        """Turn a domain event into a :class:`PendingEvent` ready to append."""
        entry = self._entry_for(event)
        return PendingEvent(entry.name, entry.version, timestamp, entry.body(event)[0])

    def to_checked(self, event: object, timestamp: float) -> PendingEvent:
        """:meth:`to_pending`, once the event is known to encode within :data:`MAX_EVENT_BYTES`
        and to decode (:meth:`from_record`) to an equal event; else :class:`UnstorableEvent`
        naming the field. The row checked is the one stored (``PendingEvent.row``).

        A row is decoded and compared unless the round trip is exact by construction: a plain
        dataclass (:func:`_plain_dataclass`) whose values are all scalars that pack
        (:data:`_SCALARS`, decision RT8)."""
        entry = self._by_class.get(type(event))
        if entry is None:
            self._entry_for(event)  # raises the TypeError naming it
        assert entry is not None
        name, version = entry.name, entry.version
        body, scalar = entry.body(event)
        try:
            row = packb([name, version, timestamp, body])
        except Exception as exc:  # msgpack: TypeError, OverflowError, ValueError, UnicodeError
            raise UnstorableEvent(self._why(name, body) or f"event {name}: {exc}") from None
        if len(row) > MAX_EVENT_BYTES:
            sizes = {f: len(msgpack.packb(v, use_bin_type=True)) for f, v in body.items()}
            big = max(sizes, key=sizes.__getitem__) if sizes else "?"
            raise UnstorableEvent(
                f"event {name} is {len(row)} bytes encoded, over the limit of {MAX_EVENT_BYTES} "
                f"bytes for one event (its field {big} is {sizes.get(big, 0)} bytes)"
            )
        if scalar:  # it packed, so it reads back as it is: what the decode below would find
            return _pending(name, version, timestamp, body, row)
        try:
            t, v, ts, back_body = _unpackb(row, raw=False, strict_map_key=False)
            if t != name or v != version:
                same = self.from_record(Record("", 0, t, v, ts, 0, back_body)) == event
            elif entry.plain:  # what ``cls(**back_body) == event`` compares, without building it
                same = type(back_body) is dict and body == back_body
            else:  # what from_record does with a current row
                same = entry.cls(**back_body) == event
        except Exception:
            same = False
        if not same:
            raise UnstorableEvent(self._why(name, body) or f"event {name}: does not read back equal")
        return _pending(name, version, timestamp, body, row)

    @staticmethod
    def _why(name: str, body: dict[str, Any]) -> str | None:
        for field, value in body.items():
            found = why_not_plain(value, field)
            if found:
                return f"event {name}: {found}"
        return None

    def from_record(self, record: Record) -> Any:
        """Turn a stored record back into its domain event, upcasting older versions."""
        entry = self._by_name.get(record.type)
        if entry is None:
            raise UnknownEventType(record.stream, record.offset, record.type)
        version, body = record.version, record.body
        if version > entry.version:
            raise NewerEventVersion(record.stream, record.offset, record.type, version, entry.version)
        while version < entry.version:
            step = self._upcasters.get((record.type, version))
            if step is None:
                raise CorruptLog(
                    record.stream,
                    record.offset,
                    f"no upcaster for {record.type!r} from version {version}",
                )
            body = step(dict(body))
            version += 1
        try:
            return entry.cls(**body)
        except TypeError as exc:
            raise CorruptLog(
                record.stream, record.offset, f"body does not fit {record.type!r}: {exc}"
            ) from exc

    def current(self) -> dict[tuple[str, int], type]:
        """``(name, version) -> class`` of every registered type at its current version: a
        stored body of one of these is its event as it is (``cls(**body)``, no upcasting);
        anything else goes through :meth:`from_record`."""
        return {(e.name, e.version): e.cls for e in self._by_name.values()}

    def names(self) -> list[str]:
        """All registered event type names."""
        return sorted(self._by_name)
