"""The simulation kernel: runners on a virtual clock, a seeded network, timers, work and crashes.

Every component runs as a :class:`~cei_actors.runtime.runner.Runner` on an in-memory log, so a
crash is "drop the runner" and a restart is "a new runner recovers from the same log": the
very code path a real failover takes. Message delivery, timer firing and work completion are
events on one heap ordered by (virtual time, sequence), so a seed fixes the whole run.
Plain peers (:meth:`Simulation.add_peer`, e.g. simulated EEAgents) and scheduled calls
(:meth:`Simulation.schedule`) share that heap; :class:`Faults` may limit drops and duplicates
to some links (``lossy``).

As in the actor shell, a ``Request(rid, message)`` is handled as ``message`` and answered with
``Response(rid, reply)``; a component receives a ``Response`` only as what its node's
``peer_response`` makes of it (the HA service's ``PDReply``), else it is dropped (R3).

Trusted deliveries (docs/decisions.md SIM5): what the simulation's own pure code built (a
component's ``Send`` effects and replies, its timers' messages, work results, and what a
plain peer sends with ``tell(..., trusted=True)``) reaches a component without
:func:`~cei_actors.runtime.messages.validate`; everything else (``call``, ``call_many``, ``tell``) is
validated as the actor shell validates it. ``Simulation.validate_own = True`` validates all.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import heapq
import logging
import os
import random
import select
import signal
import struct
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..eventlog import EventLog, open_log
from ..runtime.control import Request, Response
from ..runtime.core import Component, Decision, Send, SetTimer, Work
from ..runtime.messages import ErrorReply, Ok
from ..runtime.runner import Runner

logger = logging.getLogger(__name__)

WorkHandler = Callable[[Any], Any]


#: the largest batch :meth:`Simulation.call_many` decides and appends at once: the actor
#: shell's default (``EventSourcedActor.max_batch``; a test holds them equal)
MAX_BATCH = 512

#: :attr:`Simulation.fork_check_events`'s default: below it a fork costs more than it saves
FORK_CHECK_EVENTS = 50_000

#: the collector's youngest threshold while the kernel runs (Python's default: 700)
RUN_GC_YOUNG = 20_000


@contextlib.contextmanager
def run_gc() -> Iterator[None]:
    """The cyclic collector's settings for a stretch of a run, a recovery or a replay check
    (decision SIM9): what exists on entry is frozen (``gc.freeze``: the simulated system's
    state, which only grows, is not scanned again by each full collection) and young
    collections are rarer; on exit both are as they were, the frozen objects back in the
    oldest generation. Left alone when the collector is off or the program keeps objects
    frozen itself. A nested use is told by a flag: ``gc.get_freeze_count`` walks every frozen
    object."""
    global _RUN_GC_HELD
    if _RUN_GC_HELD or not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    was = gc.get_threshold()
    gc.freeze()
    _RUN_GC_HELD = True
    if 0 < was[0] < RUN_GC_YOUNG:
        gc.set_threshold(RUN_GC_YOUNG, *was[1:])
    try:
        yield
    finally:
        _RUN_GC_HELD = False
        gc.set_threshold(*was)
        gc.unfreeze()


_RUN_GC_HELD = False  # run_gc's settings are on (its outermost use holds them)


_PLAIN, _RESPONSE, _REPLY, _REQUEST = 0, 1, 2, 3
_KINDS: dict[type, int] = {}  # message class -> how a delivery takes it (cached)


def _kind(message: Any) -> int:
    if isinstance(message, Response):
        return _RESPONSE
    if isinstance(message, Ok | ErrorReply):
        return _REPLY
    if isinstance(message, Request):
        return _REQUEST
    return _PLAIN


def pack_form(form: Any) -> bytes:
    """A snapshot form's msgpack encoding, as the simulation's digest and replay check hash
    it (decision SIM12): maps in their own order, what msgpack cannot pack as its ``str``."""
    return msgpack.packb(form, use_bin_type=True, default=str)


_CMD = struct.Struct(">cIQQQ")  # kind, log, data position, data length, log head: to the warm child
_ANSWER = struct.Struct(">cQ")  # kind, payload length: from the warm child
_HASH = 32  # bytes of a SHA-256


class _WarmReplay:
    """The replay check of the nodes' logs, folding ahead in a forked child (decision SIM20).

    The child folds the logs it inherited from offset 1 (:meth:`~cei_actors.debug.reader.Replay.fold`,
    indexes deferred), then waits for commands on a pipe: ``B`` holds the batches appended
    to one log since (as stored, in a memory file this process writes and the child reads,
    so feeding never blocks on the child), which it adds to its copy of that log and folds
    on; ``V`` settles every state and answers the SHA-256 of each one's packed snapshot form
    (:func:`pack_form`), in the nodes' order; ``P`` answers one log's packed form. An error
    is answered as ``E`` and its text."""

    def __init__(self, nodes: list[SimNode], now: float) -> None:
        self.nodes = nodes  # the largest log's node first: a failure is reported under it
        self.node = nodes[0]
        self.streams = [node.component.stream for node in nodes]
        self.heads = [node.log.head(stream) for node, stream in zip(nodes, self.streams, strict=True)]
        self.end = 0  # bytes written to the data file
        self.broken: str | None = None  # why feeding it failed
        self.status: int | None = None  # its wait status once reaped
        if hasattr(os, "memfd_create"):
            self.data = os.memfd_create("cei-warm-replay", os.MFD_CLOEXEC)
        else:  # pragma: no cover - no memfd: an unlinked temporary file
            with tempfile.TemporaryFile() as tmp:
                self.data = os.dup(tmp.fileno())
        cmd_read, self.cmd = os.pipe()
        self.answers, answer_write = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            for fd in (cmd_read, self.cmd, self.answers, answer_write, self.data):
                os.close(fd)
            raise
        if pid == 0:  # pragma: no cover - the child: folds, answers, then gone
            code = 1
            try:
                os.close(self.cmd)
                os.close(self.answers)
                code = self._child(cmd_read, answer_write, now)
            finally:
                os._exit(code)
        self.pid = pid
        os.close(cmd_read)
        os.close(answer_write)
        self._end = weakref.finalize(self, _end_child, pid, [self.cmd, self.answers, self.data])

    # ---- the parent's side

    def feed(self) -> None:
        """Send the child the batches appended since it was last fed."""
        for i, (node, stream) in enumerate(zip(self.nodes, self.streams, strict=True)):
            runner = node.runner  # the log's one writer: its head is the log's
            head = runner.head if runner is not None and runner.ready else node.log.head(stream)
            if head <= self.heads[i] or self.broken is not None:
                continue
            after = self.heads[i]
            blob = msgpack.packb(node.log.stored_batches(stream, after), use_bin_type=True)
            os.pwrite(self.data, blob, self.end)
            if self._send(b"B", i, self.end, len(blob), head):
                self.end += len(blob)
                self.heads[i] = head

    def ask(self) -> None:
        """Feed the child the last batches and ask for its verdicts (see :meth:`verdict`)."""
        self.feed()
        self._send(b"V", 0, 0, 0, 0)

    def verdict(self, lives: dict[str, bytes], timeout: float) -> list[tuple[str, str]]:
        """The child's verdicts on the replays of the nodes named in ``lives`` (name -> the
        live state's packed snapshot form), as ``(name, violation)`` (empty: all equal); a
        failure is one, under the first name. Then the child is gone. Equal hashes are equal
        forms; else the child's packed form and the live one are compared unpacked, so an
        order of map entries never differs."""
        first = next(iter(lives))
        deadline = time.monotonic() + timeout
        try:
            kind, payload = self._answer(deadline)
            if kind == b"H" and len(payload) == _HASH * len(self.nodes):
                out = []
                for i, node in enumerate(self.nodes):
                    live = lives.get(node.name)
                    if live is None or payload[i * _HASH:(i + 1) * _HASH] == hashlib.sha256(live).digest():
                        continue
                    kind, packed = self._answer(deadline) if self._send(b"P", i, 0, 0, 0) else (b"", b"")
                    if kind != b"P":
                        break
                    if _unpack(packed) != _unpack(live):
                        out.append((node.name, f"{node.name}: state differs from the replay of its log"))
                else:
                    return out
                payload = packed
            if kind == b"T":
                self.close()
                return [(first, f"{first}: the replay check in a child took more than {timeout:g} s; killed")]
            if kind == b"E":
                why = payload.decode(errors="replace")
            else:
                self.close()
                why = f"{_exit_text(self.status)}, no verdict"
            return [(first, f"{first}: the replay check in a child failed: {why}")]
        finally:
            self.close()

    def close(self) -> None:
        """Kill the child (if it runs), reap it, close the pipes: idempotent."""
        if self.status is None:
            self.status = self._end()

    def _send(self, kind: bytes, log: int, at: int, size: int, head: int) -> bool:
        if self.broken is None:
            try:
                os.write(self.cmd, _CMD.pack(kind, log, at, size, head))
                return True
            except OSError as exc:  # the child is gone: its verdict says how
                self.broken = f"{type(exc).__name__}: {exc}"
        return False

    def _answer(self, deadline: float) -> tuple[bytes, bytes]:
        """The child's next answer: (kind, payload); ``(b"T", b"")`` past ``deadline``,
        ``(b"", b"")`` when it closed its end without one."""
        head = self._read(_ANSWER.size, deadline)
        if head is None or len(head) < _ANSWER.size:
            return (b"T" if head is None else b""), b""
        kind, size = _ANSWER.unpack(head)
        payload = self._read(size, deadline)
        if payload is None or len(payload) < size:
            return (b"T" if payload is None else b""), b""
        return kind, payload

    def _read(self, size: int, deadline: float) -> bytes | None:
        """``size`` bytes of answer (fewer: the child closed its end), None past ``deadline``."""
        parts, got = [], 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                return None
            chunk = os.read(self.answers, min(size - got, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    # ---- the child's side

    def _child(self, commands: int, answers: int, now: float) -> int:  # pragma: no cover - in the child
        from ..debug.reader import Replay

        gc.disable()  # a collection would write to every object's page: copies of the heap
        nodes, streams, heads = self.nodes, self.streams, list(self.heads)
        packed: list[bytes] = []
        try:
            readers = [Replay(node.log, now=now, cache=False, components={stream: node.component})
                       for node, stream in zip(nodes, streams, strict=True)]
            states = [reader.fold(stream, node.component.initial_state(), 1, head, settle=False)
                      for reader, node, stream, head in zip(readers, nodes, streams, heads, strict=True)]
            while True:
                command = _read_fd(commands, _CMD.size)
                if len(command) < _CMD.size:  # the parent closed its end (or is gone)
                    return 0
                kind, i, at, size, upto = _CMD.unpack(command)
                if kind == b"B":
                    blob = b"".join(_pread_all(self.data, size, at))
                    batches = [(first, b) for first, b in msgpack.unpackb(blob)]
                    nodes[i].log.put_stored(streams[i], batches)  # type: ignore[attr-defined]
                    states[i] = readers[i].fold(streams[i], states[i], heads[i] + 1, upto, settle=False)
                    heads[i] = upto
                elif kind == b"V":
                    packed = []
                    for k, node in enumerate(nodes):  # a fold of no events settles
                        states[k] = readers[k].fold(streams[k], states[k], heads[k] + 1, heads[k])
                        packed.append(pack_form(node.component.snapshot(states[k])))
                    hashes = b"".join(hashlib.sha256(p).digest() for p in packed)
                    _write_fd(answers, _ANSWER.pack(b"H", len(hashes)) + hashes)
                elif kind == b"P":
                    _write_fd(answers, _ANSWER.pack(b"P", len(packed[i])))
                    _write_fd(answers, packed[i])
        except BaseException as exc:  # noqa: BLE001 -- any failure is the parent's violation
            text = f"{type(exc).__name__}: {exc}".encode()[:1000]
            with contextlib.suppress(OSError):
                _write_fd(answers, _ANSWER.pack(b"E", len(text)) + text)
            return 1


def _end_child(pid: int, fds: list[int]) -> int:
    """Kill and reap ``pid`` (gone already: reap it), close ``fds``; its wait status."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    try:
        status = os.waitpid(pid, 0)[1]
    except ChildProcessError:
        status = -1
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    return status


def _exit_text(status: int | None) -> str:
    """How a child ended, from its wait status."""
    if status is None or status < 0:
        return "exit status unknown"
    code = os.waitstatus_to_exitcode(status)
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _unpack(packed: bytes) -> Any:
    return msgpack.unpackb(packed, raw=False, strict_map_key=False)


def _read_fd(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd`` (fewer at its end)."""
    parts, got = [], 0
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _pread_all(fd: int, size: int, at: int) -> Iterator[bytes]:
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 24), at)
        if not chunk:
            raise EOFError(f"the data file ends at {at}")
        yield chunk
        at += len(chunk)
        size -= len(chunk)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class VirtualClock:
    """Time that moves only when the simulation says so."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    __call__ = now


@dataclass
class SimNode:
    """One simulated component instance."""

    name: str
    component: Component[Any]
    log: EventLog
    work: dict[str, WorkHandler]
    runner: Runner[Any] | None = None
    generation: int = 0
    timers: dict[str, int] = field(default_factory=dict)
    crashes: int = 0
    errors: list[ErrorReply] = field(default_factory=list)
    #: what a ``Response`` to one of its requests becomes for the component (None: dropped)
    peer_response: Callable[[Response], Any] | None = None

    @property
    def up(self) -> bool:
        return self.runner is not None and self.runner.ready


@dataclass
class Faults:
    """Network and work faults, drawn from the simulation's seeded randomness."""

    latency: tuple[float, float] = (0.001, 0.01)
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    work_latency: tuple[float, float] = (0.0, 0.0)
    #: ``(sender, receiver) -> bool``: the links drops and duplicates apply to (None: all).
    lossy: Callable[[str | None, str], bool] | None = None


class Lane:
    """Calls one owner schedules (e.g. a simulated agent's process ends and ticks), kept in
    a heap of their own with only the earliest on the simulation's heap (decision SIM14):
    that heap then holds one entry per lane instead of every pending call, and a step pops
    from a heap that many times smaller. Each call keeps the (time, sequence) that
    :meth:`Simulation.schedule` would have given it and takes one step, so the order of
    every step is the same as with :meth:`Simulation.schedule`."""

    __slots__ = ("_calls", "_posted", "_sim")

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self._calls: list[tuple[float, int, Callable[[], None]]] = []  # (when, seq, fn), a heap
        self._posted: set[int] = set()  # sequences of the calls on the simulation's heap

    def __len__(self) -> int:
        return len(self._calls)

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after ``delay`` virtual seconds, as :meth:`Simulation.schedule`."""
        sim = self._sim
        sim._seq += 1
        entry = (sim.clock.t + max(delay, 0.0), sim._seq, fn)
        calls = self._calls
        if not calls or entry < calls[0]:  # the new earliest (sequences differ): on the main heap too
            self._posted.add(entry[1])
            heapq.heappush(sim._heap, (entry[0], entry[1], "lane", (self,)))
        heapq.heappush(calls, entry)

    def take(self) -> Callable[[], None]:
        """The earliest call, whose entry is the simulation's earliest (``heap[0]``): that
        entry leaves the heap, replaced in one sift by the lane's successor unless the
        successor is on the heap already (decision SIM17)."""
        calls, heap = self._calls, self._sim._heap
        _, seq, fn = heapq.heappop(calls)
        posted = self._posted
        posted.discard(seq)
        if calls:
            when, nxt, _ = calls[0]
            if nxt not in posted:
                posted.add(nxt)
                heapq.heapreplace(heap, (when, nxt, "lane", (self,)))
                return fn
        heapq.heappop(heap)
        return fn


class Simulation:
    """Runs components' cores together in virtual time, deterministically for a seed."""

    def __init__(self, seed: int = 0, faults: Faults | None = None, start: float = 1_000_000.0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = VirtualClock(start)
        self.faults = faults or Faults()
        self.nodes: dict[str, SimNode] = {}
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        #: the messages in flight (``deliver`` entries), a heap of their own: few at a time,
        #: so a delivery does not sift the big heap of lanes and timers (decision SIM23)
        self._net: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = 0
        self._log_space = f"sim-{uuid.uuid4().hex}"  # unique per run; not drawn from the seed
        self.delivered = 0
        self.dropped = 0
        self.steps = 0
        self.step_hooks: list[Callable[[Simulation], None]] = []
        #: Plain peers (not event-sourced, e.g. simulated EEAgents): name -> handler(message, sender).
        self.peers: dict[str, Callable[[Any, str | None], None]] = {}
        self._crash_next: dict[str, bool] = {}
        #: validate trusted in-process deliveries too (as the actor shell does; slower)
        self.validate_own = False
        #: name -> (runner, its head, steps, snapshot form, its packing or None): the last
        #: one :meth:`check` made
        self._snapshots: dict[str, tuple[Runner[Any], int, int, Any, bytes | None]] = {}
        self._warm: _WarmReplay | None = None  # the replay check folding ahead (warm_replay)
        #: :meth:`check` folds the largest log of at least this many events in a forked
        #: child (None: never), which must answer within ``fork_check_timeout`` seconds
        self.fork_check_events: int | None = FORK_CHECK_EVENTS
        self.fork_check_timeout = 600.0

    # ---- set-up -----------------------------------------------------------------------------

    def add(self, name: str, component: Component[Any], work: dict[str, WorkHandler] | None = None,
            peer_response: Callable[[Response], Any] | None = None) -> SimNode:
        """Add a component under peer ``name`` with its own stream, and recover it."""
        log = open_log(f"memory://{self._log_space}-{name}")
        node = SimNode(name, component, log, dict(work or {}), peer_response=peer_response)
        self.nodes[name] = node
        self.restart(name)
        return node

    def add_peer(self, name: str, handler: Callable[[Any, str | None], None]) -> None:
        """Make ``name`` reachable: messages to it call ``handler(message, sender)``."""
        self.peers[name] = handler

    def remove_peer(self, name: str) -> None:
        """``name`` is gone: messages to it are dropped from now on."""
        self.peers.pop(name, None)

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after ``delay`` virtual seconds (one step of the simulation)."""
        self._push(self.clock.t + max(delay, 0.0), "call", (fn,))

    def lane(self) -> Lane:
        """A new :class:`Lane` of scheduled calls on this simulation."""
        return Lane(self)

    # ---- faults -----------------------------------------------------------------------------

    def crash(self, name: str) -> None:
        """Kill the component: its memory, timers and in-flight work results are gone."""
        node = self.nodes[name]
        node.runner = None
        node.generation += 1
        node.timers.clear()
        node.crashes += 1

    def crash_on_next(self, name: str, persisted: bool = True) -> None:
        """Crash ``name`` inside its next delivered message: after its events are appended
        (``persisted``) or before, and in either case before any of its effects happen."""
        self._crash_next[name] = persisted

    def disarm(self) -> None:
        """Cancel every crash armed with :meth:`crash_on_next`."""
        self._crash_next.clear()

    def restart(self, name: str) -> Decision:
        """Start the component again: a new runner recovers from its log. It takes its
        snapshots in place (decision SIM19)."""
        node = self.nodes[name]
        node.generation += 1
        runner = Runner(
            node.component, node.log, clock=self.clock, rng=random.Random(self.rng.getrandbits(64))
        )
        # snapshots in place: no stall in virtual time, none skipped by timing, no forked
        # copy of the heap making the run's writes copy-on-write faults (decision SIM19)
        runner.background_snapshots = False
        node.runner = runner
        decision = runner.recover()
        self._perform(node, decision, sender=None)
        return decision

    # ---- driving ----------------------------------------------------------------------------

    def call(self, name: str, message: Any) -> Any:
        """Deliver ``message`` to ``name`` now, as an outside client; return the reply."""
        return self.call_many(name, [message])[0]

    def call_many(self, name: str, messages: Sequence[Any], max_batch: int = MAX_BATCH) -> list[Any]:
        """Deliver ``messages`` to ``name`` now, as outside clients sending them at once;
        their replies, in order. As the actor shell drains a mailbox (decision SIM15): each
        batch of at most ``max_batch`` is decided in order, each message against the state
        the ones before it left, and appended at once
        (:meth:`~cei_actors.runtime.runner.Runner.handle_many`); then every message's effects
        happen, in order. Every message is validated (outside input); a refused one gets its
        ``ErrorReply`` and does not disturb the others."""
        node = self.nodes[name]
        replies: list[Any] = []
        size = max(max_batch, 1)
        for at in range(0, len(messages), size):
            chunk = messages[at:at + size]
            runner = node.runner
            if runner is None or not runner.ready:
                replies += [ErrorReply("unavailable", f"{name} is down", type(m).__name__) for m in chunk]
                continue
            for decision in runner.handle_many(chunk):
                self._perform(node, decision, sender=None)
                replies.append(decision.reply)
        return replies

    def tell(self, name: str, message: Any, delay: float = 0.0, sender: str | None = None,
             trusted: bool = False) -> None:
        """Send ``message`` to ``name`` after ``delay``, through the faulty network; a reply
        goes to ``sender`` (None: no reply). ``trusted``: built by the simulation's own pure
        code (e.g. a simulated agent's heartbeat from its process table), not validated."""
        self._send(name, message, sender=sender, delay=delay, trusted=trusted)

    def step(self) -> bool:
        """Process the next scheduled thing; False when nothing is left."""
        return self.run_steps(float("inf"), 1) == 1

    def next_at(self) -> float | None:
        """The virtual time of the next scheduled thing (None: nothing is left)."""
        heap, net = self._heap, self._net
        if net:
            return heap[0][0] if heap and heap[0] < net[0] else net[0][0]
        return heap[0][0] if heap else None

    def run_steps(self, t: float, max_steps: int) -> int:
        """Process scheduled things due at or before virtual time ``t``, at most
        ``max_steps`` of them, in order; returns how many. The clock stays at the last one
        processed (:meth:`run_until` moves it on to ``t``). The collector runs with
        :func:`run_gc`'s settings meanwhile."""
        with run_gc():
            return self._run_steps(t, max_steps)

    def _run_steps(self, t: float, max_steps: int) -> int:
        heap, net, clock, nodes, hooks = self._heap, self._net, self.clock, self.nodes, self.step_hooks
        pop, deliver = heapq.heappop, self._deliver
        n, before = 0, self.steps
        try:
            while n < max_steps:
                # the earlier of the two heaps' first entries: (time, sequence) order (SIM23)
                if net:
                    top = heap[0] if heap and heap[0] < net[0] else net[0]
                elif heap:
                    top = heap[0]
                else:
                    break
                when = top[0]
                if when > t:
                    break
                if when > clock.t:
                    clock.t = when
                kind, args = top[2], top[3]
                if kind == "lane":  # the lane takes its entry off the heap (SIM17)
                    args[0].take()()
                elif kind == "deliver":
                    pop(net)
                    deliver(*args)
                elif kind == "call":
                    pop(heap)
                    args[0]()
                elif kind == "timer":
                    pop(heap)
                    name, key, gen, message = args
                    node = nodes[name]
                    if node.up and node.timers.get(key) == gen:
                        del node.timers[key]
                        deliver(name, message, None, True)
                else:
                    pop(heap)
                    if kind == "work":
                        name, gen, handler, payload = args
                        node = nodes[name]
                        result = handler(payload)  # the side effect happens even if the node died meanwhile
                        if node.up and node.generation == gen and result is not None:
                            deliver(name, result, None, True)
                n += 1
                if hooks:  # a hook sees the step counted
                    self.steps = before + n
                    for hook in hooks:
                        hook(self)
        finally:
            self.steps = before + n
        return n

    def run_until(self, t: float, max_steps: int = 10_000_000) -> int:
        """Run every scheduled thing up to virtual time ``t``; returns the steps taken."""
        steps = self.run_steps(t, max_steps)
        self.clock.t = max(self.clock.t, t)
        return steps

    def run_for(self, seconds: float) -> int:
        return self.run_until(self.clock.t + seconds)

    # ---- checks -----------------------------------------------------------------------------

    def warm_replay(self) -> None:
        """Let :meth:`check`'s replays fold ahead, on the machine's second core (decision
        SIM20): the first call that finds a log of at least ``fork_check_events`` events
        forks a child folding every running node's log from offset 1 (not while a runner's
        background history job is busy: :meth:`_fork_replay`'s rule); later calls feed it
        the batches appended since. :meth:`check` then feeds it the last ones and takes its
        verdicts. Without ``os.fork`` or with ``fork_check_events`` None, nothing."""
        if self._warm is not None:
            self._warm.feed()
            return
        limit = self.fork_check_events
        if limit is None or not hasattr(os, "fork"):
            return
        nodes = [n for n in self.nodes.values() if n.runner is not None and n.runner.ready]
        if not nodes:
            return
        node = max(nodes, key=lambda n: n.runner.head)  # type: ignore[union-attr]
        if node.runner.head < limit:  # type: ignore[union-attr]
            return
        if all(n.runner.wait_history(self.fork_check_timeout) for n in nodes):  # type: ignore[union-attr]
            try:
                self._warm = _WarmReplay([node, *(n for n in nodes if n is not node)], self.clock.t)
            except OSError as exc:  # no fork now: check() forks or folds here, as without warm-up
                logger.warning("the replay check could not fork to fold ahead: %s", exc)

    def close(self) -> None:
        """End the replay check folding ahead, if any (its child killed and reaped)."""
        warm, self._warm = self._warm, None
        if warm is not None:
            warm.close()

    def check(self) -> list[str]:
        """Every component's invariant violations, plus any state that differs from its replay.

        The replay folds the whole log from offset 1 (no snapshot) as ``cei log`` does
        (:meth:`~cei_actors.debug.reader.Replay.state`: stored bodies, derived indexes built
        once at the end, decisions RS1-RS4) with the node's own component, and compares the
        snapshot forms. The live state's snapshot form is made afresh (a change made without
        an event is seen) and kept for :meth:`snapshot` until the simulation moves on.

        The largest log holding at least ``fork_check_events`` events is folded and compared
        in a forked child (:meth:`_fork_replay`, decision SIM16) while this process checks
        the others: the same comparison on the machine's second core; a child that fails,
        dies or overruns ``fork_check_timeout`` is a violation that says so. After
        :meth:`warm_replay` started, its child, folded ahead, answers for the nodes it folds
        (the others are checked here): it is fed the last batches and answers the hash of
        each snapshot form's packing, compared with the live form's (kept for the digest);
        unequal hashes compare the packed forms unpacked (decision SIM20)."""
        problems: dict[str, list[str]] = {}
        nodes = [n for n in self.nodes.values() if n.runner is not None and n.runner.ready]
        warm, self._warm = self._warm, None
        try:
            warmed = [n for n in warm.nodes if any(n is m for m in nodes)] if warm is not None else []
            if warm is not None and not warmed:
                warm.close()  # its nodes are down: nothing to compare
                warm = None
            if warm is not None:
                warm.ask()  # the child folds the last batches while this process goes on
            lives = {}
            for node in nodes:
                runner = node.runner
                assert runner is not None
                problems[node.name] = [f"{node.name}: {p}" for p in node.component.invariants(runner.state)]
                lives[node.name] = live = node.component.snapshot(runner.state)
                packed = pack_form(live) if any(node is n for n in warmed) else None
                self._snapshots[node.name] = (runner, runner.head, self.steps, live, packed)
            forked = self._fork_replay(nodes, lives) if warm is None else None
            for node in nodes:
                if forked is not None and node is forked[0] or any(node is n for n in warmed):
                    continue
                if self._replay_differs(node, lives[node.name]):
                    problems[node.name].append(f"{node.name}: state differs from the replay of its log")
            if forked is not None:
                problems[forked[0].name] += self._forked_verdict(*forked)
            if warm is not None:
                packs = {n.name: self._snapshots[n.name][4] for n in warmed}
                for name, problem in warm.verdict(packs, self.fork_check_timeout):  # type: ignore[arg-type]
                    problems[name].append(problem)
        finally:
            if warm is not None:
                warm.close()
        return [p for node in nodes for p in problems[node.name]]

    def _replay_differs(self, node: SimNode, live: Any) -> bool:
        """True when the fold of ``node``'s whole log has another snapshot form than ``live``."""
        from ..debug.reader import Replay

        runner = node.runner
        assert runner is not None
        stream = runner.stream
        reader = Replay(node.log, now=self.clock.t, cache=False, components={stream: node.component})
        rebuilt = reader.state(stream, node.log.head(stream), snapshots=False)
        return bool(node.component.snapshot(rebuilt) != live)

    def _fork_replay(self, nodes: list[SimNode], lives: dict[str, Any]) -> tuple[SimNode, int, int] | None:
        """Start the replay check of the largest log in a forked child: (node, pid, read end
        of its pipe), or None to check every log here (no ``os.fork``, every log below
        ``fork_check_events``, or a runner's background history job still busy: a child
        forked then could inherit a lock that thread holds)."""
        limit = self.fork_check_events
        if limit is None or not hasattr(os, "fork") or not nodes:
            return None
        node = max(nodes, key=lambda n: n.runner.head)  # type: ignore[union-attr]
        if node.runner.head < limit:  # type: ignore[union-attr]
            return None
        if not all(n.runner.wait_history(self.fork_check_timeout) for n in nodes):  # type: ignore[union-attr]
            return None
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one byte of verdict (or an error's text), then gone
            code = 1
            try:
                os.close(read)
                verdict = b"D" if self._replay_differs(node, lives[node.name]) else b"="
                code = 0
            except BaseException as exc:  # noqa: BLE001 -- any failure is the parent's violation
                verdict = f"E{type(exc).__name__}: {exc}".encode()[:1000]
            finally:
                try:
                    os.write(write, verdict)
                finally:
                    os._exit(code)
        os.close(write)
        return node, pid, read

    def _forked_verdict(self, node: SimNode, pid: int, read: int) -> list[str]:
        """The forked child's verdict on ``node``'s replay, as violations (empty: equal)."""
        deadline = time.monotonic() + self.fork_check_timeout
        data = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([read], [], [], left)[0]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    return [f"{node.name}: the replay check in a child took more than "
                            f"{self.fork_check_timeout:g} s; killed"]
                chunk = os.read(read, 4096)
                if not chunk:
                    break
                data += chunk
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(read)
        if data == b"=":
            return []
        if data == b"D":
            return [f"{node.name}: state differs from the replay of its log"]
        why = data[1:].decode(errors="replace") if data[:1] == b"E" else f"exit status {status}, no verdict"
        return [f"{node.name}: the replay check in a child failed: {why}"]

    def snapshot(self, name: str) -> Any:
        """The snapshot form of ``name``'s live state (None: down). The one :meth:`check`
        made is reused while the state is the same version (same runner and head, no step
        since), so a final check and the summary's digest build it once."""
        runner = self.nodes[name].runner
        if runner is None or not runner.ready:
            return None
        kept = self._kept(name, runner)
        if kept is not None:
            return kept[3]
        return self.nodes[name].component.snapshot(runner.state)

    def packed_snapshot(self, name: str) -> bytes:
        """:func:`pack_form` of :meth:`snapshot`, the packing :meth:`check` made reused as
        the form is (SIM20)."""
        runner = self.nodes[name].runner
        if runner is not None and runner.ready:
            kept = self._snapshots.get(name)
            if kept is not None and kept[4] is not None and self._kept(name, runner) is not None:
                return kept[4]
        return pack_form(self.snapshot(name))

    def _kept(self, name: str, runner: Runner[Any]) -> tuple[Runner[Any], int, int, Any, bytes | None] | None:
        """The snapshot form :meth:`check` made of ``name`` if still current; taken (used once)."""
        kept = self._snapshots.pop(name, None)
        if kept is not None and kept[0] is runner and kept[1] == runner.head and kept[2] == self.steps:
            return kept
        return None

    def state(self, name: str) -> Any:
        runner = self.nodes[name].runner
        return None if runner is None else runner.state

    # ---- internals --------------------------------------------------------------------------

    def _push(self, when: float, kind: str, args: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._net if kind == "deliver" else self._heap, (when, self._seq, kind, args))

    def _latency(self) -> float:
        lo, hi = self.faults.latency
        return lo if hi <= lo else self.rng.uniform(lo, hi)

    def _deliver(self, name: str, message: Any, sender: str | None, trusted: bool = False) -> None:
        node = self.nodes.get(name)
        if node is None:
            peer = self.peers.get(name)
            if peer is not None:
                self.delivered += 1
                peer(message, sender)
            else:
                self.dropped += 1
            return
        runner = node.runner
        if runner is None or not runner.ready:
            self.dropped += 1
            return
        cls = type(message)
        kind = _KINDS.get(cls)
        if kind is None:
            kind = _KINDS[cls] = _kind(message)
        rid = None
        if kind:  # not a plain message: as the actor shell takes each (R3)
            if kind == _RESPONSE:
                made = node.peer_response(message) if node.peer_response is not None else None
                if made is None:
                    return
                message, sender = made, None
                kind = _kind(message)
            if kind == _REPLY:
                if isinstance(message, ErrorReply):
                    node.errors.append(message)
                return
            if kind == _REQUEST:
                rid, message = message.rid, message.message
        self.delivered += 1
        trusted = trusted and not self.validate_own
        if name in self._crash_next:
            if self._crash_next.pop(name):
                node.runner.handle(message, trusted)  # type: ignore[union-attr]
            self.crash(name)
            return
        decision = runner.handle(message, trusted)
        self._perform(node, decision, sender, rid)

    def _perform(self, node: SimNode, decision: Decision, sender: str | None, rid: str | None = None) -> None:
        if sender is not None and decision.reply is not None:
            reply = decision.reply if rid is None else Response(rid, decision.reply)
            if rid != "":
                self._send(sender, reply, sender=node.name, trusted=True)
        for effect in decision.effects:
            if isinstance(effect, Send):
                self._send(effect.to, effect.message, sender=node.name, trusted=True)
            elif isinstance(effect, SetTimer):
                self._seq += 1
                gen = self._seq  # unique, so a timer of an earlier incarnation never matches
                node.timers[effect.key] = gen
                self._push(self.clock.t + max(effect.delay, 0.0), "timer", (node.name, effect.key, gen, effect.message))
            elif isinstance(effect, Work):
                handler = node.work.get(effect.kind)
                if handler is None:
                    logger.warning("%s: no work handler for %r", node.name, effect.kind)
                    continue
                lo, hi = self.faults.work_latency
                delay = lo if hi <= lo else self.rng.uniform(lo, hi)
                self._push(self.clock.t + delay, "work", (node.name, node.generation, handler, effect.payload))

    def _send(self, to: str, message: Any, sender: str | None = None, delay: float = 0.0,
              trusted: bool = False) -> None:
        f = self.faults
        lossy = f.lossy is None or f.lossy(sender, to)
        if lossy and f.drop_rate and self.rng.random() < f.drop_rate:
            self.dropped += 1
            return
        lo, hi = f.latency  # _latency and _push, inline: one send per delivery
        # rng.uniform(lo, hi), inline: the same float (SIM21)
        when = self.clock.t + delay + (lo if hi <= lo else lo + (hi - lo) * self.rng.random())
        self._seq += 1
        heapq.heappush(self._net, (when, self._seq, "deliver", (to, message, sender, trusted)))
        if lossy and f.duplicate_rate and self.rng.random() < f.duplicate_rate:
            self._push(self.clock.t + delay + self._latency(), "deliver", (to, message, sender, trusted))
