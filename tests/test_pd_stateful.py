"""A stateful property test of the PD core: random requests, agents, faults and crashes.

After every step: slots are never over-assigned, node_exclusive holds, nothing waits that
could run, each (upid, round) runs on at most one agent, every process's (round, state) only
moved forward, and the state equals the replay of the log.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pd_harness import Agent, Sim, check_invariants, check_no_placeable_waiting, config

from cei_actors.epum.messages import NodeState
from cei_actors.pd import states as ps
from cei_actors.pd.messages import (
    KillProcess,
    MonitorResources,
    RestartProcess,
    RetryDispatches,
    ScheduleProcess,
    SetSystemBoot,
)


class PDMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim = Sim(
            config(
                engines={
                    "e1": {
                        "slots": 2,
                        "heartbeat_period": 1.0,
                        "heartbeat_warning": 3.0,
                        "heartbeat_missing": 5.0,
                    }
                },
                restart_throttling_config={"minimum_time_between_starts": 1.0},
                dispatch_retry_seconds=2.0,
                needs_interval=0.5,
            )
        )
        self.nodes = 0
        self.procs = 0
        self.last: dict[str, tuple[int, int]] = {}

    # ---- rules ----------------------------------------------------------------------------

    @rule(zone=st.sampled_from(["a", "b"]))
    def add_node(self, zone: str) -> None:
        self.sim.add_node(f"n{self.nodes}", zone=zone)
        self.nodes += 1

    @precondition(lambda self: self.sim.state.nodes)
    @rule(i=st.integers(0, 100), how=st.sampled_from(["TERMINATED", "FAILED", "RUNNING_FAILED"]))
    def lose_node(self, i: int, how: str) -> None:
        nodes = sorted(self.sim.state.nodes)
        self.sim.lose_node(nodes[i % len(nodes)], how)

    @rule(
        restart=st.sampled_from(list(ps.RESTART_MODES)),
        queue=st.sampled_from(list(ps.QUEUEING_MODES)),
        zone=st.sampled_from([None, None, "a", "b"]),
        tag=st.sampled_from([None, None, "T"]),
    )
    def schedule(self, restart: str, queue: str, zone: str | None, tag: str | None) -> None:
        self.sim.ok(
            ScheduleProcess(
                f"p{self.procs}",
                command=["x"],
                restart_mode=restart,
                queueing_mode=queue,
                node_exclusive=tag,
                constraints={"zone": zone} if zone else None,
            )
        )
        self.procs += 1

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 1000))
    def reschedule(self, i: int) -> None:
        p = self.sim.proc(f"p{i % self.procs}")
        if p.state in ps.TERMINAL:
            self.sim.ok(ScheduleProcess(p.upid, command=["x"], restart_mode=p.restart_mode))

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 1000))
    def kill(self, i: int) -> None:
        self.sim.ok(KillProcess(f"p{i % self.procs}"))

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 1000))
    def restart(self, i: int) -> None:
        self.sim.handle(RestartProcess(f"p{i % self.procs}"))

    @precondition(lambda self: self.procs)
    @rule(i=st.integers(0, 1000), end=st.sampled_from([ps.EXITED, ps.FAILED, ps.TERMINATED]))
    def process_ends(self, i: int, end: str) -> None:
        copies = sorted(self.sim.running_copies())
        if copies:
            key = copies[i % len(copies)]
            for aid in self.sim.running_copies()[key]:
                self.sim.agents[aid].procs[key] = end

    @precondition(lambda self: self.sim.agents)
    @rule(i=st.integers(0, 1000))
    def heartbeat(self, i: int) -> None:
        ids = sorted(a for a, ag in self.sim.agents.items() if ag.up and ag.node_id in self.sim.state.nodes)
        if ids:
            self.sim.heartbeat(ids[i % len(ids)])

    @rule()
    def heartbeat_all(self) -> None:
        self.sim.heartbeat_all()

    @precondition(lambda self: self.sim.agents)
    @rule(i=st.integers(0, 1000))
    def agent_silent(self, i: int) -> None:
        """An agent stops talking (partition) but its processes keep running."""
        ids = sorted(self.sim.agents)
        a = self.sim.agents[ids[i % len(ids)]]
        a.up = not a.up if a.node_id in self.sim.state.nodes else False

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5]))
    def time_passes(self, dt: float) -> None:
        self.sim.now += dt
        self.sim.handle(MonitorResources())
        self.sim.handle(RetryDispatches())
        for key in ("throttle", "needs"):
            timer = self.sim.timers.pop(key, None)
            if timer is not None:
                self.sim.handle(timer.message)

    @rule(snapshot=st.booleans())
    def pd_crashes(self, snapshot: bool) -> None:
        before = self.sim.state.to_data()
        self.sim.crash(snapshot=snapshot)
        # recovery may place queued processes; everything else is as it was
        after = self.sim.state.to_data()
        assert {p["upid"] for p in after["processes"]} == {p["upid"] for p in before["processes"]}

    @rule(on=st.booleans())
    def system_boot(self, on: bool) -> None:
        if on:  # only meaningful when the previous run's nodes are gone
            for nid in list(self.sim.state.nodes):
                for a in self.sim.agents.values():
                    if a.node_id == nid:
                        a.up = False
                        a.procs.clear()
        self.sim.ok(SetSystemBoot(on))

    @rule()
    def unknown_node_heartbeat(self) -> None:
        self.sim.agents.setdefault("stray", Agent("stray", "nowhere"))
        self.sim.heartbeat("stray")

    @rule()
    def node_announced_twice(self) -> None:
        for nid in list(self.sim.state.nodes)[:1]:
            self.sim.ok(NodeState(nid, "pd_domain_e1", "RUNNING", {}))

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        s = self.sim.state
        check_invariants(s)
        check_no_placeable_waiting(s)
        for key, agents in self.sim.running_copies().items():
            assert len(agents) == 1, f"{key} runs on {agents}"
        for upid, p in s.processes.items():
            now = (p.round, ps.rank(p.state))
            before = self.last.get(upid)
            assert before is None or now >= before, f"{upid} went back: {before} -> {now}"
            self.last[upid] = now

    @invariant()
    def equals_replay(self) -> None:
        assert self.sim.state == self.sim.replayed()


TestPD = PDMachine.TestCase
TestPD.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
