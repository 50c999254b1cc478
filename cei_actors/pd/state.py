"""The PD's state as the fold of its events: processes, queue, nodes, resources, definitions.

``apply(state, event)`` is total and pure (no clock, no I/O). Besides the records it keeps
derived indices in step: the matchmaker's placement index, the set of unacknowledged
dispatches, per-engine counts for needs. ``to_data``/``from_data`` are the snapshot format;
two states are equal when their records are equal (indices and soft state are not compared).

**Soft state** (:class:`Soft`) is what the leader knows only while it runs: when each agent
was last heard from, which launches it resent, the last need it registered. It is never
logged; after a recovery it starts empty (every resource gets a fresh heartbeat window).
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, ClassVar

import msgpack

from ..runtime.tombstones import DEFAULT_LIMIT, Tombstones
from . import states as ps
from .events import (
    DefinitionRemoved,
    DefinitionSet,
    NodeAdded,
    NodeRemoved,
    NodeRetiring,
    ProcessAssigned,
    ProcessBackoff,
    ProcessCreated,
    ProcessesForgotten,
    ProcessMoved,
    ProcessScheduled,
    ResourceAdded,
    ResourceOccupancy,
    ResourceStateChanged,
    SystemBootSet,
)
from .matchmaker import Matchmaker

#: Spec keys stored on a process (see ProcessScheduled).
SPEC_KEYS: tuple[str, ...] = (
    "definition_id",
    "name",
    "command",
    "env",
    "cwd",
    "configuration",
    "subscribers",
    "constraints",
    "engine",
    "queueing_mode",
    "restart_mode",
    "node_exclusive",
    "min_start_interval",
    "omit_from_system_restart",
)


@dataclass(slots=True, eq=False)
class Process:
    upid: str
    state: str
    round: int
    definition_id: str | None = None
    name: str | None = None
    command: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: str | None = None
    configuration: dict[str, Any] = field(default_factory=dict)
    subscribers: list[str] = field(default_factory=list)
    constraints: dict[str, Any] = field(default_factory=dict)
    engine: str = ""
    queueing_mode: str = ps.QUEUE_ALWAYS
    restart_mode: str = ps.RESTART_ABNORMAL
    node_exclusive: str | None = None
    min_start_interval: float | None = None
    omit_from_system_restart: bool = False
    resource_id: str | None = None
    node_id: str | None = None
    last_node_id: str | None = None  # the node of its latest placement, kept once it ends
    starts: int = 0
    dispatches: int = 0
    last_dispatch: float | None = None
    seq: int = 0
    created_at: float = 0.0
    state_at: float = 0.0
    msg: str = ""
    crashes: int = 0  # quick failures in a row (decision OP3)
    retry_at: float = 0.0  # no start before (crash-loop backoff)

    def spec(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SPEC_KEYS}

    def to_data(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]

    def describe(self) -> dict[str, Any]:
        """The process as clients see it."""
        return {
            "upid": self.upid,
            "state": self.state,
            "round": self.round,
            "node_id": self.node_id,
            "last_node_id": self.last_node_id,
            "assigned": self.resource_id,
            "definition_id": self.definition_id,
            "name": self.name,
            "command": list(self.command),
            "env": dict(self.env) if self.env is not None else None,
            "cwd": self.cwd,
            "configuration": self.configuration,
            "subscribers": list(self.subscribers),
            "constraints": dict(self.constraints),
            "engine": self.engine,
            "queueing_mode": self.queueing_mode,
            "restart_mode": self.restart_mode,
            "node_exclusive": self.node_exclusive,
            "starts": self.starts,
            "dispatches": self.dispatches,
            "msg": self.msg,
            "state_time": self.state_at,
            "status": ps.CRASH_LOOP if self.crash_looping else self.state,
            "restarts": self.crashes,
            "next_start": self.retry_at or None,
        }

    @property
    def crash_looping(self) -> bool:
        """Waiting for its next start after quick failures in a row (Kubernetes'
        ``CrashLoopBackOff``)."""
        return self.crashes >= 2 and self.state in ps.QUEUED

    def tombstone(self) -> dict[str, Any]:
        """What is kept of a forgotten process: its describe() without the bulky parameters
        (command, env, cwd, configuration, subscribers), plus a digest of all of them
        (``spec_digest(self.spec())``), so a ``once`` retry can still be told same from
        different. Built directly, in describe()'s key order (decision SC10)."""
        return {
            "upid": self.upid,
            "state": self.state,
            "round": self.round,
            "node_id": self.node_id,
            "last_node_id": self.last_node_id,
            "assigned": self.resource_id,
            "definition_id": self.definition_id,
            "name": self.name,
            "constraints": dict(self.constraints),
            "engine": self.engine,
            "queueing_mode": self.queueing_mode,
            "restart_mode": self.restart_mode,
            "node_exclusive": self.node_exclusive,
            "starts": self.starts,
            "dispatches": self.dispatches,
            "msg": self.msg,
            "state_time": self.state_at,
            "status": ps.CRASH_LOOP if self.crash_looping else self.state,
            "restarts": self.crashes,
            "next_start": self.retry_at or None,
            "spec_digest": _digest(
                ["<map>", [[k, v if type(v) in _SCALARS else _ordered(v)]
                           for k, v in zip(_SPEC_ORDER, _SPEC_VALUES(self), strict=True)]]
            ),
        }


def spec_digest(spec: dict[str, Any]) -> str:
    """A short digest of a process's parameters, the same for equal specs whatever the order
    of their maps."""
    return _digest(_ordered(spec))


def _digest(ordered: Any) -> str:
    return hashlib.sha256(msgpack.packb(ordered, use_bin_type=True)).hexdigest()[:32]


_KEY_ORDERS_KEPT = 4096


def _ordered(value: Any) -> Any:
    # scalars are returned as they are without a call (most of a spec): same result, faster
    t = type(value)
    if t is list:  # (exact types first: a spec's command, subscribers; decision SC22)
        return [v if type(v) in _SCALARS else _ordered(v) for v in value] if value else []
    if t is dict and not value:  # a spec's configuration, often
        return ["<map>", []]
    if isinstance(value, dict):
        keys = tuple(value)
        order = _KEY_ORDERS.get(keys)
        if order is None:
            if any(type(k) is not str for k in keys):
                pairs = [[k, v if type(v) in _SCALARS else _ordered(v)] for k, v in value.items()]
                pairs.sort(key=_map_order)
                return ["<map>", pairs]
            order = tuple(sorted(keys, key=repr))  # _map_order's when every key is a str
            if len(_KEY_ORDERS) >= _KEY_ORDERS_KEPT:
                _KEY_ORDERS.clear()
            _KEY_ORDERS[keys] = order
        pairs = [[k, value[k]] for k in order]
        for pair in pairs:
            if type(pair[1]) not in _SCALARS:
                pair[1] = _ordered(pair[1])
        return ["<map>", pairs]
    if isinstance(value, list | tuple):
        return [v if type(v) in _SCALARS else _ordered(v) for v in value]
    return value


#: the sorted keys of maps whose keys are all ``str``, by their keys in the map's own order:
#: a spec's maps have the same few key sets, so sorting each of them again (a ``repr`` per key)
#: was most of a digest that the cache above misses (every process its own command, SIM10)
_KEY_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _map_order(pair: list[Any]) -> tuple[str, str]:
    key = pair[0]
    return type(key).__name__, repr(key)


#: types :func:`_ordered` returns unchanged
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


@dataclass(slots=True, eq=False)
class Node:
    node_id: str
    domain_id: str
    engine: str
    properties: dict[str, Any]
    seq: int
    added_at: float
    resources: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # node_exclusive tag -> upid
    retiring: bool = False
    used: int = 0  # derived: slots used on all its resources (assigned + foreign)

    def describe(self, resources: dict[str, Resource]) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "domain_id": self.domain_id,
            "engine": self.engine,
            "properties": dict(self.properties),
            "resources": list(self.resources),
            "node_exclusive": sorted(self.tags),
            "retiring": self.retiring,
            "used": self.used,
            "slots": sum(resources[r].slots for r in self.resources if r in resources),
            "state_time": self.added_at,
        }


@dataclass(slots=True, eq=False)
class Resource:
    resource_id: str
    node_id: str
    engine: str
    slots: int
    properties: dict[str, Any]
    added_at: float
    state: str = ps.RESOURCE_OK
    assigned: dict[str, int] = field(default_factory=dict)  # upid -> round (insertion order)
    foreign: int = 0

    @property
    def used(self) -> int:
        return len(self.assigned) + self.foreign

    def describe(self, retiring: bool = False) -> dict[str, Any]:
        return {
            "resource_id": self.resource_id,
            "node_id": self.node_id,
            "engine": self.engine,
            "slots": self.slots,
            "state": ps.RESOURCE_DISABLED if retiring else self.state,
            "assigned": [[u, r] for u, r in self.assigned.items()],
            "foreign": self.foreign,
            "properties": dict(self.properties),
        }


@dataclass(slots=True)
class Liveness:
    """What the leader knows of one agent's heartbeats (soft state)."""

    ts: float  # newest heartbeat timestamp (agent clock, clamped to ours)
    seen: float  # our clock when we last received a newer heartbeat
    warned_at: float | None = None  # our clock when the monitor set WARNING
    #: our clock when we last received a heartbeat that renewed the agent's lease (one we
    #: granted, or any heartbeat of an agent that asks for none): the agent may run its
    #: processes until ``granted + fence_time``, so they are not moved before
    #: ``granted + fence_time + fence_margin`` (decision PD9)
    granted: float = float("-inf")
    grant_sent: float = float("-inf")  # our clock when we last sent it a LeaseGrant

    def __post_init__(self) -> None:
        if self.granted == float("-inf"):
            self.granted = self.seen


@dataclass
class Soft:
    """The leader's in-memory knowledge; never logged, empty after a recovery."""

    live: dict[str, Liveness] = field(default_factory=dict)
    heard: set[str] = field(default_factory=set)  # resources heard from since recovery
    launch_sent: dict[str, float] = field(default_factory=dict)  # upid -> last LaunchProcess
    terminate_sent: dict[str, float] = field(default_factory=dict)
    #: per agent: (upid, round) -> when we last asked it to clean up / end a stale copy
    cleanups: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)
    stale_kills: dict[str, dict[tuple[str, int], float]] = field(default_factory=dict)
    needs_sent: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # (signature, n, retire)
    needs_sent_at: float = float("-inf")
    #: engine -> (live processes, occupied nodes, need) of the last need computed (SC18)
    needs_memo: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    needs_timer: bool = False
    needs_refresh_at: float = float("-inf")  # next unconditional RegisterNeed + SubscribeDomain
    #: the last needs check found no need changed, and no event was applied since: the next
    #: one finds the same until an event or the refresh time (decision SC20)
    needs_rest: bool = False
    recovered_at: float | None = None
    outbox: dict[str, list[Any]] = field(default_factory=dict)  # agent -> queued requests
    outbox_timer: bool = False
    timers: dict[str, float] = field(default_factory=dict)  # timer key -> due time
    #: node_id -> the loss state EPUM reported, for nodes lost but not known dead: their
    #: processes move once every agent's lease there has run out (decision PD9)
    doomed: dict[str, str] = field(default_factory=dict)
    #: doomed node_id -> (our clock then, the grant time of an agent there found not fenced
    #: then): the node is not looked at again before that grant has run out (decision SC11)
    doomed_wait: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: agent -> the process list of its last heartbeat that asked for nothing (decision SIM7)
    quiet: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: a lower bound of every agent's ``Liveness.ts`` (-inf: unknown): the monitor's last full
    #: pass saw every one, and each made since lowers it (:meth:`new_live`; decision SC14)
    live_ts_min: float = float("-inf")

    def new_live(self, rid: str, ts: float, now: float) -> Liveness:
        """A new liveness record for agent ``rid`` (heard at ``ts`` its clock, ``now`` ours)."""
        lv = self.live[rid] = Liveness(ts, now)
        if ts < self.live_ts_min:
            self.live_ts_min = ts
        return lv


class PDState:
    """The fold of the ``pd`` stream plus derived indices and soft state."""

    def __init__(self, min_start_interval: float = 2.0) -> None:
        self.processes: dict[str, Process] = {}
        self.definitions: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, Node] = {}
        self.resources: dict[str, Resource] = {}
        self.system_boot = False
        self.next_seq = 1
        self.node_seq = 1
        #: forgotten processes (decision PD10): upid -> last record, round, when
        self.tombstones = Tombstones()
        # derived
        self.mm = Matchmaker(
            self.processes, self.nodes, self.resources, min_start_interval=min_start_interval
        )
        self.unacked: dict[str, None] = {}  # ASSIGNED upids
        self.terminating: dict[str, None] = {}  # TERMINATING upids
        self.live_count: collections.Counter[str] = collections.Counter()  # engine -> n
        self.occupied: collections.Counter[str] = collections.Counter()  # engine -> nodes used
        self.engine_nodes: dict[str, dict[str, None]] = {}
        #: engine -> its nodes with no slot used (``used == 0``): the only ones a need may
        #: retire, so the need looks at them, not at every node (decision SC12)
        self.idle: dict[str, set[str]] = {}
        #: resources whose state is not OK (WARNING, MISSING): while there are none, the
        #: monitor need not look at every resource (decision SC14)
        self.unwell: set[str] = set()
        self.state_count: collections.Counter[str] = collections.Counter()
        #: finished (TERMINAL) upids -> when they finished, in the order they did
        self.ended: dict[str, float] = {}
        #: False while :meth:`defer_index` holds: the counts above are rebuilt by :meth:`reindex`
        self.counting = True
        # not derived from events at all
        self.soft = Soft()
        self.pre: collections.deque[Any] = collections.deque()  # events decide applied already
        self.broken: str | None = None

    # ---- equality and snapshots -----------------------------------------------------------

    def to_data(self) -> dict[str, Any]:
        return {
            "processes": [p.to_data() for p in self.processes.values()],
            "definitions": self.definitions,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "domain_id": n.domain_id,
                    "engine": n.engine,
                    "properties": n.properties,
                    "seq": n.seq,
                    "added_at": n.added_at,
                    "resources": list(n.resources),
                    "retiring": n.retiring,
                }
                for n in self.nodes.values()
            ],
            "resources": [
                {
                    "resource_id": r.resource_id,
                    "node_id": r.node_id,
                    "engine": r.engine,
                    "slots": r.slots,
                    "properties": r.properties,
                    "added_at": r.added_at,
                    "state": r.state,
                    "foreign": r.foreign,
                }
                for r in self.resources.values()
            ],
            "system_boot": self.system_boot,
            "next_seq": self.next_seq,
            "node_seq": self.node_seq,
            "tombstones": self.tombstones.to_data(),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any], min_start_interval: float = 2.0) -> PDState:
        s = cls(min_start_interval)
        s.definitions = dict(data["definitions"])
        s.system_boot = bool(data["system_boot"])
        s.next_seq = int(data["next_seq"])
        s.node_seq = int(data["node_seq"])
        s.tombstones = Tombstones.from_data(data.get("tombstones"))  # none before PD10
        for d in sorted(data["nodes"], key=lambda d: d["seq"]):
            node = Node(
                d["node_id"],
                d["domain_id"],
                d["engine"],
                dict(d["properties"]),
                d["seq"],
                d["added_at"],
                list(d["resources"]),
                retiring=bool(d["retiring"]),
            )
            s.nodes[node.node_id] = node
            s.engine_nodes.setdefault(node.engine, {})[node.node_id] = None
        for d in data["resources"]:
            res = Resource(
                d["resource_id"],
                d["node_id"],
                d["engine"],
                d["slots"],
                dict(d["properties"]),
                d["added_at"],
                d["state"],
                foreign=d["foreign"],
            )
            s.resources[res.resource_id] = res
            s.nodes[res.node_id].used += res.foreign
            if res.state != ps.RESOURCE_OK:
                s.unwell.add(res.resource_id)
        queued: list[Process] = []
        for d in data["processes"]:
            p = Process(**d)
            s.processes[p.upid] = p
            s._recount(p)
            if p.state in ps.PLACED and p.resource_id in s.resources:
                res = s.resources[p.resource_id]
                res.assigned[p.upid] = p.round
                node = s.nodes[res.node_id]
                node.used += 1
                if p.node_exclusive is not None:
                    node.tags[p.node_exclusive] = p.upid
            if p.state in ps.QUEUED:
                queued.append(p)
        for node in s.nodes.values():
            if node.used:
                s.occupied[node.engine] += 1
            else:
                s.idle.setdefault(node.engine, set()).add(node.node_id)
        s._index(queued)
        s.ended = dict(sorted(s.ended.items(), key=lambda kv: kv[1]))
        return s

    def _index(self, queued: list[Process]) -> None:
        """Fill the (empty) matchmaker: every node in sequence order, then the ``queued``
        processes in queue order, as a restore does."""
        mm = self.mm
        for node in sorted(self.nodes.values(), key=lambda n: n.seq):
            mm.add_node(node)
        for p in sorted(queued, key=lambda p: p.seq):
            mm.enqueue(p)
            if p.state == ps.WAITING:
                mm.waited(p.upid)

    # ---- replaying many events --------------------------------------------------------------

    #: event class -> body fields a replay may decode once and share between events, since
    #: the fold only reads them (a spec's values go to the process as they are; decision RS5)
    REPLAY_SHARED: ClassVar[dict[type, tuple[str, ...]]] = {ProcessScheduled: ("spec",)}

    def defer_index(self) -> None:
        """Fold on without keeping the matchmaker in step, nor building the records of
        forgotten processes, until :meth:`reindex`: for a replay that looks only at the
        state it ends with (decision RS1). Nothing may use the state before :meth:`reindex`."""
        if not isinstance(self.mm, _Deferred):
            self.mm = _Deferred(self.mm.min_start_interval)  # type: ignore[assignment]
            self.counting = False

    def reindex(self) -> None:
        """End :meth:`defer_index`: build the matchmaker as a restore does; the tombstone
        records of the processes forgotten meanwhile are built from the records they had
        then, each when first asked for (RS4)."""
        mm = self.mm
        if not isinstance(mm, _Deferred):
            return
        self.mm = Matchmaker(
            self.processes, self.nodes, self.resources, min_start_interval=mm.min_start_interval
        )
        self._index([p for p in self.processes.values() if p.state in ps.QUEUED])
        self.tombstones.settle(Process.tombstone)
        # the counts, as a restore makes them (finished processes in the order they finished)
        self.counting = True
        self.state_count, self.live_count = collections.Counter(), collections.Counter()
        self.unacked, self.terminating, self.ended = {}, {}, {}
        for p in self.processes.values():
            self._recount(p)
        self.ended = dict(sorted(self.ended.items(), key=lambda kv: kv[1]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PDState):
            return NotImplemented
        return _canon(self.to_data()) == _canon(other.to_data())

    __hash__ = None  # type: ignore[assignment]

    # ---- queries ----------------------------------------------------------------------------

    def queue(self) -> list[str]:
        """Queued upids in FIFO order."""
        q = [p for p in self.processes.values() if p.state in ps.QUEUED]
        q.sort(key=lambda p: p.seq)
        return [p.upid for p in q]

    # ---- the fold ---------------------------------------------------------------------------

    def _uncount(self, p: Process) -> None:
        state = p.state
        self.state_count[state] -= 1
        if state in _NEED:
            self.live_count[p.engine] -= 1
        if state == ps.ASSIGNED:
            self.unacked.pop(p.upid, None)
        elif state == ps.TERMINATING:
            self.terminating.pop(p.upid, None)
        elif state in ps.TERMINAL:
            self.ended.pop(p.upid, None)

    def _recount(self, p: Process) -> None:
        state = p.state
        self.state_count[state] += 1
        if state in _NEED:
            self.live_count[p.engine] += 1
        if state == ps.ASSIGNED:
            self.unacked[p.upid] = None
        elif state == ps.TERMINATING:
            self.terminating[p.upid] = None
        elif state in ps.TERMINAL:
            self.ended[p.upid] = p.state_at

    def _release(self, p: Process) -> None:
        rid = p.resource_id
        p.resource_id = None
        p.node_id = None
        if rid is None:
            return
        res = self.resources.get(rid)
        if res is None or res.assigned.pop(p.upid, None) is None:
            return
        node = self.nodes[res.node_id]
        self._use(node, -1)
        if p.node_exclusive is not None and node.tags.get(p.node_exclusive) == p.upid:
            del node.tags[p.node_exclusive]
        self.mm.touch_node(node)

    def _use(self, node: Node, delta: int) -> None:
        before = node.used
        node.used += delta
        if before == 0 and node.used > 0:
            self.occupied[node.engine] += 1
            self.idle[node.engine].discard(node.node_id)
        elif before > 0 and node.used == 0:
            self.occupied[node.engine] -= 1
            self.idle.setdefault(node.engine, set()).add(node.node_id)

    def _enqueue(self, p: Process) -> None:
        p.seq = self.next_seq
        self.next_seq += 1
        self.mm.enqueue(p)

    def apply(self, event: Any) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    def _on_definition_set(self, e: DefinitionSet) -> None:
        self.definitions[e.definition_id] = {
            "definition_id": e.definition_id,
            "definition_type": e.definition_type,
            "executable": e.executable,
            "name": e.name,
            "description": e.description,
        }

    def _on_definition_removed(self, e: DefinitionRemoved) -> None:
        self.definitions.pop(e.definition_id, None)

    def _on_process_created(self, e: ProcessCreated) -> None:
        if e.upid in self.processes:
            return
        self.tombstones.remove(e.upid)
        p = Process(
            e.upid,
            ps.UNSCHEDULED,
            e.round,
            definition_id=e.definition_id,
            name=e.name,
            created_at=e.at,
            state_at=e.at,
        )
        self.processes[e.upid] = p
        if self.counting:
            self._recount(p)

    # The hottest events are folded from their fields (decision RS3): the event's handler
    # passes them, and a replay's fold passes a stored body straight (``fn(state, **body)``,
    # ProcessDispatcher.body_appliers), without building the event. Parameters are the event's fields,
    # same names and defaults (checked by tests/test_replay_fold.py).

    def _scheduled(self, upid: str, round: int, spec: dict[str, Any], at: float) -> PDState:  # noqa: A002
        """ProcessScheduled."""
        p = self.processes.get(upid)
        counting = self.counting
        if p is None:
            self.tombstones.remove(upid)
            if _SPEC_SET.issuperset(spec):  # (the usual spec: made in one go)
                p = Process(upid, ps.REQUESTED, round, created_at=at, state_at=at, **spec)
            else:
                p = Process(upid, ps.REQUESTED, round, created_at=at, state_at=at)
                for key, value in spec.items():
                    if key in _SPEC_SET:
                        setattr(p, key, value)
            self.processes[upid] = p
            if counting:
                self._recount(p)
        else:
            if p.state in ps.QUEUED:
                self.mm.dequeue(upid)
            self._release(p)
            if counting:
                self._uncount(p)  # under the old engine: the spec may change it
            for key, value in spec.items():
                if key in _SPEC_SET:
                    setattr(p, key, value)
            p.state = ps.REQUESTED
            p.round = round
            p.state_at = at
            p.msg = ""
            if counting:
                self._recount(p)
        p.seq = self.next_seq
        self.next_seq += 1
        self.mm.enqueue(p)
        return self

    def _moved(self, upid: str, round: int, state: str, at: float, msg: str = "") -> PDState:  # noqa: A002
        """ProcessMoved."""
        p = self.processes.get(upid)
        if p is None:
            return self
        old = p.state
        was_queued = old in ps.QUEUED
        counting = self.counting
        if counting:
            self._uncount(p)
        p.state = state
        p.round = round
        p.state_at = at
        if counting:
            self._recount(p)
        if msg:
            p.msg = msg
        if state == ps.RUNNING:  # the most common move: stays on its resource
            if old != ps.RUNNING:
                p.starts += 1
            if was_queued:
                self.mm.dequeue(upid)
            return self
        if state not in ps.PLACED:
            if p.resource_id is not None:
                self._release(p)
            else:
                p.node_id = None
        if state in ps.FRESH:
            if was_queued:
                self.mm.dequeue(upid)
            self._enqueue(p)
        elif state == ps.WAITING:
            if not was_queued:
                self._enqueue(p)
            self.mm.waited(upid)
        elif was_queued:
            self.mm.dequeue(upid)
        return self

    def _on_process_backoff(self, e: ProcessBackoff) -> None:
        p = self.processes.get(e.upid)
        if p is not None:
            p.crashes, p.retry_at = e.failures, e.retry_at

    def _assigned(self, upid: str, round: int, resource_id: str, at: float) -> PDState:  # noqa: A002
        """ProcessAssigned."""
        p = self.processes.get(upid)
        if p is None:
            return self
        if p.state in ps.QUEUED:
            self.mm.dequeue(upid)
        if p.resource_id is not None:
            self._release(p)
        else:
            p.node_id = None
        counting = self.counting
        if counting:
            self._uncount(p)
        p.state = ps.ASSIGNED
        p.round = round
        p.state_at = at
        if counting:
            self._recount(p)
        p.dispatches += 1
        p.last_dispatch = at
        p.msg = ""
        res = self.resources.get(resource_id)
        p.resource_id = resource_id
        if res is None:
            return self
        node_id = p.node_id = p.last_node_id = res.node_id
        res.assigned[upid] = round
        node = self.nodes[node_id]
        if not node.used:
            self.occupied[node.engine] += 1
            self.idle[node.engine].discard(node_id)
        node.used += 1
        if p.node_exclusive is not None:
            node.tags[p.node_exclusive] = upid
        self.mm.touch_node(node)
        return self

    def _on_node_added(self, e: NodeAdded) -> None:
        if e.node_id in self.nodes:
            return
        node = Node(e.node_id, e.domain_id, e.engine, dict(e.properties), self.node_seq, e.at)
        self.node_seq += 1
        self.nodes[e.node_id] = node
        self.engine_nodes.setdefault(e.engine, {})[e.node_id] = None
        self.idle.setdefault(e.engine, set()).add(e.node_id)
        self.mm.add_node(node)

    def _on_node_removed(self, e: NodeRemoved) -> None:
        node = self.nodes.get(e.node_id)
        if node is None:
            return
        self.mm.remove_node(node)
        for rid in node.resources:
            res = self.resources.pop(rid, None)
            if res is None:
                continue
            self.unwell.discard(rid)
            for upid in list(res.assigned):  # defensive: moved away by earlier events
                p = self.processes.get(upid)
                if p is not None and p.resource_id == rid:
                    p.resource_id = None
                    p.node_id = None
        if node.used:
            self.occupied[node.engine] -= 1
        else:
            self.idle[node.engine].discard(e.node_id)
        del self.nodes[e.node_id]
        engine_nodes = self.engine_nodes.get(node.engine)
        if engine_nodes is not None:
            engine_nodes.pop(e.node_id, None)

    def _on_node_retiring(self, e: NodeRetiring) -> None:
        node = self.nodes.get(e.node_id)
        if node is None or node.retiring == e.retiring:
            return
        node.retiring = e.retiring
        self.mm.touch_node(node, grew=not e.retiring)

    def _on_resource_added(self, e: ResourceAdded) -> None:
        node = self.nodes.get(e.node_id)
        if node is None or e.resource_id in self.resources:
            return
        props = dict(node.properties)
        props.update(engine=node.engine, node_id=node.node_id, resource_id=e.resource_id)
        self.resources[e.resource_id] = Resource(
            e.resource_id, e.node_id, node.engine, e.slots, props, e.at
        )
        node.resources.append(e.resource_id)
        self.mm.refresh_node(node)

    def _on_resource_state(self, e: ResourceStateChanged) -> None:
        res = self.resources.get(e.resource_id)
        if res is None or res.state == e.state:
            return
        res.state = e.state
        if e.state == ps.RESOURCE_OK:
            self.unwell.discard(e.resource_id)
        else:
            self.unwell.add(e.resource_id)
        self.mm.touch_node(self.nodes[res.node_id], grew=e.state == ps.RESOURCE_OK)

    def _on_resource_occupancy(self, e: ResourceOccupancy) -> None:
        res = self.resources.get(e.resource_id)
        if res is None or res.foreign == e.foreign:
            return
        node = self.nodes[res.node_id]
        self._use(node, e.foreign - res.foreign)
        res.foreign = e.foreign
        self.mm.touch_node(node)

    def _on_processes_forgotten(self, e: ProcessesForgotten) -> None:
        deferred = isinstance(self.mm, _Deferred)
        for upid in e.upids:
            p = self.processes.get(upid)
            if p is None or p.state not in ps.TERMINAL:
                continue  # never forget a live process, whatever the event says
            if self.counting:
                self._uncount(p)
            del self.processes[upid]
            if deferred:  # the process itself (left unchanged from here), settled by reindex()
                self.tombstones.bury_later(upid, p, p.state_at, e.at)
            else:
                self.tombstones.bury(upid, p.tombstone(), p.state_at, e.at)
        if not self.ended:
            self.ended = {}  # a drained dict keeps its capacity (decision E3)
        self.tombstones.bound(DEFAULT_LIMIT if e.keep is None else e.keep, e.before)

    def _on_system_boot(self, e: SystemBootSet) -> None:
        self.system_boot = e.on


class _Deferred:
    """The matchmaker's place while :meth:`PDState.defer_index` holds: every update is
    dropped, since :meth:`PDState.reindex` builds the index from the records."""

    __slots__ = ("min_start_interval",)

    def __init__(self, min_start_interval: float) -> None:
        self.min_start_interval = min_start_interval

    def _skip(self, *args: Any, **kwargs: Any) -> None:
        return None

    enqueue = dequeue = waited = add_node = remove_node = refresh_node = touch_node = _skip


#: states whose processes count for the engine's need
_NEED: frozenset[str] = ps.QUEUED | ps.PLACED | {ps.UNSCHEDULED_PENDING}


def _canon(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    return value


_HANDLERS = {
    DefinitionSet: PDState._on_definition_set,
    DefinitionRemoved: PDState._on_definition_removed,
    ProcessCreated: PDState._on_process_created,
    ProcessScheduled: lambda s, e: s._scheduled(e.upid, e.round, e.spec, e.at),
    ProcessMoved: lambda s, e: s._moved(e.upid, e.round, e.state, e.at, e.msg),
    ProcessBackoff: PDState._on_process_backoff,
    ProcessAssigned: lambda s, e: s._assigned(e.upid, e.round, e.resource_id, e.at),
    ProcessesForgotten: PDState._on_processes_forgotten,
    NodeAdded: PDState._on_node_added,
    NodeRemoved: PDState._on_node_removed,
    NodeRetiring: PDState._on_node_retiring,
    ResourceAdded: PDState._on_resource_added,
    ResourceStateChanged: PDState._on_resource_state,
    ResourceOccupancy: PDState._on_resource_occupancy,
    SystemBootSet: PDState._on_system_boot,
}

#: event class -> its handler in field form (``fn(state, **body)``, decision RS3)
FIELD_HANDLERS: dict[type, Any] = {
    ProcessScheduled: PDState._scheduled,
    ProcessMoved: PDState._moved,
    ProcessAssigned: PDState._assigned,
}
_SPEC_SET: frozenset[str] = frozenset(SPEC_KEYS)
#: the spec keys in the order :func:`_ordered` puts a spec's keys in (all are ``str``)
_SPEC_ORDER: tuple[str, ...] = tuple(sorted(SPEC_KEYS, key=repr))
_SPEC_VALUES = attrgetter(*_SPEC_ORDER)
