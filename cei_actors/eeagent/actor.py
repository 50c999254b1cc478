"""The EEAgent around a :class:`ProcessSupervisor`: messages in, level-based heartbeats out.

:class:`AgentCore` is the agent without a transport: it runs the PD's launch, terminate and
cleanup requests on the supervisor and builds heartbeats (every process with upid, round,
state, msg). It is hosted two ways:

- :class:`EEAgentActor`, a thespian actor in the PD's actor system (tests, embedding);
- :class:`EndpointAgent`, the loop of ``python -m cei_actors.eeagent``: the process a
  local-cloud "VM" runs, which joins the running system as an external endpoint
  (``runtime.system.attach_system``), finds the PD by its global name and says
  ``Hello("eeagent:<id>")``.

**Heartbeats** go out every ``heartbeat_interval`` seconds and at once on any change. A change
made by a request (launch, terminate) is flushed right after the request. An exit is seen by
the supervisor's watcher thread, which must hand it to the host's thread:

- the endpoint loop blocks in ``listen()``; the watcher sets an event, and a small waker
  thread sends a ``Wakeup`` message to the loop's own address from a private thespian
  context (a self-pipe made of thespian's own transport: no polling, about a millisecond).
  The watcher itself never sends: it holds the supervisor's notify lock, which the loop may
  be waiting for inside ``launch``;
- the actor cannot be woken from another thread, so while any process is live (only then
  can an exit happen unasked) it polls a flag every ``poll_interval`` (20 ms) with
  ``wakeupAfter``; when nothing is live it sleeps until the next periodic heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ActorAddress, ActorExitRequest, ActorTypeDispatcher, WakeupMessage

from ..runtime.messages import ErrorReply, InvalidMessage, Message, Ok, validate
from . import states as st
from .heartbeat import HeartbeatScheduler, heartbeat_processes
from .messages import (
    AgentHeartbeat,
    AgentRequests,
    CleanupProcess,
    DumpAgentState,
    LaunchProcess,
    TerminateProcess,
)
from .supervisor import (
    ProcessLiveError,
    ProcessSupervisor,
    SupervisorClosedError,
    UnknownProcessError,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.02


class AgentCore:
    """One EEAgent: its supervisor, its heartbeat schedule and its request handling.

    ``send`` delivers a message to the PD (raising if it cannot). ``wake`` is called from the
    supervisor's watcher thread when a change needs a heartbeat; the host must then call
    :meth:`flush` on its own thread soon. Everything else runs on the host's thread.
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
    ) -> None:
        self.agent_id = agent_id
        self.node_id = node_id
        self.send = send
        self.clock = clock
        self.sched = HeartbeatScheduler(heartbeat_interval)
        self._wake = wake
        self._host = threading.get_ident()
        self._dirty = True  # the first heartbeat goes out at once
        self._lock = threading.Lock()
        self.sent = 0
        self.send_failures = 0
        self.failed_at: float | None = None  # our clock at the last failed send
        self.supervisor = supervisor_factory(
            state_dir, slots, clock=clock, on_change=self._changed, grace=grace
        )

    # ---- changes ------------------------------------------------------------------------

    def _changed(self, snapshot: list[dict[str, Any]]) -> None:
        with self._lock:
            was = self._dirty
            self._dirty = True
        if not was and self._wake is not None and threading.get_ident() != self._host:
            try:
                self._wake()
            except Exception:  # the host polls too (periodic heartbeat): never kill the watcher
                logger.exception("eeagent %s: waking the host failed", self.agent_id)

    @property
    def dirty(self) -> bool:
        return self._dirty

    def live_count(self) -> int:
        return sum(1 for p in self.supervisor.processes() if st.is_live(p.state))

    # ---- heartbeats ---------------------------------------------------------------------

    def heartbeat(self) -> AgentHeartbeat:
        """The heartbeat as of now (every process the agent knows)."""
        now = self.clock()
        return AgentHeartbeat(
            self.agent_id, self.node_id, float(now), heartbeat_processes(self.supervisor.dump())
        )

    def flush(self, force: bool = False) -> bool:
        """Send a heartbeat if something changed, it is due, or ``force``; True if sent."""
        now = self.clock()
        with self._lock:
            if not (force or self._dirty or self.sched.due(now)):
                return False
            self._dirty = False
        hb = self.heartbeat()
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

    def next_delay(self) -> float:
        """Seconds until the host should call :meth:`flush` again without being woken."""
        return self.sched.delay(self.clock())

    # ---- requests -----------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        """Run one request; returns ``Ok``/``ErrorReply``. Never raises for bad input."""
        name = type(message).__name__
        try:
            validate(message)
        except InvalidMessage as exc:
            logger.warning("eeagent %s: bad %s: %s", self.agent_id, name, exc)
            return ErrorReply("bad_request", str(exc), name)
        try:
            if isinstance(message, LaunchProcess):
                return Ok(self._launch(message))
            if isinstance(message, AgentRequests):
                return Ok([_reply_value(self.handle(m)) for m in message.requests])
            if isinstance(message, TerminateProcess):
                info = self.supervisor.terminate(message.upid, message.round)
                return Ok(info.to_dict())
            if isinstance(message, CleanupProcess):
                return Ok(self.supervisor.cleanup(message.upid, message.round))
            if isinstance(message, DumpAgentState):
                self._dirty = True
                return Ok(_heartbeat_dict(self.heartbeat()))
        except UnknownProcessError as exc:
            logger.info("eeagent %s: %s: %s", self.agent_id, name, exc)
            return ErrorReply("not_found", str(exc), name)
        except ProcessLiveError as exc:
            return ErrorReply("conflict", str(exc), name)
        except SupervisorClosedError as exc:
            return ErrorReply("unavailable", str(exc), name)
        except ValueError as exc:
            return ErrorReply("bad_request", str(exc), name)
        logger.info("eeagent %s: ignored %s", self.agent_id, name)
        return ErrorReply("bad_request", f"the EEAgent does not handle {name}", name)

    def _launch(self, m: LaunchProcess) -> dict[str, Any]:
        return self.supervisor.launch(m.upid, m.round, list(m.command), m.env, m.cwd).to_dict()

    def close(self, kill: bool = False, grace: float | None = None) -> None:
        """Stop the supervisor; with ``kill`` its processes are terminated first."""
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
    """Starts an :class:`EEAgentActor`; ``pd`` is the PD's actor address.

    Sent again to a running agent it only points the agent at a new PD (a new leader): the
    agent says hello and sends a full heartbeat there.
    """

    agent_id: str
    node_id: str | None
    slots: int
    state_dir: str
    pd: Any = None
    heartbeat_interval: float = 30.0
    grace: float = 10.0
    poll_interval: float = POLL_INTERVAL


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
        self._gen = 0
        self._wake_at: float | None = None
        self._flush_pending = False

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
            self.pd = conf.pd
            self._hello()
            self.core.flush(force=True)
            self.send(sender, Ok(conf.agent_id))
            return
        self.conf = conf
        self.pd = conf.pd
        try:
            self.core = AgentCore(
                conf.agent_id,
                conf.node_id,
                conf.slots,
                conf.state_dir,
                send=self._send_pd,
                heartbeat_interval=conf.heartbeat_interval,
                grace=conf.grace,
            )
        except Exception as exc:
            logger.exception("eeagent %s: cannot start", conf.agent_id)
            self.send(sender, ErrorReply("internal", f"{type(exc).__name__}: {exc}", "AgentConfig"))
            return
        self._hello()
        self.core.flush(force=True)
        self._schedule()
        self.send(sender, Ok(conf.agent_id))

    def _hello(self) -> None:
        from ..runtime.control import Hello

        if self.pd is not None and self.conf is not None:
            self.send(self.pd, Hello(f"eeagent:{self.conf.agent_id}"))

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
        if msg.payload == "flush":
            self._flush_pending = False
        elif msg.payload == self._gen:
            self._wake_at = None
        if self.core is not None:
            self.core.flush()
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
        if isinstance(inner, Ok | ErrorReply):  # the PD's answer to Hello
            return None
        if self.core is None:
            reply: Any = ErrorReply(
                "unavailable", "the agent is not configured", type(inner).__name__
            )
        else:
            reply = self.core.handle(inner)
            if isinstance(inner, DumpAgentState):
                self.core.flush(force=True)
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
    ) -> None:
        self.asys = asys
        self.pd_name = pd_name
        self.pd: ActorAddress | None = None
        self.agent_id = agent_id
        self.lookup_interval = (
            lookup_interval if lookup_interval is not None else heartbeat_interval
        )
        self._last_lookup = float("-inf")
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
        )
        self._waker_thread = threading.Thread(target=self._waker, name="eeagent-waker", daemon=True)
        self._waker_thread.start()

    # -- the PD's address ----------------------------------------------------------------------

    def _find_pd(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self.pd is not None and now - self._last_lookup < self.lookup_interval:
            return
        self._last_lookup = now
        from ..runtime.control import Hello
        from ..runtime.system import lookup

        try:
            addr = lookup(self.asys, self.pd_name, timeout=2.0)
        except Exception as exc:
            logger.warning("eeagent %s: looking up %r failed: %s", self.agent_id, self.pd_name, exc)
            return
        if addr is None:
            logger.info("eeagent %s: no actor named %r yet", self.agent_id, self.pd_name)
            self.pd = None
            return
        if self.pd is None or addr != self.pd:
            logger.info("eeagent %s: PD at %s", self.agent_id, addr)
            self.pd = addr
            self.asys.tell(addr, Hello(f"eeagent:{self.agent_id}"))
            self.core._dirty = True

    def _send_pd(self, message: Message) -> None:
        self._find_pd()
        if self.pd is None:
            raise RuntimeError(f"no actor named {self.pd_name!r}")
        try:
            self.asys.tell(self.pd, message)
        except Exception:
            self.pd = None  # look it up again next time
            raise

    # -- the watcher's wake-up ----------------------------------------------------------------

    def _wake(self) -> None:
        """Called on the supervisor's watcher thread: never block it (it holds the supervisor's
        notify lock, which the loop thread may be waiting for inside ``launch``)."""
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
        if self.core.dirty:
            # at once, unless the PD could not be reached just now (then retry shortly)
            wait = 0.0 if self.core.failed_at is None else min(wait, self.retry_delay)
        message = self.asys.listen(wait)
        handled = 0
        while message is not None:
            self._handle(message)
            handled += 1
            if handled >= self.drain_max:
                break
            # Drain what has already arrived, then send one heartbeat for all of it.
            message = self.asys.listen(0)
        self.core.flush()

    def _handle(self, message: Any) -> None:
        inner, _ = _unwrap(message)
        if isinstance(inner, ErrorReply):  # the PD refused something we sent
            logger.warning("eeagent %s: refused: %s: %s", self.agent_id, inner.code, inner.message)
            return
        if isinstance(inner, Wakeup | Ok):
            return
        reply = self.core.handle(inner)
        if isinstance(reply, ErrorReply):
            logger.info("eeagent %s: %s: %s", self.agent_id, reply.code, reply.message)
        if isinstance(inner, DumpAgentState):
            self.core._dirty = True

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
