"""The simulation kernel: virtual time, timers, crashes and replay checks, deterministic per seed."""

from __future__ import annotations

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
