"""Subscriptions: the host is told what happens, from the components' own logs.

A :class:`Watcher` tails the streams of a running system read-only, through the EventLog API
(``pd``, ``epum``, ``ha``; the log is the source of truth, docs/decisions.md S1), folds each
with its component's own ``apply`` and turns every event into the entity changes it made:

- ``process``: one change per process event of a PD (created, scheduled, moved, assigned):
  exactly the ``(state, round)`` the PD recorded; ``data`` is the process as ``describe_process``
  gives it; ``group`` names its HA group if it is a copy;
- ``node``: a node the PD added, retired or removed (stream ``pd``), or an EPUM instance that
  was requested, changed state or health (stream ``epum``);
- ``domain``: an EPUM domain added, reconfigured, given a new need, being removed, removed;
- ``ha``: an HA group created, removed, or whose status or its reason changed. The status is
  computed as the HA service computes it, from the HA stream and the states the PDs recorded
  for its copies, so it may lead the HA leader's own view by the time its notice takes.

Each :class:`Change` carries ``stream`` and ``seq`` (the offset of the event that made it) and a
``cursor``: the position to resume from so that nothing after this change is lost (at most the
other changes of the same event come again; every change carries its entity's whole state, so
handling one twice is harmless). A change with ``seq <= cursor.get(stream, 0)`` of a saved cursor
is a duplicate. :class:`Subscription` delivers the matching changes in order (in order per entity
in any case), to a callback on a thread it owns, as an iterator, or as an asyncio stream.

Level-based: a subscriber that falls more than ``max_pending`` changes behind has its queue
collapsed to the newest change of each entity (``coalesced`` counts what it skipped): it gets
the current state, never a stale one, and no entity is dropped.

A resumed subscription (``since=cursor``) folds the streams silently up to the cursor (from a
snapshot at or before it when there is one, else from the start, archive included) and then
delivers everything after it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .eventlog import EventLog, EventLogError, Record, open_log
from .eventlog.batch import unpack_state
from .ha.state import Observed
from .launch.components import component_for

__all__ = ["KINDS", "Change", "Subscription", "Watcher"]

logger = logging.getLogger(__name__)

#: The kinds of change a subscription can ask for.
KINDS = ("process", "node", "domain", "ha")

_PROCESS_EVENTS = frozenset({"ProcessCreated", "ProcessScheduled", "ProcessMoved", "ProcessAssigned"})
_PD_NODE_EVENTS = frozenset({"NodeAdded", "NodeRetiring", "NodeRemoved"})
_EPUM_NODE_EVENTS = frozenset({"InstanceLaunchRequested", "InstanceUpdated", "InstanceHealthChanged"})
_DOMAIN_EVENTS = frozenset({"DomainAdded", "DomainReconfigured", "NeedRegistered",
                            "DomainRemoveRequested", "DomainRemoved", "EngineFailed"})


@dataclass(frozen=True)
class Change:
    """One entity's new state, caused by the event at ``seq`` in ``stream``."""

    kind: str  # process | node | domain | ha
    key: str  # upid | node id | "owner/domain_id" | HA group name
    state: str | None  # process state, node state, ACTIVE/REMOVING/REMOVED, HA status
    stream: str
    seq: int
    event: str  # the event's type
    at: float  # the event's timestamp
    data: dict[str, Any] | None  # the entity as its component describes it (None: gone)
    group: str | None = None  # a process that is an HA copy: its group
    cursor: dict[str, int] = field(default_factory=dict)
    coalesced: int = 0  # earlier changes of this entity a slow subscriber skipped
    resync: bool = False  # the entity's current state, given when the subscription started

    @property
    def entity(self) -> tuple[str, str, str]:
        """What "in order per entity" is about: (kind, key, stream for processes and nodes)."""
        return (self.kind, self.key, self.stream if self.kind in ("process", "node") else "")


class _Filter:
    def __init__(self, kinds: Iterable[str] | None, upids: Iterable[str] | None,
                 groups: Iterable[str] | None, nodes: Iterable[str] | None,
                 domains: Iterable[str] | None) -> None:
        self.kinds = set(KINDS if kinds is None else kinds)
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown change kind(s) {', '.join(sorted(unknown))} (known: {', '.join(KINDS)})")
        self.upids = None if upids is None else set(upids)
        self.groups = None if groups is None else set(groups)
        self.nodes = None if nodes is None else set(nodes)
        self.domains = None if domains is None else set(domains)
        self.any = all(x is None for x in (self.upids, self.groups, self.nodes, self.domains))

    def __call__(self, c: Change) -> bool:
        if c.kind not in self.kinds:
            return False
        if self.any:
            return True
        if c.kind == "process":
            return bool((self.upids and c.key in self.upids) or (self.groups and c.group in self.groups))
        if c.kind == "ha":
            return bool(self.groups and c.key in self.groups)
        if c.kind == "node":
            return bool(self.nodes and c.key in self.nodes)
        return bool(self.domains and (c.key in self.domains or c.key.split("/", 1)[-1] in self.domains))


class Subscription:
    """The changes of one subscriber: ``get``, iterate, ``stream()`` (asyncio) or a callback.

    ``cursor`` is the resume position after the last change handed out (see the module
    docstring). ``close()`` ends it; so does the watcher stopping (``error`` says why if it
    failed).
    """

    def __init__(self, watcher: Watcher, match: Callable[[Change], bool],
                 callback: Callable[[Change], Any] | None, max_pending: int,
                 cursor: dict[str, int], owns_watcher: bool = False) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.watcher = watcher
        self.match = match
        self.max_pending = max_pending
        self.cursor: dict[str, int] = dict(cursor)
        self.coalesced = 0  # changes skipped in all (level-based catch-up)
        self._limit = max_pending
        self._q: collections.deque[Change] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._owns_watcher = owns_watcher
        self._thread: threading.Thread | None = None
        self._callback = callback
        if callback is not None:
            self._thread = threading.Thread(target=self._deliver, name="cei-subscription", daemon=True)

    # ---- for the watcher

    def _offer(self, changes: list[Change]) -> None:
        with self._cv:
            if self._closed:
                return
            self._q.extend(changes)
            if len(self._q) > self._limit:
                self._coalesce()
            self._cv.notify_all()

    def _coalesce(self) -> None:
        """Keep only the newest change of each entity (it holds the whole current state)."""
        last: dict[tuple[str, str, str], int] = {}
        skipped: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for i, c in enumerate(self._q):
            e = c.entity
            if e in last:
                skipped[e] += 1 + self._q[last[e]].coalesced
            last[e] = i
        keep = collections.deque()
        for i, c in enumerate(self._q):
            e = c.entity
            if last[e] == i:
                keep.append(dataclasses.replace(c, coalesced=c.coalesced + skipped[e]) if skipped[e] else c)
        self.coalesced += len(self._q) - len(keep)
        self._q = keep
        self._limit = max(self.max_pending, 2 * len(keep))

    def _end(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # ---- for the host

    @property
    def error(self) -> BaseException | None:
        return self.watcher.error

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        with self._cv:
            return len(self._q)

    def get(self, timeout: float | None = None) -> Change | None:
        """The next change, waiting up to ``timeout`` s (None: until one comes or it is closed)."""
        with self._cv:
            if not self._q and not self._closed:
                self._cv.wait_for(lambda: self._q or self._closed, timeout)
            if not self._q:
                return None
            c = self._q.popleft()
            self.cursor = dict(c.cursor)
            return c

    def __iter__(self) -> Iterator[Change]:
        """Every change until the subscription is closed (blocks while there is none)."""
        while True:
            c = self.get(0.5)
            if c is not None:
                yield c
            elif self._closed:
                return

    async def stream(self, poll: float = 0.5) -> AsyncIterator[Change]:
        """The changes as an asyncio stream (each wait runs in the default executor)."""
        while True:
            c = self.get(0)
            if c is None:
                if self._closed:
                    return
                c = await asyncio.get_running_loop().run_in_executor(None, self.get, poll)
                if c is None:
                    continue
            yield c

    def close(self) -> None:
        """Stop delivering; a callback thread ends after the change in hand."""
        self.watcher._unsubscribe(self)
        self._end()
        if self._thread is not None and self._thread is not threading.current_thread() \
                and self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if self._owns_watcher:
            self.watcher.stop()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deliver(self) -> None:
        callback = self._callback
        assert callback is not None
        while True:
            c = self.get(0.5)
            if c is None:
                if self._closed:
                    return
                continue
            try:
                callback(c)
            except Exception:
                logger.exception("subscription callback failed on %s %s (it goes on)", c.kind, c.key)


class Watcher:
    """Folds the streams of a system into entity changes, for its subscriptions.

    ``log``: a log URL (opened here, closed by :meth:`stop`) or an open :class:`EventLog`.
    ``pds``: PD peer name -> its stream (HA names PDs by peer name). ``since``: None starts at
    the current heads; a cursor resumes after it. ``idle``: how long one wait for the PD stream
    lasts when nothing happens (the other streams are read every round).
    """

    def __init__(self, log: str | EventLog, *, pds: Mapping[str, str] | None = None,
                 epum: str | None = "epum", ha: str | None = "ha",
                 since: Mapping[str, int] | None = None, idle: float = 0.2) -> None:
        self._own_log = isinstance(log, str)
        self.log: EventLog = open_log(log) if isinstance(log, str) else log
        self.pds: dict[str, str] = dict(pds) if pds is not None else {"pd": "pd"}
        self.pd_peer = {s: p for p, s in self.pds.items()}
        self.epum, self.ha = epum, ha
        self.streams: list[str] = [*self.pds.values(), *(s for s in (epum, ha) if s)]
        self.idle = idle
        self.error: BaseException | None = None
        self._since = dict(since) if since is not None else None
        self._comp = {s: component_for(s) for s in self.streams}
        self._state: dict[str, Any] = {}
        self.pos: dict[str, int] = dict.fromkeys(self.streams, 0)
        self.group_of: dict[str, str] = {}  # upid -> HA group, kept after the copy ended
        self._ha_last: dict[str, tuple[str, str]] = {}
        self._subs: list[Subscription] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0

    # ---- life

    def start(self, before_following: Callable[[], Any] | None = None) -> Watcher:
        """Fold up to the start position, then follow the streams in a thread of its own.

        ``before_following`` runs once the fold is done and before the thread reads anything
        more (a resumed subscription registers there, so no change after its cursor is offered
        to nobody)."""
        with self._lock:
            if self._thread is not None:
                return self
            for s in self.streams:
                self._load(s, None if self._since is None else self._since.get(s, 0))
            for name in list(self._ha_groups()):
                st = self._ha_status(name)
                if st is not None:
                    self._ha_last[name] = (st[0], st[1])
            if before_following is not None:
                before_following()
            self._thread = threading.Thread(target=self._run, name="cei-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following; every subscription ends. Safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            sub._end()
        if self._own_log:
            self.log.close()
            self._own_log = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def subscribe(self, callback: Callable[[Change], Any] | None = None, *,
                  kinds: Iterable[str] | None = None, upids: Iterable[str] | None = None,
                  groups: Iterable[str] | None = None, nodes: Iterable[str] | None = None,
                  domains: Iterable[str] | None = None, current: bool = False,
                  max_pending: int = 10_000, owns_watcher: bool = False) -> Subscription:
        """A subscription to the matching changes from now on; ``current``: first the current
        state of every matching entity (``resync=True``)."""
        match = _Filter(kinds, upids, groups, nodes, domains)
        with self._lock:
            sub = Subscription(self, match, callback, max_pending, dict(self.pos), owns_watcher)
            if current:
                sub._offer([c for c in self._current() if match(c)])
            if self.error is not None or self._stop.is_set():
                sub._end()
            else:
                self._subs.append(sub)
        if sub._thread is not None:
            sub._thread.start()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    # ---- folding

    def _load(self, stream: str, upto: int | None) -> None:
        """The stream's state up to ``upto`` (None: its head), from a snapshot when one fits."""
        comp = self._comp[stream]
        head = self.log.head(stream) if upto is None else upto
        state, pos = None, 0
        snap = self.log.load_snapshot(stream)
        if snap is not None and snap.offset <= head and snap.version == comp.snapshot_version:
            try:
                state = comp.restore(unpack_state(snap.data))
                pos = snap.offset
            except Exception:
                logger.exception("stream %s: snapshot at %s unusable, replaying all", stream, snap.offset)
                state, pos = None, 0
        if state is None:
            state = comp.initial_state()
        self._state[stream] = state
        self.pos[stream] = pos
        if head > pos:
            for rec in self.log.read(stream, pos + 1, head):
                self._apply(stream, rec)
        if stream == self.ha:
            for g in state.groups.values():
                for upid in g.copies:
                    self.group_of[upid] = g.name

    def _apply(self, stream: str, rec: Record) -> Any:
        comp = self._comp[stream]
        event = comp.registry.from_record(rec)
        self._state[stream] = comp.apply(self._state[stream], event)
        self.pos[stream] = rec.offset
        if rec.type == "CopyScheduled":
            self.group_of[event.upid] = event.name
        return event

    def _run(self) -> None:
        backoff = 0.1
        waited: list[Record] | None = None
        primary = next(iter(self.pds.values()), None) or self.streams[0]
        while not self._stop.is_set():
            try:
                got = self._round(waited)
                waited = None
                backoff = 0.1
                if not got:
                    # block on the PD stream (the busiest); the others are read every round.
                    # Records it returns are used next round, read before the HA stream (so a
                    # copy's CopyScheduled is always seen before the PD's events of it).
                    waited = self.log.tail(primary, self.pos[primary], self.idle) or None
            except EventLogError as exc:
                logger.warning("watcher: reading the log failed (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                waited = None
            except Exception as exc:  # a fold that fails cannot go on: tell the subscribers
                logger.exception("watcher: stopped")
                self.error = exc
                with self._lock:
                    subs, self._subs = self._subs, []
                for sub in subs:
                    sub._end()
                return

    def _round(self, waited: list[Record] | None) -> bool:
        """Read every stream once (PDs first), apply HA, then EPUM, then PD records."""
        fresh: dict[str, list[Record]] = {}
        for s in self.pds.values():
            if waited and s == next(iter(self.pds.values())):
                recs = waited + list(self.log.read(s, waited[-1].offset + 1))
            else:
                recs = list(self.log.read(s, self.pos[s] + 1))
            fresh[s] = recs
        for s in (self.ha, self.epum):
            if s:
                fresh[s] = list(self.log.read(s, self.pos[s] + 1))
        order = [s for s in (self.ha, self.epum) if s] + list(self.pds.values())
        self.rounds += 1
        got = False
        for s in order:
            for rec in fresh.get(s, ()):
                if rec.offset <= self.pos[s]:
                    continue
                got = True
                with self._lock:
                    changes = self._changes(s, rec)
                    if changes:
                        self._publish(changes)
        return got

    def _publish(self, changes: list[Change]) -> None:
        for sub in self._subs:
            mine = [c for c in changes if sub.match(c)]
            if mine:
                sub._offer(mine)

    def _changes(self, stream: str, rec: Record) -> list[Change]:
        """Apply ``rec`` and return the changes it made, each with its resume cursor."""
        event = self._apply(stream, rec)
        out: list[tuple[str, str, str | None, dict | None, str | None]] = []
        t = rec.type
        touched: set[str] = set()
        if stream in self.pd_peer:
            state = self._state[stream]
            if t in _PROCESS_EVENTS:
                p = state.processes.get(event.upid)
                group = self.group_of.get(event.upid)
                out.append(("process", event.upid, p.state if p else None, p.describe() if p else None, group))
                if group is not None:
                    touched.add(group)
            elif t in _PD_NODE_EVENTS:
                node = state.nodes.get(event.node_id)
                if node is not None:
                    d = {**node.describe(state.resources), "state": "RUNNING"}
                    out.append(("node", node.node_id, "RUNNING", d, None))
                else:
                    st = getattr(event, "state", "REMOVED")
                    out.append(("node", event.node_id, st, {"node_id": event.node_id, "state": st}, None))
        elif stream == self.epum:
            state = self._state[stream]
            if t in _EPUM_NODE_EVENTS or t == "InstanceDestroyRequested":
                ids = event.instance_ids if t == "InstanceDestroyRequested" else [event.instance_id]
                for iid in ids:
                    inst = state.instances.get(iid)
                    if inst is not None:
                        out.append(("node", iid, inst.state, inst.describe(), None))
            elif t in _DOMAIN_EVENTS:
                key = f"{event.owner}/{event.domain_id}"
                dom = state.domains.get(key)
                if dom is None:
                    out.append(("domain", key, "REMOVED",
                                {"owner": event.owner, "domain_id": event.domain_id, "removed": True}, None))
                else:
                    out.append(("domain", key, "REMOVING" if dom.removing else "ACTIVE",
                                self._comp[stream].describe(state, dom, instances=False), None))
        elif stream == self.ha:
            name = getattr(event, "name", None)
            if isinstance(name, str):
                touched.add(name)
        for name in sorted(touched):
            st = self._ha_status(name)
            if st is None:
                if name in self._ha_last or t == "GroupRemoved":
                    self._ha_last.pop(name, None)
                    out.append(("ha", name, "REMOVED", None, None))
                continue
            status, why, data = st
            if self._ha_last.get(name) != (status, why) or t == "GroupCreated":
                self._ha_last[name] = (status, why)
                out.append(("ha", name, status, data, None))
        if not out:
            return []
        cursor = dict(self.pos)
        before = {**cursor, stream: rec.offset - 1}
        n = len(out)
        return [Change(kind, key, st, stream, rec.offset, t, rec.timestamp, data, group,
                       cursor if i == n - 1 else before)
                for i, (kind, key, st, data, group) in enumerate(out)]

    def _ha_groups(self) -> Iterable[str]:
        if not self.ha:
            return ()
        return self._state[self.ha].groups.keys()

    def _ha_status(self, name: str) -> tuple[str, str, dict] | None:
        """``(status, why, description)`` of a group from the folds (None: no such group)."""
        hs = self._state[self.ha]
        g = hs.groups.get(name)
        if g is None:
            return None
        for c in g.copies.values():
            pst = self._state.get(self.pds.get(c.pd, ""))
            p = pst.processes.get(c.upid) if pst is not None else None
            if p is None:
                hs.vol.observed.pop(c.upid, None)
            else:
                hs.vol.observed[c.upid] = Observed(p.state, p.round, p.node_id)
        comp = self._comp[self.ha]
        status, why = comp.status(hs, g)
        return status, why, comp.describe(hs, g)

    def _current(self) -> list[Change]:
        """The current state of every entity, as resync changes (caller holds the lock)."""
        out: list[Change] = []
        cursor = dict(self.pos)

        def add(kind: str, key: str, st: str | None, stream: str, data: dict | None,
                group: str | None = None) -> None:
            out.append(Change(kind, key, st, stream, self.pos[stream], "current", time.time(), data,
                              group, cursor, resync=True))

        for s in self.pds.values():
            state = self._state[s]
            for p in state.processes.values():
                add("process", p.upid, p.state, s, p.describe(), self.group_of.get(p.upid))
            for node in state.nodes.values():
                add("node", node.node_id, "RUNNING", s, {**node.describe(state.resources), "state": "RUNNING"})
        if self.epum:
            state = self._state[self.epum]
            for inst in state.instances.values():
                add("node", inst.instance_id, inst.state, self.epum, inst.describe())
            for key, dom in state.domains.items():
                add("domain", key, "REMOVING" if dom.removing else "ACTIVE", self.epum,
                    self._comp[self.epum].describe(state, dom, instances=False))
        for name in list(self._ha_groups()):
            st = self._ha_status(name)
            if st is not None:
                add("ha", name, st[0], self.ha or "ha", st[2])
        return out

    def process(self, upid: str) -> dict[str, Any] | None:
        """The process as the watcher's fold has it (None: unknown)."""
        with self._lock:
            for s in self.pds.values():
                p = self._state[s].processes.get(upid)
                if p is not None:
                    return p.describe()
        return None
