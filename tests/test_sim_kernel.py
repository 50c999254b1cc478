"""The simulation kernel: virtual time, timers, crashes and replay checks, deterministic per seed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cei_actors.runtime.example import Add, Counters, Get
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.sim import Simulation
from cei_actors.sim.kernel import Faults


def test_timers_run_on_virtual_time():
    sim = Simulation(seed=1)
    sim.add("c", Counters(tick=10.0))
    start = sim.clock.now()
    sim.run_for(100.0)
    assert sim.state("c").ticks == 10
    assert sim.clock.now() == start + 100.0
    assert sim.check() == []


def test_crash_loses_memory_not_log_and_timers_resume():
    sim = Simulation(seed=2)
    sim.add("c", Counters(tick=5.0))
    assert sim.call("c", Add("a", 3)) == Ok(3)
    sim.run_for(12.0)
    sim.crash("c")
    assert isinstance(sim.call("c", Get("a")), ErrorReply)
    sim.run_for(50.0)  # timers of the dead instance never fire
    sim.restart("c")
    assert sim.call("c", Get("a")) == Ok(3)
    assert sim.state("c").ticks == 2
    sim.run_for(10.0)
    assert sim.state("c").ticks == 4
    assert sim.check() == []


def test_same_seed_same_run():
    def run(seed):
        sim = Simulation(seed=seed, faults=Faults(latency=(0.0, 1.0), drop_rate=0.3))
        sim.add("c", Counters())
        for i in range(50):
            sim.tell("c", Add(f"k{i % 3}", 1), delay=i * 0.1)
        sim.run_for(10)
        return dict(sim.state("c").counters), sim.delivered, sim.dropped

    assert run(7) == run(7)


def test_a_timer_of_an_earlier_incarnation_never_fires():
    sim = Simulation(seed=3)
    sim.add("c", Counters(tick=5.0))  # ticks at +5, +10, +15 ...
    sim.run_for(12.0)
    sim.crash("c")  # its next tick was due at +15
    sim.run_for(1.0)
    sim.restart("c")  # the new incarnation ticks at +18, +23 ...
    sim.run_for(3.5)  # +16.5: the dead incarnation's +15 tick must not have counted
    assert sim.state("c").ticks == 2
    sim.run_for(2.0)
    assert sim.state("c").ticks == 3


def test_peers_scheduled_calls_and_lossy_links():
    got = []
    sim = Simulation(seed=4, faults=Faults(drop_rate=1.0, lossy=lambda sender, to: to == "lossy"))
    sim.add("c", Counters())
    sim.add_peer("p", lambda message, sender: got.append((message, sender)))
    sim.add_peer("lossy", lambda message, sender: got.append(("lost", message)))
    sim.tell("c", Add("a", 2), sender="p")  # the reply goes to the peer
    sim.schedule(1.0, lambda: sim.tell("lossy", Add("a", 1)))
    sim.run_for(5.0)
    assert got == [(Ok(2), "c")]
    sim.remove_peer("p")
    sim.tell("p", Add("a", 1))
    sim.run_for(1.0)
    assert len(got) == 1 and sim.dropped == 2


def test_crash_inside_a_message_keeps_its_events_and_loses_its_effects():
    sim = Simulation(seed=5)
    sim.add("c", Counters())
    sim.crash_on_next("c", persisted=True)
    sim.tell("c", Add("a", 2))
    sim.run_for(1.0)
    assert not sim.nodes["c"].up
    sim.restart("c")
    assert sim.call("c", Get("a")) == Ok(2)
    sim.crash_on_next("c", persisted=False)
    sim.tell("c", Add("a", 5))
    sim.run_for(1.0)
    sim.restart("c")
    assert sim.call("c", Get("a")) == Ok(2)
    assert sim.check() == []


def test_trusted_in_process_deliveries_skip_validation_outside_ones_do_not():
    """What the simulation's own code built (``trusted``) is not validated again (SIM5);
    a message from outside is, and ``validate_own`` validates everything."""
    got = []
    sim = Simulation(seed=6)
    sim.add("c", Counters())
    sim.add_peer("p", lambda message, sender: got.append(message))
    bad = Add("a", True)  # a bool where an int is declared: validation refuses it
    sim.tell("c", bad, sender="p")
    sim.run_for(1.0)
    assert isinstance(got[-1], ErrorReply) and got[-1].code == "bad_request"
    sim.tell("c", bad, sender="p", trusted=True)
    sim.run_for(1.0)
    assert got[-1] == Ok(1)
    sim.validate_own = True
    sim.tell("c", bad, sender="p", trusted=True)
    sim.run_for(1.0)
    assert isinstance(got[-1], ErrorReply) and got[-1].code == "bad_request"
    assert isinstance(sim.call("c", bad), ErrorReply)  # an outside call is always validated


def test_run_steps_stops_after_max_steps_with_the_clock_at_the_last_one():
    """The run loop CEISystem.run_for uses between its progress and check points: a chunk
    that stops early leaves the clock at the last thing it ran, so the next chunk goes on
    exactly as one long run would (same steps, same times)."""
    sim = Simulation(seed=1)
    seen: list[float] = []
    for i in range(5):
        sim.schedule(10.0 * (i + 1), lambda: seen.append(sim.clock.now()))
    start = sim.clock.now()
    assert sim.run_steps(start + 100.0, 2) == 2
    assert sim.clock.now() == start + 20.0 and sim.steps == 2
    assert sim.run_steps(start + 35.0, 10) == 1
    assert sim.clock.now() == start + 30.0
    assert sim.run_until(start + 100.0) == 2
    assert seen == [start + 10.0 * (i + 1) for i in range(5)] and sim.clock.now() == start + 100.0
    assert sim.step() is False


def test_a_run_freezes_the_set_up_and_leaves_the_collector_as_it_found_it():
    """Decision SIM9: while the kernel runs, what existed before is frozen (full collections
    do not scan the simulated system's state again) and young collections are rarer; after
    the run, even one that raised, the collector's settings and frozen set are as before; a
    program that keeps objects frozen itself, or has the collector off, is left alone."""
    import gc

    import pytest

    from cei_actors.sim.kernel import RUN_GC_YOUNG

    before = (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count())
    assert before[0] and before[2] == 0  # pytest runs with the collector on, nothing frozen
    sim = Simulation(seed=1)
    seen: list[tuple[int, int]] = []
    sim.schedule(1.0, lambda: seen.append((gc.get_freeze_count(), gc.get_threshold()[0])))
    sim.run_for(2.0)
    assert seen and seen[0][0] > 0 and seen[0][1] >= RUN_GC_YOUNG
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == before

    def fail() -> None:
        raise RuntimeError("boom")

    sim.schedule(1.0, fail)
    with pytest.raises(RuntimeError):
        sim.run_for(2.0)
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == before

    gc.freeze()  # the program's own frozen objects: not ours to unfreeze
    try:
        frozen = gc.get_freeze_count()
        sim.schedule(1.0, lambda: seen.append((gc.get_freeze_count(), gc.get_threshold()[0])))
        sim.run_for(2.0)
        assert seen[-1] == (frozen, before[1][0]) and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        sim.schedule(1.0, lambda: seen.append((gc.get_freeze_count(), gc.get_threshold()[0])))
        sim.run_for(2.0)
        assert seen[-1] == (0, before[1][0]) and not gc.isenabled()
    finally:
        gc.enable()
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.5]),
                          st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 1.0, 3.0])),
                                   max_size=3)),
                min_size=1, max_size=25))
def test_lanes_run_their_calls_in_the_order_plain_scheduling_would(plan):
    """Calls scheduled through lanes (SIM14) run at the same steps, in the same order and at
    the same virtual times as the same calls given to ``Simulation.schedule``, ties, calls
    scheduled by calls and a lane that empties and fills again included; the heap holds one
    entry per lane, not one per call."""

    def run(use_lanes: bool) -> tuple[list[tuple[str, float]], int, int]:
        sim = Simulation(seed=1)
        lanes = [sim.lane() for _ in range(3)]
        seen: list[tuple[str, float]] = []
        biggest = [0]

        def put(where: int, delay: float, name: str, then: list[tuple[int, float]]) -> None:
            def call() -> None:
                seen.append((name, sim.clock.now()))
                biggest[0] = max(biggest[0], len(sim._heap))
                for i, (w, d) in enumerate(then):
                    put(w, d, f"{name}.{i}", [])
            if use_lanes and where < 3:
                lanes[where].schedule(delay, call)
            else:
                sim.schedule(delay, call)

        for i, (where, delay, then) in enumerate(plan):
            put(where, delay, f"c{i}", then)
        heap_at_start = len(sim._heap)
        steps = sim.run_for(100.0)
        assert all(len(lane) == 0 for lane in lanes)
        return seen, steps, heap_at_start

    plain, plain_steps, plain_heap = run(False)
    laned, laned_steps, laned_heap = run(True)
    assert laned == plain and laned_steps == plain_steps == len(plain)
    assert laned_heap <= plain_heap


def test_a_lane_keeps_one_entry_on_the_heap_for_its_later_calls():
    """A lane puts a call on the simulation's heap only when it is the lane's new earliest."""
    sim = Simulation(seed=1)
    lane, ran = sim.lane(), []
    for i in range(100):
        lane.schedule(10.0 + i, lambda i=i: ran.append(i))
    assert len(sim._heap) == 1 and len(lane) == 100
    lane.schedule(1.0, lambda: ran.append(-1))  # a new earliest: a second entry
    assert len(sim._heap) == 2
    assert sim.run_for(200.0) == 101 and ran == [-1, *range(100)]


def test_call_many_is_one_mailbox_drain_per_batch_validated_and_in_order():
    """Decision SIM15: messages sent at once are decided in order and appended once per
    batch of at most ``max_batch`` (the shell's default), each validated as outside input;
    a refused one changes nothing and leaves the others alone."""
    from cei_actors.runtime.shell import EventSourcedActor
    from cei_actors.sim.kernel import MAX_BATCH

    assert EventSourcedActor.max_batch == MAX_BATCH
    sim = Simulation(seed=4)
    sim.add("c", Counters())
    runner = sim.nodes["c"].runner
    appends = runner.log_stats.appends
    replies = sim.call_many("c", [Add("a", 1)] * 5 + [Add("", 1)] + [Add("a", 2)] * 4, max_batch=4)
    assert replies[:5] == [Ok(i) for i in range(1, 6)]
    assert isinstance(replies[5], ErrorReply) and replies[5].code == "bad_request"
    assert replies[6:] == [Ok(7), Ok(9), Ok(11), Ok(13)]
    assert runner.log_stats.appends - appends == 3  # batches of 4, 4 and 2 messages
    assert sim.call_many("c", [Add("a", 1)] * 3) == [Ok(14), Ok(15), Ok(16)]
    assert runner.log_stats.appends - appends == 4
    assert sim.check() == []
    sim.crash("c")
    assert [r.code for r in sim.call_many("c", [Add("a", 1), Get("a")])] == ["unavailable"] * 2
    sim.restart("c")
    assert sim.call("c", Get("a")) == Ok(16)


def test_runners_snapshot_in_place_never_forking(monkeypatch):
    """Decision SIM19: a simulated component's runner takes its snapshots in place, even a
    state big enough for a forked child elsewhere: no fork, and the same snapshot offsets in
    two runs of a seed."""
    import os

    from cei_actors.runtime import runner

    monkeypatch.setattr(runner, "BACKGROUND_SNAPSHOT_BYTES", 1)  # every state "big"

    def no_fork():
        raise AssertionError("a simulated runner forked")

    monkeypatch.setattr(os, "fork", no_fork)

    def run():
        sim = Simulation(seed=9)
        node = sim.add("c", Counters())
        sim.call_many("c", [Add(f"k{i % 500}", 1) for i in range(35_000)])
        assert sim.state("c").counters["k7"] == 70
        return node.log.snapshots("example")

    offsets = run()
    assert len(offsets) == 2 and offsets == run()


def test_a_memory_logs_copy_takes_the_batches_appended_since_as_stored():
    """``EventLog.stored_batches`` gives the batches past a head as stored; ``MemoryLog.put_stored``
    makes another memory log hold them, reading the same records (the warm replay's feed, SIM20)."""
    from cei_actors.eventlog import open_log
    from cei_actors.eventlog.memory import forget

    sim = Simulation(seed=5)
    node = sim.add("c", Counters())
    log = node.log
    sim.call_many("c", [Add("a", 1)] * 3)
    head = log.head("example")
    copy = open_log(f"memory://copy-{id(sim)}")
    copy.put_stored("example", log.stored_batches("example"))
    sim.call_many("c", [Add("b", 2)] * 4)
    sim.call("c", Add("a", 5))
    fresh = log.stored_batches("example", head)
    assert [first for first, _ in fresh] == [head + 1, head + 5]  # two appends: two batches
    assert log.stored_batches("example", log.head("example")) == []
    copy.put_stored("example", fresh)
    assert list(copy.read("example")) == list(log.read("example"))
    forget(f"copy-{id(sim)}")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["tell", "call", "lane"]), st.sampled_from([0.0, 0.5, 1.0, 2.0]),
                          st.lists(st.tuples(st.sampled_from(["tell", "call", "lane"]),
                                             st.sampled_from([0.0, 1.0])), max_size=3)),
                min_size=1, max_size=25))
def test_messages_in_flight_wait_in_their_own_heap_and_keep_the_order(plan):
    """Decision SIM23: a message in flight waits in the network's heap (``_net``), not in the
    heap of calls, lanes and timers; every step still comes in (time, sequence) order: each
    thing at its time, ties in the order they were sent or scheduled, things sent or
    scheduled by a step included, and ``next_at`` is the earlier of the two heaps."""
    sim = Simulation(seed=1, faults=Faults(latency=(0.0, 0.0)))  # no draw: times are exact
    lane = sim.lane()
    seen: list[tuple[str, float]] = []
    expected: list[tuple[float, int, str]] = []

    def put(how: str, delay: float, name: str, then: list[tuple[str, float]]) -> None:
        expected.append((sim.clock.now() + delay, len(expected), name))

        def step() -> None:
            seen.append((name, sim.clock.now()))
            for i, (h, d) in enumerate(then):
                put(h, d, f"{name}.{i}", [])
        if how == "tell":
            sim.add_peer(name, lambda message, sender: step())
            sim.tell(name, "m", delay=delay)
        elif how == "call":
            sim.schedule(delay, step)
        else:
            lane.schedule(delay, step)

    for i, (how, delay, then) in enumerate(plan):
        put(how, delay, f"c{i}", then)
    tells = sum(how == "tell" for how, _, _ in plan)
    assert len(sim._net) == tells and len(sim._heap) <= len(plan) - tells
    assert sim.next_at() == sim.clock.now() + min(delay for _, delay, _ in plan)
    steps = sim.run_for(100.0)
    assert steps == len(expected) == len(seen)
    assert seen == [(name, when) for when, _, name in sorted(expected)]
    assert not sim._net and not sim._heap and sim.next_at() is None
