"""Reading a recorded log for debugging: read-only, by offset or by time, from snapshots.

:class:`Replay` opens a log read-only (nothing is created or changed, decision DBG1), reads
its streams archive included (LT1, through :meth:`EventLog.read`), finds the offset a time
corresponds to, and folds a stream up to any offset, starting from the newest usable
snapshot at or below it. Whatever is wrong with the stored data is raised as
:class:`~cei_actors.eventlog.CorruptLog` naming the stream and offset, never as a bare
library error.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgpack

from ..eventlog import CorruptLog, EventLog, EventLogError, Record, open_log
from ..eventlog.batch import unpack_state
from ..launch.components import component_for
from ..runtime.core import Component

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SCAN = 4096  # offsets read in one go when finding a time
_MARK_EVERY = 1024  # remember the time of every this many offsets read, to find times faster


class BadAt(ValueError):
    """An ``--at`` that is neither an offset nor a time."""


def parse_at(text: str | int | None, now: float, name: str = "--at") -> tuple[str, float | None]:
    """``("head", None)``, ``("offset", n)`` or ``("time", t)`` for an ``--at`` value: an
    offset, ``HEAD``, an ISO-8601 time (UTC unless it names a zone) or ``-N[smhd]`` before
    ``now``."""
    if text is None:
        return "head", None
    if isinstance(text, int):
        return "offset", float(text)
    value = text.strip()
    if value.upper() == "HEAD":
        return "head", None
    if value.isdigit() or (value.startswith("-") and value[1:].isdigit()):
        return "offset", float(int(value))  # a negative one is refused with the stream's range
    m = _RELATIVE.match(value)
    if m:
        return "time", now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise BadAt(f"{name} {text}: expected an offset, HEAD, an ISO-8601 time or -N[smhd] "
                    "(e.g. -10m)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return "time", when.timestamp()


def human_time(ts: float | None) -> str:
    """``ts`` (seconds since the epoch) as ``YYYY-MM-DD HH:MM:SS.mmmZ`` (UTC)."""
    if ts is None:
        return "-"
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, OSError, ValueError):
        return f"{ts:.3f}"


class Replay:
    """A log opened read-only, its streams folded to any point. ``now`` is injected;
    ``configs`` (stream -> the component's constructor arguments, e.g. the plan's PD config,
    whose throttle interval the fold uses) default to the replay configuration."""

    def __init__(self, log: EventLog | str, now: float | None = None,
                 configs: dict[str, dict[str, Any]] | None = None) -> None:
        self.log = open_read_only(log) if isinstance(log, str) else log
        self.now = time.time() if now is None else now
        self.configs = configs or {}
        self._heads: dict[str, int] = {}
        self._marks: dict[str, dict[int, float]] = {}  # stream -> offset -> its record's time
        self._components: dict[str, Component[Any]] = {}

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- positions ----------------------------------------------------------------------------

    def streams(self) -> list[str]:
        return guarded(self.log.streams, "?")

    def head(self, stream: str) -> int:
        if stream not in self._heads:
            self._heads[stream] = guarded(lambda: self.log.head(stream), stream)
        return self._heads[stream]

    def record(self, stream: str, offset: int) -> Record | None:
        """The record at ``offset``, or None outside the stream."""
        if offset < 1 or offset > self.head(stream):
            return None
        for r in self.records(stream, offset, offset):
            return r
        return None

    def offset_at_time(self, stream: str, when: float) -> int:
        """The last offset whose record was written at or before ``when`` (0: none)."""
        lo, hi = 0, self.head(stream)  # invariant: time(lo) <= when (0: before all), time(hi+1) > when
        for offset, ts in self._marks.get(stream, {}).items():  # times seen while reading
            if ts <= when:
                lo = max(lo, offset)
            else:
                hi = min(hi, offset - 1)
        while hi - lo > _SCAN:  # each probe decodes a batch: narrow down, then read the rest at once
            mid = (lo + hi + 1) // 2
            r = self.record(stream, mid)
            if r is not None and r.timestamp <= when:
                lo = mid
            else:
                hi = mid - 1
        for r in self.records(stream, lo + 1, hi):
            if r.timestamp > when:
                break
            lo = r.offset
        return lo

    def resolve(self, stream: str, at: str | int | None, name: str = "--at") -> int:
        """The offset of ``stream`` an ``--at`` value names; an offset past the head is a
        :class:`BadAt` (``name`` is the option it came from, for the message)."""
        kind, value = parse_at(at, self.now, name)
        head = self.head(stream)
        if kind == "head":
            return head
        if kind == "offset":
            assert value is not None
            if not 0 <= value <= head:
                raise BadAt(f"{name} {at}: stream {stream!r} has offsets 0 to {head}")
            return int(value)
        assert value is not None
        return self.offset_at_time(stream, value)

    def time_of(self, stream: str, offset: int) -> float | None:
        r = self.record(stream, offset)
        return r.timestamp if r is not None else None

    # ---- reading and folding -------------------------------------------------------------------

    def component(self, stream: str) -> Component[Any]:
        if stream not in self._components:
            self._components[stream] = component_for(stream, self.configs.get(stream.split(".", 1)[0]))
        return self._components[stream]

    def records(self, stream: str, start: int = 1, stop: int | None = None) -> Iterator[Record]:
        """The stream's records ``start..stop``; damage is a :class:`CorruptLog` at its offset."""
        last = start - 1
        marks = self._marks.setdefault(stream, {})
        it = self.log.read(stream, start, stop)
        while True:
            try:
                r = next(it)
            except StopIteration:
                return
            except EventLogError:
                raise
            except (sqlite3.Error, msgpack.UnpackException, ValueError, TypeError, KeyError) as exc:
                raise CorruptLog(stream, last + 1, f"unreadable: {type(exc).__name__}: {exc}") from None
            last = r.offset
            if not last % _MARK_EVERY:
                marks[last] = r.timestamp
            yield r

    def state(self, stream: str, offset: int, snapshots: bool = True) -> Any:
        """The stream's state with every event up to ``offset`` applied; from the newest
        snapshot at or below ``offset`` that loads (else from the start) unless not
        ``snapshots``."""
        component = self.component(stream)
        state, start = None, 1
        if snapshots:
            state, start = self._from_snapshot(stream, component, offset)
        if state is None:
            state = component.initial_state()
        decode, apply = component.registry.from_record, component.apply
        for record in self.records(stream, start, offset):
            try:
                state = apply(state, decode(record))
            except EventLogError:
                raise
            except Exception as exc:  # noqa: BLE001 - a foreign body the fold cannot take
                raise CorruptLog(stream, record.offset,
                                 f"{record.type} does not apply: {type(exc).__name__}: {exc}") from None
        return state

    def _from_snapshot(self, stream: str, component: Component[Any], offset: int) -> tuple[Any, int]:
        try:
            offsets = self.log.snapshots(stream)
        except (EventLogError, sqlite3.Error):
            return None, 1
        for at in offsets:  # newest first; one that does not load is skipped, as recovery does
            if at > offset:
                continue
            try:
                snap = self.log.load_snapshot(stream, at)
                if snap is None or snap.version != component.snapshot_version:
                    continue
                data = unpack_state(snap.data)
                return component.restore(data), at + 1
            except Exception:  # noqa: BLE001 - fall back to an older one, or to the events
                continue
        return None, 1


def open_read_only(url: str) -> EventLog:
    """``open_log(url)`` read-only: the tools never create, mark or change a log."""
    return guarded(lambda: open_log(url, read_only=True), "?")


def guarded(call: Any, stream: str) -> Any:
    """``call()``, with a library error on stored data turned into a one-line log error."""
    try:
        return call()
    except EventLogError:
        raise
    except sqlite3.Error as exc:
        raise CorruptLog(stream, None, f"unreadable: {exc}") from None
