"""Hot standbys in the runner: ``follow`` keeps a state current without writing, ``recover``
takes over from it; then the shell in real processes on SQLite and ZooKeeper."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thespian.actors import ActorExitRequest
from waiting import wait_for

from cei_actors.eventlog import Fenced, open_log
from cei_actors.runtime.client import BadRequest, ServiceClient
from cei_actors.runtime.control import Request, Response, Start, Status, Stop
from cei_actors.runtime.core import Decision, SetTimer
from cei_actors.runtime.example import Add, Counters, Dump, Tick
from cei_actors.runtime.messages import Ok
from cei_actors.runtime.runner import Runner, replay
from cei_actors.runtime.system import start_actor

ACTOR = "cei_actors.runtime.example_actor.ExampleActor"


def runner(log, **kw) -> Runner:
    return Runner(Counters(), log, clock=lambda: 100.0, rng=random.Random(1), **kw)


def snap(state):
    return Counters().snapshot(state)


ops = st.lists(
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(-3, 5)), min_size=1, max_size=4),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@settings(max_examples=25, deadline=None)
@given(batches=ops, every=st.integers(1, 6), tail_fed=st.booleans())
def test_a_standby_equals_the_leader_after_every_append(tmp_path_factory, backend, batches, every, tail_fed):
    url = (f"memory://{uuid.uuid4().hex}" if backend == "memory"
           else f"sqlite:///{tmp_path_factory.mktemp('log')}/log.db")
    with open_log(url) as log, open_log(url) as other:
        leader = runner(log, snapshot_every=every)
        leader.recover()
        standby = runner(other, snapshot_every=every)
        standby.follow()
        for batch in batches:
            leader.handle_many([Add(name, amount) for name, amount in batch])
            records = other.tail("example", standby.followed_head, 0) if tail_fed else None
            standby.follow(records)
            assert standby.followed_head == leader.head
            assert snap(standby.followed_state) == snap(leader.state)
        assert other.epoch("example") == 1  # following never acquires
        standby.recover()  # takes over
        assert standby.head == leader.head and snap(standby.state) == snap(leader.state)
        assert snap(standby.state) == snap(replay(Counters(), other, "example"))
        assert not standby.following
        with pytest.raises(Fenced):
            leader.handle(Add("a", 1))


def test_takeover_reads_only_the_records_after_the_followed_head():
    url = f"memory://{uuid.uuid4().hex}"
    with open_log(url) as log, open_log(url) as other:
        leader = runner(log, snapshot_every=5)
        leader.recover()
        for i in range(12):
            leader.handle(Add(f"c{i}", 1))
        standby = runner(other)
        assert standby.follow() == 12  # loaded: snapshot at 10 plus 2 records
        leader.handle(Add("late", 7))  # appended after the last follow
        read_from = []
        real_read = other.read

        def read(stream, start=1, stop=None):
            read_from.append(start)
            return real_read(stream, start, stop)

        other.read = read
        other.load_snapshot = lambda stream: pytest.fail("a hot takeover loads no snapshot")
        standby.recover()
        assert read_from and min(read_from) == 13  # the one record after the followed 12
        assert standby.head == 13 and standby.state.counters["late"] == 7
        assert standby.handle(Add("late", 1)).reply == Ok(8)


def test_a_standby_runs_recovered_once_at_takeover_and_never_writes():
    calls = []

    class Recorded(Counters):
        def recovered(self, state, ctx):
            calls.append(dict(state.counters))
            return Decision(effects=[SetTimer("tick", 1.0, Tick())])

    url = f"memory://{uuid.uuid4().hex}"
    with open_log(url) as log, open_log(url) as other:
        leader = Runner(Recorded(), log)
        leader.recover()
        leader.handle(Add("x", 2))
        standby = Runner(Recorded(), other)
        standby.follow()
        leader.handle(Add("x", 3))
        standby.follow()
        assert calls == [{}]  # only the leader's own recovery so far
        assert other.head("example") == 2 and other.epoch("example") == 1
        decision = standby.recover()
        assert calls == [{}, {"x": 5}]
        assert decision.effects == [SetTimer("tick", 1.0, Tick())]


def test_follow_is_refused_while_leading_and_a_gap_reads_the_log():
    url = f"memory://{uuid.uuid4().hex}"
    with open_log(url) as log, open_log(url) as other:
        leader = runner(log)
        leader.recover()
        with pytest.raises(RuntimeError, match="leading"):
            leader.follow()
        standby = runner(other)
        standby.follow()
        leader.handle(Add("a", 1))
        first = other.tail("example", 0, 0)
        leader.handle(Add("a", 2))
        leader.handle(Add("a", 3))
        later = other.tail("example", 2, 0)  # misses offset 2: the standby reads the log
        assert standby.follow(later) == 3
        assert standby.follow(first) == 0  # old records are skipped
        assert standby.followed_state.counters == {"a": 6}


def test_an_unusable_followed_state_is_rebuilt_from_the_log():
    url = f"memory://{uuid.uuid4().hex}"
    with open_log(url) as log, open_log(url) as other:
        leader = runner(log)
        leader.recover()
        leader.handle(Add("a", 1))
        standby = runner(other)
        standby.follow()
        standby._followed = (standby.followed_state, 99)  # ahead of the log: cannot be right
        standby.recover()
        assert standby.head == 1 and standby.state.counters == {"a": 1}


# ---- real processes: a leader and a hot standby on the TCP base ------------------------------


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _dead(pid), timeout=10, what=f"pid {pid} to die")


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _standby_follows_then_serves(asys, url: str) -> None:
    a = start_actor(asys, ACTOR, Start(url, snapshot_every=4))
    b = start_actor(asys, ACTOR, Start(url, snapshot_every=4), wait=False)
    ca, cb = ServiceClient(asys, a, timeout=20), ServiceClient(asys, b, timeout=30)
    try:
        expected: dict[str, int] = {}
        for i in range(12):
            name = f"k{i % 5}"
            assert ca.call(Add(name, i)) == expected.get(name, 0) + i
            expected[name] = expected.get(name, 0) + i
            head = ca.call(Status())["head"]
            status = wait_for(lambda h=head: (s := cb.call(Status()))["head"] == h and s,
                              what="the standby to follow")
            assert status["mode"] == "standby" and not status["leader"] and status["epoch"] == 0
            assert cb.call(Status(state=True))["state"] == ca.call(Status(state=True))["state"]
        with asys.private() as ctx:
            ctx.tell(b, Request("held", Add("k0", 100)))  # held by the standby, never answered by it
            assert ctx.listen(0.3) is None
            kill9(ca.call(Status())["pid"])
            reply = ctx.listen(30)
        assert reply == Response("held", Ok(expected["k0"] + 100))
        expected["k0"] += 100
        status = cb.call(Status())
        assert status["leader"] and status["mode"] == "ready" and status["epoch"] == 2
        assert status["head"] == 13  # nothing lost, nothing doubled
        assert cb.call(Dump())["counters"] == expected
        cb.call(Stop())
    finally:
        ca.close()
        cb.close()
    with open_log(url) as log:
        assert log.head("example") == 13
        assert replay(Counters(), log, "example").counters == expected


def test_a_hot_standby_process_follows_and_takes_over_after_kill9_on_sqlite(tcp_system, tmp_path):
    _standby_follows_then_serves(tcp_system, f"sqlite:///{tmp_path}/log.db")


def test_a_hot_standby_process_follows_and_takes_over_after_kill9_on_zookeeper(tcp_system, zk_hosts):
    _standby_follows_then_serves(tcp_system, f"zk://{zk_hosts}?session_timeout=2")


def test_a_cold_standby_waits_without_a_state_and_still_takes_over(tcp_system, tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    start = Start(url, config={"standby": "cold"})
    a = start_actor(tcp_system, ACTOR, start)
    b = start_actor(tcp_system, ACTOR, start, wait=False)
    with ServiceClient(tcp_system, a) as ca, ServiceClient(tcp_system, b, timeout=30) as cb:
        assert ca.call(Add("c", 3)) == 3
        status = cb.call(Status(state=True))
        assert status["mode"] == "recovering" and status["standby"] == "cold"
        assert status["head"] == 0 and status["state"] is None
        kill9(ca.call(Status())["pid"])
        assert cb.call(Add("c", 1)) == 4
        cb.call(Stop())


def test_a_bad_standby_setting_is_refused(tcp_system, tmp_path):
    address = tcp_system.createActor(ACTOR)
    with ServiceClient(tcp_system, address) as client:
        with pytest.raises(BadRequest, match="standby: expected hot or cold"):
            client.call(Start(f"sqlite:///{tmp_path}/log.db", config={"standby": "warm"}))
        assert client.call(Status())["mode"] == "idle"  # nothing changed: it may start again
    tcp_system.tell(address, ActorExitRequest())


def test_an_idle_sqlite_follower_lists_the_stream_only_when_something_was_appended(tmp_path):
    """A standby tails all the time: waiting must not list every batch of the stream every
    20 ms (on a long history of small batches that cost a whole core)."""
    url = f"sqlite:///{tmp_path}/log.db"
    with open_log(url) as log, open_log(url) as follower:
        leader = runner(log)
        leader.recover()
        for i in range(50):
            leader.handle(Add(f"c{i}", 1))
        listings = []
        real = follower._index
        follower._index = lambda stream: listings.append(stream) or real(stream)
        assert follower.tail("example", 50, timeout=0.5) == []
        assert len(listings) <= 2  # the read before the wait and the one after it
        listings.clear()
        timer = threading.Timer(0.2, lambda: leader.handle(Add("late", 1)))
        timer.start()
        t0 = time.monotonic()
        got = follower.tail("example", 50, timeout=10)
        timer.join()
        assert [r.offset for r in got] == [51] and time.monotonic() - t0 < 5
        assert len(listings) <= 3
