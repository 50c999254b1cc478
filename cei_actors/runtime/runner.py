"""Drive a pure component against an event log: recover, decide, append (fenced), apply.

The :class:`Runner` knows nothing of actors. The thespian shell, the simulator and replay
tools all use it, so a component behaves the same under each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import json
import logging
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, cast

import msgpack

from ..eventlog import (
    CorruptLog,
    EventLog,
    Fence,
    PendingEvent,
    Record,
    Snapshot,
    UnstorableEvent,
)
from ..eventlog.batch import records_of, unpack_state
from .core import Component, Context, Decision, Rejected, S
from .messages import ErrorReply, InvalidMessage, validate
from .metrics import LogStats

logger = logging.getLogger(__name__)


class NotReady(Exception):  # noqa: N818
    """The runner has no valid state: recover first (after start, or after a failed append)."""


def fold(component: Component[S], records: Iterable[Record], state: S | None = None) -> S:
    """Apply ``records`` to ``state`` (default: the initial state) and return the result."""
    if state is None:
        state = component.initial_state()
    decode, apply = component.registry.from_record, component.apply
    for record in records:
        state = apply(state, decode(record))
    return state


def replay(component: Component[S], log: EventLog, stream: str, upto: int | None = None) -> S:
    """The state rebuilt from the whole log (no snapshot) up to offset ``upto``."""
    return fold(component, log.read(stream, 1, upto))


#: Bytes of snapshot per event of tail: a snapshot is taken once the events since the last one
#: number ``snapshot_every`` and also the last snapshot's size over this. A big state (a PD
#: holding every process it ran) is then snapshotted in proportion to its size, so snapshots
#: cost O(1) per event as it grows, and a replay reads a tail about as big as the snapshot.
SNAPSHOT_BYTES_PER_EVENT = 128

#: A state whose last snapshot was at least this big is snapshotted by a forked child from
#: copy-on-write memory, so the actor stalls for the fork only (docs/decisions.md LT3); a
#: smaller one is serialized in place (a few ms at most).
BACKGROUND_SNAPSHOT_BYTES = 256 * 1024
_LENGTH = struct.Struct(">Q")

#: Inputs a recording runner stores with one event at most, by count and by encoded bytes;
#: past either they are dropped for a gap marker (docs/decisions.md DBG6). With the event's own
#: 512 KiB limit a row stays under a ZooKeeper multi's 900 KiB.
MAX_BUFFERED_INPUTS = 1000
MAX_INPUT_BYTES = 256 * 1024
_TAGS = ("~m", "~t", "~l", "~s", "~f")
_KEYS = (str, int, float, bool, bytes, type(None))


def encode_input(message: Any) -> Any:
    """``message`` as plain msgpack data that :func:`decode_input` turns back into an equal
    message: dataclasses by class name and fields, tuples and sets tagged."""
    t = type(message)
    if t is str or t is int or t is float or t is bool or message is None or t is bytes:
        return message
    if t is dict:
        if not all(type(k) in _KEYS for k in message):
            raise TypeError("a map key that would not read back")
        return {k: encode_input(v) for k, v in message.items()}
    if t is list:
        items = [encode_input(v) for v in message]
        return ["~l", items] if items and isinstance(items[0], str) and items[0] in _TAGS else items
    if t is tuple:
        return ["~t", [encode_input(v) for v in message]]
    if t is set or t is frozenset:
        return ["~s" if t is set else "~f", [encode_input(v) for v in message]]
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        fields = {f.name: encode_input(getattr(message, f.name)) for f in dataclasses.fields(message) if f.init}
        return ["~m", f"{t.__module__}:{t.__qualname__}", fields]
    raise TypeError(f"{t.__name__} is not recordable")


def decode_input(data: Any) -> Any:
    """The message :func:`encode_input` recorded, built with the current code's classes (only
    dataclasses of this package); ``ValueError`` if the current code cannot build it."""
    if isinstance(data, dict):
        return {k: decode_input(v) for k, v in data.items()}
    if not isinstance(data, list):
        return data
    if len(data) >= 2 and isinstance(data[0], str) and data[0] in _TAGS:
        tag = data[0]
        if tag == "~m":
            module, _, name = str(data[1]).partition(":")
            if not module.startswith("cei_actors."):
                raise ValueError(f"{data[1]}: not a class of this package")
            try:
                cls: Any = importlib.import_module(module)
                for part in name.split("."):
                    cls = getattr(cls, part)
                if not dataclasses.is_dataclass(cls):
                    raise TypeError("not a dataclass")
                return cls(**{k: decode_input(v) for k, v in data[2].items()})
            except Exception as exc:  # the class is gone or its fields changed
                raise ValueError(f"{data[1]}: cannot be built by this code: {type(exc).__name__}: {exc}") from None
        items = [decode_input(v) for v in data[1]]
        return {"~t": tuple, "~s": set, "~f": frozenset}.get(tag, list)(items)
    return [decode_input(v) for v in data]


def decide_one(component: Component[S], state: S, message: Any, ctx: Context, stream: str = "",
               log_failures: bool = True, trusted: bool = False) -> Decision:
    """``validate`` (not for a ``trusted`` message, one the simulator's own cores built:
    decision SIM5) then ``component.decide``; a refusal, a malformed message or a failure
    becomes a decision whose reply is an :class:`ErrorReply` (what the runner does), a failure
    logged with its traceback when ``log_failures``."""
    name = type(message).__name__
    try:
        if not trusted:
            validate(message)
        return component.decide(state, message, ctx)
    except Rejected as exc:
        return Decision(reply=ErrorReply(exc.code, exc.message, name))
    except InvalidMessage as exc:
        return Decision(reply=ErrorReply("bad_request", str(exc), name))
    except Exception as exc:
        if log_failures:
            logger.exception("stream %s: decide failed on %s", stream, name)
        return Decision(reply=ErrorReply("internal", f"{type(exc).__name__}: {exc}", name))


class Runner(Generic[S]):
    """One component instance: its state, its place in the log and its fence."""

    def __init__(
        self,
        component: Component[S],
        log: EventLog,
        *,
        stream: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        snapshot_every: int = 10_000,
        record_inputs: bool = False,
    ) -> None:
        self.component = component
        self.log = log
        self.stream = stream or component.stream
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.snapshot_every = snapshot_every
        self.state: S | None = None
        self.head = 0
        self.fence: Fence | None = None
        self._since_snapshot = 0
        self._snapshot_due = snapshot_every
        self._followed: tuple[S, int] | None = None  # a hot standby's (state, head)
        #: Take due snapshots of big states in a forked child (see :meth:`_snapshot_in_child`).
        self.background_snapshots = hasattr(os, "fork")
        #: ... by a snapshotter process folding the log where it can (see :meth:`_snapshot_in_child`).
        self.snapshot_process = True
        self._snapshotter_failed = False  # the last snapshotter failed: the next one is forked
        self._snapshotter: subprocess.Popen[bytes] | None = None  # used by the history thread only
        self._snapshot_bytes = 0  # size of the last snapshot saved or loaded
        self._history = _HistoryWorker(f"history-{self.stream}")
        self._truncate_again = False
        #: What this runner appended and snapshotted (read by the shell's metrics).
        self.log_stats = LogStats()
        #: Store each decided input (message, time, seed) with the events it produced, for
        #: ``cei log verify`` (docs/decisions.md DBG6). Decisions then get a seeded randomness each.
        self.record_inputs = record_inputs
        self._inputs: list[bytes] = []  # packed inputs decided since the last stored event
        self._inputs_bytes = 0

    def _context_for_input(self, now: float) -> Context:
        if self.record_inputs:
            return Context(now, seed=self.rng.getrandbits(64))
        return Context(now, self.rng)

    def _note_input(self, message: Any, ctx: Context, events: int) -> None:
        """Hold a decided input for the next stored event (None: ``recovered``)."""
        entry: dict[str, Any] = {"t": ctx.now, "m": None, "n": events, "s": ctx.seed}
        if message is not None and not getattr(message, "recordable", True):
            entry = {"t": ctx.now, "skip": type(message).__name__, "n": events}
        try:
            if message is not None and "skip" not in entry:
                entry["m"] = encode_input(message)
            packed = msgpack.packb(entry, use_bin_type=True)
        except Exception:  # not recordable: later decisions cannot be checked until a recovery
            try:
                validate(message)
            except InvalidMessage:
                return  # refused before ``decide``: it changed nothing, re-running it shows nothing
            packed = msgpack.packb({"gap": 1}, use_bin_type=True)
        if len(packed) > MAX_INPUT_BYTES // 2:
            packed = msgpack.packb({"gap": 1}, use_bin_type=True)
        if len(self._inputs) >= MAX_BUFFERED_INPUTS or self._inputs_bytes + len(packed) > MAX_INPUT_BYTES:
            self._inputs = [msgpack.packb({"gap": len(self._inputs)}, use_bin_type=True)]
            self._inputs_bytes = 0
        self._inputs.append(packed)
        self._inputs_bytes += len(packed)

    def _with_inputs(self, first: PendingEvent, message: Any, ctx: Context, events: int) -> PendingEvent:
        """``first`` carrying the held inputs and this decision's."""
        self._note_input(message, ctx, events)
        inputs, self._inputs, self._inputs_bytes = self._inputs, [], 0
        return PendingEvent(first.type, first.version, first.timestamp, first.body, inputs)

    @property
    def ready(self) -> bool:
        return self.state is not None

    def context(self) -> Context:
        return Context(self.clock(), self.rng)

    def recover(self) -> Decision:
        """Fence out earlier writers, rebuild the state (snapshot + tail), then reconcile.

        A hot standby (:meth:`follow`) takes over from the state it followed instead: only the
        records after its followed head are read. Returns the decision of
        ``component.recovered`` after persisting its events; the caller performs its effects.
        """
        self.state = None
        self.fence = self.log.acquire(self.stream)
        if self._followed is not None:
            return self._take_over()
        return self._rebuild()

    def _rebuild(self) -> Decision:
        """Load the state from the log (snapshot + tail) under the current fence, reconcile."""
        self.state = None
        state, head = self._load()
        return self._reconcile(state, head)

    def _load(self) -> tuple[S, int]:
        """The newest usable snapshot plus the records after it: (state, head)."""
        self._snapshot_due = self.snapshot_every
        state, head, fell_back = self._restore_snapshot()
        if fell_back:  # replace the unreadable snapshot at the next append
            self._snapshot_due = 1
        if state is None:
            state = self.component.initial_state()
        # a state that can defer its derived indexes builds them once, after the tail (SC17)
        defer, reindex = getattr(state, "defer_index", None), getattr(state, "reindex", None)
        if defer is None or reindex is None:
            return self._fold_log(state, head)
        defer()
        state, head = self._fold_log(state, head)
        reindex()
        return state, head

    def _fold_log(self, state: S, head: int) -> tuple[S, int]:
        """``state`` (at offset ``head``) with every stored record after ``head`` applied:
        (state, new head). What ``apply(state, from_record(record))`` per record gives, read
        as stored rows (no :class:`Record` made): a current row's event is built from its body
        (``from_record``'s own step), and the types the component folds from a stored body
        (:meth:`~.core.Component.body_appliers`) are folded so (decision RT2). Older versions,
        rows with recorded inputs and every error go the way of ``from_record``."""
        registry, apply = self.component.registry, self.component.apply
        decode, current = registry.from_record, registry.current()
        fast = self.component.body_appliers(state)
        stream = self.stream
        for first, epoch, rows in self.log.read_rows(stream, head + 1):
            at = first - 1
            for i, row in enumerate(rows):
                at += 1
                try:
                    t, v, ts, body = row
                except (TypeError, ValueError):  # recorded inputs (a fifth item), or a wrong shape
                    for record in records_of(stream, first, epoch, rows)[i:]:  # which says so
                        state = apply(state, decode(record))
                    at = first + len(rows) - 1
                    break
                fn = fast.get((t, v))
                if fn is not None:
                    try:
                        state = fn(state, **body)
                    except Exception:
                        decode(Record(stream, at, t, v, ts, epoch, body))  # a body that does not fit says so
                        raise
                    continue
                cls = current.get((t, v))
                try:
                    if cls is None:
                        raise TypeError
                    event = cls(**body)
                except TypeError:  # not current, or does not fit: upcast, or the one-line error
                    event = decode(Record(stream, at, t, v, ts, epoch, body))
                state = apply(state, event)
            head = at
        return state, head

    def _reconcile(self, state: S, head: int) -> Decision:
        """Lead from ``state`` at ``head``: run ``component.recovered`` and persist its events."""
        self.state, self.head = state, head
        self._since_snapshot = 0
        self._inputs, self._inputs_bytes = [], 0  # what an earlier leadership decided without events died with it
        ctx = self._context_for_input(self.clock())
        decision = self.component.recovered(state, ctx)
        if decision.events:
            try:
                pending = self._checked(decision.events, ctx.now)
                for event in decision.events:
                    self.state = self.component.apply(self.state, event)
            except Exception:
                self.state = None
                raise
            if self.record_inputs:
                pending[0] = self._with_inputs(pending[0], None, ctx, len(pending))
            self._commit(pending)
        elif self.record_inputs:
            self._note_input(None, ctx, 0)
        return decision

    def _restore_snapshot(self) -> tuple[S | None, int, bool]:
        """The state of the newest usable snapshot, its offset, and whether a newer one was
        skipped. A snapshot that cannot be read or restored costs a fall back to the one before
        (or a full replay, archive included), said in a warning, never a wrong state or a dead
        component."""
        try:
            offsets = self.log.snapshots(self.stream)
        except CorruptLog as exc:
            logger.warning("stream %s: snapshots unreadable (%s); replaying from offset 1", self.stream, exc)
            return None, 0, True
        skipped: list[int] = []
        for offset in offsets:
            problem = None
            try:
                snap = self.log.load_snapshot(self.stream, offset)
            except CorruptLog as exc:
                snap, problem = None, f"unreadable: {exc}"
            if snap is not None and snap.version != self.component.snapshot_version:
                snap, problem = None, f"schema version {snap.version}, this code writes {self.component.snapshot_version}"
            state = None
            if snap is not None:
                try:
                    state = self.component.restore(unpack_state(snap.data))
                except Exception as exc:  # a bad snapshot costs a longer replay, never a wrong state
                    problem = f"cannot be restored: {type(exc).__name__}: {exc}"
            if state is None:
                if problem is not None:
                    skipped.append(offset)
                    logger.warning("stream %s: snapshot at offset %s %s", self.stream, offset, problem)
                continue
            assert snap is not None
            if skipped:
                logger.warning(
                    "stream %s: recovering from the snapshot at offset %s instead of offset %s, "
                    "replaying the events after %s", self.stream, offset, skipped[0], offset)
            self._snapshot_bytes = self.log_stats.snapshot_bytes = len(snap.data)
            self._snapshot_due = self._due_after(len(snap.data))
            return state, offset, bool(skipped)
        if skipped:
            logger.warning("stream %s: no usable snapshot (skipped offsets %s); replaying from offset 1",
                           self.stream, ", ".join(map(str, skipped)))
        return None, 0, bool(skipped)

    def handle(self, message: Any, trusted: bool = False) -> Decision:
        """Decide on one message and persist its events: :meth:`handle_many` of ``[message]``
        without a batch's lists and loops (decision RT13)."""
        if self.state is None:
            raise NotReady(f"stream {self.stream}: not recovered")
        pending: list[PendingEvent] = []
        decision = self._take(message, self.context(), trusted, pending)
        if pending:
            self._commit(pending)
        return decision

    def handle_many(self, messages: Sequence[Any], trusted: bool = False) -> list[Decision]:
        """Decide on each message in turn, then persist all their events in one append.

        ``trusted``: the messages were built in this process by the system's own pure code
        (the simulator's in-process deliveries, docs/decisions.md SIM5), so :func:`validate`
        is skipped; everything from outside is validated.

        A refused or malformed message gets an :class:`ErrorReply` and changes nothing. So does
        a message whose events would not read back equal or are too large
        (:meth:`~cei_actors.eventlog.EventRegistry.to_checked`): it gets ``bad_request``, none
        of its events is written, the other messages are unaffected, and if the component
        applies events inside ``decide`` (``applies_in_decide``) the state is rebuilt from the
        log under the same fence (the leader keeps leading; see :meth:`_refuse`). If the append
        fails the state is dropped (:class:`NotReady` until :meth:`recover`) and the exception
        propagates: nothing was acknowledged, so nothing is lost.
        """
        if self.state is None:
            raise NotReady(f"stream {self.stream}: not recovered")
        ctx = self.context()
        pending: list[PendingEvent] = []
        take = self._take
        decisions = [take(message, ctx, trusted, pending) for message in messages]
        if pending:
            self._commit(pending)
        return decisions

    def _take(self, message: Any, ctx: Context, trusted: bool, pending: list[PendingEvent]) -> Decision:
        """One message of :meth:`handle_many`: decided against the state the ones before it
        left, its events checked (a refusal: :meth:`_refuse`), applied and added to
        ``pending``; its decision."""
        record = self.record_inputs
        component = self.component
        now = ctx.now
        mctx = self._context_for_input(now) if record else ctx
        decision = decide_one(component, self.state, message, mctx, self.stream, trusted=trusted)
        events = decision.events
        if events:
            to_checked = component.registry.to_checked
            try:
                checked = [to_checked(event, now) for event in events]
            except UnstorableEvent as exc:
                return self._refuse(message, exc, pending)
            apply = component.apply
            try:
                state = self.state
                for event in events:
                    state = apply(state, event)
                self.state = state
            except Exception:
                self.state = None
                raise
            if record:
                checked[0] = self._with_inputs(checked[0], message, mctx, len(checked))
            pending.extend(checked)
        elif record:
            self._note_input(message, mctx, 0)
        return decision

    def _checked(self, events: list[Any], now: float) -> list[PendingEvent]:
        to_checked = self.component.registry.to_checked
        return [to_checked(event, now) for event in events]

    def _refuse(self, message: Any, problem: Exception, pending: list[PendingEvent]) -> Decision:
        """``bad_request`` for a message whose events cannot be stored; nothing of it is written.

        A component that applies inside ``decide`` has already changed its state: the events
        of the batch so far (``pending``, emptied here) are appended, then the state is rebuilt
        from the log under the same fence and reconciled (``recovered``; its effects go with
        this reply), as after a failover but without one.
        """
        name = type(message).__name__
        logger.warning("stream %s: refused %s: %s", self.stream, name, problem)
        reply = ErrorReply("bad_request", f"{problem} (nothing was done)", name)
        if not self.component.applies_in_decide:
            return Decision(reply=reply)
        if pending:
            self._commit(pending)
            pending.clear()
        redo = self._rebuild()
        return Decision(effects=redo.effects, reply=reply)

    def _commit(self, pending: list[PendingEvent]) -> None:
        try:
            assert self.fence is not None
            started = time.perf_counter()
            self.head = self.log.append(self.fence, self.head, pending)
        except BaseException:
            self.state = None
            raise
        self.log_stats.appended(pending, time.perf_counter() - started)
        self._since_snapshot += len(pending)
        if self._since_snapshot >= self._snapshot_due:
            try:
                if self.background_snapshots and self._snapshot_bytes >= BACKGROUND_SNAPSHOT_BYTES:
                    self._snapshot_in_child()
                else:
                    self.take_snapshot()
            except Exception:  # the events are stored; a snapshot is only a shortcut
                logger.warning("stream %s: snapshot at offset %s failed", self.stream, self.head, exc_info=True)
                self._since_snapshot = 0

    def _due_after(self, snapshot_bytes: int) -> int:
        """Events to wait for after a snapshot of ``snapshot_bytes`` before the next one."""
        return max(self.snapshot_every, snapshot_bytes // SNAPSHOT_BYTES_PER_EVENT)

    def take_snapshot(self) -> bool:
        """Store the current state as a snapshot now, if the component supports it; then
        truncate the log in the background (see :meth:`_truncate_history`)."""
        if self.state is None:
            return False
        started = time.perf_counter()
        blob = snapshot_blob(self.component, self.state)
        if blob is None:
            return False
        self.log.save_snapshot(
            Snapshot(self.stream, self.head, self.clock(), self.component.snapshot_version, blob)
        )
        self.log_stats.snapshot(len(blob), time.perf_counter() - started)
        self._since_snapshot = 0
        self._snapshot_bytes = len(blob)
        self._snapshot_due = self._due_after(len(blob))
        if not self._start_history_job(self._truncate_history):
            self._truncate_again = True  # the running job truncates once more when done
        return True

    # ---- a hot standby: follow the log without writing --------------------------------------

    @property
    def following(self) -> bool:
        """True while this runner holds a followed (standby) state."""
        return self._followed is not None

    @property
    def followed_head(self) -> int:
        """The offset the followed state reflects (0 when not following)."""
        return self._followed[1] if self._followed is not None else 0

    @property
    def followed_state(self) -> S | None:
        """The followed state (read it, never change it), or None."""
        return self._followed[0] if self._followed is not None else None

    def follow(self, records: Sequence[Record] | None = None) -> int:
        """As a standby: bring the followed state up to date without writing; returns how many
        records it applied.

        The first call loads the newest snapshot and the records after it. Later calls apply
        ``records`` (as :meth:`EventLog.tail` returns them; those at or below the followed head
        are skipped, and a gap makes it read the log instead), or, without ``records``, what
        the log holds after the followed head. Never acquires the stream, appends, or calls
        ``recovered``, so it causes no effects; :meth:`recover` then takes over from this
        state. Refused (``RuntimeError``) while leading. If applying fails the followed state
        is dropped (the next call reloads it) and the error propagates.
        """
        if self.state is not None:
            raise RuntimeError(f"stream {self.stream}: leading, not following")
        if self._followed is None:
            state, head = self._load()
            self._followed = (state, head)
            return head
        state, head = self._followed
        if records is None or (records and records[0].offset > head + 1):
            records = list(self.log.read(self.stream, head + 1))
        decode, apply = self.component.registry.from_record, self.component.apply
        applied = 0
        try:
            for record in records:
                if record.offset <= head:
                    continue
                if record.offset != head + 1:
                    raise RuntimeError(f"stream {self.stream}: followed {head}, next record is {record.offset}")
                state = apply(state, decode(record))
                head = record.offset
                applied += 1
        except BaseException:
            self._followed = None
            raise
        self._followed = (state, head)
        return applied

    def stop_following(self) -> None:
        """Drop the followed state (a later :meth:`recover` rebuilds from the log)."""
        self._followed = None

    def _take_over(self) -> Decision:
        """Lead from the followed state: apply the records after it, then reconcile."""
        assert self._followed is not None
        try:
            self.follow()
            state, head = self._followed
            if self.log.head(self.stream) < head:  # the log went back (restored?): trust it, not us
                raise RuntimeError(f"stream {self.stream}: the log's head is below the followed {head}")
        except Exception:
            logger.exception("stream %s: the followed state is unusable, rebuilding", self.stream)
            self._followed = None
            return self._rebuild()
        self._followed = None
        return self._reconcile(state, head)

    def wait_history(self, timeout: float | None = None) -> bool:
        """Wait for a background snapshot or truncation to finish; False if still running."""
        return self._history.wait(timeout)

    def history_busy(self) -> bool:
        """True while a background snapshot or truncation runs."""
        return self._history.busy()

    def _start_history_job(self, target: Callable[..., None], *args: Any) -> bool:
        """Run ``target`` in the one background history thread, unless it is busy."""
        return self._history.submit(target, args)

    def _truncate_history(self) -> None:
        """The truncation policy: once a snapshot is saved, move the batches below the oldest
        snapshot kept (the log keeps ``keep_snapshots``) to the archive. Only with an archive;
        failures are logged, never raised (the next snapshot tries again)."""
        if self.log.archive is None:
            return
        self._truncate_again = True
        while self._truncate_again:
            self._truncate_again = False
            try:
                offsets = self.log.snapshots(self.stream)
                if offsets:
                    moved = self.log.truncate(self.stream, min(offsets) + 1)
                    if moved:
                        logger.debug("stream %s: %s batches below offset %s archived",
                                     self.stream, moved, min(offsets) + 1)
            except Exception:
                logger.warning("stream %s: truncating the log failed", self.stream, exc_info=True)
                return

    def _snapshot_in_child(self) -> bool:
        """Take a snapshot without stalling, in another process; a background thread here
        waits for it and truncates. Returns False if one is still running.

        Where it can (:meth:`_snapshotter_fold_class`), a snapshotter process folds the log up to the
        head from the last snapshot and stores the state (decision FO5): the actor only hands
        the job to the history thread, whatever the size of the state. Otherwise a forked child serializes the
        state from copy-on-write memory (LT3): the actor waits for the fork, which grows with
        the heap."""
        if self.state is None or self._history.busy():
            return False
        fold = self._snapshotter_fold_class()
        if fold is not None:
            return self._snapshot_by_snapshotter(fold)
        self._snapshotter_failed = False  # a fork stands in once; the next one tries a snapshotter again
        return self._snapshot_by_fork()

    def _snapshotter_fold_class(self) -> str | None:
        """The class a snapshotter process folds with if one can write this runner's snapshots
        (else None): the log is shared
        between processes (SQLite, ZooKeeper), the component folds and snapshots as the one
        of this package the snapshotter builds (:func:`.snapshotter.fold_class`), the component config
        did not say ``snapshot_writer: fork``, and the last snapshotter did not fail."""
        if not self.snapshot_process or self._snapshotter_failed:
            return None
        if self.log.url.partition("://")[0] not in ("sqlite", "zk"):
            return None
        from .snapshotter import fold_class

        return fold_class(self.component)

    def _snapshot_by_snapshotter(self, fold: str) -> bool:
        offset, started = self.head, time.perf_counter()
        job: dict[str, Any] = {
            "log": self.log.url, "stream": self.stream, "upto": offset, "ts": self.clock(),
            "component": fold,
            "options": {"keep_snapshots": self.log.keep_snapshots,
                        **({"archive": self.log.archive} if self.log.archive else {})},
            "chunk_bytes": self.log.snapshot_chunk_bytes,
        }
        self._since_snapshot = 0
        return self._start_history_job(self._run_snapshotter, json.dumps(job).encode(), offset, started)

    def _run_snapshotter(self, job: bytes, offset: int, started: float) -> None:
        """Background thread: hand ``job`` to the snapshotter (spawned here the first time, so
        that the actor does not wait for its exec), wait for its answer, note the snapshot and
        truncate. A failure is a warning, the snapshotter is stopped, and the next snapshot is
        taken by a forked child."""
        try:
            proc = self._snapshotter
            if proc is None or proc.poll() is not None:
                proc = self._snapshotter = _spawn_snapshotter()
                weakref.finalize(self, _stop_snapshotter, proc)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(job + b"\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            answer = json.loads(line) if line else {"error": f"it exited (status {proc.wait()})"}
        except Exception as exc:  # noqa: BLE001 - a snapshot is a shortcut, never a step down
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" in answer:
            logger.warning("stream %s: the snapshotter for offset %s failed (%s); the next snapshot is "
                           "taken by a forked child", self.stream, offset, answer["error"])
            if self._snapshotter is not None:
                _stop_snapshotter(self._snapshotter)
                self._snapshotter = None
            self._snapshotter_failed = True
            return
        saved = int(answer["bytes"])
        if saved:
            self._snapshot_bytes = saved
            self._snapshot_due = self._due_after(saved)
            self.log_stats.snapshot(saved, time.perf_counter() - started)
        self._truncate_history()

    def _snapshot_by_fork(self) -> bool:
        offset, ts, version = self.head, self.clock(), self.component.snapshot_version
        started = time.perf_counter()
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            return self.take_snapshot()
        if pid == 0:  # pragma: no cover - the child; it touches nothing but the state and the pipe
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    with contextlib.suppress(Exception):
                        signal.signal(sig, signal.SIG_DFL)
                os.close(read_fd)
                gc.disable()  # a collection would write to every object's page: copies of the heap
                blob = snapshot_blob(self.component, self.state) or b""
                _write_all(write_fd, _LENGTH.pack(len(blob)))
                _write_all(write_fd, blob)
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        self._since_snapshot = 0
        return self._start_history_job(self._finish_child_snapshot, pid, read_fd, offset, ts, version,
                                       started)

    def _finish_child_snapshot(self, pid: int, fd: int, offset: int, ts: float, version: int,
                               started: float) -> None:
        """Background thread: read the child's snapshot, store it, reap the child, truncate."""
        try:
            with os.fdopen(fd, "rb", buffering=0) as pipe:
                head = _read_exactly(pipe, _LENGTH.size)
                size = _LENGTH.unpack(head)[0] if len(head) == _LENGTH.size else -1
                blob = _read_exactly(pipe, size) if size >= 0 else None
                if blob is not None and len(blob) != size:
                    blob = None  # the child died mid-write
        except OSError:
            blob = None
        status = None
        with contextlib.suppress(ChildProcessError):
            status = os.waitpid(pid, 0)[1]
        if blob is None or (status is not None and status != 0):
            logger.warning("stream %s: the snapshot child for offset %s failed (wait status %s)",
                           self.stream, offset, status)
            return
        if not blob:
            return  # the component keeps no snapshots
        try:
            # a bytearray stands in for bytes: copying it would hold the GIL for the copy
            self.log.save_snapshot(Snapshot(self.stream, offset, ts, version, cast(bytes, blob)))
        except Exception:
            logger.warning("stream %s: saving the snapshot at offset %s failed", self.stream, offset, exc_info=True)
            return
        self._snapshot_bytes = len(blob)
        self._snapshot_due = self._due_after(len(blob))
        self.log_stats.snapshot(len(blob), time.perf_counter() - started)
        self._truncate_history()


class _HistoryWorker:
    """A runner's one background thread for snapshots and truncation, started with its first
    job and then fed one job at a time: handing a job over is a queue put, not a thread start
    (which waits for the new thread to be scheduled: up to ~5 ms on a busy host, FO6). The
    thread holds no reference to the runner between jobs and ends when the worker is gone."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    def busy(self) -> bool:
        return not self._idle.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no job runs; False if one still does after ``timeout``."""
        return self._idle.wait(timeout)

    def submit(self, target: Callable[..., None], args: tuple[Any, ...]) -> bool:
        """Run ``target(*args)`` in the background; False (nothing done) if a job runs."""
        if not self._idle.is_set():
            return False
        self._idle.clear()
        if self._thread is None or not self._thread.is_alive():  # the first job, or after a fork
            self._thread = threading.Thread(target=_history_loop, args=(self._jobs, self._idle),
                                            name=self.name, daemon=True)
            self._thread.start()
            weakref.finalize(self, self._jobs.put, None)
        self._jobs.put((target, args))
        return True


def _history_loop(jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None],
                  idle: threading.Event) -> None:
    while (job := jobs.get()) is not None:
        target, args = job
        try:
            target(*args)
        except Exception:  # noqa: BLE001 - a background job never ends the thread
            logger.warning("a background history job failed", exc_info=True)
        finally:
            del job, target, args  # the runner's bound method: not kept until the next job
            idle.set()


def snapshot_blob(component: Component[S], state: S) -> bytes | None:
    """``state`` as a snapshot's data (msgpack), or None if ``component`` takes no snapshots."""
    data = component.snapshot(state)
    return None if data is None else msgpack.packb(data, use_bin_type=True)


def _spawn_snapshotter() -> subprocess.Popen[bytes]:
    """Start a snapshotter process (:mod:`.snapshotter`), with this package importable first;
    its warnings go to this process's stderr."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen([sys.executable, "-m", "cei_actors.runtime.snapshotter"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)


def _stop_snapshotter(proc: subprocess.Popen[bytes]) -> None:
    """End a snapshotter: the end of its input, then a kill if it is still busy after 2 s (a
    snapshot cut short is never seen: its head is written last)."""
    with contextlib.suppress(Exception):
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(pipe: Any, n: int) -> bytearray:
    """Up to ``n`` bytes (fewer only at end of file), read without holding the GIL to copy."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = pipe.readinto(view[got:])
        if not k:
            return buf[:got]
        got += k
    return buf
