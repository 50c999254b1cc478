"""Drive a pure component against an event log: recover, decide, append (fenced), apply.

The :class:`Runner` knows nothing of actors. The thespian shell, the simulator and replay
tools all use it, so a component behaves the same under each.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic

import msgpack

from ..eventlog import EventLog, Fence, PendingEvent, Record, Snapshot, UnstorableEvent
from .core import Component, Context, Decision, Rejected, S
from .messages import ErrorReply, InvalidMessage, validate

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
        state, head = None, 0
        self._snapshot_due = self.snapshot_every
        snap = self.log.load_snapshot(self.stream)
        if snap is not None and snap.version == self.component.snapshot_version:
            try:
                state = self.component.restore(msgpack.unpackb(snap.data, raw=False, strict_map_key=False))
                head = snap.offset
                self._snapshot_due = self._due_after(len(snap.data))
            except Exception:  # a bad snapshot costs a full replay, never a wrong state
                logger.exception("stream %s: snapshot at %s unusable, replaying all", self.stream, snap.offset)
                state, head = None, 0
        if state is None:
            state = self.component.initial_state()
        decode, apply = self.component.registry.from_record, self.component.apply
        for record in self.log.read(self.stream, head + 1):
            state = apply(state, decode(record))
            head = record.offset
        return state, head

    def _reconcile(self, state: S, head: int) -> Decision:
        """Lead from ``state`` at ``head``: run ``component.recovered`` and persist its events."""
        self.state, self.head = state, head
        self._since_snapshot = 0
        ctx = self.context()
        decision = self.component.recovered(state, ctx)
        if decision.events:
            try:
                pending = self._checked(decision.events, ctx.now)
                for event in decision.events:
                    self.state = self.component.apply(self.state, event)
            except Exception:
                self.state = None
                raise
            self._commit(pending)
        return decision

    def handle(self, message: Any) -> Decision:
        """Decide on one message and persist its events; see :meth:`handle_many`."""
        return self.handle_many([message])[0]

    def handle_many(self, messages: Sequence[Any]) -> list[Decision]:
        """Decide on each message in turn, then persist all their events in one append.

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
        decisions: list[Decision] = []
        pending: list[PendingEvent] = []
        for message in messages:
            decision = self._decide(message, ctx)
            if decision.events:
                try:
                    checked = self._checked(decision.events, ctx.now)
                except UnstorableEvent as exc:
                    decisions.append(self._refuse(message, exc, pending))
                    continue
                try:
                    for event in decision.events:
                        self.state = self.component.apply(self.state, event)
                except Exception:
                    self.state = None
                    raise
                pending.extend(checked)
            decisions.append(decision)
        if pending:
            self._commit(pending)
        return decisions

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

    def _decide(self, message: Any, ctx: Context) -> Decision:
        name = type(message).__name__
        try:
            validate(message)
            return self.component.decide(self.state, message, ctx)
        except Rejected as exc:
            return Decision(reply=ErrorReply(exc.code, exc.message, name))
        except InvalidMessage as exc:
            return Decision(reply=ErrorReply("bad_request", str(exc), name))
        except Exception as exc:
            logger.exception("stream %s: decide failed on %s", self.stream, name)
            return Decision(reply=ErrorReply("internal", f"{type(exc).__name__}: {exc}", name))

    def _commit(self, pending: list[PendingEvent]) -> None:
        try:
            assert self.fence is not None
            self.head = self.log.append(self.fence, self.head, pending)
        except BaseException:
            self.state = None
            raise
        self._since_snapshot += len(pending)
        if self._since_snapshot >= self._snapshot_due:
            self.take_snapshot()

    def _due_after(self, snapshot_bytes: int) -> int:
        """Events to wait for after a snapshot of ``snapshot_bytes`` before the next one."""
        return max(self.snapshot_every, snapshot_bytes // SNAPSHOT_BYTES_PER_EVENT)

    def take_snapshot(self) -> bool:
        """Store the current state as a snapshot if the component supports it."""
        if self.state is None:
            return False
        data = self.component.snapshot(self.state)
        if data is None:
            return False
        blob = msgpack.packb(data, use_bin_type=True)
        self.log.save_snapshot(
            Snapshot(self.stream, self.head, self.clock(), self.component.snapshot_version, blob)
        )
        self._since_snapshot = 0
        self._snapshot_due = self._due_after(len(blob))
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
