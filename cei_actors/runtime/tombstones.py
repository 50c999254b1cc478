"""Tombstones: what a component remembers of the records it forgot (issue 13, bounded state).

A component forgets a finished record (a PD process, an EPUM instance or domain, a
Provisioner node) after a retention, by an event, so its state stays bounded by its live work.
A :class:`Tombstones` map keeps, per forgotten id, the record's last public form, when it
ended and when it was forgotten, so that a late message about the id (a heartbeat, a
``describe``, a re-schedule, a ``DumpState``) still gets a correct, explained answer.

It is part of the fold: the burying event names the ids and carries its own bounds
(``keep``: at most this many tombstones; ``before``: tombstones forgotten before this time
go), so replay gives the same map whatever the configuration is when it replays. Tombstones
are kept in burial order; a bound drops the oldest first. The forgotten records themselves
stay in the log: ``cei log state --at`` shows them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_MAX_AGE",
    "Tombstone",
    "Tombstones",
    "parse_seconds",
    "parse_tombstone_bounds",
]

#: Tombstones kept per map unless configured (the Provisioner's bound since a15414c).
DEFAULT_LIMIT = 20_000
#: Seconds a tombstone is kept after its record was forgotten, unless configured.
DEFAULT_MAX_AGE = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Tombstone:
    """The last public record of a forgotten id, when it ended and when it was forgotten."""

    record: dict[str, Any]
    ended_at: float
    forgotten_at: float

    def describe(self) -> dict[str, Any]:
        """The record as callers see it: marked forgotten, with both times."""
        return {**self.record, "forgotten": True, "ended_at": self.ended_at,
                "forgotten_at": self.forgotten_at}


class Tombstones:
    """A bounded map ``id -> Tombstone`` in burial order (pure: part of a component's fold)."""

    __slots__ = ("_build", "_items")

    def __init__(self) -> None:
        #: a burial of :meth:`bury_later` is a tuple ``(object, ended_at, forgotten_at)``
        self._items: dict[str, Tombstone] = {}
        #: set by :meth:`settle`: builds the records still buried as they were, when asked for
        self._build: Callable[[Any], dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tombstones):
            return NotImplemented
        self._settle_all()
        other._settle_all()
        return self._items == other._items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Tombstones({len(self._items)})"

    def get(self, key: str) -> Tombstone | None:
        stone = self._items.get(key)
        if stone is not None and (type(stone) is tuple or type(stone.record) is not dict):
            stone = self._stone(stone)
            if type(stone.record) is dict:
                self._items[key] = stone
        return stone

    def _stone(self, stone: Tombstone | tuple[Any, float, float]) -> Tombstone:
        """The tombstone of an entry: its record built if :meth:`settle` says how."""
        record, ended_at, forgotten_at = (stone if type(stone) is tuple  # a burial of :meth:`bury_later`
                                          else (stone.record, stone.ended_at, stone.forgotten_at))
        if self._build is not None and type(record) is not dict:
            record = self._build(record)
        return Tombstone(record, float(ended_at), float(forgotten_at))

    def bury(self, key: str, record: dict[str, Any], ended_at: float, forgotten_at: float) -> None:
        """Remember ``record`` for ``key`` (a second burial of the same id replaces the first
        and counts as the newest)."""
        self._items.pop(key, None)
        self._items[key] = Tombstone(record, float(ended_at), float(forgotten_at))

    def bury_later(self, key: str, obj: Any, ended_at: float, forgotten_at: float) -> None:
        """:meth:`bury` ``obj`` as it is, its record to be built by :meth:`settle`'s ``build``
        (a replay's fold, RS4), kept as a plain tuple until then: most of a long fold's
        burials are dropped by a bound before anything asks for them (RS6)."""
        items = self._items
        items.pop(key, None)
        items[key] = (obj, ended_at, forgotten_at)  # type: ignore[assignment]

    def settle(self, build: Callable[[Any], dict[str, Any]]) -> None:
        """Have every record that is not yet a dict (one buried as it was, to be built later)
        replaced by ``build(record)``, order and times kept: each when it is first asked for
        (:meth:`get`, :meth:`remove`), all of them for :meth:`to_data` or a comparison, so a
        record the bound drops, or nobody asks for, is never built (decision RS4). ``build``
        must give the same record whenever it is called (the buried object is left as it was)."""
        self._build = build

    def _settle_all(self) -> None:
        build = self._build
        if build is None:
            return
        items = self._items
        for key, stone in items.items():
            if type(stone) is tuple or type(stone.record) is not dict:
                items[key] = self._stone(stone)
        self._build = None

    def remove(self, key: str) -> Tombstone | None:
        """Drop ``key`` (the id has a live record again); returns what was there."""
        stone = self._items.pop(key, None)
        if stone is not None and (type(stone) is tuple or type(stone.record) is not dict):
            stone = self._stone(stone)
        return stone

    def bound(self, keep: int | None = None, before: float | None = None) -> None:
        """Drop tombstones forgotten before ``before``, then the oldest beyond ``keep``.

        Ages are checked from the oldest burial on and stop at the first younger one, so a
        clock that stepped back delays an eviction but never makes one early."""
        items = self._items
        drop: list[str] = []
        if before is not None:
            for key, stone in items.items():
                if (stone[2] if type(stone) is tuple else stone.forgotten_at) >= before:
                    break
                drop.append(key)
        if keep is not None:
            excess = len(items) - len(drop) - max(0, keep)
            if excess > 0:
                drop.extend(itertools.islice(items, len(drop), len(drop) + excess))
        if drop:
            for key in drop:
                del items[key]
            if not items:
                self._items = {}  # a drained dict keeps its capacity (decision E3)

    def over(self, keep: int | None = None, before: float | None = None) -> bool:
        """True if :meth:`bound` with these bounds would drop something."""
        if keep is not None and len(self._items) > max(0, keep):
            return True
        if before is not None and self._items:
            stone = next(iter(self._items.values()))
            return (stone[2] if type(stone) is tuple else stone.forgotten_at) < before
        return False

    # ---- snapshot form ----------------------------------------------------------------------

    def to_data(self) -> list[list[Any]]:
        """Plain data, oldest first: ``[[id, record, ended_at, forgotten_at], ...]``."""
        self._settle_all()
        return [[k, t.record, t.ended_at, t.forgotten_at] for k, t in self._items.items()]

    @classmethod
    def from_data(cls, rows: Iterable[Any] | None) -> Tombstones:
        """The inverse of :meth:`to_data` (None or an absent key: an empty map)."""
        out = cls()
        for key, record, ended_at, forgotten_at in rows or ():
            out._items[key] = Tombstone(dict(record), float(ended_at), float(forgotten_at))
        return out


def parse_seconds(where: str, value: Any, *, forever: bool = True) -> float | None:
    """A config duration: seconds >= 0, or ``"forever"`` (None) when allowed; ``ValueError``
    names ``where`` otherwise."""
    if forever and isinstance(value, str) and value.strip().lower() == "forever":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < 1e12):
        also = " or 'forever'" if forever else ""
        raise ValueError(f"{where} must be seconds >= 0{also}, got {value!r}")
    return float(value)


def parse_tombstone_bounds(component: str, limit: Any, max_age: Any) -> tuple[int, float | None]:
    """``(tombstone_limit, tombstone_max_age)`` from a component's config, checked: a count
    >= 0, and seconds >= 0 or ``"forever"`` (None)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"{component} config: tombstone_limit must be an int >= 0, got {limit!r}")
    age = parse_seconds(f"{component} config: tombstone_max_age", max_age)
    return limit, age
