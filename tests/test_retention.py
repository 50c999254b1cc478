"""Bounded state (issue 13): the PD forgets finished processes after its retention, leaving
tombstones that answer a late heartbeat, a describe or a re-schedule; nothing live is ever
forgotten; history stays in the log."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from pd_harness import Sim, config

from cei_actors.cli import main
from cei_actors.eeagent.messages import CleanupProcess, TerminateProcess
from cei_actors.launch.plan import PlanError, default_plan_text, load_plan
from cei_actors.pd import invariants
from cei_actors.pd import states as ps
from cei_actors.pd.events import ProcessesForgotten
from cei_actors.pd.logic import ProcessDispatcher, parse_config
from cei_actors.pd.messages import (
    CreateDefinition,
    CreateProcess,
    DescribeProcess,
    DescribeProcesses,
    Dump,
    ForgetProcesses,
    KillProcess,
    RestartProcess,
    ScheduleProcess,
    ScheduleProcesses,
)
from cei_actors.runtime.runner import replay

RETENTION = 60.0


def retained(**over):
    return config(retention=RETENTION, **over)


def ran_and_exited(sim: Sim, upid: str, state: str = ps.EXITED, **kw) -> str:
    """Schedule ``upid``, let it run and end with ``state``; returns its agent."""
    sim.ok(ScheduleProcess(upid, command=["true"], restart_mode="never", **kw))
    aid = next(iter(sim.agents))
    sim.heartbeat(aid)
    sim.finish(upid, state)
    sim.heartbeat(aid)
    assert sim.pstate(upid) == state
    return aid


def sent_since(sim: Sim, mark: int, kind: type) -> list:
    return [s.message for s in sim.sent[mark:] if isinstance(s.message, kind)]


def test_a_finished_process_is_forgotten_after_its_retention_and_describe_says_so():
    sim = Sim(retained())
    sim.add_node("n1")
    ran_and_exited(sim, "p1")
    ended_at = sim.now
    assert "forget" in sim.timers
    sim.now += RETENTION - 1
    sim.handle(ForgetProcesses())
    assert "p1" in sim.state.processes  # not yet
    sim.now += 2
    head = sim.runner.head
    sim.handle(ForgetProcesses())
    assert "p1" not in sim.state.processes and sim.runner.head == head + 1
    d = sim.ok(DescribeProcess("p1"))
    assert (d["state"], d["round"], d["forgotten"]) == (ps.EXITED, 0, True)
    assert d["ended_at"] == ended_at and d["forgotten_at"] == sim.now
    assert [x["upid"] for x in sim.ok(DescribeProcesses(["p1", "never"]))] == ["p1"]
    assert sim.ok(DescribeProcesses()) == [] and sim.ok(Dump())["forgotten"] == 1
    assert sim.ok(KillProcess("p1"))["forgotten"] is True  # ended: nothing to kill
    err = sim.err(RestartProcess("p1"))
    assert err.code == "conflict" and "forgotten" in err.message and "schedule it again" in err.message
    assert sim.err(DescribeProcess("never")).code == "not_found"
    assert invariants.broken(sim.state) == []
    for snapshot in (False, True):
        sim.crash(snapshot=snapshot)
        assert sim.ok(DescribeProcess("p1")) == d
    assert sim.replayed() == sim.state


def test_a_late_heartbeat_of_a_forgotten_process_ends_it_and_never_resurrects_it():
    sim = Sim(retained())
    [aid] = sim.add_node("n1")
    ran_and_exited(sim, "p1", ps.FAILED)
    sim.now += RETENTION + 1
    sim.handle(ForgetProcesses())
    agent = sim.agents[aid]
    # the agent reports an old copy still running (it was partitioned), then one that ended
    agent.procs[("p1", 0)] = ps.RUNNING
    mark = len(sim.sent)
    sim.heartbeat(aid)
    assert [(m.upid, m.round) for m in sent_since(sim, mark, TerminateProcess)] == [("p1", 0)]
    assert "p1" not in sim.state.processes and "p1" in sim.state.tombstones
    agent.procs[("p1", 0)] = ps.TERMINATED
    mark = len(sim.sent)
    sim.heartbeat(aid)
    assert [(m.upid, m.round) for m in sent_since(sim, mark, CleanupProcess)] == [("p1", 0)]
    assert "p1" not in sim.state.processes and agent.procs == {}
    assert invariants.broken(sim.state) == []


def test_rescheduling_a_forgotten_process_starts_a_round_past_the_tombstone():
    sim = Sim(retained())
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("keeper", command=["sleep"]))  # the node stays busy: not retired
    sim.ok(ScheduleProcess("p1", command=["true"], restart_mode="never"))
    sim.heartbeat(aid)
    sim.ok(RestartProcess("p1"))  # round 1
    sim.heartbeat(aid)
    sim.finish("p1", ps.EXITED)
    sim.heartbeat(aid)
    assert (sim.proc("p1").round, sim.pstate("p1")) == (1, ps.EXITED)
    sim.now += RETENTION + 1
    sim.handle(ForgetProcesses())
    # once: the ended process as it stands; different parameters: refused; nothing written
    head = sim.runner.head
    same = sim.ok(ScheduleProcess("p1", command=["true"], restart_mode="never", once=True))
    assert (same["state"], same["round"], same["forgotten"]) == (ps.EXITED, 1, True)
    err = sim.err(ScheduleProcess("p1", command=["false"], restart_mode="never", once=True))
    assert err.code == "conflict" and "different parameters" in err.message
    many = sim.ok(ScheduleProcesses([ScheduleProcess("p1", command=["true"],
                                                     restart_mode="never", once=True)]))
    assert many == [same] and sim.runner.head == head
    # without once: a new round, higher than the forgotten one's
    p = sim.ok(ScheduleProcess("p1", command=["true"], restart_mode="never"))
    assert (p["round"], p["state"]) == (2, ps.ASSIGNED) and "forgotten" not in p
    assert "p1" not in sim.state.tombstones
    # a late report of the forgotten round is a stale copy, not the new one
    sim.agents[aid].procs[("p1", 1)] = ps.RUNNING
    mark = len(sim.sent)
    sim.heartbeat(aid)
    assert ("p1", 1) in [(m.upid, m.round) for m in sent_since(sim, mark, TerminateProcess)]
    assert (sim.proc("p1").round, sim.pstate("p1")) == (2, ps.RUNNING)
    assert sim.replayed() == sim.state and invariants.broken(sim.state) == []


def test_creating_a_forgotten_process_again_starts_past_its_round():
    sim = Sim(retained())
    sim.add_node("n1")
    ran_and_exited(sim, "p1")
    sim.now += RETENTION + 1
    sim.handle(ForgetProcesses())
    sim.ok(CreateDefinition("d1", {"exec": "true"}))
    created = sim.ok(CreateProcess("p1", "d1"))
    assert (created["state"], created["round"]) == (ps.UNSCHEDULED, 1)
    assert sim.ok(ScheduleProcess("p1"))["round"] == 1
    assert sim.replayed() == sim.state


def test_nothing_live_is_forgotten_even_if_an_event_names_it():
    sim = Sim(retained())
    sim.add_node("n1")
    sim.ok(ScheduleProcess("live", command=["sleep"]))
    sim.ok(ScheduleProcess("queued", command=["x"], constraints={"zone": "none"}))
    sim.now += 10 * RETENTION
    sim.handle(ForgetProcesses())
    assert {"live", "queued"} <= set(sim.state.processes)
    sim.state.apply(ProcessesForgotten(["live", "queued"], sim.now))  # a forged event
    assert {"live", "queued"} <= set(sim.state.processes) and len(sim.state.tombstones) == 0


def test_retention_forever_keeps_everything():
    sim = Sim(config(retention="forever"))
    sim.add_node("n1")
    ran_and_exited(sim, "p1")
    assert "forget" not in sim.timers
    sim.now += 10**7
    head = sim.runner.head
    sim.handle(ForgetProcesses())
    assert "p1" in sim.state.processes and len(sim.state.tombstones) == 0
    written = [r.type for r in sim.runner.log.read("pd", head + 1)]
    assert "ProcessesForgotten" not in written


def test_retention_and_tombstone_keys_are_checked():
    assert parse_config(config()).retention == 3600.0
    assert parse_config(config(retention="Forever")).retention is None
    assert parse_config(config(tombstone_max_age="forever")).tombstone_max_age is None
    for bad in ({"retention": -1}, {"retention": "soon"}, {"retention": True},
                {"tombstone_limit": -3}, {"tombstone_max_age": "never"}):
        with pytest.raises(ValueError, match="PD config: (retention|tombstone_)"):
            parse_config(config(**bad))


def test_the_default_plan_sets_the_retention_and_the_plan_check_refuses_a_bad_one(tmp_path):
    plan = load_plan(None, home=tmp_path)
    assert plan.components["pd"].config["retention"] == 3600
    path = tmp_path / "p.yaml"
    path.write_text(default_plan_text().replace("retention: 3600", "retention: sometimes"))
    with pytest.raises(PlanError, match="components.pd.config.*retention"):
        load_plan(path, home=tmp_path)
    for component, anchor in (("epum", "      decider_interval: 1.0\n"),
                              ("provisioner", "      query_interval: 2.0\n")):
        bad = default_plan_text().replace(anchor, anchor + "      tombstone_limit: -1\n")
        path.write_text(bad)
        with pytest.raises(PlanError, match=f"components.{component}.config.*tombstone_limit"):
            load_plan(path, home=tmp_path)


def test_tombstones_are_bounded_and_the_bounds_replay_without_config():
    sim = Sim(retained(tombstone_limit=3, tombstone_max_age=1000.0))
    sim.add_node("n1")
    for i in range(5):
        ran_and_exited(sim, f"p{i}")
    sim.now += RETENTION + 1
    sim.handle(ForgetProcesses())
    assert list(sim.state.tombstones) == ["p2", "p3", "p4"]
    other = replay(ProcessDispatcher(config()), sim.runner.log, "pd")  # default bounds
    assert other == sim.state
    sim.now += 1001
    sim.handle(ForgetProcesses())
    assert len(sim.state.tombstones) == 0
    assert sim.replayed() == sim.state


def test_the_state_stays_bounded_under_a_steady_churn():
    """Short processes, one per second, retention 60 s: the records held never exceed the
    retention's worth plus the tombstone bound, however many ran."""
    sim = Sim(retained(tombstone_limit=50))
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("keeper", command=["sleep"]))  # the node stays busy: not retired
    sizes = []
    for i in range(600):
        sim.ok(ScheduleProcess(f"c{i}", command=["true"], restart_mode="never"))
        sim.heartbeat(aid)
        sim.finish(f"c{i}", ps.EXITED)
        sim.heartbeat(aid)
        sim.now += 1.0
        if i % 15 == 0:
            sim.handle(ForgetProcesses())
        sizes.append(len(sim.state.processes) + len(sim.state.tombstones))
    assert max(sizes[200:]) <= 1 + RETENTION + 15 + 1 + 50
    assert len(sim.state.processes) <= 1 + RETENTION + 15 + 1
    assert len(sim.state.tombstones) == 50
    assert sim.replayed() == sim.state


def test_history_stays_in_the_log_cei_log_state_at_an_earlier_offset(tmp_path, capsys):
    sim = Sim(retained(), url=f"sqlite:///{tmp_path / 'log.sqlite'}")
    sim.add_node("n1")
    ran_and_exited(sim, "p1")
    before = sim.runner.head
    sim.now += RETENTION + 1
    sim.handle(ForgetProcesses())
    assert "p1" not in sim.state.processes
    sim.runner.log.close()

    def state_at(*at: str) -> dict:
        assert main(["--json", "--home", str(tmp_path), "log", "state", "pd", *at]) == 0
        return json.loads(capsys.readouterr().out)

    old = state_at("--at", str(before))
    assert [p["upid"] for p in old["processes"]] == ["p1"]
    assert old["processes"][0]["state"] == ps.EXITED and old["tombstones"] == []
    now = state_at()
    assert now["processes"] == [] and [t[0] for t in now["tombstones"]] == ["p1"]


def test_a_snapshot_without_tombstones_still_restores():
    sim = Sim(retained())
    sim.add_node("n1")
    ran_and_exited(sim, "p1")
    data = sim.state.to_data()
    del data["tombstones"]  # a snapshot written before PD10
    pd = ProcessDispatcher(retained())
    state = pd.restore(data)
    assert state == sim.state and len(state.tombstones) == 0


# ---- a property: nothing live is ever forgotten; live state == replay ----------------------


class Churn(RuleBasedStateMachine):
    """Random schedules, exits, kills, restarts, time jumps and forget passes."""

    def __init__(self) -> None:
        super().__init__()
        self.sim = Sim(retained(tombstone_limit=5))
        self.aid = self.sim.add_node("n1", slots=3)[0]
        self.sim.ok(ScheduleProcess("keeper", command=["sleep"]))  # the node is not retired
        self.live_before: set[str] = set()

    def _step(self) -> None:
        s = self.sim.state
        self.live_before = {u for u, p in s.processes.items() if p.state not in ps.TERMINAL}

    upids = st.sampled_from([f"u{i}" for i in range(8)])

    @rule(upid=upids, once=st.booleans(), mode=st.sampled_from(["never", "never", "never", "always", "abnormal"]))
    def schedule(self, upid: str, once: bool, mode: str) -> None:
        self._step()
        self.sim.handle(ScheduleProcess(upid, command=["x"], restart_mode=mode, once=once))
        self.sim.heartbeat(self.aid)

    @rule(pick=st.integers(0, 7), state=st.sampled_from([ps.EXITED, ps.FAILED]))
    def end(self, pick: int, state: str) -> None:
        """One of the copies running on the agent ends (the agent reports it at once)."""
        self._step()
        procs = self.sim.agents[self.aid].procs
        copies = sorted(k for k, v in procs.items() if v in ps.AGENT_LIVE and k[0] != "keeper")
        if copies:
            procs[copies[pick % len(copies)]] = state
            self.sim.heartbeat(self.aid)

    @rule(upid=upids, restart=st.booleans())
    def kill_or_restart(self, upid: str, restart: bool) -> None:
        self._step()
        self.sim.handle(RestartProcess(upid) if restart else KillProcess(upid))
        self.sim.heartbeat(self.aid)

    @rule(dt=st.sampled_from([0.5, 30.0, 61.0, 61.0, 500.0]))
    def time_passes_and_forget(self, dt: float) -> None:
        self._step()
        self.sim.now += dt
        self.sim.handle(ForgetProcesses())

    @rule()
    def crash(self) -> None:
        self._step()
        self.sim.crash(snapshot=True)

    @invariant()
    def nothing_live_forgotten_and_replay_agrees(self) -> None:
        s = self.sim.state
        assert self.live_before <= set(s.processes), self.live_before - set(s.processes)
        assert invariants.broken(s) == []
        assert len(s.tombstones) <= 5
        assert self.sim.replayed() == s


TestChurn = Churn.TestCase
TestChurn.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
