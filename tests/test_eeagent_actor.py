"""The EEAgent around its supervisor: request handling, level-based heartbeats, prompt change
notice, and the agent as an actor and as a separate "VM" process reaching the PD."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from pd_system import REPO, FakePD, wait_for

from cei_actors.eeagent.actor import AgentConfig, AgentCore, AgentStop, EEAgentActor
from cei_actors.eeagent.messages import (
    AgentHeartbeat,
    AgentRequests,
    CleanupProcess,
    DumpAgentState,
    LaunchProcess,
    TerminateProcess,
)
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.runtime.system import shutdown_system, start_system


class Collect:
    def __init__(self) -> None:
        self.sent: list[AgentHeartbeat] = []
        self.woken = threading.Event()

    def send(self, m):
        self.sent.append(m)

    def wake(self):
        self.woken.set()


@pytest.fixture
def core(tmp_path):
    col = Collect()
    c = AgentCore("a1", "n1", 2, str(tmp_path / "sd"), send=col.send, wake=col.wake, grace=1.0)
    c.col = col
    try:
        yield c
    finally:
        c.close(kill=True, grace=0.5)


def states(hb: AgentHeartbeat) -> dict:
    return {(p["upid"], p["round"]): p["state"] for p in hb.processes}


def test_core_runs_requests_and_sends_level_based_heartbeats(core):
    col = core.col
    assert core.flush() and states(col.sent[-1]) == {}  # the first one goes out at once
    assert not core.flush()  # nothing changed, not due
    reply = core.handle(LaunchProcess("u1", 0, ["sleep", "30"]))
    assert isinstance(reply, Ok) and reply.value["state"] == "RUNNING"
    assert core.flush() and states(col.sent[-1]) == {("u1", 0): "RUNNING"}
    assert core.handle(LaunchProcess("u1", 0, ["sleep", "30"])).value["state"] == "RUNNING"  # dup
    batch = core.handle(
        AgentRequests([LaunchProcess("u2", 0, ["true"]), LaunchProcess("u3", 0, ["true"]), TerminateProcess("x", 0)])
    )
    assert [p.get("state") for p in batch.value] == ["RUNNING", "REJECTED", None]  # 2 slots
    assert batch.value[2]["error"] == "not_found"
    assert core.handle(AgentRequests([LaunchProcess("", 0, ["true"])])).code == "bad_request"
    core.flush()  # the host flushes after each request; a change after that wakes it
    assert col.woken.wait(5)  # u2's exit, seen by the watcher thread
    wait_for(lambda: core.flush() or ("u2", 0) in states(col.sent[-1]) and states(col.sent[-1])[("u2", 0)] == "EXITED")
    assert isinstance(core.handle(TerminateProcess("u1", 0)), Ok)
    wait_for(lambda: core.supervisor.get("u1", 0).state == "TERMINATED")
    core.flush()
    assert states(col.sent[-1])[("u1", 0)] == "TERMINATED"
    assert core.handle(CleanupProcess("u1", 0)) == Ok(True)
    core.flush(force=True)
    assert ("u1", 0) not in states(col.sent[-1])
    hb = core.handle(DumpAgentState()).value
    assert hb["eeagent_id"] == "a1" and hb["node_id"] == "n1" and isinstance(hb["timestamp"], float)


@pytest.mark.parametrize(
    "message, code",
    [
        (LaunchProcess("", 0, ["true"]), "bad_request"),
        (LaunchProcess("u", -1, ["true"]), "bad_request"),
        (LaunchProcess("u", 0, []), "bad_request"),
        (LaunchProcess("u", 0, "true"), "bad_request"),
        (TerminateProcess("nope", 0), "not_found"),
        ("junk", "bad_request"),
        (Ok(1), "bad_request"),
    ],
)
def test_core_refuses_bad_requests(core, message, code):
    reply = core.handle(message)
    assert isinstance(reply, ErrorReply) and reply.code == code, reply
    assert core.supervisor.dump() == []


def test_core_cleanup_of_a_live_process_is_refused(core):
    core.handle(LaunchProcess("u", 0, ["sleep", "30"]))
    assert core.handle(CleanupProcess("u", 0)).code == "conflict"
    assert core.handle(CleanupProcess("unknown", 3)) == Ok(False)


def test_heartbeat_is_due_on_the_interval(tmp_path):
    t = [100.0]
    col = Collect()
    c = AgentCore("a", "n", 1, str(tmp_path), send=col.send, heartbeat_interval=5.0, clock=lambda: t[0])
    try:
        assert c.flush() and not c.flush()
        assert c.next_delay() == 5.0
        t[0] += 5.0
        assert c.flush() and len(col.sent) == 2
    finally:
        c.close()


def test_agent_actor_in_a_tcp_system(tmp_path):
    asys = start_system()
    try:
        pd = asys.createActor(FakePD, globalName="pd")
        agent = asys.createActor(EEAgentActor)
        conf = AgentConfig("a1", "n1", 2, str(tmp_path / "sd"), pd=pd, heartbeat_interval=0.5, grace=1.0)
        assert asys.ask(agent, conf, 10) == Ok("a1")
        wait_for(lambda: asys.ask(pd, "dump", 5)[0] == ["eeagent:a1"])
        asys.tell(pd, ("send", "eeagent:a1", LaunchProcess("u1", 0, ["sleep", "0.2"])))

        def exited():
            hellos, hbs = asys.ask(pd, "dump", 5)
            return hellos == ["eeagent:a1"] and any(states(h).get(("u1", 0)) == "EXITED" for _, h in hbs)

        wait_for(exited, timeout=10)
        pd2 = asys.createActor(FakePD)  # a new leader: the agent is pointed at it
        assert asys.ask(agent, conf.__class__(**{**conf.__dict__, "pd": pd2}), 10) == Ok("a1")
        wait_for(lambda: asys.ask(pd2, "dump", 5)[0] == ["eeagent:a1"] and asys.ask(pd2, "dump", 5)[1])
        reply = asys.ask(agent, DumpAgentState(), 5)
        assert isinstance(reply, Ok) and reply.value["processes"][0]["state"] == "EXITED"
        assert asys.ask(agent, TerminateProcess("ghost", 0), 5).code == "not_found"
        assert asys.ask(agent, AgentStop(kill=True), 10) == Ok(None)
    finally:
        shutdown_system(asys)


def _agent_proc(port, tmp_path, node="n1", heartbeat="5"):
    return subprocess.Popen(
        [sys.executable, "-m", "cei_actors.eeagent", "--node-id", node, "--pd", f"127.0.0.1:{port}",
         "--slots", "4", "--state-dir", str(tmp_path / node), "--heartbeat", heartbeat, "--grace", "1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def test_agent_process_reports_exits_within_50ms_and_follows_a_new_pd(tmp_path):
    asys = start_system()
    proc = None
    try:
        pd = asys.createActor(FakePD, globalName="pd")
        proc = _agent_proc(asys.cei_admin_port, tmp_path, heartbeat="0.5")
        wait_for(lambda: asys.ask(pd, "dump", 5)[0] == ["eeagent:n1"], timeout=15)
        for i in range(8):
            asys.tell(pd, ("send", "eeagent:n1", LaunchProcess(f"u{i}", 0, ["sleep", "0.1"])))
            time.sleep(0.25)
        time.sleep(0.3)
        _, hbs = asys.ask(pd, "dump", 5)
        import json

        with open(tmp_path / "n1" / "processes.json") as f:
            ended = {p["upid"]: p["ended_at"] for p in json.load(f)["processes"]}
        lat = []
        for upid, at in ended.items():
            seen = min(t for t, h in hbs if states(h).get((upid, 0)) == "EXITED")
            lat.append(seen - at)
        assert len(lat) == 8 and max(lat) < 0.05, lat
        # the PD dies and a new one takes its name: the agent finds it and says hello
        os.kill(asys.ask(pd, "pid", 5), signal.SIGKILL)
        wait_for(lambda: _lookup(asys) is None, timeout=10)
        pd2 = asys.createActor(FakePD, globalName="pd")
        wait_for(lambda: asys.ask(pd2, "dump", 5)[0] == ["eeagent:n1"] and asys.ask(pd2, "dump", 5)[1], timeout=10)
        _, hbs2 = asys.ask(pd2, "dump", 5)
        assert len(states(hbs2[-1][1])) == 8  # level-based: everything it knows
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        shutdown_system(asys)


def _lookup(asys):
    from cei_actors.runtime.system import lookup

    return lookup(asys, "pd")


def test_agent_process_usage_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cei_actors.eeagent", "--pd", "example.com:1"],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "CEI_NODE_ID": ""})
    assert r.returncode == 2 and "--pd" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cei_actors.eeagent", "--pd", "1", "--node-id", "n",
                        "--state-dir", str(tmp_path), "--attach-timeout", "0.2"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "no actor system admin" in r.stderr
