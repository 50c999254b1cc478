"""Hot standbys in the runner: ``follow`` keeps a state current without writing, ``recover``
takes over from it (the shell and real processes: tests/test_runtime_shell.py)."""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cei_actors.eventlog import Fenced, open_log
from cei_actors.runtime.core import Decision, SetTimer
from cei_actors.runtime.example import Add, Counters, Tick
from cei_actors.runtime.messages import Ok
from cei_actors.runtime.runner import Runner, replay


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
