"""The Process Dispatcher's pure core, driven through a Runner with simulated agents."""

from __future__ import annotations

import pytest
from pd_harness import ENGINE, Sim, check_invariants, config

from cei_actors.eeagent.messages import AgentHeartbeat, LaunchProcess, LeaseGrant, TerminateProcess
from cei_actors.epum.messages import AddDomain, NodeState, RegisterNeed, SubscribeDomain
from cei_actors.pd import states as ps
from cei_actors.pd.logic import ProcessDispatcher, parse_config
from cei_actors.pd.messages import (
    CreateDefinition,
    CreateProcess,
    DescribeDefinition,
    DescribeProcess,
    DescribeProcesses,
    Dump,
    ForgetProcesses,
    KillProcess,
    ListDefinitions,
    Matchmake,
    MonitorResources,
    ProcessCounts,
    RemoveDefinition,
    RestartProcess,
    RetryDispatches,
    ScheduleProcess,
    ScheduleProcesses,
    SetSystemBoot,
    UpdateDefinition,
)
from cei_actors.pd.needs import EngineSpec, need, retirable
from cei_actors.runtime.core import Send


def launches(sim: Sim) -> list[LaunchProcess]:
    out = []
    for s in sim.sent:
        m = s.message
        if isinstance(m, LaunchProcess):
            out.append(m)
    return out


# ---- scheduling, idempotency, bad input -------------------------------------------------------


def test_schedule_waits_then_runs_when_a_node_appears():
    sim = Sim()
    assert sim.ok(ScheduleProcess("p1", command=["true"]))["state"] == ps.WAITING
    [aid] = sim.add_node("n1")
    assert sim.pstate("p1") == ps.ASSIGNED
    assert sim.agents[aid].procs == {("p1", 0): ps.RUNNING}
    sim.heartbeat(aid)
    p = sim.ok(DescribeProcess("p1"))
    assert (p["state"], p["node_id"], p["assigned"], p["round"]) == (ps.RUNNING, "n1", aid, 0)
    sim.finish("p1", ps.EXITED)
    sim.heartbeat(aid)
    assert sim.pstate("p1") == ps.EXITED and sim.agents[aid].procs == {}
    check_invariants(sim.state)


def test_same_schedule_twice_returns_current_state_and_different_is_refused():
    sim = Sim()
    sim.add_node("n1")
    first = sim.ok(ScheduleProcess("p1", command=["sleep", "9"], restart_mode="never"))
    again = sim.ok(ScheduleProcess("p1", command=["sleep", "9"], restart_mode="NEVER"))
    assert first == again and again["state"] == ps.ASSIGNED
    head = sim.runner.head
    err = sim.err(ScheduleProcess("p1", command=["sleep", "10"]))
    assert err.code == "conflict" and "command" in err.message and "restart_mode" in err.message
    assert sim.runner.head == head
    assert len(launches(sim)) == 1


def test_schedule_many_in_one_request():
    sim = Sim()
    sim.add_node("n1")
    out = sim.ok(
        ScheduleProcesses(
            [
                ScheduleProcess("a", command=["x"]),
                ScheduleProcess("b", command=["x"], execution_engine_id="nope"),
                ScheduleProcess("c", command=["x"]),
                ScheduleProcess("d", command=["x"]),
            ]
        )
    )
    assert [p.get("state") for p in out] == [ps.ASSIGNED, None, ps.ASSIGNED, ps.WAITING]
    assert out[1]["error"] == "bad_request" and "nope" in out[1]["message"]
    assert "b" not in sim.state.processes
    assert sim.err(ScheduleProcesses([ScheduleProcess("", command=["x"])])).code == "bad_request"


def test_rescheduling_a_finished_process_starts_a_new_round():
    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["true"]))
    sim.heartbeat(aid)
    sim.finish("p1", ps.EXITED)
    sim.heartbeat(aid)
    assert sim.pstate("p1") == ps.EXITED
    p = sim.ok(ScheduleProcess("p1", command=["true", "again"]))
    assert (p["round"], p["state"], p["command"]) == (1, ps.ASSIGNED, ["true", "again"])


@pytest.mark.parametrize(
    "message, code, words",
    [
        (DescribeProcess("nope"), "not_found", "no process 'nope'"),
        (KillProcess("nope"), "not_found", "no process"),
        (RestartProcess("nope"), "not_found", "no process"),
        (ScheduleProcess("p", definition_id="nodef"), "not_found", "no definition 'nodef'"),
        (ScheduleProcess("p"), "bad_request", "no command"),
        (ScheduleProcess("p", command=["x"], execution_engine_id="zz"), "bad_request", "unknown execution engine 'zz'"),
        (ScheduleProcess("p", command=["x"], queueing_mode="sometimes"), "bad_request", "queueing_mode"),
        (ScheduleProcess("p", command=["x"], restart_mode=3), "bad_request", "restart_mode: expected"),
        (ScheduleProcess("p", command="true"), "bad_request", "command: expected"),
        (ScheduleProcess("", command=["x"]), "bad_request", "upid: must not be empty"),
        (ScheduleProcess("p", command=["x"], constraints={"k": {"a": 1}}), "bad_request", "constraints"),
        (ScheduleProcess("p", command=["x"], execution_engine_id="e1", constraints={"engine": "e2"}), "bad_request", "contradicts"),
        (CreateProcess("p", "nodef"), "not_found", "no definition"),
        (NodeState("n9", "other_domain", "RUNNING", {}), "bad_request", "is not pd_domain_"),
        (NodeState("n9", "pd_domain_e1", "EXPLODED", {}), "bad_request", "unknown node state"),
        (AgentHeartbeat("a", "n1", 1.0, [{"upid": "u", "round": -1, "state": "RUNNING"}]), "bad_request", "round"),
        (AgentHeartbeat("a", "n1", 1.0, [{"upid": "u", "round": 0, "state": "DANCING"}]), "bad_request", "state"),
        (AgentHeartbeat("a", "n1", "now", []), "bad_request", "timestamp"),
        (DescribeProcesses(state="SLEEPY"), "bad_request", "unknown state"),
        (CreateDefinition("bad id!", {"exec": "x"}), "bad_request", "not a valid id"),
        (CreateDefinition("d", {"argv": []}), "bad_request", "needs 'exec'"),
        (UpdateDefinition("nodef", {"exec": "x"}), "not_found", "no definition"),
        (RemoveDefinition("nodef"), "not_found", "no definition"),
        ("not a message", "bad_request", "not a message"),
    ],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(message, code, words):
    sim = Sim()
    sim.add_node("n1")
    sim.ok(ScheduleProcess("p0", command=["sleep", "1"]))
    before, head = sim.state.to_data(), sim.runner.head
    err = sim.err(message)
    assert err.code == code and words in err.message, err
    assert sim.runner.head == head and sim.state.to_data() == before


def test_heartbeat_from_an_unknown_node_is_ignored():
    sim = Sim()
    head = sim.runner.head
    reply = sim.handle(AgentHeartbeat("ghost", "nowhere", sim.now, [{"upid": "x", "round": 0, "state": "RUNNING"}]))
    assert reply is None and sim.runner.head == head and not sim.state.resources


def test_definitions_and_created_processes():
    sim = Sim()
    sim.add_node("n1")
    d = sim.ok(CreateDefinition("sleeper", {"exec": "sleep", "argv": ["5"]}, name="Sleeper"))
    assert sim.ok(CreateDefinition("sleeper", {"exec": "sleep", "argv": ["5"]}, name="Sleeper")) == d
    assert sim.err(CreateDefinition("sleeper", {"exec": "sleep"})).code == "conflict"
    assert sim.ok(ListDefinitions()) == ["sleeper"]
    assert sim.ok(CreateProcess("p1", "sleeper"))["state"] == ps.UNSCHEDULED
    assert sim.ok(CreateProcess("p1", "sleeper"))["state"] == ps.UNSCHEDULED
    assert sim.err(CreateProcess("p1", "sleeper", name="other")).code == "bad_request"
    p = sim.ok(ScheduleProcess("p1"))
    assert p["state"] == ps.ASSIGNED and p["command"] == ["sleep", "5"] and p["definition_id"] == "sleeper"
    p2 = sim.ok(ScheduleProcess("p2", definition_id="sleeper", command=["sleep", "1"]))
    assert p2["command"] == ["sleep", "1"]
    sim.ok(UpdateDefinition("sleeper", {"exec": "sleep", "argv": ["7"]}))
    assert sim.ok(DescribeDefinition("sleeper"))["executable"]["argv"] == ["7"]
    sim.ok(RemoveDefinition("sleeper"))
    assert sim.ok(ListDefinitions()) == []
    assert sim.proc("p1").command == ["sleep", "5"]


def test_engine_selection_explicit_prefix_default():
    conf = config(
        engines={"e1": {"slots": 1}, "e2": {"slots": 1}, "e3": {"slots": 1}},
        default_engine="e1",
        process_engines={"ion.agents": "e2", "ion.agents.special": "e3"},
    )
    sim = Sim(conf)
    sim.ok(CreateDefinition("a", {"module": "ion.agents.x", "class": "X"}, definition_type="pyon"))
    sim.ok(CreateDefinition("b", {"module": "ion.agents.special.y", "class": "Y"}, definition_type="pyon"))
    sim.ok(CreateDefinition("c", {"module": "other", "class": "Z"}, definition_type="pyon"))
    assert sim.ok(ScheduleProcess("pa", "a", command=["x"]))["engine"] == "e2"
    assert sim.ok(ScheduleProcess("pb", "b", command=["x"]))["engine"] == "e3"
    assert sim.ok(ScheduleProcess("pc", "c", command=["x"]))["engine"] == "e1"
    assert sim.ok(ScheduleProcess("pd", "b", command=["x"], execution_engine_id="e1"))["engine"] == "e1"
    p = sim.ok(ScheduleProcess("pe", command=["x"], constraints={"engine": "e3"}))
    assert p["engine"] == "e3" and p["constraints"] == {"engine": "e3"}


def test_config_validation():
    with pytest.raises(ValueError, match="engines"):
        parse_config({})
    with pytest.raises(ValueError, match="slots"):
        parse_config({"engines": {"e": {}}})
    with pytest.raises(ValueError, match="go together"):
        parse_config({"engines": {"e": {"slots": 1, "heartbeat_warning": 5}}})
    with pytest.raises(ValueError, match="heartbeat_period < heartbeat_warning"):
        parse_config({"engines": {"e": {"slots": 1, "heartbeat_warning": 5, "heartbeat_missing": 4}}})
    with pytest.raises(ValueError, match="unknown keys"):
        parse_config({"engines": {"e": {"slots": 1}}, "bogus": 1})
    with pytest.raises(ValueError, match="default_engine"):
        parse_config({"engines": {"e": {"slots": 1}, "f": {"slots": 1}}, "default_engine": "g"})
    assert parse_config({"engines": {"e": {"slots": 1}}}).default_engine == "e"
    assert parse_config({"engines": {"e": {"slots": 1}}, "group_commit": False, "workers": 2})


# ---- restart and queueing modes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, ending, restarted",
    [
        ("ABNORMAL", ps.FAILED, True),
        ("ABNORMAL", ps.EXITED, False),
        ("ABNORMAL", ps.TERMINATED, True),
        ("ALWAYS", ps.EXITED, True),
        ("ALWAYS", ps.FAILED, True),
        ("NEVER", ps.FAILED, False),
        ("NEVER", ps.EXITED, False),
    ],
)
def test_restart_modes(mode, ending, restarted):
    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["x"], restart_mode=mode))
    sim.heartbeat(aid)
    sim.finish("p1", ending)
    sim.heartbeat(aid)
    p = sim.proc("p1")
    if restarted:
        assert (p.round, p.state) == (1, ps.ASSIGNED)
        assert sim.agents[aid].procs == {("p1", 1): ps.RUNNING}
    else:
        assert (p.round, p.state) == (0, ending)
        assert sim.agents[aid].procs == {}


@pytest.mark.parametrize(
    "mode, first_state, restart_state",
    [
        ("ALWAYS", ps.WAITING, ps.WAITING),
        ("NEVER", ps.REJECTED, ps.REJECTED),
        ("START_ONLY", ps.WAITING, ps.REJECTED),
        ("RESTART_ONLY", ps.REJECTED, ps.WAITING),
    ],
)
def test_queueing_modes(mode, first_state, restart_state):
    sim = Sim()
    assert sim.ok(ScheduleProcess("first", command=["x"], queueing_mode=mode))["state"] == first_state
    # a process that ran once and must restart with no slot free
    [aid] = sim.add_node("n1", slots=99)
    sim.ok(ScheduleProcess("p", command=["x"], queueing_mode=mode, restart_mode="ALWAYS"))
    sim.heartbeat(aid)
    assert sim.pstate("p") == ps.RUNNING
    for i in range(4):
        sim.ok(ScheduleProcess(f"fill{i}", command=["x"]))
    sim.lose_node("n1")
    assert sim.proc("p").round == 1 and sim.pstate("p") == restart_state


def test_throttling_holds_a_crash_loop_between_starts():
    sim = Sim(config(restart_throttling_config={"minimum_time_between_starts": 5.0}))
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["false"], restart_mode="ALWAYS"))
    for expected_round in (1, 2):
        sim.heartbeat(aid)
        sim.finish("p1", ps.FAILED)
        sim.heartbeat(aid)
        assert sim.proc("p1").round == expected_round
    assert sim.pstate("p1") == ps.WAITING  # third dispatch: throttled
    assert sim.timers["throttle"].delay == pytest.approx(5.0)
    sim.now += 4.9
    sim.handle(Matchmake())
    assert sim.pstate("p1") == ps.WAITING
    sim.now += 0.2
    sim.handle(Matchmake())
    assert sim.pstate("p1") == ps.ASSIGNED and sim.proc("p1").dispatches == 3


def test_per_process_throttle_overrides_global():
    sim = Sim(config(restart_throttling_config={"minimum_time_between_starts": 100.0}))
    [aid] = sim.add_node("n1")
    sim.ok(
        ScheduleProcess(
            "p1", command=["false"], restart_mode="ALWAYS",
            configuration={"process": {"minimum_time_between_starts": 0}},
        )
    )
    for _ in range(4):
        sim.heartbeat(aid)
        sim.finish("p1", ps.FAILED)
        sim.heartbeat(aid)
    assert sim.proc("p1").round == 4 and sim.pstate("p1") == ps.ASSIGNED


# ---- terminate and restart ---------------------------------------------------------------------


def test_terminate_queued_assigned_and_running():
    sim = Sim(config(engines={ENGINE: {"slots": 1}}))
    assert sim.ok(ScheduleProcess("q", command=["x"]))["state"] == ps.WAITING
    assert sim.ok(KillProcess("q"))["state"] == ps.TERMINATED
    assert sim.state.mm.where == {}
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("r", command=["x"]))
    sim.heartbeat(aid)
    p = sim.ok(KillProcess("r"))
    assert p["state"] == ps.TERMINATING
    assert any(isinstance(s.message, TerminateProcess) and s.message.upid == "r" for s in sim.sent)
    sim.ok(ScheduleProcess("next", command=["x"]))
    assert sim.pstate("next") == ps.WAITING  # the slot is still held while terminating
    sim.heartbeat(aid)
    assert sim.pstate("r") == ps.TERMINATED and sim.pstate("next") == ps.ASSIGNED
    assert sim.ok(KillProcess("r"))["state"] == ps.TERMINATED  # at rest: a no-op


def test_restart_process_in_place_end_to_end():
    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["sleep", "9"]))
    sim.heartbeat(aid)
    p = sim.ok(RestartProcess("p1"))
    assert (p["round"], p["state"], p["assigned"]) == (1, ps.ASSIGNED, aid)
    assert sim.agents[aid].procs == {("p1", 1): ps.RUNNING}
    sim.heartbeat(aid)
    p = sim.proc("p1")
    assert (p.round, p.state, p.starts, p.dispatches) == (1, ps.RUNNING, 2, 2)
    # restart of a finished process requeues it in a new round
    sim.finish("p1", ps.EXITED)
    sim.heartbeat(aid)
    assert sim.pstate("p1") == ps.EXITED
    assert sim.ok(RestartProcess("p1"))["round"] == 2 and sim.pstate("p1") == ps.ASSIGNED
    sim.ok(ScheduleProcess("w", command=["x"], constraints={"color": "red"}))
    assert sim.err(RestartProcess("w")).code == "conflict"


def test_stale_heartbeat_of_an_older_round_gets_terminated():
    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["x"]))
    sim.heartbeat(aid)
    sim.ok(RestartProcess("p1"))
    # an agent that still reports the old round RUNNING (e.g. it missed the supersede)
    sim.agents[aid].procs[("p1", 0)] = ps.RUNNING
    sim.sent.clear()
    sim.heartbeat(aid)
    assert [s.message for s in sim.sent if isinstance(s.message, TerminateProcess)] == [TerminateProcess("p1", 0)]
    assert sim.state.resources[aid].foreign == 1


def test_an_unchanged_quiet_heartbeat_is_short_circuited_until_the_pd_changes_its_processes():
    """Decision SIM7: a heartbeat equal to the agent's last one that asked for nothing is
    not looked at again; any event on one of its processes makes the next one count."""
    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["x"]))
    sim.ok(ScheduleProcess("p2", command=["x"]))
    sim.heartbeat(aid)  # ASSIGNED -> RUNNING: the same list again asks for nothing (SC13)
    rows = [{"upid": u, "round": 0, "state": ps.RUNNING, "msg": ""} for u in ("p1", "p2")]
    assert sim.state.soft.quiet[aid] == rows
    sim.heartbeat(aid)
    assert sim.state.soft.quiet[aid] == [
        {"upid": u, "round": 0, "state": ps.RUNNING, "msg": ""} for u in ("p1", "p2")]
    head = sim.runner.head
    sim.sent.clear()
    sim.heartbeat(aid)
    assert sim.runner.head == head and sim.sent == []
    # the PD restarts p1 while the agent misses it: the same heartbeat now reports a stale round
    sim.agents[aid].up = False
    sim.ok(RestartProcess("p1"))
    sim.agents[aid].up = True
    assert aid not in sim.state.soft.quiet
    sim.sent.clear()
    sim.heartbeat(aid)
    assert [s.message for s in sim.sent if isinstance(s.message, TerminateProcess)] == [TerminateProcess("p1", 0)]
    assert sim.state.resources[aid].foreign == 1 and aid not in sim.state.soft.quiet
    check_invariants(sim.state)


def test_a_quiet_heartbeat_stays_quiet_through_events_that_cannot_change_its_pass():
    """Decision SC1: a new node, a node retiring, a forget of finished processes and a
    definition do not forget an agent's quiet heartbeat; a removed node forgets its own
    agents' only."""
    sim = Sim(config(retention=1.0))
    [a1] = sim.add_node("n1")
    [a2] = sim.add_node("n2")
    sim.ok(ScheduleProcess("done", command=["x"]))
    done_on = sim.proc("done").resource_id
    sim.heartbeat(done_on)
    sim.finish("done", ps.EXITED)
    sim.heartbeat(done_on)  # EXITED: cleaned up, and its slot is free again
    sim.ok(ScheduleProcess("p1", command=["x"]))
    sim.ok(ScheduleProcess("p2", command=["x"]))
    sim.ok(ScheduleProcess("p3", command=["x"]))
    for _ in range(2):
        sim.heartbeat(a1)
        sim.heartbeat(a2)
    assert set(sim.state.soft.quiet) == {a1, a2}
    assert sim.state.resources[a1].assigned and sim.state.resources[a2].assigned
    sim.ok(CreateDefinition("d1", {"exec": "x"}))
    sim.add_node("n3")  # NodeAdded (its agent's first heartbeat asks for nothing either)
    sim.now += 5.0
    sim.handle(ForgetProcesses())  # ProcessesForgotten of "done"
    assert "done" in sim.state.tombstones
    assert {a1, a2} <= set(sim.state.soft.quiet)
    head = sim.runner.head
    sim.sent.clear()
    sim.heartbeat(a1)
    assert sim.runner.head == head and sim.sent == []
    sim.lose_node("n2")
    assert a2 not in sim.state.soft.quiet and a1 in sim.state.soft.quiet
    check_invariants(sim.state)


# ---- nodes, resources, failures ---------------------------------------------------------------


def test_node_loss_restarts_or_fails_by_mode_and_places_elsewhere():
    sim = Sim()
    [a1] = sim.add_node("n1")
    sim.ok(ScheduleProcess("abn", command=["x"]))
    sim.ok(ScheduleProcess("never", command=["x"], restart_mode="NEVER"))
    sim.heartbeat(a1)
    [a2] = sim.add_node("n2")
    sim.lose_node("n1", "FAILED")  # EPUM's FAILED counts as node loss
    assert sim.proc("never").state == ps.FAILED
    p = sim.proc("abn")
    assert (p.round, p.state, p.resource_id) == (1, ps.ASSIGNED, a2)
    assert "n1" not in sim.state.nodes and a1 not in sim.state.resources
    check_invariants(sim.state)


def test_terminating_process_on_a_lost_node_is_terminated():
    sim = Sim()
    [a1] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p", command=["x"]))
    sim.heartbeat(a1)
    sim.ok(KillProcess("p"))
    sim.lose_node("n1")
    assert sim.pstate("p") == ps.TERMINATED


def test_resource_monitor_warning_missing_evacuation_and_return():
    sim = Sim()
    [a1] = sim.add_node("n1")
    [a2] = sim.add_node("n2")
    sim.ok(ScheduleProcess("p", command=["x"]))
    sim.ok(ScheduleProcess("q", command=["x"], restart_mode="NEVER"))
    host = sim.proc("p").resource_id
    other = a2 if host == a1 else a1
    sim.heartbeat_all()
    sim.now += 2.5
    sim.heartbeat(other)
    sim.handle(MonitorResources())
    assert sim.state.resources[host].state == ps.RESOURCE_OK
    sim.now += 0.6  # 3.1 s without a heartbeat from host
    sim.heartbeat(other)
    sim.handle(MonitorResources())
    assert sim.state.resources[host].state == ps.RESOURCE_WARNING
    sim.now += 1.9
    sim.heartbeat(other)
    sim.handle(MonitorResources())
    assert sim.state.resources[host].state == ps.RESOURCE_WARNING  # missing-warning = 2 s not over
    sim.now += 0.2
    sim.handle(MonitorResources())
    assert sim.state.resources[host].state == ps.RESOURCE_MISSING
    # MISSING, but its agent may still run them until its lease has run out (PD9): the
    # fence time (15 s) plus the margin (3 s) since its last heartbeat
    assert (sim.proc("p").round, sim.proc("p").resource_id) == (0, host)
    sim.now += 18.0 - 5.2 - 0.01
    sim.heartbeat(other)
    sim.handle(MonitorResources())
    assert (sim.proc("p").round, sim.proc("p").resource_id) == (0, host)
    sim.now += 0.02
    sim.heartbeat(other)
    sim.handle(MonitorResources())
    p, q = sim.proc("p"), sim.proc("q")
    assert (p.round, p.state, p.resource_id) == (1, ps.ASSIGNED, other)
    assert (q.round, q.state) == (0, ps.FAILED) and sim.state.resources[host].assigned == {}
    # the agent comes back: its stale copies are terminated, the resource is OK again
    sim.sent.clear()
    sim.heartbeat(host)
    assert sim.state.resources[host].state == ps.RESOURCE_OK
    stale = {(m.upid, m.round) for m in (s.message for s in sim.sent) if isinstance(m, TerminateProcess)}
    assert ("p", 0) in stale
    check_invariants(sim.state)


def test_monitor_tolerates_a_skewed_agent_clock():
    sim = Sim()
    [a1] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p", command=["x"]))
    for _ in range(20):  # the agent's clock is 10 s behind, but it keeps talking
        sim.now += 1.0
        sim.heartbeat(a1, timestamp=sim.now - 10.0)
        sim.handle(MonitorResources())
    assert sim.state.resources[a1].state == ps.RESOURCE_WARNING
    assert sim.pstate("p") in (ps.ASSIGNED, ps.RUNNING) and sim.proc("p").round == 0
    sim.heartbeat(a1, timestamp=sim.now + 50.0)  # future timestamps are clamped
    assert sim.state.resources[a1].state == ps.RESOURCE_OK


def test_constrained_process_waits_for_a_matching_node():
    sim = Sim()
    sim.add_node("plain")
    sim.ok(ScheduleProcess("gpu", command=["x"], constraints={"gpu": "yes"}))
    sim.ok(ScheduleProcess("any", command=["x"], constraints={"zone": ["a", "b"]}))
    assert sim.pstate("gpu") == ps.WAITING and sim.pstate("any") == ps.WAITING
    [g] = sim.add_node("g1", gpu="yes", zone="c")
    assert sim.proc("gpu").resource_id == g and sim.pstate("any") == ps.WAITING
    [z] = sim.add_node("z1", zone="b")
    assert sim.proc("any").resource_id == z


def test_node_exclusive_never_shares_a_node():
    sim = Sim()
    for i in range(3):
        sim.add_node(f"n{i}")
    for i in range(5):
        sim.ok(ScheduleProcess(f"x{i}", command=["x"], node_exclusive="T"))
    sim.ok(ScheduleProcess("plain", command=["x"]))
    placed = [sim.proc(f"x{i}").node_id for i in range(5)]
    assert sorted(n for n in placed if n) == ["n0", "n1", "n2"]
    assert placed.count(None) == 2
    check_invariants(sim.state)
    sim.heartbeat_all()
    first = next(f"x{i}" for i in range(5) if sim.proc(f"x{i}").node_id == "n1")
    sim.ok(KillProcess(first))
    sim.heartbeat_all()
    assert sorted(sim.proc(f"x{i}").node_id or "-" for i in range(5)).count("n1") == 1
    check_invariants(sim.state)


def test_bin_packing_fills_occupied_nodes_and_balances_agents_within_a_node():
    sim = Sim(config(engines={ENGINE: {"slots": 2, "replicas": 2}}))
    sim.add_node("n1", agents=2)
    sim.add_node("n2", agents=2)
    for i in range(4):
        sim.ok(ScheduleProcess(f"p{i}", command=["x"]))
    nodes = [sim.proc(f"p{i}").node_id for i in range(4)]
    assert nodes == ["n1"] * 4
    agents = [sim.proc(f"p{i}").resource_id for i in range(4)]
    assert agents == ["n1-a0", "n1-a1", "n1-a0", "n1-a1"]
    sim.ok(ScheduleProcess("p4", command=["x"]))
    assert sim.proc("p4").node_id == "n2"


def test_agent_rejection_requeues():
    sim = Sim()
    [aid] = sim.add_node("n1", slots=1)  # the agent has fewer slots than the PD thinks (2)
    sim.ok(ScheduleProcess("a", command=["x"]))
    sim.ok(ScheduleProcess("b", command=["x"]))
    assert sim.agents[aid].procs[("b", 0)] == ps.REJECTED
    sim.heartbeat(aid)
    b = sim.proc("b")
    assert b.round == 1 and b.state in (ps.WAITING, ps.ASSIGNED)


def test_lost_launch_is_resent_and_agent_forgetting_a_process_counts_as_failure():
    sim = Sim(config(dispatch_retry_seconds=2.0))
    [aid] = sim.add_node("n1")
    sim.agents[aid].up = False  # the launch is lost
    sim.ok(ScheduleProcess("p", command=["x"]))
    sim.agents[aid].up = True
    sim.now += 1.0
    sim.handle(RetryDispatches())
    assert sim.agents[aid].procs == {}
    sim.now += 1.5
    sim.handle(RetryDispatches())
    assert sim.agents[aid].procs == {("p", 0): ps.RUNNING}
    sim.heartbeat(aid)
    assert sim.pstate("p") == ps.RUNNING
    sim.agents[aid].procs.clear()  # e.g. its state dir was wiped
    sim.now += 0.1
    sim.heartbeat(aid)
    p = sim.proc("p")
    assert (p.round, p.state) == (1, ps.ASSIGNED)


# ---- needs, system boot, EPUM ------------------------------------------------------------------


def test_need_formula_and_retirement_order():
    spec = EngineSpec("e", slots=4, replicas=2, spare_slots=3, base_need=1, maximum_vms=5)
    assert need(spec, 0, 0) == 1
    assert need(spec, 6, 0) == 2  # ceil((6 + 3) / 8)
    assert need(spec, 1, 3) == 3  # occupied nodes
    assert need(spec, 1000, 0) == 5  # capped
    nodes = [("n5", False, False), ("n4", True, False), ("n3", False, False), ("n2", False, False), ("n1", False, True)]
    assert retirable(nodes, 5, 2) == ["n1", "n5", "n3"]  # the broken one first, then newest
    assert retirable(nodes, 5, 4) == ["n1"]
    assert retirable(nodes, 5, 5) == []


def test_needs_sent_to_epum_and_idle_nodes_retired_newest_first():
    sim = Sim(config(engines={ENGINE: {"slots": 2, "base_need": 1}}, needs_interval=0.0))
    assert isinstance(sim.sent[0].message, AddDomain) and isinstance(sim.sent[1].message, SubscribeDomain)
    assert sim.sent[0].message.config["engine_conf"]["provisioner_vars"]["slots"] == 2
    assert sim.needs[-1] == RegisterNeed("pd_domain_e1", 1, [])
    for i in range(5):
        sim.ok(ScheduleProcess(f"p{i}", command=["x"]))
    assert sim.needs[-1].count == 3
    for i in range(4):
        sim.add_node(f"n{i}")
    # 5 processes on 2 slots each: n0, n1, n2 hold them; n3 is idle and newest
    assert sim.needs[-1] == RegisterNeed("pd_domain_e1", 3, ["n3"])
    assert sim.state.nodes["n3"].retiring
    for i in range(5):
        sim.ok(KillProcess(f"p{i}"))
    sim.heartbeat_all()
    last = sim.needs[-1]
    assert last.count == 1 and last.retirable_nodes == ["n3", "n2", "n1"]
    sim.ok(ScheduleProcess("again", command=["x"]))
    assert sim.proc("again").node_id == "n0"
    for i in range(3):
        sim.ok(ScheduleProcess(f"more{i}", command=["x"]))
    assert sim.needs[-1].count == 2 and sim.needs[-1].retirable_nodes == ["n3", "n2"]
    assert not sim.state.nodes["n1"].retiring


def test_a_recovered_pd_gives_back_to_service_the_nodes_its_need_no_longer_retires():
    """Decision SC5: a leader looks only at the nodes its last need named when it un-retires;
    a new leader (no need sent yet) looks at every node."""
    sim = Sim(config(engines={ENGINE: {"slots": 2, "base_need": 1}}, needs_interval=5.0))
    for i in range(4):
        sim.add_node(f"n{i}")
    sim.now += 5.0
    sim.handle(sim.timers["needs"].message)
    assert sim.needs[-1].retirable_nodes == ["n3", "n2", "n1"]
    assert [n for n in ("n0", "n1", "n2", "n3") if sim.state.nodes[n].retiring] == ["n1", "n2", "n3"]
    for i in range(3):  # the need rises, but is held back by needs_interval
        sim.ok(ScheduleProcess(f"p{i}", command=["x"]))
    sim.crash()
    assert sim.needs[-1].count == 2 and sim.needs[-1].retirable_nodes == ["n3", "n2"]
    assert [n for n in ("n0", "n1", "n2", "n3") if sim.state.nodes[n].retiring] == ["n2", "n3"]
    assert sim.state == sim.replayed()


def test_needs_are_rate_limited_and_flushed_by_timer():
    sim = Sim(config(needs_interval=5.0))
    sent = len(sim.needs)
    sim.ok(ScheduleProcess("a", command=["x"]))
    sim.ok(ScheduleProcess("b", command=["x"]))
    sim.ok(ScheduleProcess("c", command=["x"]))
    assert len(sim.needs) == sent and "needs" in sim.timers
    sim.now += 5.0
    sim.handle(sim.timers["needs"].message)
    assert sim.needs[-1].count == 2 and len(sim.needs) == sent + 1


def test_needs_and_subscription_are_refreshed_even_when_unchanged():
    sim = Sim(config(needs_interval=0.0, needs_refresh=30.0))
    sim.ok(ScheduleProcess("a", command=["x"]))
    sim.add_node("n1")
    sent, head = len(sim.sent), sim.runner.head
    sim.now += 10.0
    sim.handle(RetryDispatches())
    assert not [e for e in sim.sent[sent:] if e.to == "epum"]  # nothing changed, not yet due
    sim.now += 25.0
    sim.handle(RetryDispatches())
    to_epum = [e.message for e in sim.sent[sent:] if e.to == "epum"]
    assert to_epum == [SubscribeDomain("pd_domain_e1", "pd", known=["n1"]),
                       RegisterNeed("pd_domain_e1", 1, [])]
    assert sim.runner.head == head  # the refresh itself writes nothing
    sent = len(sim.sent)
    sim.now += 1.0
    sim.handle(RetryDispatches())
    assert not [e for e in sim.sent[sent:] if e.to == "epum"]  # next one in 30 s


def test_static_resources_send_nothing_to_epum():
    sim = Sim(config(static_resources=True))
    sim.add_node("n1")
    sim.ok(ScheduleProcess("a", command=["x"]))
    assert not [s for s in sim.sent if s.to == "epum"]


def test_system_boot_parks_and_releases_processes():
    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("r", command=["x"]))
    sim.ok(ScheduleProcess("n", command=["x"], restart_mode="NEVER"))
    sim.ok(ScheduleProcess("o", command=["x"], configuration={"process": {"omit_from_system_restart": True}}))
    sim.ok(ScheduleProcess("w", command=["x"], constraints={"k": "v"}))
    sim.heartbeat(aid)
    assert sim.ok(SetSystemBoot(True)) == {"system_boot": True}
    got = {u: (sim.proc(u).state, sim.proc(u).round) for u in "rnow"}
    assert got == {
        "r": (ps.UNSCHEDULED_PENDING, 1),
        "n": (ps.TERMINATED, 0),
        "o": (ps.TERMINATED, 0),
        "w": (ps.UNSCHEDULED_PENDING, 1),
    }
    assert not sim.state.nodes
    assert sim.ok(Dump())["needs"][ENGINE]["need"] == 1  # parked processes count
    sim.ok(ScheduleProcess("new", command=["x"]))  # scheduling works while booting
    [a2] = sim.add_node("n2")
    assert sim.pstate("new") == ps.ASSIGNED and sim.pstate("r") == ps.UNSCHEDULED_PENDING
    sim.ok(SetSystemBoot(False))
    assert sim.pstate("r") == ps.ASSIGNED and sim.proc("r").round == 1
    assert sim.pstate("w") == ps.WAITING
    check_invariants(sim.state)


def test_subscribers_are_notified_of_every_state_change():
    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p", command=["x"], subscribers=["ha", "me"]))
    sim.heartbeat(aid)
    sim.finish("p", ps.EXITED)
    sim.heartbeat(aid)
    states = [n["state"] for to, n in sim.notices if to == "ha"]
    assert states == [ps.REQUESTED, ps.ASSIGNED, ps.RUNNING, ps.EXITED]
    assert len([1 for to, _ in sim.notices if to == "me"]) == 4
    # an exit between two heartbeats still records the start
    sim.ok(ScheduleProcess("quick", command=["true"], subscribers=["ha"]))
    sim.finish("quick", ps.EXITED)
    sim.heartbeat(aid)
    assert sim.proc("quick").starts == 1
    assert [n["state"] for to, n in sim.notices if to == "ha" and n["upid"] == "quick"][-2:] == [ps.RUNNING, ps.EXITED]
    assert sim.ok(ProcessCounts()) == {ps.EXITED: 2}


# ---- recovery ------------------------------------------------------------------------------------


@pytest.mark.parametrize("snapshot", [False, True])
def test_crash_and_recover_keeps_every_process_and_places_the_queue(snapshot):
    sim = Sim(config(engines={ENGINE: {"slots": 2}}))
    [a1] = sim.add_node("n1")
    for i in range(5):
        sim.ok(ScheduleProcess(f"p{i}", command=["x"]))
    sim.heartbeat(a1)  # p0, p1 RUNNING; p2..p4 waiting
    sim.agents[a1].up = False
    sim.ok(NodeState("n2", "pd_domain_e1", "RUNNING", {}))  # known, but its agent not heard yet
    before = sim.state.to_data()
    sim.crash(snapshot=snapshot)
    assert sim.state.to_data() == before and sim.state == sim.replayed()
    check_invariants(sim.state)
    sim.agents[a1].up = True
    from pd_harness import Agent

    sim.agents["n2-a0"] = Agent("n2-a0", "n2")
    sim.heartbeat_all()
    assert {sim.pstate(f"p{i}") for i in range(2)} == {ps.RUNNING}
    assert sorted(sim.pstate(f"p{i}") for i in range(2, 5)) == [ps.ASSIGNED, ps.ASSIGNED, ps.WAITING]
    copies = sim.running_copies()
    assert all(len(v) == 1 for v in copies.values())
    check_invariants(sim.state)


def test_recovery_resends_unacknowledged_launches_on_the_first_heartbeat():
    sim = Sim()
    [a1] = sim.add_node("n1")
    sim.agents[a1].up = False
    sim.ok(ScheduleProcess("p", command=["x"]))
    sim.crash()
    sim.agents[a1].up = True
    sim.heartbeat(a1)  # the first heartbeat to the new leader: launch resent
    assert sim.agents[a1].procs == {("p", 0): ps.RUNNING}
    sim.heartbeat(a1)
    assert sim.pstate("p") == ps.RUNNING


def test_decide_applies_as_it_goes_and_state_equals_replay():
    sim = Sim()
    sim.add_node("n1")
    sim.add_node("n2")
    for i in range(6):
        sim.ok(ScheduleProcess(f"p{i}", command=["x"], restart_mode="ALWAYS"))
    sim.heartbeat_all()
    sim.lose_node("n1")
    assert sim.state == sim.replayed()
    assert not sim.state.pre
    # the runner applied nothing twice: counts match the records
    d = sim.ok(Dump())
    assert sum(d["counts"].values()) == len(d["processes"]) == 6


def test_unknown_message_type_and_replies_from_peers():
    sim = Sim()
    from cei_actors.runtime.messages import ErrorReply, Ok

    assert sim.handle(Ok(1)) is None and sim.handle(ErrorReply("conflict", "exists")) is None
    assert sim.err(Send("x", 1)).code == "bad_request"


def test_a_failing_handler_does_not_leave_the_outbox_stuck(monkeypatch):
    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p", command=["x"]))
    sim.heartbeat(aid)
    sim.finish("p", ps.EXITED)
    import cei_actors.pd.logic as logic

    real = logic.Tx.ended

    def boom(self, *a):
        self.cleanup(aid, "zz", 0)  # queued, then the handler fails before any event
        raise RuntimeError("boom")

    monkeypatch.setattr(logic.Tx, "ended", boom)
    assert sim.err(AgentHeartbeat(aid, "n1", sim.now, [{"upid": "p", "round": 0, "state": "EXITED"}])).code == "internal"
    monkeypatch.setattr(logic.Tx, "ended", real)
    sim.heartbeat(aid)
    assert sim.pstate("p") == ps.EXITED and sim.agents[aid].procs == {}


def test_a_heartbeat_is_answered_with_its_decision_unless_requests_wait_for_the_agent():
    """Decision SC6: the requests a heartbeat leads to (here a cleanup) go to its agent with
    the decision, as one message; if earlier requests wait in the outbox for that agent, they
    join them there, after them."""
    from cei_actors.eeagent.messages import AgentRequests, CleanupProcess
    from cei_actors.pd.messages import FlushOutbox
    from cei_actors.runtime.core import SetTimer

    sim = Sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p", command=["x"]))
    sim.heartbeat(aid)
    sim.finish("p", ps.EXITED)
    report = [{"upid": "p", "round": 0, "state": ps.EXITED, "msg": ""}]
    d = sim.runner.handle(AgentHeartbeat(aid, "n1", sim.now, report, 0))
    assert [(e.to, e.message) for e in d.effects if isinstance(e, Send)] == [
        (f"eeagent:{aid}", CleanupProcess("p", 0))]
    assert not any(isinstance(e, SetTimer) and e.key == "outbox" for e in d.effects)
    assert sim.state.soft.outbox == {}
    # a launch to the agent waits in the outbox: the next heartbeat's requests go after it
    d1 = sim.runner.handle(ScheduleProcess("q", command=["x"]))
    assert [e.key for e in d1.effects if isinstance(e, SetTimer)] == ["outbox"]
    sim.now += 10.0  # the agent still reports p: the cleanup is asked again
    d2 = sim.runner.handle(AgentHeartbeat(aid, "n1", sim.now, report, 0))
    assert not [e for e in d2.effects if isinstance(e, Send) and e.to.startswith("eeagent:")]
    d3 = sim.runner.handle(FlushOutbox())  # the outbox timer
    [(to, batch)] = [(e.to, e.message) for e in d3.effects if isinstance(e, Send)]
    assert to == f"eeagent:{aid}" and isinstance(batch, AgentRequests)
    assert [type(r).__name__ for r in batch.requests] == ["LaunchProcess", "CleanupProcess"]


def test_component_has_a_stream_and_registry():
    pd = ProcessDispatcher(config())
    assert pd.stream == "pd" and "ProcessAssigned" in pd.registry.names()


# ---- the agents' lease (decision PD9) ---------------------------------------------------------


def grants(sim: Sim) -> list[tuple[str, LeaseGrant]]:
    return [(s.to, s.message) for s in sim.sent if isinstance(s.message, LeaseGrant)]


def test_lease_grants_answer_heartbeats_that_ask_and_are_rate_limited():
    sim = Sim(config(fence_time=8.0, fence_margin=1.0))
    [a1] = sim.add_node("n1")
    sim.sent.clear()
    sim.heartbeat(a1, seq=1)
    assert grants(sim) == [(f"eeagent:{a1}", LeaseGrant(1, 8.0))]
    sim.now += 0.5  # within fence_time / 8: not granted again
    sim.heartbeat(a1, seq=2)
    assert len(grants(sim)) == 1
    sim.now += 0.5
    sim.heartbeat(a1, seq=3)
    assert grants(sim)[-1] == (f"eeagent:{a1}", LeaseGrant(3, 8.0))


def test_silent_agent_work_moves_only_after_fence_plus_margin_since_its_last_grant():
    sim = Sim(config(fence_time=8.0, fence_margin=1.0))
    [a1] = sim.add_node("n1")
    [a2] = sim.add_node("n2")
    sim.ok(ScheduleProcess("p", command=["x"]))
    host = sim.proc("p").resource_id
    other = a2 if host == a1 else a1
    sim.heartbeat(host, seq=1)  # granted at t0
    t0 = sim.now
    sim.now += 0.5
    sim.heartbeat(host, seq=2)  # heard, but not granted: the agent's lease still ends at t0 + 8
    while sim.now < t0 + 9.0 - 0.25:
        sim.now += 0.2
        sim.heartbeat(other, seq=0)
        sim.handle(MonitorResources())
        assert (sim.proc("p").round, sim.proc("p").resource_id) == (0, host), sim.now - t0
    assert sim.state.resources[host].state == ps.RESOURCE_MISSING
    sim.now = t0 + 9.0
    sim.heartbeat(other)
    sim.handle(MonitorResources())
    p = sim.proc("p")
    assert (p.round, p.resource_id) == (1, other)
    check_invariants(sim.state)


def test_node_lost_but_not_dead_keeps_its_work_until_the_lease_runs_out():
    """RUNNING_FAILED (or TERMINATING) says the node is lost, not that its processes ended:
    nothing more is placed there, but its work moves only once its agent must have fenced."""
    sim = Sim(config(fence_time=8.0, fence_margin=1.0))
    [a1] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p", command=["x"]))
    sim.heartbeat(a1, seq=1)
    t0 = sim.now
    sim.ok(NodeState("n1", "pd_domain_" + ENGINE, "RUNNING_FAILED", {}))
    assert sim.state.resources[a1].state == ps.RESOURCE_MISSING
    assert (sim.proc("p").round, sim.proc("p").resource_id) == (0, a1)
    [a2] = sim.add_node("n2")  # a new node: new work goes there, p stays
    sim.ok(ScheduleProcess("q", command=["x"]))
    assert sim.proc("q").resource_id == a2 and sim.proc("p").resource_id == a1
    sim.sent.clear()
    sim.now = t0 + 5.0
    sim.heartbeat(a1, seq=2)  # the doomed node's agent still talks: heard, never renewed
    assert grants(sim) == [] and sim.state.resources[a1].state == ps.RESOURCE_MISSING
    sim.handle(RetryDispatches())
    assert "n1" in sim.state.nodes and sim.proc("p").round == 0
    sim.now = t0 + 9.0
    sim.handle(RetryDispatches())
    assert "n1" not in sim.state.nodes
    p = sim.proc("p")
    assert (p.round, p.resource_id) == (1, a2)
    check_invariants(sim.state)


def test_confirmed_dead_node_loses_its_work_at_once():
    sim = Sim(config(fence_time=8.0, fence_margin=1.0))
    [a1] = sim.add_node("n1")
    [a2] = sim.add_node("n2")
    sim.ok(ScheduleProcess("p", command=["x"]))
    host = sim.proc("p").resource_id
    sim.heartbeat(host, seq=1)
    sim.ok(NodeState("n1" if host == a1 else "n2", "pd_domain_" + ENGINE, "RUNNING_FAILED", {}))
    sim.lose_node("n1" if host == a1 else "n2", "TERMINATED")  # its VM is gone
    p = sim.proc("p")
    assert p.round == 1 and p.resource_id == (a2 if host == a1 else a1)


def test_a_new_leader_starts_every_lease_afresh():
    """After a recovery the PD has no record of grants: it assumes one at its recovery."""
    sim = Sim(config(fence_time=8.0, fence_margin=1.0))
    [a1] = sim.add_node("n1")
    [a2] = sim.add_node("n2")
    sim.ok(ScheduleProcess("p", command=["x"]))
    host = sim.proc("p").resource_id
    other = a2 if host == a1 else a1
    sim.heartbeat(host, seq=1)
    sim.now += 7.0
    sim.crash()
    sim.handle(MonitorResources())
    t1 = sim.now
    while sim.now + 0.5 < t1 + 9.0:
        sim.now += 0.5
        sim.heartbeat(other)
        sim.handle(MonitorResources())
        assert sim.proc("p").resource_id == host
    sim.now = t1 + 9.0
    sim.heartbeat(other)
    sim.handle(MonitorResources())
    assert sim.proc("p").resource_id == other


@pytest.mark.parametrize("bad", [{"fence_time": 0}, {"fence_time": "x"}, {"fence_margin": -1}, {"fence_time": True}])
def test_fence_config_is_checked(bad):
    with pytest.raises(ValueError, match="fence_.* must be seconds"):
        parse_config(config(**bad))


def crash_loop_sim(**over):
    return Sim(config(crash_backoff_base=1.0, crash_backoff_max=8.0, crash_stable_run=10.0, **over))


def crash(sim, aid, upid="p1"):
    """The current round fails on its agent; the PD hears it."""
    sim.heartbeat(aid)
    sim.finish(upid, ps.FAILED)
    sim.heartbeat(aid)


def start_when_due(sim, upid="p1"):
    """Let time pass to the throttle timer (if any) and matchmake; returns the wait."""
    p = sim.proc(upid)
    wait = max(0.0, p.retry_at - sim.now)
    sim.now += wait
    sim.handle(Matchmake())
    return wait


def test_a_crash_loop_backs_off_exponentially_capped_and_shows_as_such():
    """ABNORMAL restarts of a command that always fails: the first quick failure restarts at
    once, then 1, 2, 4, 8, 8 s (cap) between starts, as ProcessBackoff events; describe says
    CrashLoopBackOff with the count and the next start (decision OP3)."""
    from cei_actors.pd.events import ProcessBackoff

    sim = crash_loop_sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["false"], restart_mode="ABNORMAL"))
    waits = []
    for _ in range(7):
        crash(sim, aid)
        if sim.pstate("p1") in ps.QUEUED:
            desc = sim.ok(DescribeProcesses(["p1"]))[0]
            if sim.proc("p1").crashes >= 2:
                assert desc["status"] == ps.CRASH_LOOP and desc["restarts"] == sim.proc("p1").crashes
                assert desc["next_start"] == pytest.approx(sim.now + waits_expected(sim.proc("p1").crashes))
                assert desc["msg"].startswith("CrashLoopBackOff: ")
                # nothing starts before the backoff ends
                sim.now += waits_expected(sim.proc("p1").crashes) - 0.1
                sim.handle(Matchmake())
                assert sim.pstate("p1") in ps.QUEUED
                sim.now -= waits_expected(sim.proc("p1").crashes) - 0.1
        waits.append(start_when_due(sim))
        assert sim.pstate("p1") == ps.ASSIGNED
    assert waits == pytest.approx([0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
    backoffs = [e for e in events_of(sim) if isinstance(e, ProcessBackoff)]
    assert [e.failures for e in backoffs] == [1, 2, 3, 4, 5, 6, 7]
    # the backoff is state: a new leader keeps it
    crash(sim, aid)
    before = sim.ok(DescribeProcesses(["p1"]))[0]
    sim.crash()
    assert sim.ok(DescribeProcesses(["p1"]))[0]["next_start"] == before["next_start"]
    assert sim.state == sim.replayed()


def waits_expected(failures: int) -> float:
    return min(1.0 * 2 ** (failures - 2), 8.0)


def events_of(sim):
    decode = sim.runner.component.registry.from_record
    return [decode(r) for r in sim.runner.log.read("pd", 1)]


def test_a_stable_run_resets_the_crash_loop_and_a_restart_ends_it():
    sim = crash_loop_sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["flaky"], restart_mode="ABNORMAL"))
    for _ in range(4):
        crash(sim, aid)
        start_when_due(sim)
    assert sim.proc("p1").crashes == 4
    sim.heartbeat(aid)  # RUNNING, and it runs for longer than crash_stable_run
    assert sim.pstate("p1") == ps.RUNNING
    sim.now += 11.0
    crash(sim, aid)
    assert sim.proc("p1").crashes == 1 and sim.proc("p1").retry_at == 0.0
    assert start_when_due(sim) == 0.0 and sim.pstate("p1") == ps.ASSIGNED
    # an operator's restart of a backing-off process starts it now
    for _ in range(4):
        crash(sim, aid)
        start_when_due(sim)
    crash(sim, aid)
    assert sim.ok(DescribeProcesses(["p1"]))[0]["status"] == ps.CRASH_LOOP
    sim.ok(RestartProcess("p1"))
    sim.handle(Matchmake())
    assert sim.pstate("p1") == ps.ASSIGNED and sim.proc("p1").crashes == 0


def node_stops(sim, aid, upid="p1", state=ps.TERMINATED, cause="node"):
    """The agent stops ``upid``'s current round because its node is going away and reports it
    with the cause the real agent gives (decision OP7)."""
    sim.heartbeat(aid)
    key = (upid, sim.proc(upid).round)
    sim.agents[aid].procs[key] = state
    procs = [{"upid": u, "round": r, "state": s, "msg": "terminated: killed by signal SIGTERM"}
             for (u, r), s in sorted(sim.agents[aid].procs.items())]
    for d in procs:
        if (d["upid"], d["round"]) == key and cause is not None:
            d["cause"] = cause
    sim.handle(AgentHeartbeat(aid, sim.agents[aid].node_id, sim.now, procs))


def test_an_end_caused_by_its_node_is_restarted_without_backoff_and_a_crash_still_backs_off():
    """F3: ends the agent reports as caused by its node (SIGTERM with the VM) restart at once,
    however many in a row, and leave the crash count alone; real crashes still back off."""
    sim = crash_loop_sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["long"], restart_mode="ABNORMAL"))
    for _ in range(5):
        before = sim.proc("p1").round
        node_stops(sim, aid)
        p = sim.proc("p1")  # restarted at once: a new round placed again
        assert p.round == before + 1 and p.state == ps.ASSIGNED and p.crashes == 0 and p.retry_at == 0.0
        desc = sim.ok(DescribeProcesses(["p1"]))[0]
        assert desc["status"] != ps.CRASH_LOOP and desc["restarts"] == 0
    crash(sim, aid)
    start_when_due(sim)
    crash(sim, aid)
    assert sim.proc("p1").crashes == 2 and sim.proc("p1").retry_at == pytest.approx(sim.now + 1.0)
    assert sim.ok(DescribeProcesses(["p1"]))[0]["status"] == ps.CRASH_LOOP
    # a node-caused end in the middle of a crash loop neither adds to it nor ends it
    start_when_due(sim)
    before = sim.proc("p1").round
    node_stops(sim, aid, state=ps.FAILED)
    assert sim.proc("p1").crashes == 2 and sim.proc("p1").round == before + 1
    # the same end without the agent's cause is a crash (what F3 saw)
    start_when_due(sim)
    node_stops(sim, aid, cause=None)
    assert sim.proc("p1").crashes == 3
    # NEVER restarts nothing: the end is recorded as the agent reports it
    sim.ok(ScheduleProcess("p2", command=["once"], restart_mode="NEVER"))
    node_stops(sim, aid, upid="p2")
    assert sim.pstate("p2") == ps.TERMINATED and sim.proc("p2").crashes == 0
    assert sim.state == sim.replayed()


def test_an_end_on_a_node_epum_said_is_going_is_not_a_crash():
    """The PD's own side: EPUM said the node is TERMINATING; an end reported there without
    the agent's cause (an older agent, a process that died of the VM's SIGTERM first) is
    the node's, and the process restarts at once elsewhere."""
    sim = crash_loop_sim()
    [a1] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["long"], restart_mode="ABNORMAL"))
    crash(sim, a1)
    start_when_due(sim)
    assert sim.proc("p1").crashes == 1
    sim.lose_node("n1", "TERMINATING")
    sim.agents[a1].up = True  # it still reports while its VM goes down
    sim.finish("p1", ps.FAILED)
    before = sim.proc("p1").round
    sim.heartbeat(a1)
    assert sim.proc("p1").round == before + 1 and sim.proc("p1").crashes == 1
    assert sim.pstate("p1") in ps.QUEUED  # nowhere to go: n1 is going
    [a2] = sim.add_node("n2")
    assert start_when_due(sim) == 0.0 and sim.proc("p1").resource_id == a2
    assert sim.state == sim.replayed()


def test_a_stable_run_ended_by_its_node_still_ends_the_crash_count():
    sim = crash_loop_sim()
    [aid] = sim.add_node("n1")
    sim.ok(ScheduleProcess("p1", command=["flaky"], restart_mode="ABNORMAL"))
    for _ in range(2):
        crash(sim, aid)
        start_when_due(sim)
    assert sim.proc("p1").crashes == 2
    sim.heartbeat(aid)  # RUNNING, for longer than crash_stable_run, then its node goes
    sim.now += 11.0
    node_stops(sim, aid)
    assert sim.proc("p1").crashes == 0 and sim.pstate("p1") == ps.ASSIGNED
    assert sim.state == sim.replayed()


def test_spec_digest_is_the_one_tombstones_have_always_had():
    """Decision SC1: the digest of a spec (kept in tombstones, compared by ``once``) is
    unchanged by the faster ordering; map order never matters."""
    from cei_actors.pd.state import spec_digest

    spec = {"command": ["a", 1, 2.5, None, True, b"x", ("t", [1, {"z": 1, "a": [2]}])],
            "env": {"B": "1", "A": "2"}, "cwd": None, "flag": False,
            "configuration": {1: "int key", "1": "str key", None: {}, "n": {"x": (1, 2)}}}
    assert spec_digest(spec) == "8bca0c1fd1168de7b11f29ecdc2548d8"  # as computed before SC1
    again = dict(reversed(list(spec.items())))
    again["env"] = {"A": "2", "B": "1"}
    assert spec_digest(again) == spec_digest(spec)


def test_spec_digest_with_kept_key_orders_is_the_one_sorted_each_time():
    """Decision SIM10: maps whose keys are all ``str`` are ordered by their key set's sorted
    keys, kept; the same digest as sorting by ``repr`` each time (quotes make ``repr``'s
    order differ from the strings'), cold or kept, whatever the map's own order."""
    from cei_actors.pd import state

    def spec(flip: bool) -> dict:
        env = {"b'": "1", 'a"': "2", "A": "3"}
        inner = {"b'": [1], 'a"': {}}
        if flip:
            env, inner = dict(reversed(env.items())), dict(reversed(inner.items()))
        return {"command": ["sim", "1.5", "0"], "env": env, "configuration": {"x": inner},
                "constraints": {}}

    state._KEY_ORDERS.clear()
    assert state.spec_digest(spec(False)) == "e5fd97ad5fcc2101d2c9e30c8940efe7"  # before SIM10
    assert tuple(spec(False)["env"]) in state._KEY_ORDERS
    # the same spec again: ordered from the kept key orders
    assert state.spec_digest(spec(False)) == "e5fd97ad5fcc2101d2c9e30c8940efe7"
    assert state.spec_digest(spec(True)) == "e5fd97ad5fcc2101d2c9e30c8940efe7"


def test_spec_digest_of_empty_and_nested_containers_is_the_one_before_the_exact_type_paths():
    """Decision SC22: lists and empty maps take exact-type paths in the ordering; the digest
    is the one computed before them (empty lists and maps, nested too)."""
    from cei_actors.pd.state import spec_digest

    spec = {"command": [], "configuration": {}, "subscribers": [[], {}, ["x", {}]],
            "constraints": {"engine": "e"}, "env": None}
    assert spec_digest(spec) == "abc5e37d59aa07f64f83f5c747bd5c9c"  # as computed before SC22


def test_a_tombstone_is_describe_without_the_bulky_parameters_plus_their_digest():
    """Decision SC10: ``Process.tombstone`` builds its record directly; it is exactly (keys,
    their order, values) describe() without command, env, cwd, configuration, subscribers,
    plus ``spec_digest(spec())``, for plain and unusual specs (crash loop, non-str map keys,
    maps in another order)."""
    from cei_actors.pd.state import Process, spec_digest

    def expected(p: Process) -> list:
        out = p.describe()
        for key in ("command", "env", "cwd", "configuration", "subscribers"):
            del out[key]
        out["spec_digest"] = spec_digest(p.spec())
        return list(out.items())

    plain = Process("p1", ps.EXITED, 2, command=["sim", "12.5", "0"],
                    constraints={"engine": ENGINE}, engine=ENGINE, last_node_id="n1",
                    starts=2, dispatches=3, msg="ended", state_at=5.0)
    odd = Process("p2", ps.DIED_REQUESTED, 1, definition_id="d", name="odd",
                  command=["x", 1, 2.5, None, True, b"b", ("t", [{"z": 1, "a": 2}])],
                  env={"B": "1", "A": "2"}, cwd="/tmp",
                  configuration={1: "int key", "1": "str key", None: {}, "n": {"x": (1, 2)}},
                  subscribers=["s"], constraints={"engine": ENGINE, "site": ["a", "b"]},
                  engine=ENGINE, node_exclusive="tag", min_start_interval=0.5,
                  omit_from_system_restart=True, crashes=3, retry_at=9.0)
    assert odd.crash_looping
    for p in (plain, odd):
        assert list(p.tombstone().items()) == expected(p)
    flipped = Process("p2", ps.DIED_REQUESTED, 1, **{**odd.spec(), "env": {"A": "2", "B": "1"}})
    assert flipped.tombstone()["spec_digest"] == odd.tombstone()["spec_digest"]


def test_doomed_nodes_are_looked_at_again_only_once_the_lease_found_could_have_run_out(monkeypatch):
    """Decision SC11: a doomed node whose agent was found not fenced is not checked again
    until that agent's grant has run out (grants only grow); a seq-0 agent's renewal still
    keeps its node, and a clock that went back makes the PD look again."""
    from cei_actors.pd.logic import PDConfig

    checks: list[float] = []
    expired = PDConfig.lease_expired

    def counting(self, lv, now):  # noqa: ANN001, ANN202
        checks.append(now)
        return expired(self, lv, now)

    monkeypatch.setattr(PDConfig, "lease_expired", counting)
    sim = Sim(config(fence_time=8.0, fence_margin=1.0))
    agents = [sim.add_node(f"n{i}")[0] for i in range(20)]
    t0 = sim.now
    for i in range(20):
        sim.ok(NodeState(f"n{i}", "pd_domain_" + ENGINE, "TERMINATING", {}))
    checks.clear()
    for k in range(1, 9):  # within the leases: nothing to check again
        sim.now = t0 + k * 0.5
        sim.handle(RetryDispatches())
    assert checks == [] and all(f"n{i}" in sim.state.nodes for i in range(20))
    sim.now = t0 + 5.0
    sim.heartbeat(agents[0])  # seq 0: asks for no lease, renewed at every heartbeat
    sim.now = t0 + 9.0  # the others' leases are out; n0's runs until t0 + 14
    sim.handle(RetryDispatches())
    assert [f"n{i}" in sim.state.nodes for i in range(20)] == [True] + [False] * 19
    checks.clear()
    sim.now = t0 + 13.9
    sim.handle(RetryDispatches())
    assert checks == [] and "n0" in sim.state.nodes
    sim.now = t0 + 4.0  # our clock went back: look again (the grant may be later than now)
    sim.handle(RetryDispatches())
    assert checks == [t0 + 4.0] and "n0" in sim.state.nodes
    sim.now = t0 + 14.0
    sim.handle(RetryDispatches())
    assert "n0" not in sim.state.nodes
    check_invariants(sim.state)


def test_a_need_looks_only_at_idle_nodes_for_retirement(monkeypatch):
    """Decision SC12: the nodes a need may retire are found among the engine's idle nodes
    (the fold keeps them), newest first, broken ones first, not by a walk of every node;
    the index follows placements, ends, foreign copies, node losses, snapshots and replay."""
    from cei_actors.pd import invariants, logic

    seen: list[list[tuple[str, bool, bool]]] = []
    real = logic.retirable

    def recording(nodes, count, needed):  # noqa: ANN001, ANN202
        nodes = list(nodes)
        seen.append(nodes)
        return real(nodes, count, needed)

    monkeypatch.setattr(logic, "retirable", recording)
    sim = Sim(config(engines={ENGINE: {"slots": 2, "heartbeat_period": 1.0, "heartbeat_warning": 3.0,
                                       "heartbeat_missing": 5.0}}, needs_interval=0.0))
    for i in range(6):
        sim.add_node(f"n{i}")
    for i in range(8):
        sim.ok(ScheduleProcess(f"p{i}", command=["x"]))
    assert {n for n in sim.state.nodes if sim.state.nodes[n].used} == {"n0", "n1", "n2", "n3"}
    for step in (3.0, 2.5):  # n4's agent falls silent: WARNING, then MISSING (n4 is broken)
        sim.now += step
        for aid, agent in sim.agents.items():
            if agent.node_id != "n4":
                sim.heartbeat(aid)
        sim.handle(MonitorResources())
    assert sim.state.resources["n4-a0"].state == ps.RESOURCE_MISSING
    assert sim.state.idle[ENGINE] == {"n4", "n5"}
    seen.clear()
    for upid in ("p6", "p7"):  # n3 ends up idle: the need drops to 3
        sim.ok(KillProcess(upid))
    sim.heartbeat_all()
    assert sim.state.idle[ENGINE] == {"n3", "n4", "n5"}
    assert seen and all(not occupied for nodes in seen for _, occupied, _ in nodes)
    assert [nid for nid, _, _ in seen[-1]] == ["n5", "n4", "n3"]
    assert sim.needs[-1].retirable_nodes == ["n4", "n5", "n3"]  # the broken one first
    sim.lose_node("n0")  # its processes move; n0 leaves the index with it
    assert "n0" not in sim.state.idle[ENGINE]
    assert invariants.broken(sim.state) == []
    sim.crash(snapshot=True)
    assert sim.state.idle == sim.replayed().idle
    assert sim.state.idle[ENGINE] == {n for n, node in sim.state.nodes.items() if not node.used}


def test_a_heartbeat_that_only_moved_up_or_ended_processes_leaves_the_list_to_come_as_its_memo():
    """Decision SC13: after a heartbeat whose rows were quiet, acknowledged (PENDING/RUNNING)
    or ended (cleaned up now), the same rows less the ended ones would ask for nothing: that
    list is the agent's memo, so the next heartbeat after the cleanup is not looked at again.
    A row reported again after all is handled as ever (its cleanup resent at once, as a pass
    of the shorter list would have let it be); a placement on the agent forgets the memo."""
    from cei_actors.eeagent.messages import CleanupProcess

    sim = Sim(config(engines={ENGINE: {"slots": 4}}, dispatch_retry_seconds=30.0, needs_interval=0.0))
    [aid] = sim.add_node("n1")
    for u in ("p1", "p2", "p3"):
        sim.ok(ScheduleProcess(u, command=["x"], restart_mode="NEVER"))
    sim.heartbeat(aid)
    running = [{"upid": u, "round": 0, "state": ps.RUNNING, "msg": ""} for u in ("p1", "p2", "p3")]
    assert sim.state.soft.quiet[aid] == running
    sim.finish("p2", ps.EXITED)
    sim.agents[aid].up = False  # the cleanup is lost: the agent keeps reporting p2
    sim.heartbeat(aid)
    sim.agents[aid].up = True
    assert sim.pstate("p2") == ps.EXITED
    assert sim.state.soft.quiet[aid] == [running[0], running[2]]
    assert sim.state.soft.cleanups[aid] == {("p2", 0): sim.now}
    sim.agents[aid].procs.pop(("p2", 0))  # as if it had cleaned up after all
    head, sent = sim.runner.head, len(sim.sent)
    sim.now += 1.0
    sim.heartbeat(aid)
    assert sim.runner.head == head and len(sim.sent) == sent
    assert sim.state.soft.cleanups[aid] == {}  # as the pass it skipped leaves it
    sim.agents[aid].procs[("p2", 0)] = ps.EXITED  # reported again: cleaned up again, at once
    sim.now += 1.0
    sim.heartbeat(aid)
    assert [s.message for s in sim.sent[sent:]] == [CleanupProcess("p2", 0)]
    assert aid not in sim.state.soft.quiet
    sim.heartbeat(aid)  # cleaned up: p1 and p3 again
    assert sim.state.soft.quiet[aid] == [running[0], running[2]]
    sim.ok(ScheduleProcess("p4", command=["x"]))  # placed there: the memo goes
    assert sim.proc("p4").resource_id == aid and aid not in sim.state.soft.quiet
    check_invariants(sim.state)
    assert sim.state == sim.replayed()


def _record_events(sim: Sim, events: list) -> object:
    """Every event ``sim``'s runner decides from now on is added to ``events``, in order;
    returns the runner's own ``handle``."""
    handle = sim.runner.handle

    def recording(message):  # noqa: ANN001, ANN202
        decision = handle(message)
        events.extend(decision.events)
        return decision

    sim.runner.handle = recording
    return handle


def test_the_monitor_looks_at_every_resource_only_when_one_may_have_gone_silent(monkeypatch):
    """Decision SC14: while no resource is WARNING or MISSING and no agent can have been
    silent for ``heartbeat_warning`` (every agent's ts is at least the bound the last full
    pass left, lowered by each agent heard since), a monitor tick looks at no resource. The
    resource states, their times and the moves are those of a full pass at every tick: an
    agent falling silent, one first heard with a lagging clock, our clock going back."""
    from cei_actors.pd.logic import PDConfig

    engines = {ENGINE: {"slots": 2, "heartbeat_period": 1.0, "heartbeat_warning": 3.0,
                        "heartbeat_missing": 5.0}}

    def drive(sim: Sim) -> tuple[list, list]:
        states: list = []
        events: list = []  # every event, in order
        _record_events(sim, events)
        for i in range(5):
            sim.add_node(f"n{i}")
        for i in range(4):
            sim.ok(ScheduleProcess(f"p{i}", command=["x"]))
        for tick in range(50):
            sim.now += 0.5
            for aid, agent in sim.agents.items():
                silent = (agent.node_id == "n1" and tick > 24) or (agent.node_id == "n5" and tick < 13)
                if not silent and tick % 2 == 0:
                    sim.heartbeat(aid, seq=tick + 1)
            if tick == 8:  # a new agent whose clock lags 2.9 s behind ours
                sim.ok(NodeState("n5", "pd_domain_" + ENGINE, "RUNNING", {}))
                sim.agents["n5-a0"] = type(sim.agents["n0-a0"])("n5-a0", "n5")
                sim.heartbeat("n5-a0", timestamp=sim.now - 2.9)
            if tick == 16:  # lost by EPUM's word: MISSING while its agent still talks
                sim.ok(NodeState("n0", "pd_domain_" + ENGINE, "RUNNING_FAILED", {}))
            if tick == 30:
                sim.now -= 3.0  # our clock steps back
            sim.handle(MonitorResources())
            states.append((sim.now, sorted((r, x.state) for r, x in sim.state.resources.items()),
                           sorted((u, p.state, p.resource_id, p.msg)
                                  for u, p in sim.state.processes.items())))
        return states, events

    conf = config(engines=engines, fence_time=2.0, fence_margin=0.5)
    full = Sim(conf)
    with monkeypatch.context() as m:
        m.setattr(PDConfig, "least_warning", lambda self: 0.0)  # now - bound < 0: always a full pass
        expected, expected_events = drive(full)
    sim = Sim(conf)
    assert drive(sim) == (expected, expected_events)
    assert any(dict(s[1]).get("n1-a0") == ps.RESOURCE_MISSING for s in expected)
    assert any(dict(s[1]).get("n5-a0") == ps.RESOURCE_WARNING for s in expected)
    assert "n0" not in sim.state.nodes
    assert [e for e in expected_events if getattr(e, "msg", "") == "resource n0-a0 missing"]
    assert sim.state == full.state and sim.state.unwell == full.state.unwell

    class Counting(dict):
        gets = 0

        def get(self, *a):  # noqa: ANN002, ANN202
            Counting.gets += 1
            return super().get(*a)

    quiet = Sim(config(engines=engines))
    for i in range(3):
        quiet.add_node(f"n{i}")
    quiet.handle(MonitorResources())  # the first tick after a recovery: a full pass
    quiet.state.soft.live = Counting(quiet.state.soft.live)
    quiet.now += 1.0
    quiet.handle(MonitorResources())
    assert Counting.gets == 0
    quiet.now += 2.0  # silent for 3 s: a full pass, WARNING for all
    quiet.handle(MonitorResources())
    assert Counting.gets == 3
    assert all(r.state == ps.RESOURCE_WARNING for r in quiet.state.resources.values())


class _CountingGets(dict):
    """A process map that records the upids ``get`` is asked for."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.asked: list[str] = []

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        self.asked.append(key)
        return super().get(key, default)


def test_a_heartbeat_looks_only_at_the_rows_that_differ_from_its_agents_memo():
    """Decision SC16: a row equal to the quiet memo's row at the same place is quiet as it
    was (nothing on the agent changed since, or the memo would be gone), so the pass only
    notes it as seen; the decision, the memo and the cleanup times are those of a full pass.
    A process event on the agent forgets the memo: every row is looked at again."""

    def build() -> tuple[Sim, str]:
        sim = Sim(config(engines={ENGINE: {"slots": 8}}, dispatch_retry_seconds=30.0, needs_interval=0.0))
        [aid] = sim.add_node("n1")
        for u in ("p1", "p2", "p3", "p4", "p5"):
            sim.ok(ScheduleProcess(u, command=["x"], restart_mode="NEVER"))
        sim.heartbeat(aid)  # acknowledged: the running list is the memo (SC13)
        sim.heartbeat(aid)
        return sim, aid

    def step(sim: Sim, aid: str, full: bool, act) -> tuple[list, list]:  # noqa: ANN001
        act(sim)
        if full:
            sim.state.soft.quiet.pop(aid, None)  # the pass over every row, as before SC16
        head, sent = sim.runner.head, len(sim.sent)
        events = []
        handle = _record_events(sim, events)
        counting = _CountingGets(sim.state.processes)
        sim.state.processes = sim.state.mm.processes = counting
        sim.now += 1.0
        sim.heartbeat(aid)
        sim.state.processes = sim.state.mm.processes = dict(counting)
        sim.runner.handle = handle
        assert sim.runner.head >= head
        return counting.asked, [events, [s.message for s in sim.sent[sent:]],
                                sim.state.soft.quiet.get(aid), sim.state.soft.cleanups.get(aid)]

    def finish(upid: str):  # noqa: ANN202
        return lambda sim: sim.finish(upid, ps.EXITED)

    def finish_unheard(upid: str):  # noqa: ANN202 (its cleanup is lost: it is reported again)
        def act(sim: Sim) -> None:
            sim.finish(upid, ps.EXITED)
            sim.agents["n1-a0"].up = False
        return act

    def up(sim: Sim) -> None:  # heard again, once the cleanup is due to be resent
        sim.agents["n1-a0"].up = True
        sim.now += 5.0

    acts = [finish("p3"), lambda sim: None, finish_unheard("p1"), up, lambda sim: None,
            lambda sim: None, finish("p5"), lambda sim: sim.ok(KillProcess("p2"))]
    fast, full = build(), build()
    looked_at = []
    for act in acts:
        asked, result = step(*fast, False, act)
        _, expected = step(*full, True, act)
        assert result == expected
        looked_at.append(sorted(set(asked)))
    assert looked_at == [
        ["p3"],  # the exited row; p1, p2, p4, p5 as in the memo
        [],  # the list the last heartbeat left as memo: not looked at (SC13)
        ["p1"],
        ["p1", "p2", "p4", "p5"],  # p1 reported again: the rows after it are out of place
        ["p2", "p4", "p5"],  # its cleanup (resent) left no memo: every row
        [],
        ["p5"],
        ["p2", "p4"],  # the kill forgot the memo: every row (p2 TERMINATING, p4 running)
    ]
    check_invariants(fast[0].state)
    assert fast[0].state == fast[0].replayed()


def test_a_recovery_folds_the_tail_after_its_snapshot_without_the_matchmaker_in_step(monkeypatch):
    """Decision SC17: the runner folds the records after the snapshot with the PD's index
    deferred (as a replay does, RS1) and builds it once at the end: no matchmaker update per
    tail event; the recovered leader's state, queue and next placements are those of one
    restored from a snapshot taken at the end (no tail)."""
    from cei_actors.pd.matchmaker import Matchmaker

    def history() -> Sim:
        sim = Sim(config(engines={ENGINE: {"slots": 2}}, needs_interval=0.0))
        sim.add_node("n1")
        for u in ("a1", "a2"):
            sim.ok(ScheduleProcess(u, command=["x"]))
        sim.heartbeat_all()
        sim.crash(snapshot=True)  # the snapshot: a1, a2 placed on n1
        sim.add_node("n2")  # the tail: a node, processes placed, queued, one ended
        for i in range(7):
            sim.ok(ScheduleProcess(f"t{i}", command=["x"], queueing_mode="ALWAYS"))
        sim.heartbeat_all()
        sim.finish("a1")
        sim.heartbeat_all()
        return sim

    tailed, whole = history(), history()
    enqueued: list[str] = []
    enqueue = Matchmaker.enqueue

    def counting(self, p):  # noqa: ANN001, ANN202
        enqueued.append(p.upid)
        return enqueue(self, p)

    monkeypatch.setattr(Matchmaker, "enqueue", counting)
    tailed.crash()  # the snapshot, then every record after it
    folded = list(enqueued)
    whole.crash(snapshot=True)  # a snapshot at the head: nothing to fold after it
    monkeypatch.setattr(Matchmaker, "enqueue", enqueue)
    queued = sorted(u for u, p in tailed.state.processes.items() if p.state in ps.QUEUED)
    assert queued and sorted(folded) == queued  # once each, when the index is built
    assert tailed.state == whole.state and tailed.state.queue() == whole.state.queue()
    check_invariants(tailed.state)
    for sim in (tailed, whole):
        sim.add_node("n3")
        sim.add_node("n4")
        sim.heartbeat_all()
    assert {u: p.resource_id for u, p in tailed.state.processes.items()} == {
        u: p.resource_id for u, p in whole.state.processes.items()}
    assert tailed.sent[-20:] == whole.sent[-20:]


def test_the_need_is_computed_again_only_when_its_counts_changed(monkeypatch):
    """Decision SC18: every decision ends with the needs check; the need of an engine is
    computed again only when its live processes or occupied nodes changed since the last
    one, and is then what ``need`` gives for the counts at that point."""
    from cei_actors.pd import logic

    calls: list[tuple[int, int]] = []

    def counting(spec, live, occupied):  # noqa: ANN001, ANN202
        calls.append((live, occupied))
        return need(spec, live, occupied)

    monkeypatch.setattr(logic, "need", counting)
    sim = Sim(config(engines={ENGINE: {"slots": 2}}, needs_interval=0.0))
    [aid] = sim.add_node("n1")

    def counts() -> tuple[int, int]:
        return sim.state.live_count[ENGINE], sim.state.occupied[ENGINE]

    def step(act) -> list[tuple[int, int]]:  # noqa: ANN001
        del calls[:]
        act()
        memo = sim.state.soft.needs_memo[ENGINE]
        spec = sim.runner.component.cfg.engines[ENGINE]
        assert memo == (*counts(), need(spec, *counts()))
        return list(calls)

    assert step(lambda: sim.heartbeat(aid)) == []  # nothing changed
    # queued (live), then placed on the idle node (occupied)
    assert step(lambda: sim.ok(ScheduleProcess("p1", command=["x"]))) == [(1, 0), (1, 1)]
    assert step(lambda: sim.heartbeat(aid)) == []  # acknowledged: the same counts
    assert step(lambda: sim.ok(ScheduleProcess("p2", command=["x"]))) == [(2, 1)]  # live
    assert step(lambda: sim.ok(ScheduleProcess("p3", command=["x"]))) == [(3, 1)]  # queued
    assert step(lambda: sim.heartbeat(aid)) == []
    sim.finish("p1")
    assert step(lambda: sim.heartbeat(aid)) == [(2, 1)]  # p1 ended, p3 placed: (2, 1) once
    assert step(lambda: sim.ok(KillProcess("p2"))) == []  # TERMINATING still counts
    sim.heartbeat(aid)
    sim.finish("p3")
    assert step(lambda: sim.heartbeat(aid)) == [(0, 0)]  # the node is idle again
    del calls[:]
    sim.crash()  # a recovery starts with no memo: the need is computed at once
    assert calls == [counts()]
    assert step(lambda: sim.heartbeat(aid)) == []


class _CountingMemo(dict):
    """``Soft.needs_memo`` that counts the needs check's per-engine reads."""

    reads = 0

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        type(self).reads += 1
        return super().get(key, default)


def test_the_needs_are_looked_at_again_only_after_an_event_or_at_the_refresh():
    """Decision SC20: a decision with no event after a needs check that found nothing changed
    does not look at the engines again; an event in a decision, an event folded outside one,
    a forced check and the refresh time each make it look (and send what changed)."""
    from cei_actors.pd.events import NodeAdded

    sim = Sim(config(engines={ENGINE: {"slots": 2}}, needs_interval=0.0, needs_refresh=30.0))
    [aid] = sim.add_node("n1")
    sim.state.soft.needs_memo = _CountingMemo(sim.state.soft.needs_memo)

    def reads(act) -> int:  # noqa: ANN001
        _CountingMemo.reads = 0
        act()
        return _CountingMemo.reads

    # the node's agent's first heartbeat (its resource added) found no need changed, and
    # this one has no event: nothing to look at
    assert reads(lambda: sim.heartbeat(aid)) == 0
    # queued, n1 brought back from retirement (a need sent), placed; the outbox's flush
    # after it looks once more, as the last check sent something
    assert reads(lambda: sim.ok(ScheduleProcess("p1", command=["x"]))) == 2
    assert reads(lambda: sim.heartbeat(aid)) == 1  # acknowledged (an event)
    assert reads(lambda: sim.heartbeat(aid)) == 0
    # an event folded outside a decision: the next check looks and sends the new need
    sent = len(sim.needs)
    sim.runner.component.apply(sim.state, NodeAdded("n2", f"pd_domain_{ENGINE}", ENGINE, {}, sim.now))
    assert not sim.state.soft.needs_rest
    assert reads(lambda: sim.heartbeat(aid)) == 1
    assert len(sim.needs) == sent + 1
    assert reads(lambda: sim.heartbeat(aid)) == 1  # a check that sent is not a rest
    assert reads(lambda: sim.heartbeat(aid)) == 0
    # the refresh time: the needs go out again unchanged, with the subscription
    sim.now += 31.0
    head = len(sim.sent)
    assert reads(lambda: sim.heartbeat(aid)) == 1
    to_epum = [type(e.message) for e in sim.sent[head:] if e.to == "epum"]
    assert to_epum == [SubscribeDomain, RegisterNeed]
    assert reads(lambda: sim.heartbeat(aid)) == 1
    assert reads(lambda: sim.heartbeat(aid)) == 0
    # a fold of stored bodies outside a decision (offered only with no quiet agent) forgets
    # the rest too
    sim.state.soft.quiet.clear()
    assert sim.runner.component.body_appliers(sim.state)
    assert not sim.state.soft.needs_rest
    assert reads(lambda: sim.heartbeat(aid)) == 1
    check_invariants(sim.state)
