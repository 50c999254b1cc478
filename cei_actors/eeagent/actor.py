"""The EEAgent around a :class:`ProcessSupervisor`: messages in, level-based heartbeats out.

:class:`AgentCore` is the agent without a transport: it runs the PD's launch, terminate and
cleanup requests on the supervisor and builds heartbeats (every process with upid, round,
state, msg). It is hosted two ways:

- :class:`EEAgentActor`, a thespian actor in the PD's actor system (static nodes, tests,
  embedding): a PD or EPUM replica that starts leading says ``Hello("pd")``/``Hello("epum")``
  to the agents it holds as peers, and the agent follows it there;
- :class:`EndpointAgent`, the loop of ``python -m cei_actors.eeagent``: the process a
  local-cloud "VM" runs, which joins the running system as an external endpoint
  (``runtime.system.attach_system``), finds the PD and EPUM leaders among their replicas'
  global names (``pd``, ``pd.1``, ...; asking each for ``Status``, and the current one again
  every few seconds, see docs/decisions.md F1) and says ``Hello("eeagent:<id>")`` to each.

**Heartbeats** to the PD go out every ``heartbeat_interval`` seconds and at once on any change
(at most one per ``MIN_GAP``, 25 ms: a burst of changes shares one heartbeat; decision EA6).
**Health heartbeats** to EPUM (``epum.messages.NodeHeartbeat``: OK, or PROCESS_ERROR with the
processes that FAILED since the previous one) go out on the same interval and at once in
answer to EPUM's ``HealthProbe``; without an EPUM (static nodes) they are skipped. A change
made by a request (launch, terminate) is flushed right after the request. An exit is seen by
the supervisor's watcher thread, which must hand it to the host's thread:

- the endpoint loop blocks in ``listen()``; the watcher sets an event, and a small waker
  thread sends a ``Wakeup`` message to the loop's own address from a private thespian
  context (a self-pipe made of thespian's own transport: no polling, about a millisecond).
  The watcher itself never sends: a send that blocks would hold up every other exit notice
  (and, before EA4, deadlocked with ``launch``);
- the actor cannot be woken from another thread, so while any process is live (only then
  can an exit happen unasked) it polls a flag every ``poll_interval`` (20 ms) with
  ``wakeupAfter``; when nothing is live it sleeps until the next periodic heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ActorAddress, ActorExitRequest, ActorTypeDispatcher, WakeupMessage

from ..epum.messages import HealthProbe, NodeHeartbeat
from ..runtime.control import Hello
from ..runtime.messages import ErrorReply, InvalidMessage, Message, Ok, validate
from ..runtime.metrics import (
    COLLECTOR_NAME,
    DEFAULT_INTERVAL,
    ReportMetrics,
    Sample,
    counts,
    make_report,
)
from ..runtime.system import global_actors, replica_names
from . import states as st
from .heartbeat import HeartbeatScheduler, heartbeat_processes
from .lease import DEFAULT_FENCE, AgentLease
from .messages import (
    AgentHeartbeat,
    AgentRequests,
    CleanupProcess,
    DumpAgentState,
    LaunchProcess,
    LeaseGrant,
    ReadOutput,
    TerminateProcess,
)
from .retention import DEFAULT_OUTPUT_RETENTION
from .supervisor import (
    ProcessLiveError,
    ProcessSupervisor,
    SupervisorClosedError,
    UnknownProcessError,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.02
#: Least seconds between two heartbeats sent for changes: under a burst of exits one heartbeat
#: covers many (each lists every process, so one per exit would cost O(slots) per exit).
MIN_GAP = 0.025
#: Launches started per round trip to the reaper (~0.5 ms each); between two, a due
#: heartbeat goes out, so a long batch does not hold exits back (decision EA6).
LAUNCH_CHUNK = 32
#: Most FAILED processes held for the next health heartbeat (the oldest are dropped, counted).
MAX_FAILED_HELD = 100
#: The peer names a PD and an EPUM replica announce themselves by when they start leading.
PD_PEER, EPUM_PEER = "pd", "epum"
#: Most seconds between SIGTERM and SIGKILL when the lease runs out: the PD's margin
#: (``fence_margin``, 3 s by default) must cover it.
FENCE_GRACE = 1.0


class AgentCore:
    """One EEAgent: its supervisor, its heartbeat schedules and its request handling.

    ``send`` delivers a message to the PD (raising if it cannot); ``send_epum`` one to EPUM
    (None: no health heartbeats). ``wake`` is called from the supervisor's watcher thread when
    a change needs a heartbeat; the host must then call :meth:`flush` on its own thread soon.
    Everything else runs on the host's thread.
    """

    def __init__(
        self,
        agent_id: str,
        node_id: str | None,
        slots: int,
        state_dir: str,
        *,
        send: Callable[[Message], None],
        heartbeat_interval: float = 30.0,
        grace: float = 10.0,
        clock: Callable[[], float] = time.time,
        wake: Callable[[], None] | None = None,
        supervisor_factory: Callable[..., ProcessSupervisor] = ProcessSupervisor,
        send_epum: Callable[[Message], None] | None = None,
        min_gap: float = MIN_GAP,
        output_retention: float | None = DEFAULT_OUTPUT_RETENTION,
        fence: float = DEFAULT_FENCE,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent_id = agent_id
        self.min_gap = min_gap
        self.grace = grace
        #: the PD's lease on our processes, on our monotonic clock ``mono`` (decision PD9)
        self.mono = mono
        self.lease = AgentLease.start(fence, mono())
        self.heartbeat_interval = heartbeat_interval
        #: times the lease ran out and the live processes were stopped
        self.fenced = 0
        self.send_epum = send_epum
        self.health_sched = HeartbeatScheduler(heartbeat_interval)
        #: FAILED processes not yet reported to EPUM, keyed (upid, round), in order seen
        self._failed_new: dict[tuple[str, int], dict[str, Any]] = {}
        self._failed_seen: set[tuple[str, int]] = set()
        self._failed_dropped = 0
        self.health_sent = 0
        self.node_id = node_id
        self.send = send
        self.clock = clock
        self.sched = HeartbeatScheduler(min(heartbeat_interval, self.lease.renew_every()))
        self._wake = wake
        self._host = threading.get_ident()
        self._dirty = True  # the first heartbeat goes out at once
        self._lock = threading.Lock()
        self.sent = 0
        self.send_failures = 0
        self.launched = 0  #: processes started, not counting repeated launch requests (metrics)
        self.failed_at: float | None = None  # our clock at the last failed send
        self.supervisor = supervisor_factory(
            state_dir, slots, clock=clock, on_change=self._changed, grace=grace,
            output_retention=output_retention,
        )
        #: the lease deadline (our ``mono``) last given to the reaper
        self._reaper_until: float | None = None
        self._send_lease()  # the provisional lease, before any launch
        if send_epum is not None:
            with self._lock:
                self._note_failures(self.supervisor.dump())  # e.g. ended while we were down
        # The lease is kept by its own thread: the host's thread may be stuck in a send to a
        # PD that does not answer (thespian waits for the receiver's acknowledgement).
        self._fence_event = threading.Event()
        self._fence_lock = threading.Lock()
        self._closing = False
        self._granted_once = False
        self._fence_thread = threading.Thread(
            target=self._fence_loop, name=f"eeagent-fence-{agent_id}", daemon=True
        )
        self._fence_thread.start()

    # ---- changes ------------------------------------------------------------------------

    def _changed(self, snapshot: list[dict[str, Any]]) -> None:
        with self._lock:
            was = self._dirty
            self._dirty = True
            if self.send_epum is not None:
                self._note_failures(snapshot)
        if not was and self._wake is not None and threading.get_ident() != self._host:
            try:
                self._wake()
            except Exception:  # the host polls too (periodic heartbeat): never kill the watcher
                logger.exception("eeagent %s: waking the host failed", self.agent_id)

    def _note_failures(self, snapshot: list[dict[str, Any]]) -> None:
        """Remember processes that turned FAILED (each once) for the next health heartbeat."""
        failed = set()
        for p in snapshot:
            if p["state"] == st.FAILED:
                key = (p["upid"], p["round"])
                failed.add(key)
                if key not in self._failed_seen:
                    self._failed_new[key] = {
                        "upid": p["upid"],
                        "round": p["round"],
                        "state": st.FAILED,
                        "msg": p.get("msg") or "",
                        "exit_code": p.get("exit_code"),
                    }
                    if len(self._failed_new) > MAX_FAILED_HELD:  # no EPUM for a long time
                        del self._failed_new[next(iter(self._failed_new))]
                        self._failed_dropped += 1
        self._failed_seen = failed  # a cleaned-up key may fail again in a later life

    @property
    def dirty(self) -> bool:
        return self._dirty

    def live_count(self) -> int:
        return sum(1 for p in self.supervisor.processes() if st.is_live(p.state))

    # ---- heartbeats ---------------------------------------------------------------------

    def heartbeat(self, seq: int = 0) -> AgentHeartbeat:
        """The heartbeat as of now (every process the agent knows); ``seq`` asks for a lease."""
        now = self.clock()
        return AgentHeartbeat(
            self.agent_id,
            self.node_id,
            float(now),
            heartbeat_processes(self.supervisor.dump()),
            seq,
        )

    def check_lease(self) -> int:
        """Stop every live process if the lease has run out (the PD may place them elsewhere
        once it is over, plus its margin); how many were stopped."""
        if not self.lease.expired(self.mono()):
            return 0
        with self._fence_lock:  # the host's flush and the fence thread: one at a time
            return self._fence()

    def _fence(self) -> int:
        stopped = 0
        for p in self.supervisor.processes():
            if p.state in (st.PENDING, st.RUNNING):
                with contextlib.suppress(UnknownProcessError, SupervisorClosedError):
                    info = self.supervisor.terminate(
                        p.upid, p.round, grace=min(self.grace, FENCE_GRACE)
                    )
                    # not one the reaper stopped already (its exit settled in terminate)
                    stopped += p.state == st.PENDING or info.state == st.TERMINATING
        if stopped:
            self.fenced += 1
            logger.warning(
                "eeagent %s: no lease from the PD for %.1f s: stopped %d process(es)",
                self.agent_id,
                self.lease.fence - self.lease.remaining(self.mono()),
                stopped,
            )
        return stopped

    def _granted(self, m: LeaseGrant) -> bool:
        first = self.lease.fence != m.fence or not self._granted_once
        ok = self.lease.granted(m.seq, m.fence)
        if ok:
            self._send_lease()
        if ok and first:
            self._granted_once = True
            logger.info("eeagent %s: lease from the PD: %.1f s", self.agent_id, m.fence)
        self.sched.interval = min(self.heartbeat_interval, self.lease.renew_every())
        self._fence_event.set()
        return ok

    def _send_lease(self) -> None:
        """Give the lease to the reaper, which stops the processes itself when it runs out,
        even while this process is frozen (decision EA8). The reaper's clock is read before
        the lease is measured, so the deadline it gets is never later than ours."""
        if self.lease.until == self._reaper_until:
            return
        now = time.monotonic()
        left = self.lease.remaining(self.mono())
        try:
            self.supervisor.set_lease(now + left, min(self.grace, FENCE_GRACE))
        except SupervisorClosedError:
            return
        self._reaper_until = self.lease.until

    def _fence_loop(self) -> None:
        """Stop the live processes when the lease runs out, whatever the host thread does."""
        while not self._closing:
            left = self.lease.remaining(self.mono())
            if left <= 0:
                try:
                    self.check_lease()
                except Exception:  # never let the fence thread die
                    logger.exception("eeagent %s: stopping processes failed", self.agent_id)
                left = 0.5  # launches that come while it has no lease are stopped too
            self._fence_event.wait(min(left, 60.0))
            self._fence_event.clear()

    def flush(self, force: bool = False) -> bool:
        """Send a heartbeat if something changed, it is due, or ``force``; True if sent.
        A lease that ran out stops the live processes first."""
        self.check_lease()
        now = self.clock()
        with self._lock:
            held = not self._dirty or self._gap_left(now) > 0
            if not force and not self.sched.due(now) and held:
                return False
            self._dirty = False
        hb = self.heartbeat(self.lease.sending(self.mono()))
        try:
            self.send(hb)
        except Exception as exc:
            with self._lock:
                self._dirty = True  # try again at the next chance
            self.send_failures += 1
            self.failed_at = now
            logger.warning("eeagent %s: heartbeat not sent: %s", self.agent_id, exc)
            return False
        self.sched.sent(now)
        self.sent += 1
        self.failed_at = None
        return True

    def _gap_left(self, now: float) -> float:
        last = self.sched.last_sent
        return 0.0 if last is None else max(0.0, last + self.min_gap - now)

    def next_delay(self) -> float:
        """Seconds until the host should call :meth:`flush` again without being woken."""
        now = self.clock()
        delay = self.sched.delay(now)
        if self._dirty:
            delay = min(delay, self._gap_left(now))
        if self.live_count():
            delay = min(delay, max(0.0, self.lease.remaining(self.mono())))
        if self.send_epum is not None and self.node_id:
            delay = min(delay, self.health_sched.delay(now))
        return delay

    # ---- health heartbeats to EPUM ---------------------------------------------------------

    def node_heartbeat(self) -> NodeHeartbeat:
        """The health heartbeat as of now: PROCESS_ERROR if a process FAILED since the last one."""
        with self._lock:
            failed = list(self._failed_new.values())
            dropped = self._failed_dropped
        if not failed:
            return NodeHeartbeat(self.node_id or "", "OK", float(self.clock()),
                                 agent=f"eeagent:{self.agent_id}")
        shown = "; ".join(f"{p['upid']} round {p['round']}: {p['msg']}" for p in failed[:5])
        more = f" (+{len(failed) - 5} more)" if len(failed) > 5 else ""
        if dropped:
            more += f" ({dropped} older failures not listed)"
        return NodeHeartbeat(
            self.node_id or "",
            "PROCESS_ERROR",
            float(self.clock()),
            error=f"{len(failed) + dropped} process(es) failed: {shown}{more}",
            failed_processes=failed,
            agent=f"eeagent:{self.agent_id}",
        )

    def flush_health(
        self, force: bool = False, send: Callable[[Message], None] | None = None
    ) -> bool:
        """Send a health heartbeat to EPUM if due or ``force``; True if sent.

        ``send`` overrides ``send_epum`` (to answer a probe's sender). Failures stay queued
        until a heartbeat carrying them is sent; nothing is sent without a node id.
        """
        send = send or self.send_epum
        now = self.clock()
        if send is None or not self.node_id or not (force or self.health_sched.due(now)):
            return False
        hb = self.node_heartbeat()
        try:
            send(hb)
        except Exception as exc:
            self.health_sched.sent(now)  # no EPUM (yet): try again next interval
            logger.debug("eeagent %s: health heartbeat not sent: %s", self.agent_id, exc)
            return False
        self.health_sched.sent(now)
        self.health_sent += 1
        with self._lock:
            for p in hb.failed_processes or ():
                self._failed_new.pop((p["upid"], p["round"]), None)
            if hb.failed_processes:
                self._failed_dropped = 0
        return True

    # ---- requests -----------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        """Run one request; returns ``Ok``/``ErrorReply``. Never raises for bad input."""
        name = type(message).__name__
        try:
            validate(message)  # a batch validates its items too
        except InvalidMessage as exc:
            logger.warning("eeagent %s: bad %s: %s", self.agent_id, name, exc)
            return ErrorReply("bad_request", str(exc), name)
        if isinstance(message, AgentRequests):
            return Ok(self._run_batch(message.requests))
        return self._run(message)

    def _run_batch(self, requests: list[Any]) -> list[Any]:
        """Each request's reply value, in order; consecutive launches start in one round trip
        to the supervisor's reaper, consecutive cleanups are journaled in one write."""
        out: list[Any] = []
        i = 0
        while i < len(requests):
            j = i
            while j < len(requests) and isinstance(requests[j], CleanupProcess):
                j += 1
            if j > i:
                out.extend(self._cleanup_many(requests[i:j]))
                i = j
                continue
            while j < len(requests) and isinstance(requests[j], LaunchProcess):
                j += 1
            if j == i:
                out.append(_reply_value(self._run(requests[i])))
                i += 1
                continue
            for k in range(i, j, LAUNCH_CHUNK):
                chunk = requests[k : min(j, k + LAUNCH_CHUNK)]
                fresh = sum(1 for m in chunk if self.supervisor.get(m.upid, m.round) is None)
                try:
                    out.extend(info.to_dict() for info in self.supervisor.launch_many(chunk))
                    self.launched += fresh
                except (SupervisorClosedError, ValueError) as exc:
                    code = "unavailable" if isinstance(exc, SupervisorClosedError) else "bad_request"
                    out.extend({"error": code, "message": str(exc)} for _ in chunk)
                if k + LAUNCH_CHUNK < j:
                    self.flush()  # exits seen meanwhile are not held up by a long batch
            i = j
        return out

    def _cleanup_many(self, requests: list[CleanupProcess]) -> list[Any]:
        try:
            results = self.supervisor.cleanup_many((m.upid, m.round) for m in requests)
        except SupervisorClosedError as exc:
            return [{"error": "unavailable", "message": str(exc)} for _ in requests]
        return [
            {"error": "conflict", "message": str(r)} if isinstance(r, ProcessLiveError) else r
            for r in results
        ]

    def _run(self, message: Any) -> Any:
        """Run one valid request; ``Ok``/``ErrorReply``."""
        name = type(message).__name__
        try:
            if isinstance(message, LaunchProcess):
                return Ok(self._launch(message))
            if isinstance(message, TerminateProcess):
                info = self.supervisor.terminate(message.upid, message.round)
                return Ok(info.to_dict())
            if isinstance(message, CleanupProcess):
                return Ok(self.supervisor.cleanup(message.upid, message.round))
            if isinstance(message, LeaseGrant):
                return Ok(self._granted(message))
            if isinstance(message, DumpAgentState):
                self._dirty = True
                return Ok(_heartbeat_dict(self.heartbeat()))
            if isinstance(message, ReadOutput):
                return Ok(self.supervisor.read_output(message.upid, message.round, message.stream,
                                                      message.offset, message.limit, message.tail))
        except UnknownProcessError as exc:
            logger.info("eeagent %s: %s: %s", self.agent_id, name, exc)
            return ErrorReply("not_found", str(exc), name)
        except ProcessLiveError as exc:
            return ErrorReply("conflict", str(exc), name)
        except SupervisorClosedError as exc:
            return ErrorReply("unavailable", str(exc), name)
        except ValueError as exc:
            return ErrorReply("bad_request", str(exc), name)
        except OSError as exc:  # e.g. an output file that cannot be read
            logger.warning("eeagent %s: %s: %s", self.agent_id, name, exc)
            return ErrorReply("unavailable", f"{type(exc).__name__}: {exc}", name)
        logger.info("eeagent %s: ignored %s", self.agent_id, name)
        return ErrorReply("bad_request", f"the EEAgent does not handle {name}", name)

    def _launch(self, m: LaunchProcess) -> dict[str, Any]:
        fresh = self.supervisor.get(m.upid, m.round) is None
        info = self.supervisor.launch(m.upid, m.round, list(m.command), m.env, m.cwd).to_dict()
        self.launched += fresh
        return info

    def metrics(self) -> list[Sample]:
        """The agent's figures (:mod:`~cei_actors.runtime.metrics`): its processes by state,
        launches, heartbeats sent."""
        by_state: dict[str, int] = {}
        for p in self.supervisor.processes():
            by_state[p.state] = by_state.get(p.state, 0) + 1
        return [*counts("cei_eeagent_processes", "state", by_state),
                ("cei_launches", {}, float(self.launched)),
                ("cei_eeagent_heartbeats_sent", {}, float(self.sent))]

    def report(self, name: str, interval: float) -> Message:
        """A :class:`~cei_actors.runtime.metrics.MetricsReport` of :meth:`metrics`."""
        return make_report(name, "eeagent", interval, self.metrics())

    def close(self, kill: bool = False, grace: float | None = None) -> None:
        """Stop the supervisor; with ``kill`` its processes are terminated first."""
        self._closing = True
        self._fence_event.set()
        with contextlib.suppress(Exception):
            if kill:
                self.supervisor.shutdown(kill=True, grace=grace)
            else:
                self.supervisor.close()


def _reply_value(reply: Any) -> Any:
    """One item of a batch reply: the Ok value, or ``{"error": code, "message": ...}``."""
    if isinstance(reply, Ok):
        return reply.value
    return {"error": reply.code, "message": reply.message}


def _heartbeat_dict(hb: AgentHeartbeat) -> dict[str, Any]:
    return {
        "eeagent_id": hb.eeagent_id,
        "node_id": hb.node_id,
        "timestamp": hb.timestamp,
        "processes": hb.processes,
    }


def _unwrap(message: Any) -> tuple[Any, str | None]:
    """A runtime ``Request`` envelope's message and request id, or the message itself."""
    from ..runtime.control import Request

    if isinstance(message, Request):
        return message.message, (message.rid or None)
    return message, None


# ---- host 1: a thespian actor ---------------------------------------------------------------


@dataclass(frozen=True)
class AgentConfig(Message):
    """Starts an :class:`EEAgentActor`; ``pd`` is the PD's actor address, ``epum`` EPUM's
    (None: no health heartbeats).

    Sent again to a running agent it only points the agent at a new PD and EPUM (new leaders):
    the agent says hello and sends a full heartbeat there.
    """

    plain_data = False  # holds actor addresses; never stored (decisions M1)
    max_bytes = None

    agent_id: str
    node_id: str | None
    slots: int
    state_dir: str
    pd: Any = None
    heartbeat_interval: float = 30.0
    grace: float = 10.0
    poll_interval: float = POLL_INTERVAL
    epum: Any = None
    #: seconds a cleaned-up process's output files are kept (None: for ever)
    output_retention: float | None = DEFAULT_OUTPUT_RETENTION
    #: the lease before the PD's first grant (whose ``fence`` then counts); decision PD9
    fence: float = DEFAULT_FENCE

    def check(self) -> None:
        if self.output_retention is not None and not self.output_retention >= 0:
            raise InvalidMessage("AgentConfig.output_retention: must be >= 0 or None")
        if not (isinstance(self.fence, int | float) and 0 < self.fence < 1e9):
            raise InvalidMessage("AgentConfig.fence: must be seconds > 0")


@dataclass(frozen=True)
class AgentStop(Message):
    """Terminate every process (when ``kill``) and stop the agent actor's supervisor."""

    kill: bool = True


class EEAgentActor(ActorTypeDispatcher):
    """An EEAgent inside an actor system; configure it with :class:`AgentConfig`."""

    def __init__(self) -> None:
        super().__init__()
        self.core: AgentCore | None = None
        self.conf: AgentConfig | None = None
        self.pd: ActorAddress | None = None
        self.epum: ActorAddress | None = None
        self._gen = 0
        self._wake_at: float | None = None
        self._flush_pending = False
        self._metrics: ReportMetrics | None = None

    def receiveMsg_ReportMetrics(self, msg: ReportMetrics, sender: ActorAddress) -> None:  # noqa: N802
        """Report to ``msg.to`` every ``msg.interval`` seconds (see :mod:`~cei_actors.runtime.metrics`)."""
        try:
            validate(msg)
        except InvalidMessage as exc:
            self.send(sender, ErrorReply("bad_request", str(exc), "ReportMetrics"))
            return
        first = self._metrics is None
        self._metrics = msg if msg.to is not None else None
        self.send(sender, Ok(None))
        if first:
            self._report_metrics()

    def _report_metrics(self) -> None:
        target = self._metrics
        if target is None:
            return
        self.wakeupAfter(timedelta(seconds=target.interval), payload="metrics")
        if self.core is not None:
            try:
                self.send(target.to, self.core.report(target.name, target.interval))
            except Exception:
                logger.exception("eeagent %s: reporting metrics failed", target.name)

    def receiveMsg_AgentConfig(self, conf: AgentConfig, sender: ActorAddress) -> None:  # noqa: N802
        try:
            validate(conf)
        except InvalidMessage as exc:
            self.send(sender, ErrorReply("bad_request", str(exc), "AgentConfig"))
            return
        if self.core is not None:
            if self.conf is not None and conf.agent_id != self.conf.agent_id:
                self.send(
                    sender,
                    ErrorReply("conflict", f"this agent is {self.conf.agent_id!r}", "AgentConfig"),
                )
                return
            self.pd, self.epum = conf.pd, conf.epum
            self._hello()
            self.core.flush(force=True)
            self.core.flush_health(force=True)
            self.send(sender, Ok(conf.agent_id))
            return
        self.conf = conf
        self.pd, self.epum = conf.pd, conf.epum
        try:
            self.core = AgentCore(
                conf.agent_id,
                conf.node_id,
                conf.slots,
                conf.state_dir,
                send=self._send_pd,
                heartbeat_interval=conf.heartbeat_interval,
                grace=conf.grace,
                send_epum=self._send_epum,
                output_retention=conf.output_retention,
                fence=conf.fence,
            )
        except Exception as exc:
            logger.exception("eeagent %s: cannot start", conf.agent_id)
            self.send(sender, ErrorReply("internal", f"{type(exc).__name__}: {exc}", "AgentConfig"))
            return
        self._hello()
        self.core.flush(force=True)
        self.core.flush_health(force=True)
        self._schedule()
        self.send(sender, Ok(conf.agent_id))

    def _follow(self, peer: str, sender: ActorAddress) -> None:
        """A replica of the PD or EPUM leads now (its shell's ``Hello``): send there, and
        introduce ourselves and our processes to it."""
        if self.conf is None or self.core is None:
            return
        if peer == PD_PEER:
            if sender == self.pd:
                return
            self.pd = sender
        else:
            if sender == self.epum:
                return
            self.epum = sender
        logger.info("eeagent %s: %s at %s", self.conf.agent_id, peer.upper(), sender)
        self.send(sender, Hello(f"eeagent:{self.conf.agent_id}"))
        if peer == PD_PEER:
            self.core.flush(force=True)
        else:
            self.core.flush_health(force=True)

    def _hello(self) -> None:
        if self.conf is None:
            return
        for peer in (self.pd, self.epum):
            if peer is not None:
                self.send(peer, Hello(f"eeagent:{self.conf.agent_id}"))

    def _send_epum(self, message: Message) -> None:
        if self.epum is None:
            raise RuntimeError("no EPUM address")
        self.send(self.epum, message)

    def _send_pd(self, message: Message) -> None:
        if self.pd is None:
            raise RuntimeError("no PD address")
        self.send(self.pd, message)

    def _schedule(self) -> None:
        """Keep one wakeup chain: poll fast while something may exit, else until due."""
        core, conf = self.core, self.conf
        if core is None or conf is None:
            return
        delay = core.next_delay()
        if core.dirty or core.live_count() > 0:
            delay = min(delay, conf.poll_interval)
        now = time.monotonic()
        if self._wake_at is not None and self._wake_at <= now + delay + 1e-3:
            return  # an earlier wakeup is already on its way
        self._gen += 1
        self._wake_at = now + delay
        self.wakeupAfter(timedelta(seconds=max(0.001, delay)), payload=self._gen)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: ActorAddress) -> None:  # noqa: N802
        if msg.payload == "metrics":
            self._report_metrics()
            return
        if msg.payload == "flush":
            self._flush_pending = False
        elif msg.payload == self._gen:
            self._wake_at = None
        if self.core is not None:
            self.core.flush()
            self.core.flush_health()
        self._schedule()

    def receiveMsg_AgentStop(self, msg: AgentStop, sender: ActorAddress) -> None:  # noqa: N802
        if self.core is not None:
            self.core.close(kill=msg.kill)
            self.core.flush(force=True)
            self.core = None
        self.send(sender, Ok(None))

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: ActorAddress) -> None:  # noqa: N802
        if self.core is not None:
            self.core.close(kill=False)
            self.core = None

    def receiveMsg_Message(self, message: Message, sender: ActorAddress) -> Any:  # noqa: N802
        inner, rid = _unwrap(message)
        if isinstance(inner, Ok | ErrorReply):  # the PD's or EPUM's answer to Hello
            return None
        if isinstance(inner, Hello) and inner.name in (PD_PEER, EPUM_PEER):
            self._follow(inner.name, sender)
            return None
        if isinstance(inner, HealthProbe):
            if self.core is not None:  # answer the prober, whoever it is
                self.core.flush_health(force=True, send=lambda m: self.send(sender, m))
            return None
        if self.core is None:
            reply: Any = ErrorReply(
                "unavailable", "the agent is not configured", type(inner).__name__
            )
        else:
            reply = self.core.handle(inner)
            if isinstance(inner, DumpAgentState):
                self.core.flush(force=True)
            elif isinstance(inner, ReadOutput):
                pass  # changes nothing: no heartbeat to flush
            elif not self._flush_pending:
                # thespian delivers what has already arrived before this wakeup: one
                # heartbeat then covers the whole burst
                self._flush_pending = True
                self.wakeupAfter(timedelta(0), payload="flush")
        if rid is not None:
            from ..runtime.control import Response

            self.send(sender, Response(rid, reply))
        elif sender != self.pd:
            self.send(sender, reply)
        return None


# ---- host 2: an external endpoint in its own OS process (a "VM") --------------------------------


@dataclass(frozen=True)
class Wakeup(Message):
    """Sent by the supervisor's watcher thread to the endpoint loop's own address."""


class EndpointAgent:
    """The EEAgent as an external endpoint of a running actor system (see the module doc)."""

    def __init__(
        self,
        asys: Any,
        *,
        agent_id: str,
        node_id: str | None,
        slots: int,
        state_dir: str,
        pd_name: str = "pd",
        heartbeat_interval: float = 30.0,
        grace: float = 10.0,
        lookup_interval: float | None = None,
        epum_name: str | None = "epum",
        probe_interval: float = 2.0,
        probe_timeout: float = 1.0,
        min_gap: float = MIN_GAP,
        output_retention: float | None = DEFAULT_OUTPUT_RETENTION,
        fence: float = DEFAULT_FENCE,
        admins: Sequence[Any] = (),
        admin_retry: float = 10.0,
    ) -> None:
        self.asys = asys
        self.pd_name = pd_name
        #: the admins asked for the services' replicas (other hosts' too): ``(label,
        #: address)``; empty: the one ``asys`` attached to
        self.admins: list[tuple[str, Any]] = list(admins)
        #: seconds an admin that did not answer is left out of lookups (while another answers)
        self.admin_retry = admin_retry
        self._admin_down: dict[str, float] = {}
        self.epum_name = epum_name
        #: the PD and EPUM leaders followed among their replicas
        self.leaders = {"pd": _Leader(pd_name)}
        if epum_name:
            self.leaders["epum"] = _Leader(epum_name)
        #: seconds between Status probes of a leader once its replicas were seen
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.agent_id = agent_id
        self.lookup_interval = (
            lookup_interval if lookup_interval is not None else heartbeat_interval
        )
        self._last_lookup = float("-inf")
        #: the host's metrics collector (global name ``metrics``), found with the PD
        self.metrics_to: ActorAddress | None = None
        self._metrics_at = float("-inf")
        self._wake_event = threading.Event()
        self._my_address = asys._systemBase.transport.myAddress
        self.stopping = False
        #: most requests handled before a heartbeat goes out
        self.drain_max = 256
        #: seconds between attempts while the PD cannot be reached
        self.retry_delay = min(1.0, heartbeat_interval)
        self.core = AgentCore(
            agent_id,
            node_id,
            slots,
            state_dir,
            send=self._send_pd,
            heartbeat_interval=heartbeat_interval,
            grace=grace,
            wake=self._wake,
            send_epum=self._send_epum if epum_name else None,
            min_gap=min_gap,
            output_retention=output_retention,
            fence=fence,
        )
        self._waker_thread = threading.Thread(target=self._waker, name="eeagent-waker", daemon=True)
        self._waker_thread.start()

    # -- the PD's and EPUM's addresses ------------------------------------------------------------

    @property
    def pd(self) -> ActorAddress | None:
        return self.leaders["pd"].addr

    @property
    def epum(self) -> ActorAddress | None:
        leader = self.leaders.get("epum")
        return leader.addr if leader is not None else None

    def _find_pd(self, force: bool = False) -> None:
        """Find the PD and EPUM leaders among their replicas ``pd``, ``pd.1``, ... (global names).

        One admin status request lists every name; it is repeated every ``lookup_interval``,
        when a leader is unknown, and after a failed send. A service with one replica is taken
        as it is. Once replicas of a service were seen, its current leader is asked for its
        ``Status`` every ``probe_interval`` seconds; if it does not answer in ``probe_timeout``
        or is not the ready leader, every replica is asked and the agent switches to the one
        that leads (decision F1).
        """
        now = time.monotonic()
        pd = self.leaders["pd"]
        lookup = force or pd.addr is None or now - self._last_lookup >= self.lookup_interval
        stale = {k for k, leader in self.leaders.items() if leader.addr is not None} if force else set()
        for key, leader in self.leaders.items():
            if leader.addr is not None and leader.replicated and now - leader.last_probe >= self.probe_interval:
                leader.last_probe = now
                if not _is_leader(self._status(leader.addr)):
                    logger.info("eeagent %s: %s at %s (%s) is not the ready leader now",
                                self.agent_id, key.upper(), leader.addr, leader.found_as)
                    stale.add(key)
                    lookup = True
        if not lookup:
            return
        self._last_lookup = now
        found = self._lookup(now)
        if found is None:
            return
        self.metrics_to = found.get(COLLECTOR_NAME)
        for key, leader in self.leaders.items():
            if self._follow(key, leader, found, key in stale):
                leader.last_probe = now  # the replicas were just asked; a lookup alone is no probe

    def _lookup(self, now: float) -> dict[str, Any] | None:
        """Every global name the admins know (one status request each), or None if none
        answered. With several admins (one per host), an admin that does not answer is left
        out for ``admin_retry`` seconds unless no other answers, so a lost host costs one
        timeout per ``admin_retry``, and the agent goes on with the hosts that remain."""
        if not self.admins:
            try:
                return global_actors(self.asys, timeout=2.0)
            except Exception as exc:
                logger.warning("eeagent %s: looking up %r failed: %s", self.agent_id, self.pd_name, exc)
                return None
        found: dict[str, Any] = {}
        answered = False
        up = [a for a in self.admins if self._admin_down.get(a[0], float("-inf")) <= now]
        for label, admin in up + [a for a in self.admins if a not in up]:
            if answered and label in self._admin_down and self._admin_down[label] > now:
                continue  # left out for now: another admin answered
            try:
                names = global_actors(self.asys, timeout=2.0, admin=admin)
            except Exception as exc:
                if label not in self._admin_down:
                    logger.warning("eeagent %s: admin %s does not answer (%s); asking the others",
                                   self.agent_id, label, exc)
                self._admin_down[label] = time.monotonic() + self.admin_retry
                continue
            if self._admin_down.pop(label, None) is not None:
                logger.info("eeagent %s: admin %s answers again", self.agent_id, label)
            answered = True
            for name, addr in names.items():
                found.setdefault(name, addr)
        if not answered:
            logger.warning("eeagent %s: no admin answers (%s)", self.agent_id,
                           ", ".join(label for label, _ in self.admins))
            return None
        return found

    def _follow(self, key: str, leader: _Leader, found: dict[str, Any], force: bool) -> bool:
        """Point ``leader`` at the replica of its service that leads now (``force``: the
        current one was found not leading, so it is asked last). True if the replicas were
        asked (a probe), False if the current one was kept unasked."""
        names = replica_names(leader.name, found)
        if not names:
            if leader.addr is not None or leader.found_as is None:
                logger.info("eeagent %s: no actor named %r now", self.agent_id, leader.name)
            leader.addr, leader.found_as = None, ""
            return False
        if len(names) > 1:
            leader.replicated = True
        current = [n for n in names if found[n] == leader.addr]
        asked = False
        if len(names) == 1:
            chosen = names[0]
        elif current and not force:
            chosen = current[0]  # still registered: the next probe tells whether it leads
        else:
            chosen = self._choose_leader(names, found, skip=leader.addr if force else None)
            asked = True
        addr = found[chosen]
        leader.found_as = chosen
        if leader.addr is not None and addr == leader.addr:
            return asked
        logger.info("eeagent %s: %s at %s (%s)", self.agent_id, key.upper(), addr, chosen)
        if leader.addr is not None:
            leader.switches += 1
        leader.addr = addr
        try:
            self.asys.tell(addr, Hello(f"eeagent:{self.agent_id}"))
        except Exception as exc:
            logger.warning("eeagent %s: hello to %s failed: %s", self.agent_id, chosen, exc)
        if key == "pd":
            self.core._dirty = True  # a full heartbeat to the new PD at once
        return asked

    def _choose_leader(self, names: list[str], found: dict[str, Any], skip: Any) -> str:
        """The replica that says it is the ready leader; else one that answers; else the first.

        ``skip``: the address just found not leading (asked last, if at all)."""
        answering = None
        order = [n for n in names if found[n] != skip] + [n for n in names if found[n] == skip]
        for name in order:
            status = self._status(found[name])
            if _is_leader(status):
                return name
            if status is not None and answering is None and status.get("mode") != "stopped":
                answering = name
        return answering or names[0]

    def _status(self, addr: ActorAddress) -> dict[str, Any] | None:
        """The runtime ``Status`` of the actor at ``addr``, or None (no answer in time)."""
        from ..runtime.client import ServiceClient
        from ..runtime.control import Status

        try:
            with ServiceClient(self.asys, addr, timeout=self.probe_timeout) as client:
                value = client.call(Status())
        except Exception as exc:  # a probe never stops the loop: no answer is the answer
            logger.debug("eeagent %s: no status from %s: %s", self.agent_id, addr, exc)
            return None
        return value if isinstance(value, dict) else None

    def _send_to(self, key: str, message: Message) -> None:
        leader = self.leaders.get(key)
        if leader is None:
            raise RuntimeError(f"no {key} to send to")
        if leader.addr is None:
            self._find_pd()
        if leader.addr is None:
            raise RuntimeError(f"no actor named {leader.name!r}")
        try:
            self.asys.tell(leader.addr, message)
        except Exception:
            leader.addr = None  # look it up again next time
            raise

    def _send_epum(self, message: Message) -> None:
        self._send_to("epum", message)

    def _send_pd(self, message: Message) -> None:
        self._find_pd()
        self._send_to("pd", message)

    # -- the watcher's wake-up ----------------------------------------------------------------

    def _wake(self) -> None:
        """Called on the supervisor's watcher thread: never block it (other exits wait)."""
        self._wake_event.set()

    def _waker(self) -> None:
        """A small thread that turns wake requests into a ``Wakeup`` to the loop's address."""
        ctx = None
        try:
            while True:
                self._wake_event.wait()
                if self.stopping:
                    return
                self._wake_event.clear()
                try:
                    if ctx is None:
                        ctx = self.asys._systemBase.external_clone()
                    ctx.tell(self._my_address, Wakeup())
                except Exception:
                    logger.exception("eeagent %s: wake-up failed", self.agent_id)
                    time.sleep(0.05)
        finally:
            if ctx is not None:
                with contextlib.suppress(Exception):
                    ctx.exit_context()

    # -- the loop -------------------------------------------------------------------------------

    def step(self, max_wait: float = 1.0) -> None:
        """Wait for one message (or the next heartbeat time) and handle it."""
        self._find_pd()
        wait = max(0.0, min(max_wait, self.core.next_delay()))
        if self.core.dirty and self.core.failed_at is not None:
            # the PD could not be reached just now: retry shortly, not at once
            wait = max(wait, min(max_wait, self.retry_delay))
        message, sender = _listen(self.asys, wait)
        handled = 0
        while message is not None:
            self._handle(message, sender)
            handled += 1
            if handled >= self.drain_max:
                break
            # Drain what has already arrived, then send one heartbeat for all of it.
            message, sender = _listen(self.asys, 0)
        self.core.flush()
        self.core.flush_health()
        self._report_metrics()

    def _report_metrics(self) -> None:
        """Send the agent's figures to the collector every ``DEFAULT_INTERVAL`` seconds."""
        now = time.monotonic()
        if self.metrics_to is None or now - self._metrics_at < DEFAULT_INTERVAL:
            return
        self._metrics_at = now
        try:
            self.asys.tell(self.metrics_to, self.core.report(f"eeagent:{self.agent_id}",
                                                             DEFAULT_INTERVAL))
        except Exception as exc:
            logger.debug("eeagent %s: metrics report failed: %s", self.agent_id, exc)

    def _handle(self, message: Any, sender: ActorAddress | None = None) -> None:
        """Handle one message; a ``Request`` with an id (a client's call, e.g. ``cei process
        logs``) is answered to ``sender`` with a ``Response``."""
        inner, rid = _unwrap(message)
        if isinstance(inner, ErrorReply):  # the PD refused something we sent
            logger.warning("eeagent %s: refused: %s: %s", self.agent_id, inner.code, inner.message)
            return
        if isinstance(inner, Wakeup | Ok):
            return
        if isinstance(inner, HealthProbe):
            # listen() does not tell the sender: answer the EPUM known by name (looked up
            # again if unknown, e.g. a new leader)
            if self.epum is None:
                self._find_pd(force=True)
            self.core.flush_health(force=True)
            return
        reply = self.core.handle(inner)
        if isinstance(reply, ErrorReply):
            logger.info("eeagent %s: %s: %s", self.agent_id, reply.code, reply.message)
        if isinstance(inner, DumpAgentState):
            self.core._dirty = True
        if rid is not None and sender is not None:
            from ..runtime.control import Response

            try:
                self.asys.tell(sender, Response(rid, reply))
            except Exception as exc:  # the caller went away: nothing to undo
                logger.info("eeagent %s: reply to %s failed: %s", self.agent_id, sender, exc)

    def run(self, should_stop: Callable[[], bool] | None = None) -> None:
        while not self.stopping and not (should_stop and should_stop()):
            try:
                self.step()
            except Exception:
                logger.exception("eeagent %s: loop error", self.agent_id)
                time.sleep(0.1)

    def close(self, kill: bool, grace: float | None = None) -> None:
        self.core.close(kill=kill, grace=grace)
        with contextlib.suppress(Exception):
            self.core.flush(force=True)
        self.stopping = True
        self._wake_event.set()
        self._waker_thread.join(timeout=2)


def _listen(asys: Any, timeout: float) -> tuple[Any, ActorAddress | None]:
    """The next message to this endpoint and its sender, or ``(None, None)`` after ``timeout``
    seconds. ``ActorSystem.listen`` drops the sender; a client's request must be answered to
    it (thespian's own ``listen``, keeping the envelope's sender)."""
    from thespian.system import isInternalActorSystemMessage
    from thespian.system.timing import toTimeDeltaOrNone
    from thespian.system.transport import ReceiveEnvelope

    base = asys._systemBase
    while True:
        response = base._run_transport(toTimeDeltaOrNone(timeout))
        if not isinstance(response, ReceiveEnvelope):
            return None, None
        if not isInternalActorSystemMessage(response.message):
            return response.message, response.sender


@dataclass
class _Leader:
    """Where one service (the PD or EPUM) is followed: ``name`` is the first replica's global
    name; ``addr`` the leader found (None: unknown), under the name ``found_as``."""

    name: str
    addr: Any = None
    found_as: str | None = None
    replicated: bool = False
    last_probe: float = float("-inf")
    switches: int = 0


def _is_leader(status: dict[str, Any] | None) -> bool:
    return bool(status and status.get("leader") and status.get("ready"))


