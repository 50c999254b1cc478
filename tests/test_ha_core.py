"""The HA service's pure core, driven through a Runner against real PD cores (ha_harness)."""

from __future__ import annotations

import pytest
from ha_harness import World
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cei_actors.epum.messages import SensorData
from cei_actors.ha.events import CopyScheduled, PolicyChanged
from cei_actors.ha.logic import HA, HAConfig
from cei_actors.ha.messages import (
    CreateGroup,
    DescribeGroup,
    HAPass,
    ListGroups,
    PDReply,
    ReconfigureGroup,
    RemoveGroup,
)
from cei_actors.pd import states as ps
from cei_actors.pd.messages import CreateDefinition, KillProcess, ScheduleProcess
from cei_actors.runtime.runner import fold

SLEEP = {"command": ["sleep", "999"], "restart_mode": "never"}


def npreserving(w: World, n: int, name: str = "web", **kw) -> dict:
    return w.ok(CreateGroup(name, "npreserving", {"preserve_n": n}, dict(SLEEP), **kw))


def converge(w: World, name: str = "web", passes: int = 4) -> dict:
    for _ in range(passes):
        w.tick()
    return w.ok(DescribeGroup(name))


def counted(w: World, name: str) -> int:
    """The copies HA counts (not being terminated)."""
    return len(w.state.groups[name].active())


def events(w: World) -> list:
    log_events = list(w.runner.log.read("ha", 1))
    return [HA.registry.from_record(r) for r in log_events]


# ---- npreserving ------------------------------------------------------------------------------


def test_npreserving_schedules_n_copies_and_becomes_steady():
    w = World()
    g = npreserving(w, 3)
    assert g["target"] == 3 and len(g["copies"]) == 3 and g["status"] == "PENDING"
    assert len(w.live("web")) == 3
    g = converge(w)
    assert g["status"] == "STEADY", g["why"]
    assert {c["state"] for c in g["copies"]} == {ps.RUNNING}
    assert sorted(c["upid"] for c in g["copies"]) == w.running("web")
    # the PD got each schedule with HA as the subscriber, and the group's parameters
    proc = w.pds["pd"].proc(g["copies"][0]["upid"])
    assert proc.subscribers == ["ha"] and proc.restart_mode == "NEVER"
    w.check()


def test_a_killed_copy_is_replaced_at_once_from_the_pd_notice():
    w = World()
    npreserving(w, 2)
    g = converge(w)
    victim = g["copies"][0]["upid"]
    w.pds["pd"].finish(victim, ps.FAILED)
    w.pds["pd"].heartbeat_all()
    w.settle()  # no HA pass: the PD's notice alone makes HA replace it
    g = w.ok(DescribeGroup("web"))
    assert victim not in [c["upid"] for c in g["copies"]] and len(g["copies"]) == 2
    assert len(w.live("web")) == 2
    assert converge(w)["status"] == "STEADY"
    w.check()


def test_terminated_from_outside_is_replaced():
    w = World()
    npreserving(w, 2)
    g = converge(w)
    victim = g["copies"][1]["upid"]
    w.pd("pd", KillProcess(victim))
    w.pds["pd"].heartbeat_all()
    w.settle()
    g = converge(w)
    assert g["status"] == "STEADY" and victim not in [c["upid"] for c in g["copies"]]
    assert len(w.running("web")) == 2
    w.check()


def test_a_lost_notice_is_healed_by_the_next_pass():
    w = World()
    npreserving(w, 2)
    g = converge(w)
    victim = g["copies"][0]["upid"]
    w.lose_to_ha = True
    w.pds["pd"].finish(victim, ps.EXITED)
    w.pds["pd"].heartbeat_all()
    w.settle()
    w.lose_to_ha = False
    assert len(w.live("web")) == 1
    assert victim in [c["upid"] for c in w.ok(DescribeGroup("web"))["copies"]]
    g = converge(w)  # the pass asks the PD, which answers EXITED
    assert g["status"] == "STEADY" and len(w.running("web")) == 2
    w.check()


def test_raising_and_lowering_n_converges_and_terminates_the_oldest_first():
    w = World()
    npreserving(w, 2)
    converge(w)
    w.ok(ReconfigureGroup("web", parameters={"preserve_n": 5}))
    g = converge(w)
    assert g["status"] == "STEADY" and len(w.running("web")) == 5
    order = [c["upid"] for c in g["copies"]]  # oldest first
    w.ok(ReconfigureGroup("web", parameters={"preserve_n": 2}))
    g = w.ok(DescribeGroup("web"))
    assert [c["upid"] for c in g["copies"] if not c["terminating"]] == order[3:]
    assert g["status"] != "STEADY"  # three still terminating
    g = converge(w)
    assert g["status"] == "STEADY" and w.live("web") == sorted(order[3:])
    w.ok(ReconfigureGroup("web", parameters={"preserve_n": 0}))
    g = converge(w)
    assert g["status"] == "STEADY" and g["copies"] == [] and w.live("web") == []
    w.check()


def test_never_more_than_n_once_converged_under_kills():
    w = World()
    npreserving(w, 3)
    converge(w)
    for i in range(6):
        running = w.running("web")
        upid = running[i % len(running)]
        if i % 2:
            w.pd("pd", KillProcess(upid))
        else:
            w.pds["pd"].finish(upid, ps.FAILED)
        w.tick()
        assert len(w.live("web")) <= 3
    converge(w)
    assert len(w.running("web")) == 3 and len(w.live("web")) == 3
    w.check()


def test_copies_go_to_the_least_loaded_pd():
    w = World(pds=("pd", "pd2"))
    for i in range(3):  # pd is busier with processes of its own
        w.pd("pd", ScheduleProcess(f"other-{i}", command=["sleep", "9"]))
    w.tick()  # HA learns the loads
    npreserving(w, 4)
    where = [w.where(u) for u in w.live("web")]
    assert where.count("pd2") == 3 and where.count("pd") == 1
    g = converge(w)
    assert g["status"] == "STEADY"
    assert {c["pd"] for c in g["copies"]} == {"pd", "pd2"}
    w.check()


def test_a_group_may_be_restricted_to_some_pds_and_unknown_pds_are_refused():
    w = World(pds=("pd", "pd2"))
    npreserving(w, 2, pds=["pd2"])
    assert {w.where(u) for u in w.live("web")} == {"pd2"}
    head = w.runner.head
    err = w.err(CreateGroup("x", "npreserving", {"preserve_n": 1}, dict(SLEEP), ["pd9"]))
    assert err.code == "bad_request" and "pd9" in err.message and w.runner.head == head


def test_schedule_parameters_pass_through_to_the_pd():
    w = World()
    w.pd("pd", CreateDefinition("svc", {"exec": "sleep", "argv": ["99"]}))
    process = {"definition_id": "svc", "execution_engine_id": "e1", "node_exclusive": "svc",
               "constraints": {"zone": "a"}, "queueing_mode": "always", "restart_mode": "always"}
    w.ok(CreateGroup("svc", "npreserving", {"preserve_n": 1}, process))
    [upid] = w.live("svc")
    p = w.pds["pd"].proc(upid)
    assert (p.node_exclusive, p.queueing_mode, p.restart_mode) == ("svc", "ALWAYS", "ALWAYS")
    assert p.constraints == {"zone": "a", "engine": "e1"} and p.definition_id == "svc"


# ---- status ---------------------------------------------------------------------------------


def test_status_pending_ready_steady():
    w = World(nodes=1, slots=1)  # room for one copy only
    g = npreserving(w, 2)
    assert g["status"] == "PENDING"
    g = converge(w)
    assert g["status"] == "READY" and "1 of 2 running" in g["why"]
    assert "wait for 1 to run" in g["wants"]
    w.pds["pd"].add_node("extra")
    g = converge(w)
    assert g["status"] == "STEADY"
    w.ok(ReconfigureGroup("web", parameters={"preserve_n": 0}))
    assert converge(w)["status"] == "STEADY"  # N = 0


def test_failed_is_sticky_until_a_reconfigure():
    w = World()
    w.ok(CreateGroup("svc", "npreserving", {"preserve_n": 2}, {"definition_id": "nope"}))
    g = w.ok(DescribeGroup("svc"))  # the PD's refusal has come back
    assert g["status"] == "FAILED" and "nope" in g["failed"] and g["copies"] == []
    w.pd("pd", CreateDefinition("nope", {"exec": "sleep", "argv": ["99"]}))
    g = converge(w, "svc")
    assert g["status"] == "FAILED" and w.live("svc") == []  # sticky: nothing scheduled
    assert "reconfigure" in g["why"]
    w.ok(ReconfigureGroup("svc"))  # same parameters: clears FAILED
    g = converge(w, "svc")
    assert g["status"] == "STEADY" and len(w.running("svc")) == 2
    w.check()


def test_list_and_describe_explain_the_group():
    w = World()
    npreserving(w, 1)
    converge(w)
    [row] = w.ok(ListGroups())
    assert row == {"name": "web", "policy": "npreserving", "status": "STEADY", "target": 1,
                   "copies": 1, "removing": False}
    g = w.ok(DescribeGroup("web"))
    c = g["copies"][0]
    assert c["pd"] == "pd" and c["node_id"].startswith("pd-n") and g["wants"] == "nothing: steady"
    assert w.err(DescribeGroup("nope")).code == "not_found"


# ---- remove -----------------------------------------------------------------------------------


def test_remove_terminates_the_copies_then_forgets_the_group():
    w = World()
    npreserving(w, 2)
    converge(w)
    w.ok(RemoveGroup("web"))
    assert counted(w, "web") == 0 and w.running("web") == []
    assert w.err(ReconfigureGroup("web", parameters={"preserve_n": 3})).code in ("conflict", "not_found")
    w.tick()
    assert w.ok(ListGroups()) == []
    assert w.err(DescribeGroup("web")).code == "not_found"
    npreserving(w, 1)  # the name is free again
    w.check()


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [
    CreateGroup("web", "npreserving", {"preserve_n": -1}, SLEEP),
    CreateGroup("web", "npreserving", {"preserve_n": 1, "extra": 1}, SLEEP),
    CreateGroup("web", "npreserving", {}, SLEEP),
    CreateGroup("web", "bogus", {"preserve_n": 1}, SLEEP),
    CreateGroup("web", "npreserving", {"preserve_n": 1}, {"command": ["x"], "upid": "u"}),
    CreateGroup("web", "npreserving", {"preserve_n": 1}, {}),
    CreateGroup("web", "npreserving", {"preserve_n": 1}, {"command": ["x"], "restart_mode": "sometimes"}),
    CreateGroup("we/b", "npreserving", {"preserve_n": 1}, SLEEP),
    CreateGroup("web", "sensor", {"minimum_processes": 3, "maximum_processes": 1, "metric": "m",
                                  "scale_up_threshold": 2, "scale_down_threshold": 1}, SLEEP),
    CreateGroup("web", "sensor", {"minimum_processes": 0, "maximum_processes": 1, "metric": "m",
                                  "scale_up_threshold": 1, "scale_down_threshold": 2}, SLEEP),
    CreateGroup("web", "sensor", {"minimum_processes": 0, "maximum_processes": 1, "metric": "m",
                                  "scale_up_threshold": 2, "scale_down_threshold": 1,
                                  "sensor_type": "no.such:Sensor"}, SLEEP),
    ReconfigureGroup("nope", parameters={"preserve_n": 1}),
])
def test_bad_requests_are_refused_and_write_nothing(message):
    w = World()
    head = w.runner.head
    err = w.err(message)
    assert err.code in ("bad_request", "not_found"), err
    assert w.runner.head == head and w.live("web") == []


def test_bad_reconfigure_and_conflicting_create_change_nothing():
    w = World()
    npreserving(w, 2)
    head = w.runner.head
    assert w.err(ReconfigureGroup("web", parameters={"preserve_n": "3"})).code == "bad_request"
    assert w.err(ReconfigureGroup("web", parameters={"bogus": 1})).code == "bad_request"
    assert w.err(CreateGroup("web", "npreserving", {"preserve_n": 3}, SLEEP)).code == "conflict"
    assert w.runner.head == head
    assert npreserving(w, 2)["target"] == 2  # the same create again: the group as it is
    assert w.runner.head == head


def test_malformed_pd_reports_are_dropped():
    w = World()
    npreserving(w, 1)
    head = w.runner.head
    w.ha(PDReply("pd", "describe", "x", True, [{"upid": 3}, "junk", {"upid": "web-1", "state": "NOPE"}]))
    w.ha(PDReply("pd", "schedule", "nobody", False, None, "bad_request", "x"))
    w.ha(PDReply("pd", "counts", "", True, {"RUNNING": "many"}))
    assert w.runner.head == head


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown"):
        HAConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="pds"):
        HAConfig.from_dict({"pds": []})
    with pytest.raises(ValueError, match="poll_interval"):
        HAConfig.from_dict({"poll_interval": 0})


# ---- sensor ----------------------------------------------------------------------------------


SENSOR = {"minimum_processes": 1, "maximum_processes": 4, "metric": "load",
          "scale_up_threshold": 10.0, "scale_down_threshold": 2.0,
          "scale_up_n_processes": 2, "scale_down_n_processes": 1, "cooldown_period": 30.0}


def test_sensor_scales_up_and_down_within_bounds_honouring_cooldown():
    w = World()
    g = w.ok(CreateGroup("s", "sensor", dict(SENSOR), dict(SLEEP)))
    assert g["target"] == 1 and counted(w, "s") == 1
    w.ok(SensorData("s", "load", {}, 50.0))
    assert counted(w, "s") == 3  # 1 + 2
    w.ok(SensorData("s", "load", {}, 50.0))
    assert counted(w, "s") == 3  # cooling down
    w.tick(31.0)
    w.ok(SensorData("s", "load", {}, 50.0))
    assert counted(w, "s") == 4  # 3 + 2 clamped to the maximum
    w.tick(31.0)
    w.ok(SensorData("s", "load", {}, 50.0))
    assert counted(w, "s") == 4
    w.tick(31.0)
    w.ok(SensorData("s", "load", {}, 0.0))
    assert counted(w, "s") == 3
    w.ok(SensorData("s", "load", {}, 0.0))
    assert counted(w, "s") == 3  # cooling down
    for _ in range(4):
        w.tick(31.0)
        w.ok(SensorData("s", "load", {}, 0.0))
    assert counted(w, "s") == 1  # never below the minimum
    w.ok(SensorData("s", "other", {}, 99.0))  # not the group's metric
    assert counted(w, "s") == 1
    g = converge(w, "s")
    assert g["status"] == "STEADY" and g["last_value"] == 0.0 and len(w.running("s")) == 1
    w.check()


def test_sensor_per_copy_values_are_sampled_over_the_live_copies():
    w = World()
    w.ok(CreateGroup("s", "sensor", {**SENSOR, "sample_function": "Maximum", "cooldown_period": 0},
                     dict(SLEEP)))
    [upid] = w.live("s")
    w.ok(SensorData("s", "load", {upid: 11.0, "someone-else": 0.0}))
    assert counted(w, "s") == 3


def test_sensor_pulled_from_a_simulated_sensor():
    w = World()
    params = {**SENSOR, "cooldown_period": 0, "sensor_type": "simulated", "sample_period": 5.0,
              "sensor_config": {"steps": [[0, 5.0], [1010, 20.0], [1030, 0.0]]}}
    w.ok(CreateGroup("s", "sensor", params, dict(SLEEP)))
    assert counted(w, "s") == 1  # 5.0: between the thresholds
    w.tick(10.0)  # 1010: 20 -> up
    assert counted(w, "s") == 3
    w.tick(2.0)  # not sampled again before sample_period
    assert counted(w, "s") == 3
    w.tick(4.0)
    assert counted(w, "s") == 4
    w.tick(20.0)  # 1036: 0 -> down
    assert counted(w, "s") == 3


def test_reconfigure_switches_policy_live():
    w = World()
    npreserving(w, 3)
    converge(w)
    w.ok(ReconfigureGroup("web", "sensor", dict(SENSOR, maximum_processes=2)))
    g = converge(w)
    assert g["policy"] == "sensor" and g["target"] == 2 and len(w.live("web")) == 2
    w.check()


# ---- failover -------------------------------------------------------------------------------


def test_recovery_resends_unacknowledged_schedules_without_doubling():
    w = World()
    w.lose_to_pd = True  # the PD never hears of them: HA dies right after writing its events
    npreserving(w, 3)
    w.lose_to_pd = False
    assert w.live("web") == []
    upids = sorted(c.upid for c in w.state.groups["web"].copies.values())
    w.crash()
    w.settle()
    assert sorted(c.upid for c in w.state.groups["web"].copies.values()) == upids
    g = converge(w)
    assert g["status"] == "STEADY" and w.running("web") == upids
    assert sum(isinstance(e, CopyScheduled) for e in events(w)) == 3
    w.check()


def test_recovery_after_convergence_schedules_nothing_new():
    w = World()
    npreserving(w, 3)
    converge(w)
    before = w.running("web")
    for snapshot in (False, True):
        w.crash(snapshot=snapshot)
        w.settle()
        g = converge(w)
        assert g["status"] == "STEADY" and w.running("web") == before
    assert sum(isinstance(e, CopyScheduled) for e in events(w)) == 3
    w.check()


def test_a_copy_that_died_while_ha_was_down_is_replaced_once():
    w = World()
    npreserving(w, 2)
    converge(w)
    victim = w.running("web")[0]
    w.lose_to_ha = True
    w.pds["pd"].finish(victim, ps.FAILED)
    w.pds["pd"].heartbeat_all()
    w.settle()
    w.lose_to_ha = False
    w.crash()
    w.settle()
    g = converge(w)
    assert g["status"] == "STEADY" and len(w.live("web")) == 2 and victim not in w.live("web")
    assert sum(isinstance(e, CopyScheduled) for e in events(w)) == 3
    w.check()


def test_terminations_are_resent_until_the_pd_confirms():
    w = World()
    npreserving(w, 3)
    converge(w)
    w.lose_to_pd = True
    w.ok(ReconfigureGroup("web", parameters={"preserve_n": 1}))
    w.crash()  # the kills were lost, and the leader with them
    w.lose_to_pd = False
    w.settle()
    assert len(w.live("web")) == 3
    g = converge(w)
    assert g["status"] == "STEADY" and len(w.live("web")) == 1
    w.check()


def test_invariants_hold_after_every_event():
    w = World()
    npreserving(w, 2)
    converge(w)
    w.ok(ReconfigureGroup("web", parameters={"preserve_n": 4}))
    w.ok(ReconfigureGroup("web", parameters={"preserve_n": 1}))
    converge(w)
    w.ok(RemoveGroup("web"))
    w.tick()
    w.tick()
    assert w.ok(ListGroups()) == []
    ha = HA(w.ha_conf)
    state = ha.initial_state()
    evs = list(w.runner.log.read("ha", 1))
    assert any(isinstance(HA.registry.from_record(r), PolicyChanged) for r in evs)
    for record in evs:
        state = fold(ha, [record], state)
        assert ha.invariants(state) == []


def test_the_invariant_catches_too_many_copies():
    ha = HA({"timers": False})
    from cei_actors.ha.events import GroupCreated

    state = fold(ha, [])
    for e in [GroupCreated("g", "npreserving", {"preserve_n": 1}, SLEEP, ["pd"], 1, 0.0),
              CopyScheduled("g", "g-1", "pd", 0.0), CopyScheduled("g", "g-2", "pd", 0.0)]:
        state = ha.apply(state, e)
    assert ha.invariants(state) == ["group g counts 2 copies for a target of 1"]


# ---- a random walk ------------------------------------------------------------------------------


class HAMachine(RuleBasedStateMachine):
    """Kills, outside terminates, N changes, lost messages and HA crashes, in any order: once
    the world is quiet for a few passes, exactly N copies run, none forgotten or doubled."""

    def __init__(self) -> None:
        super().__init__()
        # kills in a row are a crash loop to HA: a short backoff cap keeps the walk's quiet
        # time bounded (the backoff itself is tested above)
        self.w = World(pds=("pd", "pd2"), backoff_max=2.0)
        self.n = 2
        npreserving(self.w, self.n)

    @rule(n=st.integers(0, 4))
    def set_n(self, n: int) -> None:
        self.n = n
        self.w.ok(ReconfigureGroup("web", parameters={"preserve_n": n}))

    @rule(i=st.integers(0, 9), state=st.sampled_from([ps.FAILED, ps.EXITED]))
    def copy_dies(self, i: int, state: str) -> None:
        on_agents = sorted((name, upid) for name, sim in self.w.pds.items()
                           for upid, _ in sim.running_copies() if upid.startswith("web-"))
        if on_agents:
            name, upid = on_agents[i % len(on_agents)]
            self.w.pds[name].finish(upid, state)

    @rule(i=st.integers(0, 9))
    def outside_kill(self, i: int) -> None:
        live = self.w.live("web")
        if live:
            upid = live[i % len(live)]
            self.w.pd(self.w.where(upid), KillProcess(upid))

    @rule(snapshot=st.booleans())
    def ha_crashes(self, snapshot: bool) -> None:
        self.w.crash(snapshot=snapshot)
        self.w.settle()

    @rule(to_pd=st.booleans())
    def messages_lost_for_a_tick(self, to_pd: bool) -> None:
        if to_pd:
            self.w.lose_to_pd = True
        else:
            self.w.lose_to_ha = True
        self.w.tick()
        self.w.lose_to_pd = self.w.lose_to_ha = False

    @rule()
    def tick(self) -> None:
        self.w.tick()

    @invariant()
    def sound(self) -> None:
        self.w.check()

    def teardown(self) -> None:
        g = converge(self.w, passes=7)
        assert g["status"] == "STEADY", g
        assert len(self.w.running("web")) == self.n and len(self.w.live("web")) == self.n
        assert sorted(c["upid"] for c in g["copies"]) == self.w.live("web")


HAMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
test_random_walk = HAMachine.TestCase


def test_a_pass_needs_no_groups():
    w = World()
    assert w.ok(HAPass()) == {"groups": 0}


def test_a_crash_loop_backs_off_exponentially_up_to_a_cap():
    w = World(backoff_base=1.0, backoff_max=8.0, min_lifetime=5.0)
    npreserving(w, 1)
    wants = set()
    for _ in range(160):  # every copy fails as soon as it runs
        for upid in w.running("web"):
            w.pds["pd"].finish(upid, ps.FAILED)
        w.tick(0.25)
        wants.add(w.ok(DescribeGroup("web"))["wants"].split(" (")[0])
    at = [r.body["at"] for r in w.runner.log.read("ha") if r.type == "CopyScheduled"]
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    # a copy takes about 0.5 s from its schedule to its failure: that, plus the backoff
    # (none after the first quick failure, then 1, 2, 4, 8 s, capped at 8)
    assert gaps[0] < 1.0, gaps
    assert 1.0 <= gaps[1] < 2.0 and 2.0 <= gaps[2] < 3.0 and 4.0 <= gaps[3] < 5.0, gaps
    assert all(8.0 <= g < 9.0 for g in gaps[4:]) and len(gaps) >= 6, gaps
    g = w.ok(DescribeGroup("web"))
    assert g["backoff"]["failures"] == len(at) - (1 if g["copies"] else 0)
    assert "back off" in wants
    w.check()
    # a copy that lives long enough resets the count: the next replacement is immediate
    for _ in range(40):
        w.tick(0.25)
    g = w.ok(DescribeGroup("web"))
    assert g["status"] == "STEADY"
    w.pds["pd"].finish(g["copies"][0]["upid"], ps.FAILED)
    w.tick(0.25)
    w.tick(0.25)
    g = w.ok(DescribeGroup("web"))
    assert g["backoff"] == {"failures": 0, "retry_at": 0.0} and len(g["copies"]) == 1
    # a reconfigure (even to the same parameters) clears a backoff
    for _ in range(12):
        for upid in w.running("web"):
            w.pds["pd"].finish(upid, ps.FAILED)
        w.tick(0.25)
    assert w.ok(DescribeGroup("web"))["backoff"]["failures"] >= 2
    g = w.ok(ReconfigureGroup("web", parameters={"preserve_n": 1}))
    assert g["backoff"] == {"failures": 0, "retry_at": 0.0}
    w.check()


def test_backoff_config_is_checked():
    with pytest.raises(ValueError, match="backoff_max"):
        HAConfig.from_dict({"backoff_max": -1})
    w = World(backoff_base=0)  # 0: never back off
    npreserving(w, 1)
    for _ in range(30):
        for upid in w.running("web"):
            w.pds["pd"].finish(upid, ps.FAILED)
        w.tick(0.25)
    at = [r.body["at"] for r in w.runner.log.read("ha") if r.type == "CopyScheduled"]
    assert max(b - a for a, b in zip(at, at[1:], strict=False)) <= 1.5 and len(at) >= 8, at
    assert w.ok(DescribeGroup("web"))["backoff"]["failures"] == 0
