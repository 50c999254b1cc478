"""Reading a recorded log for debugging: read-only, by offset or by time, from snapshots.

:class:`Replay` opens a log read-only (nothing is created or changed, decision DBG1), reads
its streams archive included (LT1, through :meth:`EventLog.read`), finds the offset a time
corresponds to, and folds a stream up to any offset, starting from the newest usable
snapshot at or below it. Whatever is wrong with the stored data is raised as
:class:`~cei_actors.eventlog.CorruptLog` naming the stream and offset, never as a bare
library error.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack

from ..eventlog import CorruptLog, EventLog, EventLogError, Record, open_log
from ..eventlog.batch import SharedValues, records_of, unpack_state
from ..launch.components import component_for
from ..private_files import private_dir, write_secret_file
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
    whose throttle interval the fold uses) default to the replay configuration; ``components``
    (stream -> a component) folds those streams with the caller's own (the simulator's check)."""

    def __init__(self, log: EventLog | str, now: float | None = None,
                 configs: dict[str, dict[str, Any]] | None = None,
                 cache: Path | str | None | bool = True,
                 components: dict[str, Component[Any]] | None = None) -> None:
        self.log = open_read_only(log) if isinstance(log, str) else log
        self.now = time.time() if now is None else now
        self.configs = configs or {}
        #: checkpoints of long folds (RS2): True the default directory, a path, None/False off
        root = default_cache() if cache is True else (Path(cache) if cache else None)
        url = str(getattr(self.log, "url", ""))
        self.checkpoints = Checkpoints(root, url) if root is not None and not url.startswith("memory:") else None
        #: ``(stream, first offset folded, last offset)`` of the latest :meth:`state`
        self.folded: tuple[str, int, int] | None = None
        self._heads: dict[str, int] = {}
        self._marks: dict[str, dict[int, float]] = {}  # stream -> offset -> its record's time
        #: stream -> the component that folds it (given ones are used as they are)
        self._components: dict[str, Component[Any]] = dict(components or {})

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
        with paused_gc():  # a whole batch is decoded for it
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
        with paused_gc():
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
        for first, epoch, rows in self.rows(stream, start, stop):
            yield from records_of(stream, first, epoch, rows)

    def rows(self, stream: str, start: int = 1, stop: int | None = None,
             shared: SharedValues | None = None) -> Iterator[tuple[int, int, list]]:
        """The stream's stored rows ``start..stop`` a batch at a time (:meth:`EventLog.read_rows`:
        ``(first offset, epoch, rows)``, rows unchecked, ``shared`` values decoded once); damage
        is a :class:`CorruptLog` at its offset."""
        last = start - 1
        marks = self._marks.setdefault(stream, {})
        it = self.log.read_rows(stream, start, stop, shared=shared)
        while True:
            try:
                first, epoch, rows = next(it)
            except StopIteration:
                return
            except EventLogError:
                raise
            except (sqlite3.Error, msgpack.UnpackException, ValueError, TypeError, KeyError) as exc:
                raise CorruptLog(stream, last + 1, f"unreadable: {type(exc).__name__}: {exc}") from None
            last = first + len(rows) - 1
            for k in range(-(-first // _MARK_EVERY) * _MARK_EVERY, last + 1, _MARK_EVERY):
                row = rows[k - first]
                if type(row) is list and len(row) > 2 and type(row[2]) in (float, int):
                    marks[k] = row[2]
            yield first, epoch, rows

    def state(self, stream: str, offset: int, snapshots: bool = True) -> Any:
        """The stream's state with every event up to ``offset`` applied; from the newest
        snapshot at or below ``offset`` that loads (unless not ``snapshots``) or the newest
        valid checkpoint past it (:class:`Checkpoints`), else from the start."""
        component = self.component(stream)
        ckpt = self.checkpoints
        with paused_gc():
            state, start = None, 1
            if snapshots:
                state, start = self._from_snapshot(stream, component, offset)
            if ckpt is not None:  # a state folded earlier, past the snapshot
                found = ckpt.load(self.log, stream, offset, start, component.snapshot_version)
                if found is not None:
                    state, start = component.restore(found[1]), found[0] + 1
            if state is None:
                state = component.initial_state()
            state = self._fold(stream, component, state, start, offset, True)
            if ckpt is not None and offset - start + 1 >= ckpt.min_events:
                self._checkpoint(stream, component, state, offset, None, None)
        self.folded = (stream, start, offset)
        return state

    def fold(self, stream: str, state: Any, start: int, offset: int, settle: bool = True) -> Any:
        """``state`` (the stream's state after offset ``start - 1``) with the events
        ``start..offset`` applied, by the fold :meth:`state` uses. Its derived indexes are
        deferred meanwhile (RS1) and rebuilt at the end; with ``settle=False`` they stay
        deferred, for a caller folding on from ``offset + 1`` later (nothing may read the state
        until a call with ``settle``, which may fold no events: ``start = offset + 1``).
        No checkpoints are read or written."""
        with paused_gc():
            return self._fold(stream, self.component(stream), state, start, offset, settle, False)

    def _fold(self, stream: str, component: Component[Any], state: Any, start: int, offset: int,
              settle: bool, checkpoints: bool = True) -> Any:
        """The fold loop of :meth:`state` and :meth:`fold` (the collector paused by the caller);
        with ``checkpoints``, one is saved every :attr:`Checkpoints.every` events on the way."""
        # a state that can defer its derived indexes builds them once, at the end (RS1)
        defer, reindex = getattr(state, "defer_index", None), getattr(state, "reindex", None)
        deferred = start <= offset and defer is not None and reindex is not None
        if deferred:
            defer()
        decode, apply = component.registry.from_record, component.apply
        current = component.registry.current()
        fast = component.body_appliers(state)  # folded from the body, no event built (RS3)
        # a repeated spec decoded once, shared by the events the fold only reads (RS5)
        fields = component.shared_fields() if fast else None
        shared = SharedValues(fields) if fields else None
        ckpt = self.checkpoints if checkpoints else None
        every = ckpt.every if ckpt is not None else 0
        due = start - 1 + every if every else -1  # the next checkpoint on the way
        for first, epoch, rows in self.rows(stream, start, offset, shared):
            at = first - 1
            for row in rows:
                at += 1
                fn = None
                try:
                    fn = fast.get((row[0], row[1]))
                    if fn is not None:
                        state = fn(state, **row[3])
                    else:
                        if shared is not None:  # an event may keep what it is given
                            row = shared.unshared(row)  # noqa: PLW2901
                        record = _record(stream, at, epoch, row)
                        try:  # a current body is its event; else upcast, or the one-line error
                            event = current[record.type, record.version](**record.body)
                        except (KeyError, TypeError):
                            event = decode(record)
                        state = apply(state, event)
                except EventLogError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a foreign body the fold cannot take
                    record = _record(stream, at, epoch, row)  # a row of the wrong shape says so
                    if fn is not None:
                        decode(record)  # a body that does not fit says so, as the event would
                    raise CorruptLog(stream, at, f"{record.type} does not apply: "
                                                 f"{type(exc).__name__}: {exc}") from None
                if at == due and at < offset:
                    self._checkpoint(stream, component, state, at, reindex, defer if deferred else None)
                    due += every
        if settle and reindex is not None:
            reindex()
        return state

    def _checkpoint(self, stream: str, component: Component[Any], state: Any, offset: int,
                    reindex: Any, defer: Any) -> None:
        assert self.checkpoints is not None
        if reindex is not None and defer is not None:
            reindex()  # the snapshot form needs the records the fold deferred
        data = msgpack.packb(component.snapshot(state), use_bin_type=True)
        if reindex is not None and defer is not None:
            defer()
        self.checkpoints.save(self.log, stream, offset, component.snapshot_version, data)

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


def _record(stream: str, offset: int, epoch: int, row: Any) -> Record:
    """The record of one stored row (:class:`CorruptLog` for a row of the wrong shape)."""
    return records_of(stream, offset, epoch, [row])[0]


def default_cache() -> Path | None:
    """Where :class:`Checkpoints` live: ``CEI_REPLAY_CACHE`` (a directory, or ``off``), else
    ``$XDG_CACHE_HOME/cei/replay`` (``~/.cache/cei/replay``)."""
    env = os.environ.get("CEI_REPLAY_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "no", "none") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cei" / "replay"


_FINGERPRINT: list[str] = []


def code_fingerprint() -> str:
    """A digest of this package's source: states folded by other code are never reused."""
    if not _FINGERPRINT:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        _FINGERPRINT.append(h.hexdigest()[:20])
    return _FINGERPRINT[0]


class Checkpoints:
    """States that long folds reached, kept in a private cache directory for later folds
    of the same log to start from (decision RS2); never inside the log, which stays unread-
    only. A checkpoint at offset ``k`` holds the component's snapshot data there and a digest
    of the ``(first offset, CRC-32)`` of every stored batch up to ``k``: it is used only
    while the log's batches still carry those checksums (a log rebuilt or replaced at the same
    URL invalidates it, and it is deleted), and only by the same code (the directory is
    named by :func:`code_fingerprint`). Writing is best effort: a cache that cannot be
    written is no cache."""

    min_events = 50_000  #: a fold this long leaves its end state behind
    every = 250_000  #: and a checkpoint every this many events folded on the way
    kept = 8  #: per log and stream; the least recently used go
    stale_days = 7.0  #: caches of other code not used for this long go

    def __init__(self, root: Path, url: str) -> None:
        self.root = Path(root)
        self.url = url

    @property
    def base(self) -> Path:
        """The directory of this code's checkpoints (the source is read once, when first needed)."""
        return self.root / code_fingerprint()

    @property
    def dir(self) -> Path:
        """The directory of this log's checkpoints."""
        return self.base / hashlib.sha256(self.url.encode()).hexdigest()[:24]

    def _digest(self, sums: list[tuple[int, int]], stream: str, offset: int) -> bytes:
        return hashlib.sha256(msgpack.packb([stream, offset, [list(x) for x in sums]])).digest()

    def load(self, log: EventLog, stream: str, offset: int, above: int,
             version: int) -> tuple[int, Any] | None:
        """``(k, snapshot data)`` of the newest valid checkpoint with ``above <= k <= offset``."""
        try:
            names = sorted((int(p.stem), p) for p in (self.dir / stream).glob("*.ckpt") if p.stem.isdigit())
        except OSError:
            return None
        sums: list[tuple[int, int]] | None = None
        for k, path in reversed(names):
            if k > offset or k < above:
                continue
            try:
                if sums is None:
                    sums = log.batch_checksums(stream, offset)
                fmt, s_stream, s_offset, s_version, digest, data = msgpack.unpackb(path.read_bytes())
                valid = (fmt, s_stream, s_offset) == (1, stream, k) and digest == self._digest(
                    [x for x in sums if x[0] <= k], stream, k)
                if not valid:
                    path.unlink(missing_ok=True)
                    continue
                if s_version != version:
                    continue
                os.utime(path)  # used: kept longer
                return k, msgpack.unpackb(data, raw=False, strict_map_key=False)
            except (EventLogError, sqlite3.Error):
                return None
            except Exception:  # noqa: BLE001 - a damaged cache file is no checkpoint
                path.unlink(missing_ok=True)
        return None

    def save(self, log: EventLog, stream: str, offset: int, version: int, data: bytes) -> None:
        """Keep the state at ``offset`` (``data``: its snapshot form, msgpack)."""
        try:
            sums = log.batch_checksums(stream, offset)
            where = self.dir / stream
            fresh = not self.base.is_dir()
            private_dir(where)
            for d in (self.root, self.base, self.dir):
                private_dir(d)
            blob = msgpack.packb([1, stream, offset, version, self._digest(sums, stream, offset), data])
            tmp = where / f".{offset}.{os.getpid()}.tmp"
            tmp.unlink(missing_ok=True)
            write_secret_file(tmp, blob)
            os.replace(tmp, where / f"{offset}.ckpt")
            files = sorted(where.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in files[self.kept:]:
                old.unlink(missing_ok=True)
            if fresh:  # caches of other code, not used for a while
                limit = time.time() - self.stale_days * 86400
                for other in self.root.iterdir():
                    if other != self.base and other.is_dir() and other.stat().st_mtime < limit:
                        shutil.rmtree(other, ignore_errors=True)
        except (OSError, EventLogError, sqlite3.Error):
            return


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside: decoding a batch makes thousands of containers
    and a fold keeps many, so the collector ran over the growing state again and again (three
    quarters of the time spent reading a long log, decision RS1). Folds make no cycles to
    collect; the collector is back on (if it was) at the end, with what survived the pause
    counted as old: moved to the oldest generation unscanned (``gc.freeze`` then ``unfreeze``,
    unless the program keeps objects frozen itself), where the next young collections would
    have scanned the whole new state twice to move it there (~0.3 s after a long fold, RS4)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if not gc.get_freeze_count():
                gc.freeze()
                gc.unfreeze()
            gc.enable()


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
