"""The thespian shell: serving, containment, timers, work, holding, crash recovery, loopback.

Most behaviour runs on both bases (``simpleSystemBase`` in process, ``multiprocTCPBase`` with
one OS process per actor). The TCP system is shared by this module and shut down at the end;
each test makes its own actors on its own log.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import pkgutil
import signal
import subprocess
import sys
import time
import types
import typing
import uuid
from pathlib import Path

import pytest
from thespian.actors import Actor, ActorAddress, ActorExitRequest
from waiting import wait_for

import cei_actors
from cei_actors.eventlog import LogUnavailable, open_log
from cei_actors.runtime import demo
from cei_actors.runtime.client import (
    BadRequest,
    InternalError,
    NotFound,
    ServiceClient,
    Unavailable,
)
from cei_actors.runtime.control import (
    Hello,
    PeerAddress,
    Request,
    Response,
    SetPeers,
    Start,
    Started,
    Status,
    Stop,
)
from cei_actors.runtime.example import Add, Counters, Dump, Get
from cei_actors.runtime.example_actor import (
    AddLater,
    Crash,
    Echo,
    Echoed,
    ExampleActor,
    FailingWork,
)
from cei_actors.runtime.leadership import FileLockLeadership
from cei_actors.runtime.messages import ErrorReply, Message, Ok
from cei_actors.runtime.runner import replay
from cei_actors.runtime.shell import EventSourcedActor
from cei_actors.runtime.system import (
    SIMPLE_BASE,
    TCP_BASE,
    lookup,
    shutdown_system,
    start_actor,
    start_system,
)
from cei_actors.testing.zkserver import listening_sockets

ACTOR = "cei_actors.runtime.example_actor.ExampleActor"


# ---- process helpers (Linux /proc) -------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def session_members(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and int(st[3]) == sid and st[0] not in ("Z", "X"):
                out.append(int(name))
    return out


def pid_listening_on(port: int) -> int:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if ("127.0.0.1", port) in listening_sockets(int(name)):
                    return int(name)
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
    raise AssertionError(f"nobody listens on 127.0.0.1:{port}")


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcp_system():
    asys = start_system(TCP_BASE)
    admin = pid_listening_on(asys.cei_admin_port)
    sid = int(_stat(admin)[3])
    try:
        yield asys
    finally:
        shutdown_system(asys)
        wait_for(lambda: not session_members(sid), timeout=15, what="the TCP system's processes to exit")


@pytest.fixture
def simple_system():
    asys = start_system(SIMPLE_BASE)
    try:
        yield asys
    finally:
        shutdown_system(asys)


@pytest.fixture(params=[SIMPLE_BASE, TCP_BASE])
def system(request):
    if request.param == SIMPLE_BASE:
        return request.getfixturevalue("simple_system")
    return request.getfixturevalue("tcp_system")


@pytest.fixture
def started(system, tmp_path):
    """An ExampleActor on a fresh SQLite log; stopped after the test."""
    url = f"sqlite:///{tmp_path}/log.db"
    address = start_actor(system, ACTOR, Start(url), timeout=20)
    client = ServiceClient(system, address, timeout=10)
    try:
        yield system, address, client, url
    finally:
        try:
            client.call(Stop(), timeout=5)
        except Exception:
            system.tell(address, ActorExitRequest())
        client.close()


def is_tcp(asys) -> bool:
    return getattr(asys, "cei_base", "") == TCP_BASE


# ---- serving -----------------------------------------------------------------------------


def test_requests_get_replies(started):
    _, _, client, url = started
    assert client.call(Add("a", 2)) == 2
    assert client.call(Add("a", 3)) == 5
    assert client.call(Get("a")) == 5
    status = client.call(Status())
    assert status["ready"] and status["leader"] and status["mode"] == "ready"
    assert status["stream"] == "example" and status["epoch"] == 1 and status["head"] == 2


def test_bad_messages_get_error_replies_and_the_actor_keeps_serving(started):
    asys, address, client, _ = started
    client.call(Add("a", 1))
    with pytest.raises(BadRequest, match="below zero"):
        client.call(Add("a", -5))
    with pytest.raises(NotFound):
        client.call(Get("nope"))
    with pytest.raises(BadRequest, match="Add.amount: expected int"):
        client.call(Add("a", "7"))
    with pytest.raises(BadRequest, match="not a message"):
        client.call({"not": "a message"})
    with pytest.raises(BadRequest, match="unknown message"):
        client.call(Message())
    # a bare (unwrapped) ask gets a bare reply
    reply = asys.ask(address, Add("", 1), 10)
    assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
    assert client.call(Add("a", 1)) == 2


def test_a_raising_core_and_failing_work_are_contained(started):
    _, _, client, _ = started
    with pytest.raises(InternalError, match="crashed on purpose"):
        client.call(Crash())
    assert client.call(FailingWork()) == "queued"
    assert client.call(Add("x", 1)) == 1
    time.sleep(0.05)
    assert client.call(Add("x", 1)) == 2
    assert client.call(Status())["ready"]


def test_timers_fire(system, tmp_path):
    address = start_actor(system, ACTOR, Start(f"sqlite:///{tmp_path}/log.db", config={"tick": 0.05}))
    with ServiceClient(system, address) as client:
        wait_for(lambda: client.call(Dump())["ticks"] >= 3, timeout=10, what="ticks")
        client.call(Stop())


def test_work_results_come_back(started):
    _, _, client, _ = started
    assert client.call(AddLater("w", 4)) == "queued"
    assert client.call(AddLater("w", 5)) == "queued"
    wait_for(lambda: client.call(Dump())["counters"].get("w") == 9, timeout=10, what="work results")
    assert client.call(Status())["work"] == 0


def test_hello_records_a_peer_and_sends_reach_it(started):
    asys, address, client, _ = started
    with asys.private() if is_tcp(asys) else _same(asys) as ctx:
        assert ctx.ask(address, Hello("watcher"), 10) == Ok("watcher")
        got = [ctx.ask(address, Echo("watcher", "hi"), 10)]
        got.append(ctx.listen(10))
    assert Echoed("hi") in got and Ok(None) in got
    assert "watcher" in client.call(Status())["peers"]
    known = client.call(PeerAddress("watcher"))  # the address it greeted from, for a client
    assert isinstance(known, ActorAddress)
    with pytest.raises(NotFound, match="no peer named 'nobody'"):
        client.call(PeerAddress("nobody"))
    with pytest.raises(BadRequest):
        client.call(PeerAddress(""))
    # an unknown peer: the send is dropped (logged), the request still succeeds
    assert client.call(Echo("nobody", "hi")) is None
    assert client.call(SetPeers({"watcher": None})) == []
    with pytest.raises(NotFound):
        client.call(PeerAddress("watcher"))


class _Greeted(Actor):
    """Records the ``Hello`` it gets; ``"got"`` answers them."""

    def __init__(self):
        super().__init__()
        self.hellos = []

    def receiveMessage(self, msg, sender):  # noqa: N802
        if isinstance(msg, Hello):
            self.hellos.append(msg.name)
        elif msg == "got":
            self.send(sender, list(self.hellos))


def test_set_peers_replicas_are_greeted_by_a_leader(started):
    """Replicas of a peer on another system, handed over by SetPeers, hear the leader at once
    (and are greeted again whenever this actor leads)."""
    asys, _, client, _ = started
    other = asys.createActor(_Greeted)
    assert client.call(SetPeers({}, replicas={"watcher": [other]})) == []
    assert wait_for(lambda: asys.ask(other, "got", 5), timeout=10) == ["example"]
    assert "watcher" not in client.call(Status())["peers"]  # replicas are not the peer itself
    with pytest.raises(BadRequest, match="SetPeers.replicas"):
        client.call(SetPeers({}, replicas={"watcher": "not a list"}))


class _same:
    def __init__(self, asys):
        self.asys = asys

    def __enter__(self):
        return self.asys

    def __exit__(self, *exc):
        return None


def test_start_twice_is_a_conflict_and_bad_start_is_refused(started, tmp_path):
    asys, _, client, url = started
    from cei_actors.runtime.client import Conflict

    with pytest.raises(Conflict):
        client.call(Start(url))
    other = asys.createActor(ACTOR)
    with ServiceClient(asys, other, timeout=10) as c2:
        with pytest.raises(BadRequest, match="log_url"):
            c2.call(Start("nowhere"))
        with pytest.raises(BadRequest, match="unknown scheme"):
            c2.call(Start("ftp://x/y"))
        with pytest.raises(BadRequest, match="Start.replicas"):
            c2.call(Start(url, replicas={"pd": "not a list"}))
        c2.call(Stop())


class _Burst(Actor):
    def receiveMessage(self, msg, sender):  # noqa: N802
        if isinstance(msg, tuple):
            target, messages = msg
            for m in messages:
                self.send(target, m)


def test_an_actor_raises_its_process_gc_threshold(simple_system, tmp_path):
    import gc

    saved = gc.get_threshold()
    gc.set_threshold(700, *saved[1:])
    try:
        address = start_actor(simple_system, ACTOR, Start(f"sqlite:///{tmp_path}/log.db"))
        assert gc.get_threshold()[0] == EventSourcedActor.gc_young_threshold
        assert gc.get_threshold()[1:] == saved[1:]
        simple_system.tell(address, ActorExitRequest())
    finally:
        gc.set_threshold(*saved)


def test_group_commit_shares_one_append(simple_system):
    """Messages queued together (here: a burst sent by another actor) share one append."""
    url = f"memory://{uuid.uuid4().hex}"
    address = start_actor(simple_system, ACTOR, Start(url))
    burst = simple_system.createActor(_Burst)
    simple_system.tell(burst, (address, [Add(f"c{i % 3}", 1) for i in range(60)]))
    with ServiceClient(simple_system, address) as client:
        assert client.call(Dump())["counters"] == {"c0": 20, "c1": 20, "c2": 20}
        stats = client.call(Status())["stats"]
        client.call(Stop())
    assert stats["appends"] == 1 and stats["messages"] >= 61


# ---- holding during recovery -------------------------------------------------------------


def test_messages_held_until_recovery_are_served_in_order(system, tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    lock = FileLockLeadership(f"{tmp_path}/log.db.example.lock")
    assert lock.try_acquire()  # the test holds the stream's lock: the actor must wait
    address = start_actor(system, ACTOR, Start(url), wait=False)
    with system.private() if is_tcp(system) else _same(system) as ctx:
        rids = [uuid.uuid4().hex for _ in range(4)]
        for rid, amount in zip(rids, [1, 2, 3, 4], strict=True):
            ctx.tell(address, Request(rid, Add("h", amount)))
        status = ctx.ask(address, Request("s", Status()), 10)
        assert status.reply.value["mode"] == "standby" and status.reply.value["held"] == 4
        lock.release()
        replies = []
        while len(replies) < 4:
            msg = ctx.listen(10)
            assert msg is not None, "held requests were not answered after recovery"
            if isinstance(msg, Response):
                replies.append(msg)
        assert [r.rid for r in replies] == rids
        assert [r.reply for r in replies] == [Ok(1), Ok(3), Ok(6), Ok(10)]
        ctx.tell(address, Stop())
    lock.close()


def test_a_standby_that_won_and_stopped_at_once_closes_its_log_after_its_follower_left_it(simple_system, tmp_path):
    """RT7: winning stops the hot standby's follower without waiting (it may be inside a
    one-second tail of the log); a Stop right after must wait for it before closing the log:
    closing a SQLite connection another thread reads with crashed the process (seen once,
    in the test above under load)."""
    import threading

    url = f"sqlite:///{tmp_path}/log.db"
    lock = FileLockLeadership(f"{tmp_path}/log.db.example.lock")
    assert lock.try_acquire()
    address = start_actor(simple_system, ACTOR, Start(url), wait=False)
    followers = lambda: [t for t in threading.enumerate() if t.name == "follow-example" and t.is_alive()]  # noqa: E731
    assert simple_system.ask(address, Request("s", Status()), 10).reply.value["mode"] == "standby"
    assert followers()  # a hot standby follows the log
    lock.release()
    assert simple_system.ask(address, Request("a", Add("h", 1)), 10).reply == Ok(1)  # it won and leads
    simple_system.tell(address, Stop())
    assert followers() == []  # joined before the log was closed
    lock.close()


# ---- fencing -----------------------------------------------------------------------------


def test_a_fenced_actor_stops_serving(simple_system):
    """Two 'always' leaders on one stream: the newer fences the older in storage."""
    url = f"memory://{uuid.uuid4().hex}"
    old = start_actor(simple_system, ACTOR, Start(url, leadership="always"))
    with ServiceClient(simple_system, old) as c_old:
        assert c_old.call(Add("a", 1)) == 1
        new = start_actor(simple_system, ACTOR, Start(url, leadership="always"))
        with ServiceClient(simple_system, new) as c_new:
            with pytest.raises(Unavailable, match="Fenced"):
                c_old.call(Add("a", 1))
            with pytest.raises(Unavailable):
                c_old.call(Get("a"))
            assert c_new.call(Add("a", 1)) == 2
            assert c_new.call(Status())["epoch"] == 2
            time.sleep(0.3)  # the fenced 'always' leader does not contend again
            assert c_old.call(Status())["mode"] == "down"
            assert c_new.call(Add("a", 1)) == 3
            c_new.call(Stop())
        c_old.call(Stop())


def test_a_log_failure_makes_the_actor_step_down_and_recover(simple_system):
    url = f"memory://{uuid.uuid4().hex}"
    address = start_actor(simple_system, ACTOR, Start(url))
    actor = simple_system._systemBase.actorRegistry[address.actorAddressString].instance
    log = actor._runner.log
    real_append = log.append
    failures = [LogUnavailable("the disk went away (test)")]

    def flaky_append(*args):
        if failures:
            raise failures.pop()
        return real_append(*args)

    log.append = flaky_append
    with ServiceClient(simple_system, address) as client:
        with pytest.raises(Unavailable, match="disk went away"):
            client.call(Add("a", 1))
        wait_for(lambda: client.call(Status())["ready"], timeout=10, what="recovery")
        assert client.call(Status())["epoch"] == 2
        assert client.call(Add("a", 1)) == 1  # the failed request left nothing behind
        client.call(Stop())


def test_exit_request_releases_the_log_lock(simple_system, tmp_path):
    address = start_actor(simple_system, ACTOR, Start(f"sqlite:///{tmp_path}/log.db"))
    lock = FileLockLeadership(f"{tmp_path}/log.db.example.lock")
    assert not lock.try_acquire()
    simple_system.tell(address, ActorExitRequest())
    assert lock.try_acquire()
    lock.close()


# ---- crashes and takeover on the TCP base -------------------------------------------------


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), timeout=10, what=f"pid {pid} to die")


def test_kill9_then_a_new_actor_replays_the_same_state(tcp_system, tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    first = start_actor(tcp_system, ACTOR, Start(url, snapshot_every=7), global_name="kill9-example")
    with ServiceClient(tcp_system, first) as client:
        for i in range(20):
            client.call(Add(f"c{i % 4}", i))
        before = client.call(Dump())
        pid = client.call(Status())["pid"]
    assert pid != os.getpid()
    kill9(pid)
    # the admin notices the death and forgets the global name
    wait_for(lambda: lookup(tcp_system, "kill9-example") is None, timeout=10, what="the name to be freed")
    second = start_actor(tcp_system, ACTOR, Start(url, snapshot_every=7), global_name="kill9-example")
    with ServiceClient(tcp_system, second) as client:
        assert client.call(Dump()) == before
        status = client.call(Status())
        assert status["pid"] != pid and status["epoch"] == 2 and status["head"] == 20
        client.call(Stop())
    with open_log(url) as log:
        state = replay(Counters(), log, "example")
    assert {"counters": state.counters, "ticks": state.ticks} == before


def test_standby_takes_over_when_the_leader_dies_and_a_paused_leader_is_fenced(tcp_system, tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    a = start_actor(tcp_system, ACTOR, Start(url))
    b = start_actor(tcp_system, ACTOR, Start(url), wait=False)
    ca, cb = ServiceClient(tcp_system, a), ServiceClient(tcp_system, b, timeout=15)
    try:
        assert ca.call(Add("x", 1)) == 1
        sb = cb.call(Status())
        assert sb["mode"] == "standby" and not sb["leader"]
        with tcp_system.private() as ctx:
            ctx.tell(b, Request("held", Add("x", 10)))  # held by the standby
            kill9(ca.call(Status())["pid"])
            reply = ctx.listen(15)
        assert reply == Response("held", Ok(11))
        sb = cb.call(Status())
        assert sb["leader"] and sb["epoch"] == 2

        # Pause b and break its lock (as an operator might by deleting the lock file); c
        # takes over. Resumed, b still believes it leads: the epoch in the log fences it.
        c = start_actor(tcp_system, ACTOR, Start(url), wait=False)
        cc = ServiceClient(tcp_system, c, timeout=15)
        pid_b = sb["pid"]
        os.kill(pid_b, signal.SIGSTOP)
        try:
            os.unlink(f"{tmp_path}/log.db.example.lock")
            wait_for(lambda: cc.call(Status())["ready"], timeout=15, what="c to lead")
            assert cc.call(Add("x", 100)) == 111
        finally:
            os.kill(pid_b, signal.SIGCONT)
        with pytest.raises(Unavailable, match="Fenced"):
            cb.call(Add("x", 1000))
        with pytest.raises(Unavailable):
            cb.call(Get("x"))
        assert cc.call(Get("x")) == 111
        assert cc.call(Status())["epoch"] == 3
        time.sleep(0.5)  # b contends again, on the new lock file, and stays a standby
        assert not cb.call(Status())["leader"]
        assert cc.call(Add("x", 1)) == 112
        cc.call(Stop())
        cc.close()
        cb.call(Stop())
    finally:
        ca.close()
        cb.close()
    with open_log(url) as log:
        assert replay(Counters(), log, "example").counters == {"x": 112}


# ---- messages cross process boundaries -----------------------------------------------------


def _sample(hint, name):
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is object:
        return None
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args:
            return None
        return _sample(args[0], name)
    if origin is typing.Literal:
        return typing.get_args(hint)[0]
    if hint is str:
        return f"{name}-1"
    if hint is bool:
        return True
    if hint is int:
        return 1
    if hint is float:
        return 1.5
    if origin in (list, set, frozenset, tuple) or hint in (list, set, frozenset, tuple):
        return (origin or hint)()
    if origin is dict or hint is dict:
        return {}
    if isinstance(hint, type) and issubclass(hint, Message):
        return _instance(hint)
    raise TypeError(f"no sample for {hint!r}")


def _instance(cls):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        kwargs[f.name] = _sample(hints[f.name], f.name)
    return cls(**kwargs)


def _message_classes() -> list[type]:
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(cei_actors.__path__, "cei_actors."):
        if info.name.startswith("cei_actors.testing") or info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Message)
                and dataclasses.is_dataclass(value)
                and value.__module__ == module.__name__
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[k] for k in sorted(found)] + [Message]


def test_every_message_type_pickles_and_crosses_a_process_boundary(tmp_path):
    classes = _message_classes()
    names = {c.__name__ for c in classes}
    assert {"Start", "Started", "Hello", "SetPeers", "Status", "Stop", "Request", "Response",
            "Ok", "ErrorReply", "Add", "AddLater", "Echoed"} <= names
    samples = []
    for cls in classes:
        msg = _instance(cls)
        again = pickle.loads(pickle.dumps(msg))
        assert again == msg and type(again) is cls
        samples.append(msg)
    samples.append(Request("r", Add("a", 1)))
    samples.append(Response("r", ErrorReply("bad_request", "no", "Add")))
    blob = tmp_path / "messages.pickle"
    blob.write_bytes(pickle.dumps(samples))
    code = (
        "import pickle, sys; msgs = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "sys.stdout.buffer.write(pickle.dumps(msgs))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert pickle.loads(out.stdout) == samples  # unpickled and pickled again in another process


# ---- loopback only ----------------------------------------------------------------------------


def test_every_listening_socket_of_the_tcp_base_is_on_loopback(tcp_system, tmp_path):
    address = start_actor(tcp_system, ACTOR, Start(f"sqlite:///{tmp_path}/log.db"))
    with ServiceClient(tcp_system, address) as client:  # opens a private endpoint too
        actor_pid = client.call(Status())["pid"]
        admin = pid_listening_on(tcp_system.cei_admin_port)
        sid = int(_stat(admin)[3])
        pids = set(session_members(sid)) | {os.getpid()}
        assert actor_pid in pids and admin in pids
        sockets = {pid: listening_sockets(pid) for pid in pids}
        assert ("127.0.0.1", tcp_system.cei_admin_port) in sockets[admin]
        assert len(sockets[actor_pid]) >= 1
        bad = {pid: [s for s in socks if s[0] != "127.0.0.1"] for pid, socks in sockets.items()}
        assert not any(bad.values()), f"listening off loopback: {bad}"
        try:
            ss = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=10).stdout
        except FileNotFoundError:
            ss = ""
        for line in ss.splitlines():
            if any(f"pid={pid}," in line for pid in pids):
                assert line.split()[3].startswith("127.0.0.1:"), line
        client.call(Stop())


# ---- the demo ----------------------------------------------------------------------------------


def test_foundation_demo_runs(tmp_path, capsys):
    assert demo.main(Path(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "equal by replay" in out


def test_started_reply_and_lookup(simple_system, tmp_path):
    address = simple_system.createActor(ExampleActor, globalName="ex")
    assert lookup(simple_system, "ex") == address
    assert lookup(simple_system, "missing") is None
    reply = simple_system.ask(address, Start(f"memory://{uuid.uuid4().hex}"), 10)
    assert reply == Started("example", 1, 0)
    simple_system.ask(address, Stop(), 10)


def test_attach_starts_no_admin_where_none_answers():
    """A port held by something that never answers (as a killed admin's logger holds its
    socket) is no system: attach_system says so, and starts no admin of its own even when the
    port comes free while thespian retries."""
    import socket
    import threading

    from cei_actors.runtime.system import SystemNotRunning, attach_system

    def children() -> set[int]:
        out = set()
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat", "rb") as f:
                        if int(f.read().rsplit(b")", 1)[1].split()[1]) == os.getpid():
                            out.add(int(entry.name))
                except (OSError, IndexError, ValueError):
                    pass
        return out

    before = children()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    port = holder.getsockname()[1]
    threading.Timer(1.0, holder.close).start()  # the "logger" exits while thespian retries
    with pytest.raises(SystemNotRunning):
        attach_system(port)
    time.sleep(0.5)
    assert children() - before == set(), "attach started a process"
    with socket.socket() as probe:  # and nothing listens there now
        assert probe.connect_ex(("127.0.0.1", port)) != 0
