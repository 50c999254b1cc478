"""The Process Dispatcher's pure core: a :class:`~cei_actors.runtime.core.Component`.

``decide`` validates a request, emits events and asks for effects (launches and terminations
to EEAgents, notices to subscribers, needs to EPUM). Every decision ends with a matchmaking
pass (``matchmaker.py`` holds the rules) and a needs check (``needs.py``), so a placement
follows at once from whatever freed a slot or queued a process.

**Decide applies as it goes.** A decision often depends on its own earlier events (a node is
lost, its processes are requeued, then placed elsewhere; a heartbeat frees slots, then the
queue is matched). ``decide`` therefore applies each event to the state the moment it emits
it and remembers it in ``state.pre``; the runner's following ``apply`` of the same event
object is then a no-op. The state is always exactly the fold of the events returned, and
replay (which never calls ``decide``) applies them normally. If ``decide`` fails after it
emitted events, it returns those events with an error reply (they are valid, already
applied); if applying an event fails, the state is marked broken and the runner's ``apply``
raises, which drops the state until the shell recovers it from the log.

Config keys (all optional except ``engines``; see :func:`parse_config`)::

    engines: {id: {slots, replicas=1, spare_slots=0, base_need=0, maximum_vms=None,
                   heartbeat_period=30, heartbeat_warning=None, heartbeat_missing=None,
                   iaas_allocation=None, config=None}}
    default_engine            # implicit when only one engine is defined
    process_engines           # {dotted module/definition prefix: engine}
    restart_throttling_config: {minimum_time_between_starts: 2.0}
    dispatch_retry_seconds: 30.0
    static_resources: false   # no EPUM: nodes are announced with NodeState by hand
    epum: "epum"              # EPUM's peer name
    self_name: "pd"           # our peer name (EPUM's subscriber)
    domain_prefix: "pd_domain_"
    domain_definition_id: "pd_default"   # EPUM domain definition the PD's domains use
    domain_config: {}         # sections (general, engine_conf, health) for AddDomain
    monitor_resource_heartbeats: true
    monitor_interval: null    # default: from the engines' heartbeat settings
    needs_interval: 1.0       # at most one RegisterNeed per engine per this many seconds
    needs_refresh: 30.0       # re-send needs and re-subscribe this often even if unchanged (0: never)
    fence_time: 15.0          # an agent's lease: it stops its processes this long after the
                              # heartbeat the PD last granted, unless renewed (decision PD9)
    fence_margin: 3.0         # the PD moves work off a silent node not known dead only
                              # fence_time + fence_margin after it last renewed its lease
    retention: 3600           # seconds a finished process is kept before it is forgotten
                              # for a tombstone ('forever': never; decision PD10)
    tombstone_limit: 20000    # tombstones kept at most (the oldest go first)
    tombstone_max_age: 604800 # seconds a tombstone is kept ('forever': no limit)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..eeagent import states as agent_states
from ..eeagent.messages import (
    AgentHeartbeat,
    AgentRequests,
    CleanupProcess,
    LaunchProcess,
    LeaseGrant,
    TerminateProcess,
)
from ..epum.messages import AddDomain, NodeState, RegisterNeed, SubscribeDomain
from ..runtime.core import (
    SHELL_CONFIG_KEYS,
    Component,
    Context,
    Decision,
    Rejected,
    Send,
    SetTimer,
    bad_request,
    conflict,
    not_found,
)
from ..runtime.messages import ErrorReply, Ok
from ..runtime.tombstones import (
    DEFAULT_LIMIT,
    DEFAULT_MAX_AGE,
    Tombstone,
    parse_seconds,
    parse_tombstone_bounds,
)
from . import invariants
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
    events,
)
from .matchmaker import engine_by_definition
from .messages import (
    CreateDefinition,
    CreateProcess,
    DescribeDefinition,
    DescribeProcess,
    DescribeProcesses,
    Dump,
    FlushNeeds,
    FlushOutbox,
    ForgetProcesses,
    KillProcess,
    ListDefinitions,
    Matchmake,
    MonitorResources,
    ProcessCounts,
    ProcessStateChanged,
    RemoveDefinition,
    RestartProcess,
    RetryDispatches,
    ScheduleProcess,
    ScheduleProcesses,
    SetSystemBoot,
    UpdateDefinition,
)
from .needs import EngineSpec, need, retirable
from .state import FIELD_HANDLERS, Liveness, PDState, Process, Resource, Soft, spec_digest

logger = logging.getLogger(__name__)

#: Instance states before RUNNING (EPUM does not send them; ignored if it does).
PRE_RUNNING = frozenset({"REQUESTING", "REQUESTED", "ERROR_RETRYING", "PENDING", "STARTED"})
#: Instance states that mean the node is lost.
NODE_LOST = frozenset({"RUNNING_FAILED", "TERMINATING", "TERMINATED", "FAILED", "REJECTED"})
#: Losses that mean the node's processes are gone too (its VM ended, or never ran): work
#: moves at once. After the others (RUNNING_FAILED, TERMINATING) the agent may still run
#: it, so it moves when the agent's lease has run out (decision PD9).
NODE_DEAD = frozenset({"TERMINATED", "FAILED", "REJECTED"})
#: Processes forgotten per pass at most (the rest follow at once, in the next pass) and per
#: event (so no event outgrows a znode; decision P8).
FORGET_PER_PASS = 5_000
FORGET_PER_EVENT = 500


@dataclass(frozen=True)
class PDConfig:
    engines: dict[str, EngineSpec]
    default_engine: str | None = None
    process_engines: dict[str, str] = field(default_factory=dict)
    minimum_time_between_starts: float = 2.0
    #: a crash loop backs off (decision OP3): from the second quick failure in a row the next
    #: start waits base, 2*base, ... seconds, at most max; a run of stable_run s resets it
    crash_backoff_base: float = 1.0
    crash_backoff_max: float = 60.0
    crash_stable_run: float = 10.0
    dispatch_retry_seconds: float = 30.0
    static_resources: bool = False
    epum: str = "epum"
    self_name: str = "pd"
    domain_prefix: str = "pd_domain_"
    domain_definition_id: str = "pd_default"
    domain_config: dict[str, Any] = field(default_factory=dict)
    monitor_resource_heartbeats: bool = True
    monitor_interval: float | None = None
    needs_interval: float = 1.0
    needs_refresh: float = 30.0
    fence_time: float = 15.0
    fence_margin: float = 3.0
    retention: float | None = 3600.0  # None: forever
    tombstone_limit: int = DEFAULT_LIMIT
    tombstone_max_age: float | None = DEFAULT_MAX_AGE  # None: forever

    def forget_every(self) -> float | None:
        """Seconds between two passes that forget finished processes (None: never)."""
        if self.retention is None:
            return None
        return max(1.0, min(300.0, self.retention / 4))

    def domain_id(self, engine: str) -> str:
        return f"{self.domain_prefix}{engine}"

    def engine_of_domain(self, domain_id: str) -> str | None:
        if not domain_id.startswith(self.domain_prefix):
            return None
        engine = domain_id[len(self.domain_prefix) :]
        return engine if engine in self.engines else None

    def lease_expired(self, lv: Liveness, now: float) -> bool:
        """True once an agent last renewed at ``lv.granted`` must have stopped its processes
        (decision PD9): ``fence_time`` after the heartbeat that renewed its lease, which it
        sent before we received it, plus ``fence_margin`` for its kill and clock rates."""
        return now - lv.granted >= self.fence_time + self.fence_margin

    def least_warning(self) -> float | None:
        """The least ``heartbeat_warning`` of the monitored engines (None: none monitored)."""
        warnings = [e.heartbeat_warning for e in self.engines.values() if e.monitored]
        return min(warnings) if warnings else None  # type: ignore[type-var]

    def grant_every(self) -> float:
        """Least seconds between two lease grants to one agent."""
        return self.fence_time / 8

    def monitor_every(self) -> float | None:
        """Seconds between resource monitor passes, or None when nothing is monitored."""
        if not self.monitor_resource_heartbeats:
            return None
        if self.monitor_interval is not None:
            return self.monitor_interval
        gaps = [
            min((e.heartbeat_missing - e.heartbeat_warning) / 4, e.heartbeat_period / 2)  # type: ignore[operator]
            for e in self.engines.values()
            if e.monitored
        ]
        return max(0.02, min(1.0, *gaps)) if gaps else None


#: Keys the runtime shell reads from the same config (ignored here).
_TOP_KEYS = set(PDConfig.__dataclass_fields__) | {"restart_throttling_config"} | SHELL_CONFIG_KEYS
_TOP_KEYS.discard("minimum_time_between_starts")


def parse_config(config: Mapping[str, Any] | None) -> PDConfig:
    """Validate the PD config; ``ValueError`` names the first bad key."""
    config = dict(config or {})
    unknown = set(config) - _TOP_KEYS
    if unknown:
        raise ValueError(f"PD config: unknown keys {sorted(unknown)}")
    raw_engines = config.get("engines")
    if not isinstance(raw_engines, Mapping) or not raw_engines:
        raise ValueError("PD config: 'engines' must map at least one engine id to its settings")
    engines = {str(k): EngineSpec.from_config(str(k), v) for k, v in raw_engines.items()}
    default = config.get("default_engine")
    if default is None and len(engines) == 1:
        default = next(iter(engines))
    if default is not None and default not in engines:
        raise ValueError(f"PD config: default_engine {default!r} is not among {sorted(engines)}")
    pe = dict(config.get("process_engines") or {})
    for prefix, eng in pe.items():
        if eng not in engines:
            raise ValueError(f"PD config: process_engines[{prefix!r}] = {eng!r} is not an engine")
    throttle = config.get("restart_throttling_config") or {}
    mtbs = float(throttle.get("minimum_time_between_starts", 2.0))
    retry = float(config.get("dispatch_retry_seconds", 30.0))
    if retry <= 0 or mtbs < 0:
        raise ValueError("PD config: dispatch_retry_seconds must be > 0, throttling >= 0")
    for key, least in (("fence_time", 0.0), ("fence_margin", -1.0)):
        if key in config:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                least < value < 1e6
            ):
                raise ValueError(
                    f"PD config: {key} must be seconds {'> 0' if least == 0 else '>= 0'}, "
                    f"got {value!r}"
                )
            config[key] = float(value)
    if "retention" in config:
        config["retention"] = parse_seconds("PD config: retention", config["retention"])
    limit, max_age = parse_tombstone_bounds(
        "PD", config.get("tombstone_limit", DEFAULT_LIMIT),
        config.get("tombstone_max_age", DEFAULT_MAX_AGE),
    )
    config["tombstone_limit"], config["tombstone_max_age"] = limit, max_age
    kw = {k: config[k] for k in PDConfig.__dataclass_fields__ if k in config}
    kw.update(
        engines=engines,
        default_engine=default,
        process_engines=pe,
        minimum_time_between_starts=mtbs,
        dispatch_retry_seconds=retry,
    )
    return PDConfig(**kw)


class _Broken(Exception):  # noqa: N818
    pass


class Tx:
    """One decision in the making: emits (and applies) events, collects effects."""

    __slots__ = ("pd", "cfg", "s", "ctx", "now", "events", "effects", "reply", "reply_process",
                 "reply_many", "direct_rid", "direct")

    def __init__(self, pd: ProcessDispatcher, state: PDState, ctx: Context) -> None:
        self.pd = pd
        self.cfg = pd.cfg
        self.s = state
        self.ctx = ctx
        self.now = ctx.now
        self.events: list[Any] = []
        self.effects: list[Any] = []
        self.reply: Any = None
        self.reply_process: str | None = None
        self.reply_many: list[Any] | None = None
        #: the agent whose heartbeat this decision answers, when nothing waits in the outbox
        #: for it: its requests go out with this decision, as one message (decision SC6)
        self.direct_rid: str | None = None
        self.direct: list[Any] = []

    # ---- primitives ---------------------------------------------------------------------------

    def emit(self, event: Any) -> None:
        soft = self.s.soft
        soft.needs_rest = False
        quiet = soft.quiet
        if quiet:
            _unquiet(self.s, quiet, event)
        try:
            self.s.apply(event)
        except Exception as exc:
            self.s.broken = f"{type(event).__name__}: {type(exc).__name__}: {exc}"
            self.events.append(event)
            raise _Broken(self.s.broken) from exc
        self.s.pre.append(event)
        self.events.append(event)

    def send(self, to: str, message: Any) -> None:
        self.effects.append(Send(to, message))

    def timer(self, key: str, delay: float, message: Any) -> None:
        self.effects.append(SetTimer(key, max(0.0, delay), message))

    def forget_timers(self) -> None:
        """This decision is dropped with its effects: timers it asked for will not come."""
        soft = self.s.soft
        for eff in self.effects:
            if isinstance(eff, SetTimer):
                if eff.key == "outbox":
                    soft.outbox_timer = False
                elif eff.key == "needs":
                    soft.needs_timer = False
                else:
                    soft.timers.pop(eff.key, None)

    @staticmethod
    def agent(resource_id: str) -> str:
        return f"eeagent:{resource_id}"

    # ---- process moves ------------------------------------------------------------------------

    def move(self, p: Process, round_: int, state: str, msg: str = "") -> None:
        self.emit(ProcessMoved(p.upid, round_, state, self.now, msg))
        self.notify(p)

    def assign(self, p: Process, round_: int, res: Resource) -> None:
        self.emit(ProcessAssigned(p.upid, round_, res.resource_id, self.now))
        self.launch(p)
        self.notify(p)

    def to_agent(self, rid: str, message: Any) -> None:
        """Queue a request for agent ``rid``: the outbox goes out as one message per agent
        when the current burst of messages is done (a zero-delay timer); the requests to the
        agent whose heartbeat this is go with this decision (SC6)."""
        if rid == self.direct_rid:
            self.direct.append(message)
            return
        soft = self.s.soft
        soft.outbox.setdefault(rid, []).append(message)
        if not soft.outbox_timer:
            soft.outbox_timer = True
            self.timer("outbox", 0.0, FlushOutbox())

    def answer_directly(self, rid: str) -> None:
        """Send this decision's requests to agent ``rid`` with it, unless earlier ones wait
        in the outbox for it (they go first, in order)."""
        if rid not in self.s.soft.outbox:
            self.direct_rid = rid

    def undo_direct(self) -> None:
        """The decision is dropped: its requests to the agent wait in the outbox, as any
        other's do (its next flush takes them)."""
        if self.direct:
            self.s.soft.outbox.setdefault(self.direct_rid, []).extend(self.direct)  # type: ignore[arg-type]
            self.direct = []

    def flush_outbox(self) -> None:
        soft = self.s.soft
        for rid, requests in soft.outbox.items():
            msg: Any = requests[0] if len(requests) == 1 else AgentRequests(requests)
            self.send(self.agent(rid), msg)
        soft.outbox = {}

    def launch(self, p: Process) -> None:
        assert p.resource_id is not None
        self.to_agent(p.resource_id, LaunchProcess(p.upid, p.round, list(p.command), p.env, p.cwd))
        self.s.soft.launch_sent[p.upid] = self.now

    def terminate(self, rid: str, upid: str, round_: int) -> None:
        self.to_agent(rid, TerminateProcess(upid, round_))

    def cleanup(self, rid: str, upid: str, round_: int) -> None:
        self.to_agent(rid, CleanupProcess(upid, round_))

    def notify(self, p: Process) -> None:
        if not p.subscribers:
            return
        notice = ProcessStateChanged(
            {
                "upid": p.upid,
                "round": p.round,
                "state": p.state,
                "node_id": p.node_id,
                "assigned": p.resource_id,
            }
        )
        for sub in p.subscribers:
            self.send(sub, notice)

    def ended(self, p: Process, reported: str, msg: str, cause: str | None = None) -> None:
        """The agent reports the end of ``p``'s current round (``reported`` is terminal).
        An end caused by its node (the agent's ``cause`` says so, or EPUM said the node is
        going) is restarted per the restart mode but not counted as a crash (OP7)."""
        if reported == ps.EXITED and p.state in (ps.ASSIGNED, ps.PENDING):
            # It ran and exited between two heartbeats: record the start we did not see.
            self.move(p, p.round, ps.RUNNING)
        if p.state == ps.TERMINATING:
            self.move(p, p.round, ps.TERMINATED, msg)
        elif reported == ps.REJECTED:
            # The agent had no slot: our view of it was wrong. Requeue, not a failure.
            self.move(p, p.round + 1, ps.DIED_REQUESTED, msg or "rejected by the agent")
        elif ps.restarts_after_exit(p.restart_mode, reported):
            why = msg or f"ended {reported}"
            if cause == agent_states.CAUSE_NODE or self.node_going(p):
                self.node_ended(p)
            else:
                why = self.crash_backoff(p, why)
            self.move(p, p.round + 1, ps.DIED_REQUESTED, why)
        else:
            self.move(p, p.round, reported, msg)

    def crash_backoff(self, p: Process, why: str) -> str:
        """Count ``p``'s end towards its crash loop (decision OP3); the message for its restart.

        An end less than ``crash_stable_run`` s after it started running (or before it ran)
        is a quick failure; from the second in a row the next start waits ``base * 2 **
        (failures - 2)`` s (at most ``max``). A longer run starts the count afresh."""
        cfg = self.cfg
        if cfg.crash_backoff_base <= 0:
            return why
        ran = self.now - p.state_at if p.state == ps.RUNNING else 0.0
        failures = 1 if ran >= cfg.crash_stable_run else p.crashes + 1
        delay = 0.0 if failures < 2 else min(cfg.crash_backoff_base * 2 ** (failures - 2),
                                             cfg.crash_backoff_max)
        if failures != p.crashes or delay:
            self.emit(ProcessBackoff(p.upid, failures, self.now + delay if delay else 0.0, self.now))
        if failures < 2:
            return why
        return f"{ps.CRASH_LOOP}: {why}; {failures} quick failures in a row, next start in {delay:g}s"

    def node_going(self, p: Process) -> bool:
        """True if EPUM said the node ``p`` is placed on is going (doomed: TERMINATING or
        RUNNING_FAILED), so an end reported there is its node's, not the process's own."""
        res = self.s.resources.get(p.resource_id) if p.resource_id is not None else None
        return res is not None and res.node_id in self.s.soft.doomed

    def node_ended(self, p: Process) -> None:
        """``p`` ended because its node went away, and is restarted: not a quick failure (the
        count stays, as after REJECTED); a stable run before it still ends the count (OP3)."""
        if (p.crashes and p.state == ps.RUNNING
                and self.now - p.state_at >= self.cfg.crash_stable_run):
            self.emit(ProcessBackoff(p.upid, 0, 0.0, self.now))

    def evacuate(self, res: Resource, reason: str, *, boot: bool = False) -> None:
        for upid in list(res.assigned):
            p = self.s.processes[upid]
            if p.state == ps.TERMINATING:
                self.move(p, p.round, ps.TERMINATED, reason)
            elif boot:
                self.boot_park(p, reason)
            elif ps.restarts_after_loss(p.restart_mode):
                self.move(p, p.round + 1, ps.DIED_REQUESTED, reason)
            else:
                self.move(p, p.round, ps.FAILED, reason)

    def boot_park(self, p: Process, reason: str) -> None:
        if ps.restarts_after_loss(p.restart_mode) and not p.omit_from_system_restart:
            self.move(p, p.round + 1, ps.UNSCHEDULED_PENDING, reason)
        else:
            self.move(p, p.round, ps.TERMINATED, reason)

    def lose_node(self, node_id: str, state: str, reason: str) -> None:
        node = self.s.nodes.get(node_id)
        if node is None:
            return
        for rid in list(node.resources):
            res = self.s.resources.get(rid)
            if res is not None:
                self.evacuate(res, reason)
        self.forget_node(node_id)
        self.emit(NodeRemoved(node_id, state, self.now))

    def doom_node(self, node_id: str, state: str) -> None:
        """EPUM reports the node lost, but not that its processes are gone: nothing is placed
        there any more, and its work moves once every agent's lease there has run out."""
        node = self.s.nodes.get(node_id)
        if node is None:
            return
        soft = self.s.soft
        if node_id not in soft.doomed:
            logger.warning(
                "pd: node %s is %s; its processes move when its agents' leases run out",
                node_id,
                state,
            )
        soft.doomed[node_id] = state
        for rid in node.resources:
            res = self.s.resources.get(rid)
            if res is not None and res.state != ps.RESOURCE_MISSING:
                self.emit(ResourceStateChanged(rid, ps.RESOURCE_MISSING, self.now))
        self.expire_doomed()

    def fenced(self, rid: str) -> bool:
        """True once agent ``rid`` must have stopped its processes (its lease ran out)."""
        soft = self.s.soft
        lv = soft.live.get(rid)
        if lv is None:
            lv = soft.new_live(rid, self.now, self.now)
        return self.cfg.lease_expired(lv, self.now)

    def expire_doomed(self) -> None:
        """Lose the doomed nodes whose agents' leases have all run out.

        A node found with an agent not yet fenced keeps that agent's grant time: grants only
        grow, so the node is not looked at again until that grant has run out (decision SC11;
        a clock that went back since makes it look again)."""
        soft = self.s.soft
        if not soft.doomed:
            return
        now, waits, limit = self.now, soft.doomed_wait, self.cfg.fence_time + self.cfg.fence_margin
        for node_id, state in list(soft.doomed.items()):
            node = self.s.nodes.get(node_id)
            if node is None:
                del soft.doomed[node_id]
                waits.pop(node_id, None)
                continue
            wait = waits.get(node_id)
            if wait is not None and wait[0] <= now and now - wait[1] < limit:
                continue  # (the agent found unfenced is so still: now - granted < limit)
            for rid in node.resources:
                if not self.fenced(rid):
                    waits[node_id] = (now, soft.live[rid].granted)
                    break
            else:
                self.lose_node(node_id, state, f"node {node_id} {state}")

    def forget_node(self, node_id: str) -> None:
        soft = self.s.soft
        soft.doomed.pop(node_id, None)
        soft.doomed_wait.pop(node_id, None)
        for rid in self.s.nodes[node_id].resources:
            soft.live.pop(rid, None)
            soft.heard.discard(rid)
            soft.cleanups.pop(rid, None)
            soft.stale_kills.pop(rid, None)
            soft.quiet.pop(rid, None)

    # ---- the end of every decision ------------------------------------------------------------

    def matchmake(self) -> None:
        s, mm = self.s, self.s.mm
        if not mm.pending():
            return  # nothing queued to place, judge or release (most decisions)
        mm.release_throttled(self.now)
        while True:
            pick = mm.next_placement()
            if pick is None:
                break
            p, res = pick
            self.assign(p, p.round, res)
        if mm.fresh:
            for upid in list(mm.fresh):
                p = s.processes[upid]
                if mm.is_throttled(upid) or ps.may_wait(p.queueing_mode, p.starts):
                    if p.state != ps.WAITING:
                        self.move(p, p.round, ps.WAITING)
                    else:
                        mm.waited(upid)
                else:
                    self.move(
                        p, p.round, ps.REJECTED, f"no free slot (queueing mode {p.queueing_mode})"
                    )
        due = mm.next_throttle()
        timers = s.soft.timers
        if due is not None and timers.get("throttle") != due:
            timers["throttle"] = due
            self.timer("throttle", due - self.now, Matchmake())

    def needs(self, force: bool = False) -> bool:
        """Register changed needs with EPUM (rate-limited); True if a node was un-retired.

        Every ``needs_refresh`` seconds the current needs go out even when unchanged, each
        with a ``SubscribeDomain`` naming the engine's nodes: a lost ``RegisterNeed`` or
        ``NodeState`` is healed by the next refresh (EPUM writes nothing for an unchanged
        need, and answers the subscription with its domain's node states)."""
        cfg, s = self.cfg, self.s
        if cfg.static_resources:
            return False
        soft = s.soft
        refresh = cfg.needs_refresh > 0 and self.now >= soft.needs_refresh_at
        if soft.needs_rest and not (force or refresh):
            return False  # no event since a check that found nothing changed (SC20)
        if refresh:
            if soft.needs_refresh_at > float("-inf"):  # not at recovery: it subscribes itself
                for eid in cfg.engines:
                    self.subscribe(eid)
            soft.needs_refresh_at = self.now + cfg.needs_refresh
            force = True
        changed = []
        sent, memo = soft.needs_sent, soft.needs_memo
        for eid, spec in cfg.engines.items():
            occupied, live = s.occupied[eid], s.live_count[eid]
            last = memo.get(eid)  # need() of the same counts: the same need (SC18)
            if last is not None and last[0] == live and last[1] == occupied:
                n = last[2]
            else:
                n = need(spec, live, occupied)
                memo[eid] = (live, occupied, n)
            sig = (n, len(s.engine_nodes.get(eid, ())), occupied)
            if force or eid not in sent or sent[eid][0] != sig:
                changed.append((eid, spec, n, sig))
        soft.needs_rest = not changed
        if not changed:
            return False
        wait = soft.needs_sent_at + cfg.needs_interval - self.now
        if wait > 0 and not force:
            if not soft.needs_timer:
                soft.needs_timer = True
                self.timer("needs", wait, FlushNeeds())
            return False
        soft.needs_sent_at = self.now
        unretired = False
        for eid, _spec, n, sig in changed:
            nodes = s.engine_nodes.get(eid, {})
            retire = retirable(self.idle_newest_first(eid), len(nodes), n)
            keep = set(retire)
            for nid in self.retiring(eid, nodes):
                if nid not in keep:
                    self.emit(NodeRetiring(nid, False, self.now))
                    unretired = True
            for nid in retire:
                if not s.nodes[nid].retiring:
                    self.emit(NodeRetiring(nid, True, self.now))
            soft.needs_sent[eid] = (sig, n, tuple(retire))
            self.send(cfg.epum, RegisterNeed(cfg.domain_id(eid), n, list(retire)))
        return unretired

    def idle_newest_first(self, engine: str) -> Iterator[tuple[str, bool, bool]]:
        """``retirable``'s nodes: the engine's idle ones (an occupied node is never retired,
        so it is not looked at: SC12), newest first (node order), each with whether it is
        broken; sorted only if ``retirable`` asks for the first."""
        nodes = self.s.nodes
        for nid in sorted(self.s.idle.get(engine, ()), key=lambda nid: nodes[nid].seq,
                          reverse=True):
            yield nid, False, self.broken(nid)

    def retiring(self, engine: str, nodes: dict[str, None]) -> list[str]:
        """The engine's retiring nodes (``nodes``), in node order. Only :meth:`needs` retires
        nodes, and after it sent a need exactly the nodes it named retire: those still here
        are looked at, not every node (SC5); after a recovery, every node."""
        sent = self.s.soft.needs_sent.get(engine)
        known = self.s.nodes
        if sent is None:
            return [nid for nid in nodes if known[nid].retiring]
        named = [nid for nid in sent[2] if nid in nodes and known[nid].retiring]
        named.sort(key=lambda nid: known[nid].seq)  # ``nodes`` is in node order
        return named

    def subscribe(self, engine: str) -> None:
        """(Re-)subscribe to the engine's EPUM domain, naming the nodes we hold."""
        cfg = self.cfg
        known = list(self.s.engine_nodes.get(engine, ()))
        self.send(cfg.epum, SubscribeDomain(cfg.domain_id(engine), cfg.self_name, known=known))

    def broken(self, node_id: str) -> bool:
        """True if the node has agents and every one of them is MISSING."""
        rids = self.s.nodes[node_id].resources
        res = self.s.resources
        missing = ps.RESOURCE_MISSING  # (the first one decides for almost every node)
        return bool(rids) and res[rids[0]].state == missing and all(
            res[r].state == missing for r in rids)

    def finish(self) -> None:
        self.matchmake()
        if self.needs():
            self.matchmake()  # a node given back to service may take queued processes

    def decision(self) -> Decision:
        if self.direct:
            requests, self.direct = self.direct, []
            msg: Any = requests[0] if len(requests) == 1 else AgentRequests(requests)
            self.send(self.agent(self.direct_rid), msg)  # type: ignore[arg-type]
        reply = self.reply
        if reply is None and self.reply_many is not None:
            procs = self.s.processes
            reply = Ok([procs[x].describe() if isinstance(x, str) else x for x in self.reply_many])
        if reply is None and self.reply_process is not None:
            p = self.s.processes.get(self.reply_process)
            reply = Ok(p.describe() if p is not None else None)
        return Decision(self.events, self.effects, reply)


Handler = Callable[["ProcessDispatcher", Tx, Any], None]


class ProcessDispatcher(Component[PDState]):
    """Schedules processes onto EEAgents of elastic nodes; see the module docstring."""

    registry = events
    stream = "pd"
    applies_in_decide = True  # PD1

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.cfg = parse_config(config)
        #: ``cfg.grant_every()``, read at every heartbeat (the config is fixed)
        self.grant_every = self.cfg.grant_every()

    # ---- the component contract ---------------------------------------------------------------

    def initial_state(self) -> PDState:
        return PDState(self.cfg.minimum_time_between_starts)

    def apply(self, state: PDState, event: Any) -> PDState:
        if state.broken is not None:
            raise RuntimeError(f"PD state is broken ({state.broken}); recover from the log")
        pre = state.pre
        if pre:
            head = pre[0]
            if head is event or head == event:
                pre.popleft()
                return state
            pre.clear()  # left over from a decision whose events were applied elsewhere
        soft = state.soft
        soft.needs_rest = False  # an event not decided here: the needs are looked at again
        if soft.quiet:
            soft.quiet.clear()  # an event not decided here: no heartbeat is quiet (SIM7)
        state.apply(event)
        return state

    def body_appliers(self, state: PDState) -> dict[tuple[str, int], Any]:
        """The hottest events, folded from their stored bodies (decision RS3); none for a
        state a decision is under way in (it has events applied ahead, or quiet agents)."""
        if state.broken is not None or state.pre or state.soft.quiet:
            return {}
        state.soft.needs_rest = False  # events folded outside a decision (SC20)
        return _BODY_APPLIERS

    @classmethod
    def for_replay(cls) -> ProcessDispatcher:
        """A PD able to fold any PD stream: it merely refuses to be built without an engine."""
        return cls(config={"engines": {"default": {"slots": 1}}})

    def shared_fields(self) -> dict[str, tuple[str, ...]]:
        """A workload's processes are scheduled with one spec (decision RS5)."""
        return _SHARED_FIELDS

    def decide(self, state: PDState, message: Any, ctx: Context) -> Decision:
        state.pre.clear()
        if state.broken is not None:
            raise RuntimeError(f"PD state is broken ({state.broken}); recover from the log")
        handler = _HANDLERS.get(type(message))
        if handler is None:
            if isinstance(message, Ok | ErrorReply):
                if isinstance(message, ErrorReply):
                    logger.info("pd: reply from a peer: %s %s", message.code, message.message)
                return Decision()
            raise bad_request(f"the PD does not handle {type(message).__name__}")
        tx = Tx(self, state, ctx)
        try:
            handler(self, tx, message)
            if type(message) not in _QUERIES:
                tx.finish()
        except _Broken:
            logger.exception("pd: applying an event failed; the state must be recovered")
            return Decision(events=tx.events)
        except Rejected as exc:
            if not tx.events:
                tx.forget_timers()
                tx.undo_direct()
                raise
            tx.reply = ErrorReply(exc.code, exc.message, type(message).__name__)
        except Exception as exc:
            if not tx.events:
                tx.forget_timers()
                tx.undo_direct()
                raise
            logger.exception("pd: %s failed after emitting events", type(message).__name__)
            tx.reply = ErrorReply(
                "internal", f"{type(exc).__name__}: {exc}", type(message).__name__
            )
        return tx.decision()

    def recovered(self, state: PDState, ctx: Context) -> Decision:
        state.pre.clear()
        now = ctx.now
        state.soft = Soft(recovered_at=now)
        for rid in state.resources:
            state.soft.live[rid] = Liveness(now, now)
        tx = Tx(self, state, ctx)
        cfg = self.cfg
        if not cfg.static_resources:
            for eid, spec in cfg.engines.items():
                did = cfg.domain_id(eid)
                tx.send(
                    cfg.epum,
                    AddDomain(
                        did,
                        cfg.domain_definition_id,
                        self.domain_config(spec),
                        subscriber=cfg.self_name,
                    ),
                )
                tx.subscribe(eid)
        try:
            tx.matchmake()
            if tx.needs(force=True):
                tx.matchmake()
        except _Broken:
            logger.exception("pd: applying an event failed during recovery")
            return Decision(events=tx.events)
        every = cfg.monitor_every()
        if every is not None:
            tx.timer("monitor", every, MonitorResources())
        tx.timer("retry", self.retry_every(), RetryDispatches())
        forget = cfg.forget_every()
        if forget is not None:
            tx.timer("forget", forget, ForgetProcesses())
        # The runner commits these events without applying them again: nothing is pending.
        decision = tx.decision()
        return decision

    def snapshot(self, state: PDState) -> Any:
        return state.to_data()

    def restore(self, data: Any) -> PDState:
        return PDState.from_data(data, self.cfg.minimum_time_between_starts)

    def invariants(self, state: PDState) -> list[str]:
        return invariants.broken(state)

    # ---- helpers ------------------------------------------------------------------------------

    def retry_every(self) -> float:
        return max(0.02, min(5.0, self.cfg.dispatch_retry_seconds / 4))

    def domain_config(self, spec: EngineSpec) -> dict[str, Any]:
        """The AddDomain config for an engine: ``domain_config`` plus the engine's sizing."""
        conf = copy.deepcopy(self.cfg.domain_config)
        ec = conf.setdefault("engine_conf", {})
        ec.update(spec.config or {})
        ec["preserve_n"] = 0
        if spec.maximum_vms is not None:
            ec["maximum_vms"] = spec.maximum_vms
        if spec.iaas_allocation is not None:
            ec["iaas_allocation"] = spec.iaas_allocation
        pv = ec.setdefault("provisioner_vars", {})
        pv.update(
            slots=spec.slots,
            replicas=spec.replicas,
            heartbeat=spec.heartbeat_period,
            fence=self.cfg.fence_time,
        )
        return conf

    def resolve_engine(self, m: ScheduleProcess, definition: dict | None) -> str:
        explicit = m.execution_engine_id
        constrained = (m.constraints or {}).get("engine")
        if constrained is not None and not isinstance(constrained, str):
            raise bad_request(
                "ScheduleProcess.constraints['engine']: must be one engine id (a str)"
            )
        if explicit and constrained and explicit != constrained:
            raise bad_request(
                f"execution_engine_id {explicit!r} contradicts constraints.engine {constrained!r}"
            )
        engine = explicit or constrained
        if engine is None:
            engine = engine_by_definition(definition, self.cfg.process_engines, self.cfg.default_engine)
        if engine is None:
            raise bad_request("no execution engine: give execution_engine_id (no default_engine)")
        if engine not in self.cfg.engines:
            raise bad_request(
                f"unknown execution engine {engine!r} (known: {', '.join(sorted(self.cfg.engines))})"
            )
        return engine


# ---- handlers ---------------------------------------------------------------------------------


def _proc(tx: Tx, upid: str) -> Process:
    p = tx.s.processes.get(upid)
    if p is None:
        raise not_found(f"no process {upid!r}")
    return p


def _ended(stone: Tombstone) -> str:
    """How a forgotten process ended, for messages."""
    r = stone.record
    return (f"ended {r['state']} (round {r['round']}) and was forgotten at "
            f"{stone.forgotten_at:.3f} after the PD's retention")


def _definition_fields(m: CreateDefinition | UpdateDefinition) -> dict[str, Any]:
    return {
        "definition_id": m.definition_id,
        "definition_type": m.definition_type,
        "executable": m.executable,
        "name": m.name,
        "description": m.description,
    }


def _on_create_definition(pd: ProcessDispatcher, tx: Tx, m: CreateDefinition) -> None:
    want = _definition_fields(m)
    have = tx.s.definitions.get(m.definition_id)
    if have is not None:
        if have != want:
            raise conflict(f"definition {m.definition_id!r} exists with different content")
        tx.reply = Ok(dict(have))
        return
    tx.emit(DefinitionSet(**want, at=tx.now))
    tx.reply = Ok(want)


def _on_update_definition(pd: ProcessDispatcher, tx: Tx, m: UpdateDefinition) -> None:
    if m.definition_id not in tx.s.definitions:
        raise not_found(f"no definition {m.definition_id!r}")
    want = _definition_fields(m)
    if tx.s.definitions[m.definition_id] != want:
        tx.emit(DefinitionSet(**want, at=tx.now))
    tx.reply = Ok(want)


def _on_describe_definition(pd: ProcessDispatcher, tx: Tx, m: DescribeDefinition) -> None:
    d = tx.s.definitions.get(m.definition_id)
    if d is None:
        raise not_found(f"no definition {m.definition_id!r}")
    tx.reply = Ok(dict(d))


def _on_list_definitions(pd: ProcessDispatcher, tx: Tx, m: ListDefinitions) -> None:
    tx.reply = Ok(sorted(tx.s.definitions))


def _on_remove_definition(pd: ProcessDispatcher, tx: Tx, m: RemoveDefinition) -> None:
    if m.definition_id not in tx.s.definitions:
        raise not_found(f"no definition {m.definition_id!r}")
    tx.emit(DefinitionRemoved(m.definition_id, tx.now))
    tx.reply = Ok(None)


def _on_create_process(pd: ProcessDispatcher, tx: Tx, m: CreateProcess) -> None:
    if m.definition_id not in tx.s.definitions:
        raise not_found(f"no definition {m.definition_id!r}")
    p = tx.s.processes.get(m.upid)
    if p is not None:
        if p.definition_id != m.definition_id or (m.name is not None and p.name != m.name):
            raise bad_request(
                f"process {m.upid!r} exists with definition {p.definition_id!r} and name {p.name!r}"
            )
    else:
        stone = tx.s.tombstones.get(m.upid)
        round_ = 0 if stone is None else stone.record["round"] + 1  # past any late report
        tx.emit(ProcessCreated(m.upid, m.definition_id, m.name, tx.now, round_))
    tx.reply_process = m.upid


def _schedule_spec(pd: ProcessDispatcher, tx: Tx, m: ScheduleProcess, p: Process | None) -> dict:
    def_id = m.definition_id
    if def_id is None and p is not None:
        def_id = p.definition_id
    definition = None
    if def_id is not None:
        definition = tx.s.definitions.get(def_id)
        if definition is None:
            raise not_found(f"no definition {def_id!r}")
    ex = (definition or {}).get("executable") or {}
    command = list(m.command) if m.command is not None else None
    if command is None and ex.get("exec"):
        command = [ex["exec"], *ex.get("argv", [])]
    if not command:
        raise bad_request(
            f"process {m.upid!r}: no command (give command, or a definition with 'exec')"
        )
    env = dict(ex.get("env") or {})
    env.update(m.env or {})
    engine = pd.resolve_engine(m, definition)
    constraints = dict(m.constraints or {})
    constraints["engine"] = engine
    configuration = m.configuration or {}
    pconf = configuration.get("process") or {}
    mtbs = pconf.get("minimum_time_between_starts")
    return {
        "definition_id": def_id,
        "name": m.name if m.name is not None else (p.name if p is not None else None),
        "command": command,
        "env": env or None,
        "cwd": m.cwd if m.cwd is not None else ex.get("working_directory"),
        "configuration": configuration,
        "subscribers": list(m.subscribers or []),
        "constraints": constraints,
        "engine": engine,
        "queueing_mode": (m.queueing_mode or ps.QUEUE_ALWAYS).upper(),
        "restart_mode": (m.restart_mode or ps.RESTART_ABNORMAL).upper(),
        "node_exclusive": m.node_exclusive,
        "min_start_interval": float(mtbs) if mtbs is not None else None,
        "omit_from_system_restart": bool(pconf.get("omit_from_system_restart", False)),
    }


def _on_schedule(pd: ProcessDispatcher, tx: Tx, m: ScheduleProcess) -> None:
    p = tx.s.processes.get(m.upid)
    if (
        p is not None
        and m.definition_id is not None
        and p.state == ps.UNSCHEDULED
        and p.definition_id != m.definition_id
    ):
        raise bad_request(
            f"process {m.upid!r} was created with definition {p.definition_id!r}, "
            f"not {m.definition_id!r}"
        )
    spec = _schedule_spec(pd, tx, m, p)
    tx.reply_process = m.upid
    stone = tx.s.tombstones.get(m.upid) if p is None else None
    if stone is not None and m.once:
        # ended and forgotten: answered as it stands, never run again (C2)
        if stone.record.get("spec_digest") != spec_digest(spec):
            raise conflict(f"process {m.upid!r} {_ended(stone)}, with different parameters")
        tx.reply_process = None
        tx.reply = Ok(stone.describe())
        return
    if stone is not None:
        # a new round past the forgotten one's, so a late report of it is never taken for this
        round_ = stone.record["round"] + 1
    elif p is None:
        round_ = 0
    elif p.state == ps.UNSCHEDULED:
        round_ = p.round
    elif p.state in ps.TERMINAL and not m.once:
        round_ = p.round + 1
    else:  # live, or ended and asked ``once``: the same request again changes nothing
        have = p.spec()
        if have != spec:
            diff = sorted(k for k in spec if have.get(k) != spec[k])
            raise conflict(
                f"process {m.upid!r} is {p.state} (round {p.round}) with different "
                f"parameters: {', '.join(diff)}"
            )
        return  # the same request again: the process as it stands
    tx.emit(ProcessScheduled(m.upid, round_, spec, tx.now))
    tx.notify(tx.s.processes[m.upid])


def _on_schedule_many(pd: ProcessDispatcher, tx: Tx, m: ScheduleProcesses) -> None:
    out: list[Any] = []
    for request in m.requests:
        tx.reply_process = None
        tx.reply = None
        try:
            _on_schedule(pd, tx, request)  # refuses before it emits anything
        except Rejected as exc:
            out.append({"upid": request.upid, "error": exc.code, "message": exc.message})
            continue
        out.append(request.upid if tx.reply is None else tx.reply.value)
    tx.reply = None
    tx.reply_process = None
    tx.reply_many = out


def _on_kill(pd: ProcessDispatcher, tx: Tx, m: KillProcess) -> None:
    stone = tx.s.tombstones.get(m.upid)
    if stone is not None:  # ended long ago: nothing to do, answered as it stands
        tx.reply = Ok(stone.describe())
        return
    p = _proc(tx, m.upid)
    tx.reply_process = m.upid
    if p.state in ps.TERMINAL:
        return
    if p.state in (ps.ASSIGNED, ps.PENDING, ps.RUNNING):
        tx.move(p, p.round, ps.TERMINATING, "terminate requested")
        assert p.resource_id is not None
        tx.terminate(p.resource_id, p.upid, p.round)
        tx.s.soft.terminate_sent[p.upid] = tx.now
    elif p.state == ps.TERMINATING:
        if p.resource_id is not None:
            tx.terminate(p.resource_id, p.upid, p.round)
            tx.s.soft.terminate_sent[p.upid] = tx.now
    else:  # queued, UNSCHEDULED, UNSCHEDULED_PENDING
        tx.move(p, p.round, ps.TERMINATED, "terminate requested")


def _on_restart(pd: ProcessDispatcher, tx: Tx, m: RestartProcess) -> None:
    stone = tx.s.tombstones.get(m.upid)
    if stone is not None:  # its parameters were forgotten with it
        raise conflict(f"process {m.upid!r} {_ended(stone)}: schedule it again to run it")
    p = _proc(tx, m.upid)
    tx.reply_process = m.upid
    if p.crashes or p.retry_at:  # the operator asks for a start now: the crash loop ends
        looping = p.crash_looping
        tx.emit(ProcessBackoff(p.upid, 0, 0.0, tx.now))
        if looping:
            tx.move(p, p.round + 1, ps.DIED_REQUESTED, "restart requested")
            return
    if p.state in (ps.ASSIGNED, ps.PENDING, ps.RUNNING):
        res = tx.s.resources.get(p.resource_id or "")
        if res is not None and res.state in (ps.RESOURCE_OK, ps.RESOURCE_WARNING):
            # In place: the agent supersedes the older round (terminates it, then starts this).
            tx.assign(p, p.round + 1, res)
        else:
            tx.move(p, p.round + 1, ps.DIED_REQUESTED, "restart requested")
    elif p.state in ps.TERMINAL:
        tx.move(p, p.round + 1, ps.REQUESTED, "restart requested")
    else:
        raise conflict(f"process {m.upid!r} is {p.state}: nothing to restart")


def _on_describe(pd: ProcessDispatcher, tx: Tx, m: DescribeProcess) -> None:
    stone = tx.s.tombstones.get(m.upid)
    if stone is not None:
        tx.reply = Ok(stone.describe())  # marked forgotten, with when it ended and was forgotten
        return
    tx.reply = Ok(_described(tx, _proc(tx, m.upid), {}))


def _described(tx: Tx, p: Process, held: dict[Any, str]) -> dict[str, Any]:
    """``p.describe()`` plus ``why``: for a queued process, what keeps it from a slot now
    (:meth:`Matchmaker.held_back`; ``held`` its cache for one read), else None."""
    d = p.describe()
    d["why"] = tx.s.mm.held_back(p, tx.now, held) if p.state in ps.QUEUED else None
    return d


def _on_describe_many(pd: ProcessDispatcher, tx: Tx, m: DescribeProcesses) -> None:
    """The named processes (a forgotten one by its tombstone), or every live record."""
    procs, stones = tx.s.processes, tx.s.tombstones
    held: dict[Any, str] = {}
    if m.upids is not None:
        chosen: list[dict[str, Any]] = []
        for u in m.upids:
            p = procs.get(u)
            if p is not None:
                chosen.append(_described(tx, p, held))
            elif (stone := stones.get(u)) is not None:
                chosen.append(stone.describe())
    else:
        chosen = [_described(tx, p, held) for p in procs.values()]
    if m.state is not None:
        want = m.state.upper()
        chosen = [d for d in chosen if d["state"] == want]
    tx.reply = Ok(chosen)


def _on_system_boot(pd: ProcessDispatcher, tx: Tx, m: SetSystemBoot) -> None:
    s = tx.s
    if m.on and not s.system_boot:
        for nid in list(s.nodes):
            node = s.nodes[nid]
            for rid in list(node.resources):
                res = s.resources.get(rid)
                if res is not None:
                    tx.evacuate(res, "system boot", boot=True)
            tx.forget_node(nid)
            tx.emit(NodeRemoved(nid, "SYSTEM_BOOT", tx.now))
        for upid in s.queue():
            tx.boot_park(s.processes[upid], "system boot")
        tx.emit(SystemBootSet(True, tx.now))
    elif not m.on and s.system_boot:
        parked = [p for p in s.processes.values() if p.state == ps.UNSCHEDULED_PENDING]
        for p in parked:
            tx.move(p, p.round, ps.REQUESTED, "system boot ended")
        tx.emit(SystemBootSet(False, tx.now))
    tx.reply = Ok({"system_boot": s.system_boot})


def _on_counts(pd: ProcessDispatcher, tx: Tx, m: ProcessCounts) -> None:
    tx.reply = Ok({k: v for k, v in tx.s.state_count.items() if v})


def _on_dump(pd: ProcessDispatcher, tx: Tx, m: Dump) -> None:
    s = tx.s
    tx.reply = Ok(
        {
            "processes": [p.describe() for p in s.processes.values()],
            "nodes": [n.describe(s.resources) for n in s.nodes.values()],
            "resources": [r.describe(s.nodes[r.node_id].retiring) for r in s.resources.values()],
            "queue": s.queue(),
            "definitions": sorted(s.definitions),
            "system_boot": s.system_boot,
            "needs": {
                eid: {
                    "need": need(spec, s.live_count[eid], s.occupied[eid]),
                    "nodes": len(s.engine_nodes.get(eid, ())),
                }
                for eid, spec in pd.cfg.engines.items()
            },
            "counts": {k: v for k, v in s.state_count.items() if v},
            "forgotten": len(s.tombstones),
        }
    )


def _on_node_state(pd: ProcessDispatcher, tx: Tx, m: NodeState) -> None:
    engine = pd.cfg.engine_of_domain(m.domain_id)
    if engine is None:
        raise bad_request(
            f"node {m.node_id!r}: domain {m.domain_id!r} is not {pd.cfg.domain_prefix}<engine> "
            f"for an engine of this PD ({', '.join(sorted(pd.cfg.engines))})"
        )
    state = m.state.upper()
    node = tx.s.nodes.get(m.node_id)
    if state == "RUNNING":
        if node is None:
            tx.emit(NodeAdded(m.node_id, m.domain_id, engine, dict(m.properties), tx.now))
        elif node.engine != engine:
            raise bad_request(f"node {m.node_id!r} is known in domain {node.domain_id!r}")
    elif state in PRE_RUNNING:
        pass
    elif state in NODE_DEAD:
        if node is not None:
            tx.lose_node(m.node_id, state, f"node {m.node_id} {state}")
    elif state in NODE_LOST:
        if node is not None:
            tx.doom_node(m.node_id, state)
    else:
        raise bad_request(f"node {m.node_id!r}: unknown node state {m.state!r}")
    tx.reply = Ok(None)


def _on_heartbeat(pd: ProcessDispatcher, tx: Tx, m: AgentHeartbeat) -> None:
    s, soft, now = tx.s, tx.s.soft, tx.now
    rid = m.eeagent_id
    res = s.resources.get(rid)
    if res is None:
        node = s.nodes.get(m.node_id) if m.node_id else None
        if node is None:
            logger.info(
                "pd: heartbeat from %s on unknown node %r ignored (still booting?)", rid, m.node_id
            )
            return
        tx.emit(ResourceAdded(rid, node.node_id, pd.cfg.engines[node.engine].slots, now))
        res = s.resources[rid]
    elif m.node_id is not None and m.node_id != res.node_id:
        logger.warning(
            "pd: heartbeat from %s names node %r, but it is on %r; ignored",
            rid,
            m.node_id,
            res.node_id,
        )
        return
    tx.answer_directly(rid)
    ts = min(m.timestamp, now) if math.isfinite(m.timestamp) else now
    lv = soft.live.get(rid)
    in_order = True
    if lv is None:
        lv = soft.new_live(rid, ts, now)
    else:
        lv.seen = now  # any heartbeat proves the agent alive (its clock may have jumped back)
        if ts >= lv.ts:
            lv.ts = ts
        else:
            in_order = False
    doomed = res.node_id in soft.doomed
    if m.seq == 0:
        lv.granted = now  # it asks for no lease: all we know is that it was alive now
    elif not doomed and now - lv.grant_sent >= pd.grant_every:
        # first in the outbox: a batch that also relaunches work here is run after it
        tx.to_agent(rid, LeaseGrant(m.seq, pd.cfg.fence_time))
        lv.granted = lv.grant_sent = now
    if doomed:
        pass  # lost by EPUM's word: it stays MISSING until its node is gone
    elif res.state in _UNWELL and (spec := pd.cfg.engines[res.engine]).monitored:
        age = now - lv.ts
        if age < spec.heartbeat_warning:  # type: ignore[operator]
            tx.emit(ResourceStateChanged(rid, ps.RESOURCE_OK, now))
        elif res.state == ps.RESOURCE_MISSING and age < spec.heartbeat_missing:  # type: ignore[operator]
            tx.emit(ResourceStateChanged(rid, ps.RESOURCE_WARNING, now))
            lv.warned_at = now
    first = rid not in soft.heard
    soft.heard.add(rid)
    memo = soft.quiet.get(rid)
    if memo == m.processes:
        # as the last heartbeat, which asked for nothing, or as the list the last one left
        # (SC13); nothing here changed since: the pass would decide nothing and ask for
        # no cleanup or stale kill
        if soft.cleanups.get(rid):
            soft.cleanups[rid] = {}
        return
    # A row equal to the memo's row at the same place is quiet as it was: the pass only
    # notes it as seen (decision SC16). (A memo holds only rows of processes placed here,
    # not TERMINATING, at their state; any event on them since forgot the memo.)
    if memo is None:
        memo = ()
    n_memo = len(memo)
    foreign = 0
    seen: set[tuple[str, int]] = set()
    # Cleanups and stale-copy terminations are level-triggered by what the agent reports,
    # so they are repeated only every ``resend`` seconds while the agent still reports them.
    resend = min(pd.cfg.dispatch_retry_seconds, 5.0)
    old_cleanups = soft.cleanups.get(rid, {})
    old_kills = soft.stale_kills.get(rid, {})
    cleanups: dict[tuple[str, int], float] = {}
    kills: dict[tuple[str, int], float] = {}
    processes, normalize, placed = s.processes, agent_states.normalize, ps.PLACED
    names, reported_up, unacked = _AGENT_NAMES, _REPORTED_UP, _UNACKED_UP
    TERMINATING, rank = ps.TERMINATING, ps.rank  # noqa: N806 (hoisted: this loop is hot)
    acted = False  # a process needed something: not a quiet heartbeat
    #: every row was quiet, moved up (PENDING/RUNNING acknowledged) or ended and is cleaned
    #: up now, and every process placed here was reported (decision SC13)
    settled = True
    for i, d in enumerate(m.processes):
        upid, rnd = d["upid"], d["round"]
        if i < n_memo and (d is memo[i] or d == memo[i]):
            seen.add((upid, rnd))
            continue
        state = d["state"]
        if type(state) is not str or state not in names:  # (normalize's own fast path)
            state = normalize(state)
        p = processes.get(upid)
        key = (upid, rnd)
        if p is None or p.resource_id != rid or p.round != rnd or p.state not in placed:
            # Not our placement here: a stale round, a copy the PD moved away or ended (or
            # forgot: a tombstone), or an unknown upid. Live ones hold a slot on the agent;
            # stale ones are ended; finished ones are cleaned up, never brought back.
            settled = False
            if state in ps.AGENT_LIVE:
                foreign += 1
                if (p is not None or upid in s.tombstones) and state != ps.TERMINATING:
                    last = old_kills.get(key)
                    if last is None or now - last >= resend:
                        tx.terminate(rid, upid, rnd)
                        last = now
                    kills[key] = last
            else:
                last = old_cleanups.get(key)
                if last is None or now - last >= resend:
                    tx.cleanup(rid, upid, rnd)
                    last = now
                cleanups[key] = last
            continue
        seen.add(key)
        pstate = p.state
        if pstate == TERMINATING:
            acted, settled = True, False
        if state in reported_up:
            if pstate in unacked and rank(state) > rank(pstate):
                tx.move(p, rnd, state, d.get("msg") or "")
                acted = True
            elif pstate == TERMINATING and (first or upid not in soft.terminate_sent):
                tx.terminate(rid, upid, rnd)
                soft.terminate_sent[upid] = now
        elif state == TERMINATING:
            pass
        else:
            tx.ended(p, state, d.get("msg") or "", d.get("cause"))
            tx.cleanup(rid, upid, rnd)
            cleanups[key] = now
    soft.cleanups[rid] = cleanups
    soft.stale_kills[rid] = kills
    if foreign != res.foreign:
        tx.emit(ResourceOccupancy(rid, foreign, now))
    for upid, rnd in list(res.assigned.items()):
        if (upid, rnd) in seen:
            continue
        acted, settled = True, False
        p = s.processes[upid]
        if p.state == ps.ASSIGNED:
            if first:
                tx.launch(p)
        elif not in_order:
            continue
        elif p.state in (ps.PENDING, ps.RUNNING):
            tx.ended(p, ps.FAILED, "the agent no longer reports it")
        elif p.state == ps.TERMINATING:
            tx.move(p, p.round, ps.TERMINATED, "not on the agent")
    if not (acted or foreign or cleanups or kills):
        soft.quiet[rid] = m.processes
    elif settled:
        # The same rows again, less those ended (the agent drops them at the cleanup sent
        # now), would ask for nothing: moved-up processes are where the agent says, ended
        # ones are off this agent. That list is the memo (SC13); any event on an agent's
        # processes or resource after this still forgets it (``_unquiet``).
        soft.quiet[rid] = ([d for d in m.processes if (d["upid"], d["round"]) not in cleanups]
                           if cleanups else m.processes)
    else:
        soft.quiet.pop(rid, None)


#: resource states a heartbeat may bring back to OK (or MISSING to WARNING)
_UNWELL = (ps.RESOURCE_WARNING, ps.RESOURCE_MISSING)
#: the agent's state names; reported states a placed process moves up to; its states then
_AGENT_NAMES = frozenset(agent_states.ORDER)
_REPORTED_UP = frozenset({ps.PENDING, ps.RUNNING})
_UNACKED_UP = frozenset({ps.ASSIGNED, ps.PENDING})

#: events that change one process (``upid``) or one resource (``resource_id``) only
_ONE_PROCESS = (ProcessMoved, ProcessAssigned, ProcessScheduled, ProcessBackoff, ProcessCreated)
_ONE_RESOURCE = (ResourceStateChanged, ResourceOccupancy, ResourceAdded)
#: events that change nothing a heartbeat's per-process pass reads: a quiet list holds only
#: placed processes of its agent (never a finished one, which is all a forget removes), and
#: the pass does not look at nodes, their retirement or definitions (decision SC1)
_NO_AGENT = (ProcessesForgotten, NodeAdded, NodeRetiring, DefinitionSet, DefinitionRemoved)


def _unquiet(s: PDState, quiet: dict[str, Any], event: Any) -> None:
    """``event`` is about to be applied: forget the quiet heartbeat (decision SIM7) of every
    agent whose processes or resource it may change (of a removed node's agents; of all
    agents for an event not named here)."""
    if isinstance(event, _ONE_PROCESS):
        p = s.processes.get(event.upid)
        if p is not None and p.resource_id is not None:
            quiet.pop(p.resource_id, None)
        rid = getattr(event, "resource_id", None)
        if rid is not None:
            quiet.pop(rid, None)
    elif isinstance(event, _ONE_RESOURCE):
        quiet.pop(event.resource_id, None)
    elif isinstance(event, _NO_AGENT):
        pass
    elif isinstance(event, NodeRemoved):
        node = s.nodes.get(event.node_id)
        for rid in node.resources if node is not None else ():
            quiet.pop(rid, None)
    else:
        quiet.clear()


def _on_monitor(pd: ProcessDispatcher, tx: Tx, m: MonitorResources) -> None:
    s, soft, now = tx.s, tx.s.soft, tx.now
    least = pd.cfg.least_warning()
    if least is None or (not s.unwell and now - soft.live_ts_min < least):
        # Nothing monitored; or no resource WARNING or MISSING and none silent for a warning
        # yet (every agent's ts >= live_ts_min): the pass would change nothing (SC14).
        pass
    else:
        _monitor_pass(pd, tx)
    tx.expire_doomed()
    every = pd.cfg.monitor_every()
    if every is not None:
        tx.timer("monitor", every, MonitorResources())


def _monitor_pass(pd: ProcessDispatcher, tx: Tx) -> None:
    """Look at every monitored resource: WARNING after ``heartbeat_warning`` s of silence,
    MISSING after ``heartbeat_missing``, its work moved once its lease is out (PD9)."""
    s, soft, now = tx.s, tx.s.soft, tx.now
    ts_min = float("inf")
    for rid in list(s.resources):
        res = s.resources.get(rid)
        if res is None:
            continue
        spec = pd.cfg.engines[res.engine]
        if not spec.monitored:
            continue
        lv = soft.live.get(rid)
        if lv is None:
            lv = soft.live[rid] = Liveness(now, now)
        if lv.ts < ts_min:
            ts_min = lv.ts
        warning, missing = spec.heartbeat_warning, spec.heartbeat_missing
        assert warning is not None and missing is not None
        if res.state == ps.RESOURCE_OK:
            if now - lv.ts >= warning:
                logger.warning(
                    "pd: resource %s: no heartbeat for %.1f s (WARNING)", rid, now - lv.ts
                )
                tx.emit(ResourceStateChanged(rid, ps.RESOURCE_WARNING, now))
                lv.warned_at = now
        elif res.state == ps.RESOURCE_WARNING:
            since = max(lv.seen, lv.warned_at if lv.warned_at is not None else lv.seen)
            if now - since >= missing - warning:
                logger.warning("pd: resource %s is MISSING; its processes move when its lease "
                               "has run out", rid)
                tx.emit(ResourceStateChanged(rid, ps.RESOURCE_MISSING, now))
                if tx.fenced(rid):
                    tx.evacuate(res, f"resource {rid} missing")
        elif res.state == ps.RESOURCE_MISSING and res.assigned and tx.fenced(rid):
            tx.evacuate(res, f"resource {rid} missing")
    soft.live_ts_min = ts_min


def _on_retry(pd: ProcessDispatcher, tx: Tx, m: RetryDispatches) -> None:
    s, soft, now = tx.s, tx.s.soft, tx.now
    limit = pd.cfg.dispatch_retry_seconds
    for upid in list(s.unacked):
        p = s.processes[upid]
        last = soft.launch_sent.get(upid, p.last_dispatch or 0.0)
        if now - last >= limit:
            tx.launch(p)
    for upid in list(s.terminating):
        p = s.processes[upid]
        last = soft.terminate_sent.get(upid, p.state_at)
        if p.resource_id is not None and now - last >= limit:
            tx.terminate(p.resource_id, upid, p.round)
            soft.terminate_sent[upid] = now
    tx.expire_doomed()
    tx.timer("retry", pd.retry_every(), RetryDispatches())


def _on_forget(pd: ProcessDispatcher, tx: Tx, m: ForgetProcesses) -> None:
    """Forget the processes finished for longer than the retention (oldest first), and bound
    the tombstones; the bounds go into the event, so replay needs no config (PD10)."""
    s, cfg = tx.s, pd.cfg
    every = cfg.forget_every()
    if every is None or cfg.retention is None:
        return
    cutoff = tx.now - cfg.retention
    due: list[str] = []
    for upid, at in s.ended.items():
        if at > cutoff or len(due) >= FORGET_PER_PASS:
            break
        due.append(upid)
    keep = cfg.tombstone_limit
    before = None if cfg.tombstone_max_age is None else tx.now - cfg.tombstone_max_age
    if due or s.tombstones.over(keep, before):
        for k in range(0, max(len(due), 1), FORGET_PER_EVENT):
            tx.emit(ProcessesForgotten(due[k : k + FORGET_PER_EVENT], tx.now, keep, before))
    tx.timer("forget", 0.0 if len(due) >= FORGET_PER_PASS else every, ForgetProcesses())


def _on_matchmake(pd: ProcessDispatcher, tx: Tx, m: Matchmake) -> None:
    tx.s.soft.timers.pop("throttle", None)


def _on_flush_needs(pd: ProcessDispatcher, tx: Tx, m: FlushNeeds) -> None:
    tx.s.soft.needs_timer = False


def _on_flush_outbox(pd: ProcessDispatcher, tx: Tx, m: FlushOutbox) -> None:
    tx.s.soft.outbox_timer = False
    tx.flush_outbox()


#: Requests that only read: no matchmaking pass after them.
_QUERIES = frozenset(
    {DescribeDefinition, ListDefinitions, DescribeProcess, DescribeProcesses, Dump}
)

_HANDLERS: dict[type, Handler] = {
    CreateDefinition: _on_create_definition,
    UpdateDefinition: _on_update_definition,
    DescribeDefinition: _on_describe_definition,
    ListDefinitions: _on_list_definitions,
    RemoveDefinition: _on_remove_definition,
    CreateProcess: _on_create_process,
    ScheduleProcess: _on_schedule,
    ScheduleProcesses: _on_schedule_many,
    KillProcess: _on_kill,
    RestartProcess: _on_restart,
    DescribeProcess: _on_describe,
    DescribeProcesses: _on_describe_many,
    SetSystemBoot: _on_system_boot,
    Dump: _on_dump,
    ProcessCounts: _on_counts,
    NodeState: _on_node_state,
    AgentHeartbeat: _on_heartbeat,
    MonitorResources: _on_monitor,
    RetryDispatches: _on_retry,
    ForgetProcesses: _on_forget,
    Matchmake: _on_matchmake,
    FlushNeeds: _on_flush_needs,
    FlushOutbox: _on_flush_outbox,
}


#: ``(type, current version) -> fn(state, **body)`` (decision RS3)
_BODY_APPLIERS: dict[tuple[str, int], Any] = {
    key: FIELD_HANDLERS[cls] for key, cls in events.current().items() if cls in FIELD_HANDLERS
}
#: ``type -> fields`` a replay decodes once per value (decision RS5)
_SHARED_FIELDS: dict[str, tuple[str, ...]] = {
    key[0]: PDState.REPLAY_SHARED[cls] for key, cls in events.current().items() if cls in PDState.REPLAY_SHARED
}
