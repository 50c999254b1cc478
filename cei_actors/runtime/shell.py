"""The thespian shell around a :class:`~cei_actors.runtime.runner.Runner`.

An :class:`EventSourcedActor` receives, lets the runner decide, appends the events under the
fence, applies them, and only then performs the effects and replies. It never decides.

Life cycle (``mode`` in :meth:`EventSourcedActor.status`):

- ``idle``: created, waiting for :class:`~.control.Start`; other messages are held.
- ``standby``: a hot standby (config ``standby: hot``, the default): contending for
  leadership while following the log (``runner.follow``), so its state stays current and
  taking over costs the fence write plus the records after the followed head. It performs no
  effects and answers nothing as leader; messages are held as in ``recovering``. A
  :class:`_Follower` thread waits on the log (``EventLog.tail``: a ZooKeeper watch, a poll
  elsewhere) and hands new records to the actor, which applies them on its own thread (woken
  by the pipe where the base supports ``ThespianWatch``, else at each leadership retry).
- ``recovering``: a cold standby (``standby: cold``): contending for leadership, then
  ``runner.recover()`` replays snapshot + tail; messages are held and served after recovery
  in arrival order (at most ``max_held``; beyond that: unavailable).
- ``ready``: serving. Component messages handled in one burst share one append (group
  commit, see below).
- ``suspended``: the leadership is in doubt (ZooKeeper ``SUSPENDED``): no appends, no
  effects; messages are held until it is confirmed again (``CONNECTED``) or lost.
- ``down``: fenced by a newer writer, the log failed, or leadership was lost: state dropped,
  leadership released, every request answered ``ErrorReply("unavailable")``; the actor
  re-contends on a timer and recovers again when it wins (a hot one follows the log meanwhile).
- ``stopped``: after :class:`~.control.Stop` or ``ActorExitRequest``.

Replies. A message wrapped in :class:`~.control.Request` gets its reply as
:class:`~.control.Response` with the same request id (an empty id: no reply). A bare message
gets the bare reply (plain ``ask`` compatibility). Bare replies that arrive here (``Ok``,
``ErrorReply``: peers answering our ``Send`` effects) are logged, never fed to the core and
never answered, so two shells cannot ping-pong errors.

Peers. ``Start.peers`` and ``SetPeers`` name the configured peers; ``Hello(name)`` records its
sender under ``name``. Whenever the actor starts leading it sends ``Hello(peer_name)`` to each
configured peer and to every replica of it named in ``Start.replicas`` or ``SetPeers.replicas``
(a leader also greets those when they arrive), so a standby that took over is reached at once,
and a standby of the peer that leads later already holds this leader's address
(docs/decisions.md F1).

Group commit. thespian hands over one message at a time. A component message is not decided
at once: it joins a batch, and the first message of a batch asks for a zero-delay wakeup.
thespian delivers messages that have already arrived before that wakeup, so the batch grows
until the mailbox is drained; then ``runner.handle_many`` decides them in arrival order (each
against the state left by the ones before it), appends all their events at once, and the
effects and replies of every message follow the append. A batch never exceeds ``max_batch``.

Metrics. After :class:`~.metrics.ReportMetrics` the actor sends a small
:class:`~.metrics.MetricsReport` to the host's collector every ``interval`` seconds and when it
starts leading or steps down: the runtime's figures (``status()``, the runner's
``log_stats``, messages and heartbeats counted at each flush, recovery time) and, on the
leader only, the component's :meth:`metrics` of its state (docs/decisions.md MT1, MT2).

Timers: ``SetTimer`` becomes ``wakeupAfter`` with a ``(key, generation)`` payload; a newer
timer with the same key (or a change of leadership term) makes older wakeups stale, and stale
wakeups are ignored (thespian cannot cancel them). Work: a bounded thread pool runs the work
handler; results come back through a queue and are collected on the actor's thread (woken by
a pipe where the base supports ``ThespianWatch``, else by short polling wakeups while work is
outstanding) and fed to the core like any other message.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import (
    Actor,
    ActorExitRequest,
    ActorSystemMessage,
    ChildActorExited,
    DeadEnvelope,
    PoisonMessage,
    ThespianWatch,
    WakeupMessage,
    WatchMessage,
)

from ..eventlog import EventLogError, Fenced, open_log
from . import faults
from .control import Hello, PeerAddress, Request, Response, SetPeers, Start, Started, Status, Stop
from .core import Component, Send, SetTimer, Work
from .leadership import Leadership, leadership_for
from .messages import ErrorReply, InvalidMessage, Message, Ok, validate
from .metrics import ReportMetrics, Sample, ShellStats, make_report, runtime_samples
from .runner import Runner

_LOG_NAME = "cei_actors.runtime.shell"

# Wakeup payloads (small, picklable): ("cei", kind, *args)
_FLUSH = ("cei", "flush")
_POLL = ("cei", "poll")
_CHECK = ("cei", "check")
_METRICS = ("cei", "metrics")

_REPLY_TYPES = (Ok, ErrorReply, Response, Started)


@dataclass
class _Origin:
    """Where a message came from and how to answer it."""

    sender: Any = None  # ActorAddress, or None for timers and work results
    rid: str | None = None  # None: bare message; "": a tell; else the request id
    kind: str = ""  # the message's type name, for error replies


_SELF = _Origin()


class _Waker:
    """A self-pipe: worker and election threads write a byte, the actor watches the read end.

    ``notify`` and ``close`` share a lock so that a late notify can never write into a reused
    descriptor number after the pipe was closed.
    """

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self._lock = threading.Lock()
        self._closed = False

    def notify(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):  # full pipe: a wakeup is already pending
                os.write(self.w, b"!")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.r, 4096):
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.r, self.w):
                with contextlib.suppress(OSError):
                    os.close(fd)


class _Follower:
    """A thread that waits on the log for records after ``after`` (``EventLog.tail``) and queues
    them for the actor; errors are queued too (the actor logs them), then it pauses and goes on.
    It never touches the runner: the actor applies what it queued."""

    wait = 1.0  #: longest single tail wait (s); a stop takes effect within it
    pause = 0.5  #: seconds to wait after a failed read

    def __init__(self, log: Any, stream: str, after: int, notify: Callable[[], None] | None) -> None:
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(log, stream, after, notify), name=f"follow-{stream}", daemon=True
        )
        self._thread.start()

    def _run(self, log: Any, stream: str, after: int, notify: Callable[[], None] | None) -> None:
        stop = self._stop
        while not stop.is_set():
            try:
                records = log.tail(stream, after, self.wait)
            except Exception as exc:  # noqa: BLE001 - reported on the actor thread
                if stop.is_set():
                    return
                self.items.put(exc)
                stop.wait(self.pause)
                continue
            if records and not stop.is_set():
                after = records[-1].offset
                self.items.put(records)
                if notify is not None:
                    notify()

    def stop(self, join: bool = False) -> None:
        """Stop following; with ``join``, also wait (at most a tail wait and a margin) until
        the thread is out of the log, which must be before the log is closed: closing a SQLite
        connection another thread is reading with crashes the process."""
        self._stop.set()
        if join and self._thread is not threading.current_thread():
            self._thread.join(self.wait + 5.0)

    def alive(self) -> bool:
        return self._thread.is_alive()


class EventSourcedActor(Actor):
    """A thespian actor that runs an event-sourced component; subclass and override the hooks.

    Hooks: :meth:`make_component` (required), :meth:`setup`, :meth:`teardown`,
    :meth:`work_handlers`, :meth:`make_leadership`. Tunables are class attributes; ``config``
    keys of the same name (``workers``, ``group_commit``, ``group_commit_delay``, ``max_batch``, ``standby``,
    ``snapshot_writer``) override them per
    instance.
    """

    #: Decide and append messages that arrive together as one batch.
    group_commit: bool = True
    #: Seconds a batch waits for more messages before it is decided and appended (0: only
    #: what has already arrived). A few milliseconds trade latency for fewer, larger appends.
    group_commit_delay: float = 0.0
    #: Largest batch (messages) per append.
    max_batch: int = 512
    #: Worker threads for ``Work`` effects.
    workers: int = 4
    #: ``hot``: a replica that does not lead follows the log (mode ``standby``); ``cold``: it
    #: waits in ``recovering`` and replays snapshot + tail only once it wins.
    standby: str = "hot"
    #: Who writes a due snapshot of a big state: ``process``, a snapshotter process folding
    #: the log (the actor only spawns it, at the cost of a second copy of the state while it
    #: runs; decision FO5), or ``fork``, a forked child (the actor stalls for the fork; LT3).
    snapshot_writer: str = "process"
    #: Seconds between leadership/recovery attempts while not leading (doubles up to 8x).
    retry_interval: float = 0.2
    #: Seconds between leadership checks while leading (a pipe wakes it sooner when it can).
    check_interval: float = 0.5
    #: Seconds between polls for work results on bases without ``ThespianWatch``.
    poll_interval: float = 0.005
    #: Most messages held while recovering or suspended; beyond that: unavailable.
    max_held: int = 10_000
    #: The youngest generation's GC threshold in the actor's process (CPython's default: 700).
    #: An actor allocates a few objects per message and keeps a big state for long; with the
    #: default, the PD spent 5.5% of its CPU in the collector, 1% with this (measured).
    gc_young_threshold: int = 20_000
    #: The peer name this actor announces (``Hello``) to its configured peers when it starts
    #: leading; None: the component's default stream (``pd``, ``epum``, ``provisioner``).
    peer_name: str | None = None
    #: Message types counted as heartbeats received (``cei_heartbeats_received``).
    heartbeat_types: tuple[str, ...] = ()
    #: Event types counted as launches (``cei_launches``).
    launch_events: tuple[str, ...] = ()

    @property
    def _mode(self) -> str:
        return self._mode_now

    @_mode.setter
    def _mode(self, mode: str) -> None:  # ``since`` in the status: when the mode last changed
        if mode != getattr(self, "_mode_now", None):
            self._mode_since = time.time()
        self._mode_now = mode

    def __init__(self, capabilities: dict | None = None) -> None:
        super().__init__()
        self._watch_supported = bool((capabilities or {}).get("Thespian Watch Supported"))
        self._mode = "idle"
        self._runner: Runner | None = None
        self._leadership: Leadership | None = None
        self._start: Start | None = None
        self._start_origin: _Origin | None = None
        self._config: dict = {}
        self._peers: dict[str, Any] = {}
        self._configured: set[str] = set()  # peer names from Start/SetPeers: told when we lead
        self._replicas: dict[str, list[Any]] = {}  # every replica of a peer, from Start: told too
        self._me: str | None = None
        self._held: deque[tuple[Any, _Origin]] = deque()
        self._batch: list[tuple[Any, _Origin]] = []
        self._flush_pending = False
        self._timers: dict[str, tuple[int, Any]] = {}
        self._gens = itertools.count(1)
        self._term = 0
        self._retry_gen = 0
        self._retry_delay = self.retry_interval
        self._check_pending = False
        self._poll_pending = False
        self._handlers: dict[str, Callable[[Any], Any]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._outstanding = 0
        self._waker: _Waker | None = None
        self._set_up = False
        self._log = logging.getLogger(_LOG_NAME)
        self.stats = {"appends": 0, "messages": 0, "batches": 0}
        self._last_error: dict[str, str] | None = None
        self._follower: _Follower | None = None
        #: followers stopped without waiting (a win, a restart of following): joined before the
        #: log is closed, since one may still be reading it (RT7)
        self._stopped: list[_Follower] = []
        self._shell_stats = ShellStats()
        self._metrics_to: ReportMetrics | None = None
        self._metrics_pending = False
        self._metrics_failed = False

    # ---- hooks ------------------------------------------------------------------------------

    def make_component(self, config: dict) -> Component:
        """The pure core this actor runs, built from ``config``."""
        raise NotImplementedError(f"{type(self).__name__} must override make_component")

    def setup(self, config: dict) -> None:
        """Acquire resources (cloud drivers, ...) before the component is built."""

    def teardown(self) -> None:
        """Release what :meth:`setup` acquired; called once when the actor stops."""

    def work_handlers(self) -> dict[str, Callable[[Any], Message]]:
        """Blocking handlers by ``Work.kind``; each returns a message for the core (or None)."""
        return {}

    def peer_response(self, response: Response) -> Message | None:
        """A message for the core made of a peer's ``Response`` to a ``Request`` this actor
        sent (a ``Send`` effect may carry one); None (the default): the response is only
        logged. Either way it is never answered (R3)."""
        return None

    def peer_named_by(self, msg: Any) -> str | None:
        """The peer name a message says its sender has (e.g. ``eeagent:<id>`` for an agent's
        heartbeat), or None (the default). The shell then holds the sender under that name, as
        a ``Hello`` would: level-based, so a peer whose ``Hello`` was lost (sent to a replica
        that was just being replaced) is still reached."""
        return None

    def greeted(self, name: str) -> Message | None:
        """A message for the core when peer ``name`` says (``Hello``) that it now leads, or
        None (the default). A peer's failover may have lost what it was about to send (its
        leader died between an append and its effects): this lets the core ask again at once
        instead of waiting for its periodic refresh. Only a leading actor gets it; a standby
        asks everything when it takes over anyway."""
        return None

    def metrics(self, state: Any) -> list[Sample]:
        """The component's figures computed from its state (leader only; see
        :mod:`.metrics`): a pure function of ``state``; default none."""
        return []

    def make_leadership(self, spec: str, log_url: str, stream: str) -> Leadership:
        """The leadership for ``stream``; default :func:`~.leadership.leadership_for`."""
        return leadership_for(spec, log_url, stream)

    # ---- thespian entry point ----------------------------------------------------------------

    def receiveMessage(self, msg: Any, sender: Any) -> Any:  # noqa: N802 - thespian's name
        origin: _Origin | None = None
        try:
            origin = self._dispatch(msg, sender)
        except Exception as exc:  # nothing may kill the actor
            self._log.exception("%s: failed handling %s", self._name(), type(msg).__name__)
            if origin is None and not isinstance(msg, ActorSystemMessage):
                origin = self._origin_of(msg, sender)
            if origin is not None:
                self._reply(origin, ErrorReply("internal", f"{type(exc).__name__}: {exc}", origin.kind))
        if self._watch_supported and self._waker is not None:
            return ThespianWatch([self._waker.r])
        return None

    def _origin_of(self, msg: Any, sender: Any) -> _Origin:
        if isinstance(msg, Request):
            return _Origin(sender, msg.rid, type(msg.message).__name__)
        return _Origin(sender, None, type(msg).__name__)

    def _dispatch(self, msg: Any, sender: Any) -> _Origin | None:
        if isinstance(msg, ActorSystemMessage):
            self._system_message(msg, sender)
            return None
        if isinstance(msg, Request):
            if not isinstance(msg.rid, str):
                return None  # cannot be answered
            origin = _Origin(sender, msg.rid, type(msg.message).__name__)
            msg = msg.message
        else:
            origin = _Origin(sender, None, type(msg).__name__)
        if isinstance(msg, _REPLY_TYPES):
            self._peer_reply(msg, sender)
            return None
        control = _CONTROL.get(type(msg))
        if control is not None:
            try:
                validate(msg)
            except InvalidMessage as exc:
                self._reply(origin, ErrorReply("bad_request", str(exc), origin.kind))
                return origin
            control(self, msg, origin)
            return origin
        if sender is not None:
            self._learn_peer(msg, sender)
        self._submit(msg, origin)
        return origin

    def _learn_peer(self, msg: Any, sender: Any) -> None:
        try:
            name = self.peer_named_by(msg)
        except Exception:  # a malformed message names nobody; validation answers it
            return
        if isinstance(name, str) and name and self._peers.get(name) != sender:
            self._peers[name] = sender
            self._log.info("%s: peer %s is %s (from its %s)", self._name(), name, sender, type(msg).__name__)

    def _system_message(self, msg: Any, sender: Any) -> None:
        if isinstance(msg, WakeupMessage):
            self._wakeup(msg.payload)
        elif isinstance(msg, WatchMessage):
            if self._waker is not None:
                self._waker.drain()
            self._collect_results()
            if self._mode in ("standby", "recovering", "down"):
                self._catch_up()
                self._try_lead(retry=False)  # an election may just have been won: do not wait
            else:
                self._check_leadership()
        elif isinstance(msg, ActorExitRequest):
            self._shutdown("exit requested")
        elif isinstance(msg, ChildActorExited):
            self._log.info("%s: child %s exited", self._name(), msg.childAddress)
        elif isinstance(msg, PoisonMessage):
            self._log.warning(
                "%s: a message we sent made its receiver fail: %s", self._name(), msg.poisonMessage
            )
        elif isinstance(msg, DeadEnvelope):
            self._log.warning("%s: undeliverable to %s: %s", self._name(), msg.deadAddress, msg.deadMessage)
        else:
            self._log.debug("%s: ignoring %s", self._name(), type(msg).__name__)

    def _peer_reply(self, msg: Any, sender: Any) -> None:
        if isinstance(msg, Response):
            made = self.peer_response(msg)
            if made is not None:
                self._submit(made, _Origin(None, None, type(made).__name__))
                return
        if isinstance(msg, ErrorReply) or (isinstance(msg, Response) and isinstance(msg.reply, ErrorReply)):
            self._log.warning("%s: peer %s refused: %s", self._name(), self._peer_name(sender), msg)
        else:
            self._log.debug("%s: reply from %s ignored: %s", self._name(), self._peer_name(sender), msg)

    # ---- control messages ------------------------------------------------------------------

    def _on_start(self, msg: Start, origin: _Origin) -> None:
        if self._mode != "idle":
            self._reply(origin, ErrorReply("conflict", f"already started ({self._mode})", "Start"))
            return
        config = dict(msg.config)
        log = None
        try:
            standby = str(config.get("standby", self.standby))
            if standby not in ("hot", "cold"):
                raise ValueError(f"config standby: expected hot or cold, got {standby!r}")
            writer = str(config.get("snapshot_writer", self.snapshot_writer))
            if writer not in ("process", "fork"):
                raise ValueError(f"config snapshot_writer: expected process or fork, got {writer!r}")
            self.setup(config)
            self._set_up = True
            component = self.make_component(config)
            stream = msg.stream or component.stream
            faults.arm(config.get("crash_at"), stream)  # crash points: tests only (FT1)
            log = open_log(msg.log_url)
            leadership = self.make_leadership(msg.leadership, msg.log_url, stream)
        except Exception as exc:
            self._log.exception("%s: Start failed", self._name())
            if log is not None:
                with contextlib.suppress(Exception):
                    log.close()
            self._teardown_once()
            code = "bad_request" if isinstance(exc, ValueError | TypeError | KeyError) else "internal"
            self._reply(origin, ErrorReply(code, f"Start failed: {type(exc).__name__}: {exc}", "Start"))
            return
        self._config = config
        self.standby = standby
        young, *older = gc.get_threshold()
        if 0 < young < self.gc_young_threshold:  # 0: the collector is off; leave it so
            gc.set_threshold(self.gc_young_threshold, *older)
        self.group_commit = bool(config.get("group_commit", self.group_commit))
        self.group_commit_delay = float(config.get("group_commit_delay", self.group_commit_delay))
        self.max_batch = int(config.get("max_batch", self.max_batch))
        self._runner = Runner(component, log, stream=stream, snapshot_every=msg.snapshot_every,
                              record_inputs=bool(config.get("record_inputs", False)))
        self._runner.snapshot_process = writer == "process"
        self._leadership = leadership
        self._start, self._start_origin = msg, origin
        self._peers.update({k: v for k, v in msg.peers.items() if v is not None})
        self._configured.update(k for k, v in msg.peers.items() if v is not None)
        self._replicas = {k: list(v) for k, v in msg.replicas.items()}
        self._configured.update(k for k, v in self._replicas.items() if v)
        self._me = self.peer_name or type(component).stream or None
        self._handlers = dict(self.work_handlers())
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, int(config.get("workers", self.workers))),
            thread_name_prefix=f"work-{stream}",
        )
        if self._watch_supported:
            self._waker = _Waker()
            leadership.on_change = self._waker.notify
        self._mode = "standby" if standby == "hot" else "recovering"
        self._log.info("%s: starting on %s, leadership %s, %s standby", self._name(), msg.log_url,
                       leadership.describe(), standby)
        self._try_lead()

    def _on_hello(self, msg: Hello, origin: _Origin) -> None:
        if origin.sender is None:
            return
        self._peers[msg.name] = origin.sender
        self._log.info("%s: peer %s is %s", self._name(), msg.name, origin.sender)
        self._reply(origin, Ok(msg.name))
        if self._mode in ("ready", "suspended"):
            made = self.greeted(msg.name)
            if made is not None:
                self._submit(made, _Origin(None, None, type(made).__name__))

    def _on_set_peers(self, msg: SetPeers, origin: _Origin) -> None:
        for name, address in msg.peers.items():
            if address is None:
                self._peers.pop(name, None)
                self._configured.discard(name)
            else:
                self._peers[name] = address
                self._configured.add(name)
        for name, addresses in msg.replicas.items():
            self._replicas[name] = list(addresses)
            if addresses:
                self._configured.add(name)
        if msg.replicas and self._mode == "ready":
            self._announce()  # replicas that never heard of this leader (another system's)
        self._reply(origin, Ok(sorted(self._peers)))

    def _on_peer_address(self, msg: PeerAddress, origin: _Origin) -> None:
        address = self._peers.get(msg.name)
        if address is None:
            self._reply(origin, ErrorReply("not_found", f"no peer named {msg.name!r}", "PeerAddress"))
        else:
            self._reply(origin, Ok(address))

    def _on_status(self, msg: Status, origin: _Origin) -> None:
        status = self.status()
        if msg.state:
            runner = self._runner
            state = None
            if runner is not None:
                state = runner.state if runner.state is not None else runner.followed_state
            status["state"] = None if state is None else runner.component.snapshot(state)
        self._reply(origin, Ok(status))

    def _on_report_metrics(self, msg: ReportMetrics, origin: _Origin) -> None:
        self._metrics_to = msg if msg.to is not None else None
        self._reply(origin, Ok(None))
        self._report_metrics()

    def _report_metrics(self) -> None:
        """Send this replica's figures to the collector (if told to) and schedule the next
        report; a failure is logged (once), never raised."""
        target = self._metrics_to
        if target is None or self._mode == "stopped":
            return
        if not self._metrics_pending:
            self._metrics_pending = True
            self.wakeupAfter(timedelta(seconds=target.interval), _METRICS)
        runner = self._runner
        try:
            samples = runtime_samples(self.status(), runner.log_stats if runner else None,
                                      self._shell_stats, self.launch_events)
            histograms = []
            if runner is not None:
                histograms.append(("cei_append_seconds", {}, runner.log_stats.append_seconds))
                if self._mode == "ready" and runner.state is not None:
                    samples += self.metrics(runner.state)
            component = type(runner.component).stream if runner is not None else None
            report = make_report(target.name, component or self._me or target.name,
                                 target.interval, samples, histograms)
            self.send(target.to, report)
            self._metrics_failed = False
        except Exception:
            if not self._metrics_failed:
                self._log.exception("%s: reporting metrics failed", self._name())
            self._metrics_failed = True

    def _on_stop(self, msg: Stop, origin: _Origin) -> None:
        self._shutdown("stop requested")
        self._reply(origin, Ok(None))
        self.send(self.myAddress, ActorExitRequest())

    def status(self) -> dict[str, Any]:
        """Plain data: mode, ready, leader, stream, epoch, head, held, batch, work, peers, pid,
        standby (hot or cold), ``since`` (when the mode last changed, epoch seconds) and
        ``last_error`` (``{type, message}`` of the last failed attempt to lead or recover, or
        why it stepped down; None once it leads). ``head`` is the offset the replica's
        state reflects: a hot standby's followed head while it does not lead."""
        runner = self._runner
        leadership = self._leadership
        head = 0
        if runner is not None:
            head = runner.followed_head if runner.state is None and runner.following else runner.head
        return {
            "mode": self._mode,
            "since": self._mode_since,
            "standby": self.standby,
            "ready": self._mode == "ready",
            "leader": bool(leadership is not None and leadership.is_leader),
            "leadership": leadership.describe() if leadership is not None else None,
            "stream": runner.stream if runner else None,
            "epoch": runner.fence.epoch if runner and runner.fence else 0,
            "head": head,
            "held": len(self._held),
            "batch": len(self._batch),
            "work": self._outstanding,
            "peers": sorted(self._peers),
            "pid": os.getpid(),
            "stats": dict(self.stats),
            "last_error": self._last_error,
        }

    # ---- leadership and recovery -----------------------------------------------------------

    def _try_lead(self, retry: bool = True) -> None:
        """Contend; on a win recover (a hot standby takes over) and serve. ``retry``: schedule
        the next attempt if this one does not win (False for extra attempts made between the
        timer's, which keeps running)."""
        if self._mode not in ("standby", "recovering", "down") or self._runner is None or self._leadership is None:
            return
        try:
            won = self._leadership.try_acquire()
        except Exception as exc:
            self._log.warning("%s: contending failed: %s: %s", self._name(), type(exc).__name__, exc)
            self._last_error = {"type": type(exc).__name__, "message": str(exc)}
            won = False
        if not won:
            self._catch_up()
            if retry:
                self._schedule_retry()
            return
        self._catch_up(start=False)  # what the follower already read need not be read again
        self._stop_following()
        started = time.perf_counter()
        try:
            decision = self._runner.recover()
        except Exception as exc:
            self._log.warning("%s: recovery failed: %s: %s", self._name(), type(exc).__name__, exc)
            self._last_error = {"type": type(exc).__name__, "message": str(exc)}
            with contextlib.suppress(Exception):
                self._leadership.release()
            self._schedule_retry(backoff=True)
            return
        self._shell_stats.recoveries += 1
        self._shell_stats.recovery_seconds = time.perf_counter() - started
        self._term += 1
        self._timers.clear()
        self._mode = "ready"
        self._last_error = None
        self._retry_delay = self.retry_interval
        runner = self._runner
        assert runner.fence is not None
        self._log.info(
            "%s: leading %s at epoch %d, head %d", self._name(), runner.stream, runner.fence.epoch, runner.head
        )
        faults.crash_point("after_recovery")
        self._announce()
        self._perform(decision.effects, _SELF)
        if self._start_origin is not None:
            self._reply(self._start_origin, Started(runner.stream, runner.fence.epoch, runner.head))
            self._start_origin = None
        self._schedule_check()
        self._release_held()
        self._report_metrics()

    # ---- a hot standby ------------------------------------------------------------------------

    def _catch_up(self, start: bool = True) -> None:
        """A hot standby that does not lead: load the state and start following the log if it
        is not yet (and ``start``), else apply the records the follower queued. Failures are
        logged; the next call starts over from the log."""
        runner = self._runner
        if self.standby != "hot" or runner is None or self._mode not in ("standby", "down"):
            return
        if runner.state is not None:
            return
        try:
            if self._follower is None or not runner.following:
                if not start:
                    return
                self._stop_following()
                runner.stop_following()
                runner.follow()
                waker = self._waker
                self._follower = _Follower(runner.log, runner.stream, runner.followed_head,
                                           waker.notify if waker is not None else None)
                self._log.info("%s: hot standby following from %d", self._name(), runner.followed_head)
                return
            items = self._follower.items
            while True:
                try:
                    item = items.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, BaseException):
                    self._log.warning("%s: following the log: %s: %s", self._name(), type(item).__name__, item)
                else:
                    runner.follow(item)
        except Exception as exc:
            self._log.warning("%s: following the log failed: %s: %s", self._name(), type(exc).__name__, exc)
            self._last_error = {"type": type(exc).__name__, "message": str(exc)}
            self._stop_following()
            runner.stop_following()

    def _stop_following(self, join: bool = False) -> None:
        """Stop the follower; with ``join``, wait until it and every follower stopped before
        are out of the log (before the log is closed)."""
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.stop(join)
            if not join:
                self._stopped = [f for f in self._stopped if f.alive()] + [follower]
        if join:
            stopped, self._stopped = self._stopped, []
            for old in stopped:
                old.stop(join=True)

    def _announce(self) -> None:
        """Tell the configured peers that this replica now serves our peer name (F1).

        Their shells record the sender under that name (``Hello``), so a standby that took
        over is reached at once; the ``Ok`` they answer is logged here, never answered.
        """
        if not self._me:
            return
        hello = Hello(self._me)
        for name in sorted(self._configured):
            targets = [self._peers.get(name), *self._replicas.get(name, ())]
            told: list[Any] = []
            for address in targets:
                if address is None or address == self.myAddress or address in told:
                    continue
                told.append(address)
                try:
                    self.send(address, hello)
                except Exception:
                    self._log.exception("%s: announcing to %s failed", self._name(), name)

    def _schedule_retry(self, backoff: bool = False) -> None:
        self._retry_gen += 1
        delay = self._retry_delay
        if backoff:
            self._retry_delay = min(self._retry_delay * 2, self.retry_interval * 8)
        self.wakeupAfter(timedelta(seconds=delay), ("cei", "retry", self._retry_gen))

    def _schedule_check(self) -> None:
        if not self._check_pending:
            self._check_pending = True
            self.wakeupAfter(timedelta(seconds=self.check_interval), _CHECK)

    def _check_leadership(self) -> bool:
        """Follow leadership changes while leading; True if the actor may act now."""
        if self._mode not in ("ready", "suspended") or self._leadership is None:
            return self._mode == "ready"
        leadership = self._leadership
        if leadership.is_leader:
            if self._mode == "suspended":
                self._log.warning("%s: leadership confirmed again, resuming", self._name())
                self._mode = "ready"
                self._release_held()
            return True
        if leadership.suspended:
            if self._mode == "ready":
                self._log.warning("%s: leadership in doubt, holding messages", self._name())
                self._mode = "suspended"
                self._hold_batch()
            return False
        self._step_down("leadership lost")
        return False

    def _step_down(self, reason: str, fenced: bool = False) -> None:
        self._log.warning("%s: stepping down: %s", self._name(), reason)
        self._last_error = {"type": "SteppedDown", "message": reason}
        self._mode = "down"
        self._term += 1
        self._timers.clear()
        if self._runner is not None:
            self._runner.state = None
        unavailable = ErrorReply("unavailable", f"not serving: {reason}")
        pending = list(self._batch) + list(self._held)
        self._batch.clear()
        self._held.clear()
        for _, origin in pending:
            self._reply(origin, unavailable)
        if self._leadership is not None:
            try:
                if fenced:
                    self._leadership.fenced()
                else:
                    self._leadership.release()
            except Exception:
                self._log.exception("%s: releasing leadership failed", self._name())
        self._retry_delay = self.retry_interval
        self._schedule_retry()
        self._report_metrics()

    def _hold_batch(self) -> None:
        # Undecided messages go back in front of the held ones, in arrival order.
        for item in reversed(self._batch):
            self._held.appendleft(item)
        self._batch.clear()

    def _release_held(self) -> None:
        while self._held and self._mode == "ready":
            msg, origin = self._held.popleft()
            self._batch.append((msg, origin))
            if len(self._batch) >= self.max_batch:
                self._flush()
        if self._batch and self._mode == "ready":
            self._flush()

    # ---- handling component messages -------------------------------------------------------

    def _submit(self, msg: Any, origin: _Origin) -> None:
        mode = self._mode
        if mode == "ready":
            self._batch.append((msg, origin))
            if not self.group_commit or len(self._batch) >= self.max_batch:
                self._flush()
            elif not self._flush_pending:
                self._flush_pending = True
                self.wakeupAfter(timedelta(seconds=self.group_commit_delay), _FLUSH)
        elif mode in ("idle", "standby", "recovering", "suspended"):
            if len(self._held) >= self.max_held:
                self._reply(origin, ErrorReply("unavailable", f"not serving yet ({mode}) and {self.max_held} messages held", origin.kind))
            else:
                self._held.append((msg, origin))
        else:
            self._reply(origin, ErrorReply("unavailable", f"not serving ({mode})", origin.kind))

    def _flush(self) -> None:
        if not self._batch:
            return
        if not self._check_leadership():
            return  # held (suspended) or answered unavailable (stepped down)
        batch, self._batch = self._batch, []
        runner = self._runner
        assert runner is not None
        head_before = runner.head
        try:
            decisions = runner.handle_many([m for m, _ in batch])
        except Exception as exc:
            self._batch = batch + self._batch
            fenced = isinstance(exc, Fenced)
            if not isinstance(exc, EventLogError):
                self._log.exception("%s: handling a batch failed", self._name())
            self._step_down(f"{type(exc).__name__}: {exc}", fenced=fenced)
            return
        self.stats["batches"] += 1
        self.stats["messages"] += len(batch)
        counted = self._shell_stats.messages
        for msg, _ in batch:
            kind = type(msg).__name__
            counted[kind] += 1
            if kind in self.heartbeat_types:
                self._shell_stats.heartbeats += 1
        if runner.head != head_before:
            self.stats["appends"] += 1
            faults.crash_point("after_append")
        for (_msg, origin), decision in zip(batch, decisions, strict=True):
            failure = self._perform(decision.effects, origin)
            reply = decision.reply
            if failure is not None:
                reply = ErrorReply(
                    "internal", f"recorded, but an effect failed: {failure}", origin.kind
                )
            if reply is not None:
                self._reply(origin, reply)
            elif origin.rid:  # a request always gets an answer
                self._reply(origin, Ok(None))
        faults.crash_point("after_effects")

    # ---- effects ---------------------------------------------------------------------------

    def _perform(self, effects: list[Any], origin: _Origin) -> str | None:
        """Perform effects in order; each is contained. Returns the first failure, if any."""
        failure = None
        for effect in effects:
            try:
                if isinstance(effect, Send):
                    self._send_to_peer(effect)
                elif isinstance(effect, SetTimer):
                    gen = next(self._gens)
                    self._timers[effect.key] = (gen, effect.message)
                    self.wakeupAfter(timedelta(seconds=max(0.0, float(effect.delay))), ("cei", "timer", effect.key, gen))
                elif isinstance(effect, Work):
                    self._start_work(effect)
                else:
                    raise TypeError(f"unknown effect {type(effect).__name__}")
            except Exception as exc:
                self._log.exception("%s: effect %s failed", self._name(), type(effect).__name__)
                failure = failure or f"{type(effect).__name__}: {type(exc).__name__}: {exc}"
        return failure

    def _send_to_peer(self, effect: Send) -> None:
        address = self._peers.get(effect.to)
        if address is None:
            self._log.warning(
                "%s: dropped %s to unknown peer %r", self._name(), type(effect.message).__name__, effect.to
            )
            return
        self.send(address, effect.message)

    def _start_work(self, effect: Work) -> None:
        handler = self._handlers.get(effect.kind)
        if handler is None:
            raise LookupError(f"no work handler for kind {effect.kind!r}")
        assert self._executor is not None
        self._outstanding += 1
        self._executor.submit(self._run_work, handler, effect.kind, effect.payload, self._term)
        if not self._watch_supported:
            self._schedule_poll()

    def _run_work(self, handler: Callable[[Any], Any], kind: str, payload: Any, term: int) -> None:
        # Runs on a worker thread: no logging or sending here, only hand the outcome over.
        try:
            outcome: tuple = (kind, term, handler(payload), None)
        except BaseException as exc:  # noqa: BLE001 - reported on the actor thread
            outcome = (kind, term, None, "".join(traceback.format_exception(exc)))
        faults.crash_point("after_work", kind)
        self._results.put(outcome)
        waker = self._waker
        if waker is not None:
            waker.notify()

    def _schedule_poll(self) -> None:
        if not self._poll_pending:
            self._poll_pending = True
            self.wakeupAfter(timedelta(seconds=self.poll_interval), _POLL)

    def _collect_results(self) -> None:
        while True:
            try:
                kind, term, result, error = self._results.get_nowait()
            except queue.Empty:
                break
            self._outstanding -= 1
            if error is not None:
                self._log.error("%s: work %r failed:\n%s", self._name(), kind, error)
            elif term != self._term:
                self._log.info("%s: dropped a result of %r from an earlier term", self._name(), kind)
            elif result is not None:
                self._submit(result, _Origin(None, None, type(result).__name__))
        if self._outstanding > 0 and not self._watch_supported:
            self._schedule_poll()

    # ---- wakeups ---------------------------------------------------------------------------

    def _wakeup(self, payload: Any) -> None:
        if not (isinstance(payload, tuple) and payload[:1] == ("cei",)):
            self._log.debug("%s: foreign wakeup %r", self._name(), payload)
            return
        kind = payload[1]
        if kind == "flush":
            self._flush_pending = False
            self._flush()
        elif kind == "timer":
            key, gen = payload[2], payload[3]
            current = self._timers.get(key)
            if current is not None and current[0] == gen:
                del self._timers[key]
                self._submit(current[1], _Origin(None, None, type(current[1]).__name__))
        elif kind == "poll":
            self._poll_pending = False
            self._collect_results()
        elif kind == "check":
            self._check_pending = False
            if self._mode in ("ready", "suspended"):
                self._check_leadership()
                if self._mode in ("ready", "suspended"):
                    self._schedule_check()
        elif kind == "retry" and payload[2] == self._retry_gen:
            self._try_lead()
        elif kind == "metrics":
            self._metrics_pending = False
            self._report_metrics()

    # ---- replies and shutdown --------------------------------------------------------------

    def _reply(self, origin: _Origin, reply: Any) -> None:
        if origin.sender is None:
            if isinstance(reply, ErrorReply):
                self._log.warning("%s: internal %s refused: %s", self._name(), origin.kind, reply.message)
            return
        if origin.rid == "":
            if isinstance(reply, ErrorReply):
                self._log.warning("%s: %s (told, not asked) refused: %s", self._name(), origin.kind, reply.message)
            return
        message = reply if origin.rid is None else Response(origin.rid, reply)
        try:
            self.send(origin.sender, message)
        except Exception:
            self._log.exception("%s: reply to %s failed", self._name(), origin.sender)

    def _teardown_once(self) -> None:
        if self._set_up:
            self._set_up = False
            try:
                self.teardown()
            except Exception:
                self._log.exception("%s: teardown failed", self._name())

    def _shutdown(self, reason: str) -> None:
        if self._mode == "stopped":
            return
        self._log.info("%s: stopping: %s", self._name(), reason)
        self._mode = "stopped"
        self._term += 1
        self._timers.clear()
        unavailable = ErrorReply("unavailable", f"stopped: {reason}")
        pending = list(self._batch) + list(self._held)
        self._batch.clear()
        self._held.clear()
        for _, origin in pending:
            self._reply(origin, unavailable)
        if self._start_origin is not None:
            self._reply(self._start_origin, unavailable)
            self._start_origin = None
        self._stop_following(join=True)  # before the log is closed below
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._leadership is not None:
            with contextlib.suppress(Exception):
                self._leadership.close()
        if self._runner is not None:
            self._runner.state = None
            self._runner.stop_following()
            with contextlib.suppress(Exception):
                self._runner.log.close()
        self._teardown_once()
        if self._waker is not None:
            self._waker.close()
            self._waker = None

    # ---- helpers ---------------------------------------------------------------------------

    def _name(self) -> str:
        runner = self._runner
        return f"{type(self).__name__}[{runner.stream if runner else '-'}]"

    def _peer_name(self, address: Any) -> str:
        for name, known in self._peers.items():
            if known == address:
                return name
        return str(address)


_CONTROL: dict[type, Callable[[EventSourcedActor, Any, _Origin], None]] = {
    Start: EventSourcedActor._on_start,
    Hello: EventSourcedActor._on_hello,
    SetPeers: EventSourcedActor._on_set_peers,
    PeerAddress: EventSourcedActor._on_peer_address,
    Status: EventSourcedActor._on_status,
    Stop: EventSourcedActor._on_stop,
    ReportMetrics: EventSourcedActor._on_report_metrics,
}

__all__ = ["EventSourcedActor"]
