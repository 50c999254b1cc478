"""The PD actor on real thespian (TCP base) and a real ZooKeeper log, with real EEAgent
processes running real commands (``true``, ``false``, ``sleep``)."""

from __future__ import annotations

import collections
import time

import pytest
from pd_system import CallError, PDSystem, pd_config
from waiting import wait_for

from cei_actors.pd import states as ps


@pytest.fixture
def system(zk_hosts, tmp_path, request):
    over = getattr(request, "param", {})  # parametrize("system", [{...}], indirect=True)
    sys_ = PDSystem(f"zk://{zk_hosts}", str(tmp_path), pd_config(**over))
    try:
        yield sys_
    finally:
        sys_.close()


def state_of(system, upid):
    return system.client.describe_process(upid)["state"]


def test_processes_run_exit_fail_restart_and_terminate(system):
    c = system.client
    system.add_node("n1", slots=4)
    system.add_node("n2", slots=4)
    c.schedule_process("ok", command=["true"])
    c.schedule_process("bad", command=["false"], restart_mode="never")
    c.schedule_process("loop", command=["false"], restart_mode="always")
    c.schedule_process("long", command=["sleep", "30"])
    assert c.wait_process("ok", ps.EXITED)["round"] == 0
    bad = c.wait_process("bad", ps.FAILED)
    assert bad["round"] == 0 and "exit code 1" in bad["msg"]
    wait_for(lambda: c.describe_process("loop")["round"] >= 3)  # restarted, throttled
    long = c.wait_process("long", ps.RUNNING)
    assert long["starts"] == 1
    # restart_process works end to end: a new round runs in place, the old copy is gone
    again = c.restart_process("long")
    assert again["round"] == 1 and again["state"] == ps.ASSIGNED
    c.wait_process("long", ps.RUNNING)
    wait_for(lambda: [k for k in system.live_copies() if k[0] == "long"] == [("long", 1)])
    assert c.describe_process("long")["starts"] == 2
    assert c.terminate_process("long")["state"] == ps.TERMINATING
    c.wait_process("long", ps.TERMINATED)
    c.terminate_process("loop")
    c.wait_process("loop", [ps.TERMINATED])
    # a finished process scheduled again runs a new round
    assert c.schedule_process("ok", command=["true"])["round"] == 1
    c.wait_process("ok", ps.EXITED)
    wait_for(lambda: not system.live_copies())


def test_bad_input_is_refused_clearly(system):
    c = system.client
    with pytest.raises(CallError, match="no process 'ghost'"):
        c.describe_process("ghost")
    with pytest.raises(CallError, match="unknown execution engine 'nope'"):
        c.schedule_process("x", command=["true"], execution_engine_id="nope")
    with pytest.raises(CallError, match="no definition 'd0'"):
        c.schedule_process("x", "d0")
    with pytest.raises(CallError, match="name: expected"):
        from cei_actors.pd.messages import ScheduleProcess

        c.service.call(ScheduleProcess("x", command=["true"], name=5))
    c.schedule_process("x", command=["sleep", "5"])
    with pytest.raises(CallError, match="different parameters: command"):
        c.schedule_process("x", command=["sleep", "6"])
    assert c.dump()["processes"][0]["upid"] == "x"


@pytest.mark.parametrize("system", [{"monitor": True}], indirect=True, ids=["monitored"])
def test_killed_agent_processes_restart_elsewhere_or_fail(system):
    c = system.client
    system.add_node("n1", slots=2)
    c.schedule_process("a", command=["sleep", "60"])
    c.schedule_process("n", command=["sleep", "60"], restart_mode="never")
    c.wait_process("a", ps.RUNNING)
    c.wait_process("n", ps.RUNNING)
    system.add_node("n2", slots=2)
    wait_for(lambda: any(r["resource_id"] == "n2" for r in c.dump()["resources"]))
    system.kill_node("n1")
    a = wait_for(lambda: (p := c.describe_process("a"))["round"] == 1 and p["state"] == ps.RUNNING and p)
    assert a["node_id"] == "n2"
    n = c.wait_process("n", ps.FAILED)
    assert n["round"] == 0
    res = {r["resource_id"]: r["state"] for r in c.dump()["resources"]}
    assert res["n1"] == ps.RESOURCE_MISSING
    assert list(system.live_copies()) == [("a", 1)]


def test_constraints_wait_for_a_matching_node_and_node_exclusive(system):
    c = system.client
    system.add_node("plain", slots=4)
    c.schedule_process("gpu", command=["sleep", "30"], constraints={"gpu": "yes"})
    for i in range(3):
        c.schedule_process(f"x{i}", command=["sleep", "30"], node_exclusive="ex")
    wait_for(lambda: state_of(system, "x0") == ps.RUNNING)
    assert state_of(system, "gpu") == ps.WAITING
    assert [state_of(system, f"x{i}") for i in (1, 2)] == [ps.WAITING, ps.WAITING]
    system.add_node("g", slots=4, gpu="yes")
    assert c.wait_process("gpu", ps.RUNNING)["node_id"] == "g"
    wait_for(lambda: sum(state_of(system, f"x{i}") == ps.RUNNING for i in range(3)) == 2)
    nodes = collections.Counter(c.describe_process(f"x{i}")["node_id"] for i in range(3))
    assert nodes[None] == 1 and nodes["plain"] == 1 and nodes["g"] == 1


@pytest.mark.parametrize("system", [{"slots": 4}], indirect=True, ids=["4slots"])
def test_kill_9_of_the_pd_loses_nothing_and_doubles_nothing(system):
    c = system.client
    system.add_node("n1", slots=4)
    system.add_node("n2", slots=4)
    wait_for(lambda: len(c.dump()["resources"]) == 2)
    for i in range(4):
        c.schedule_process(f"run{i}", command=["sleep", "60"])
    wait_for(lambda: all(state_of(system, f"run{i}") == ps.RUNNING for i in range(4)))
    for i in range(6):  # 4 get the last slots (ASSIGNED, maybe not acknowledged), 2 queue
        c.schedule_process(f"late{i}", command=["sleep", "60"])
    system.kill_pd()
    system.start_pd()
    c = system.client
    upids = [f"run{i}" for i in range(4)] + [f"late{i}" for i in range(6)]
    procs = {p["upid"]: p for p in c.describe_processes()}
    assert sorted(procs) == sorted(upids)  # nothing lost
    system.add_node("n3", slots=4)  # room for the queued ones
    wait_for(lambda: all(state_of(system, u) == ps.RUNNING for u in upids), timeout=20)
    copies = system.live_copies()
    assert sorted(k[0] for k in copies) == sorted(upids)
    assert all(len(nodes) == 1 for nodes in copies.values()), copies
    assert all(c.describe_process(u)["round"] == 0 for u in upids)


def test_heartbeat_from_an_unknown_node_is_ignored(system):
    c = system.client
    system.add_node("stray", announce=False)
    log = tmp_log(system, "stray")
    wait_for(lambda: "PD at" in log())
    time.sleep(0.8)  # a few heartbeats
    d = c.dump()
    assert d["nodes"] == [] and d["resources"] == []


def tmp_log(system, node):
    def read():
        with open(f"{system.workdir}/{node}.log") as f:
            return f.read()

    return read


def test_start_with_a_bad_config_is_refused(system):
    from cei_actors.pd.actor import ProcessDispatcherActor
    from cei_actors.runtime.control import Start
    from cei_actors.runtime.messages import ErrorReply

    other = system.asys.createActor(ProcessDispatcherActor)
    reply = system.asys.ask(other, Start(system.log_url, config={"engines": {"e1": {}}}), 10)
    assert isinstance(reply, ErrorReply) and "'slots' is required" in reply.message


@pytest.mark.parametrize("system", [{"retention": 1.0}], indirect=True, ids=["retention-1s"])
def test_a_finished_process_is_forgotten_by_the_real_pd_and_still_answered(system):
    """Retention 1 s on the real actor and a ZooKeeper log: the PD's own timer forgets a
    process that exited; describe answers from its tombstone; a schedule runs a new round
    past it; a ``once`` retry is answered as it ended, and a kill -9 changes nothing."""
    c = system.client
    system.add_node("n1", slots=2)
    c.schedule_process("short", command=["true"], restart_mode="never")
    assert c.wait_process("short", ps.EXITED)["round"] == 0
    wait_for(lambda: c.describe_process("short").get("forgotten"), timeout=30)
    gone = c.describe_process("short")
    assert (gone["state"], gone["round"]) == (ps.EXITED, 0) and gone["forgotten_at"] >= gone["ended_at"]
    assert [p["upid"] for p in c.dump()["processes"]] == []
    same = c.schedule_process("short", command=["true"], restart_mode="never", once=True)
    assert same["forgotten"] is True and same["round"] == 0
    system.kill_pd()
    system.start_pd()
    c = system.client
    assert c.describe_process("short")["forgotten"] is True
    again = c.schedule_process("short", command=["true"], restart_mode="never")
    assert again["round"] == 1 and "forgotten" not in again
    assert c.wait_process("short", ps.EXITED)["round"] == 1


def test_an_agent_whose_hello_was_lost_is_reached_from_its_heartbeats(system):
    """Found by the fault suite: an agent greeted a PD replica that was being replaced, its
    ``Hello`` never reached the replica that then led, and every LaunchProcess and LeaseGrant
    to it was "dropped ... unknown peer" while its heartbeats arrived. A heartbeat names its
    agent, so the PD holds the sender under that name (level-based) and reaches it."""
    from cei_actors.eeagent.messages import AgentHeartbeat, AgentRequests, LaunchProcess, LeaseGrant
    from cei_actors.runtime.system import attach_system, detach_system, lookup

    system.announce("mute")
    asys = attach_system(system.port)
    try:
        pd = lookup(asys, "pd")
        system.client.schedule_process("hb-only", command=["true"])
        got: list[type] = []
        deadline = time.monotonic() + 20
        seq = 0
        while time.monotonic() < deadline and not ({LaunchProcess, LeaseGrant} <= set(got)):
            seq += 1
            asys.tell(pd, AgentHeartbeat("mute", "mute", time.time(), [], seq))  # never a Hello
            msg = asys.listen(0.3)
            while msg is not None:
                got += [type(r) for r in msg.requests] if isinstance(msg, AgentRequests) else [type(msg)]
                msg = asys.listen(0.05)
        assert {LaunchProcess, LeaseGrant} <= set(got), got
    finally:
        detach_system(asys)
