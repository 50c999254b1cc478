"""The EEAgent around its supervisor: request handling, level-based heartbeats, prompt change
notice, and the agent as an actor and as a separate "VM" process reaching the PD."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from pd_system import REPO, FakePD
from thespian.actors import ActorTypeDispatcher
from waiting import wait_for

from cei_actors.eeagent.actor import AgentConfig, AgentCore, AgentStop, EEAgentActor
from cei_actors.eeagent.messages import (
    AgentHeartbeat,
    AgentRequests,
    CleanupProcess,
    DumpAgentState,
    LaunchProcess,
    LeaseGrant,
    ReadOutput,
    TerminateProcess,
)
from cei_actors.epum.messages import HealthProbe, NodeHeartbeat
from cei_actors.runtime.messages import ErrorReply, Ok, validate
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
    c = AgentCore(
        "a1", "n1", 2, str(tmp_path / "sd"), send=col.send, wake=col.wake, grace=1.0, min_gap=0.0
    )
    c.col = col
    try:
        yield c
    finally:
        c.close(kill=True, grace=0.5)


def states(hb: AgentHeartbeat) -> dict:
    return {(p["upid"], p["round"]): p["state"] for p in hb.processes}


def test_changes_within_the_gap_share_one_heartbeat(tmp_path):
    col = Collect()
    now = [1000.0]
    c = AgentCore("a1", "n1", 4, str(tmp_path / "sd"), send=col.send, clock=lambda: now[0],
                  heartbeat_interval=30.0, min_gap=0.01)
    try:
        assert c.flush()  # the first one at once
        c.handle(LaunchProcess("u1", 0, ["sleep", "30"]))
        now[0] += 0.004
        assert not c.flush() and c.dirty  # 4 ms after the last one: held
        assert c.next_delay() == pytest.approx(0.006)
        c.handle(LaunchProcess("u2", 0, ["sleep", "30"]))
        now[0] += 0.006
        assert c.next_delay() == 0.0
        assert c.flush() and states(col.sent[-1]) == {("u1", 0): "RUNNING", ("u2", 0): "RUNNING"}
        assert len(col.sent) == 2 and not c.dirty
        now[0] += 0.001
        assert c.flush(force=True)  # forced (e.g. a dump) ignores the gap
    finally:
        c.close(kill=True, grace=0.5)


def test_a_batch_runs_in_order_with_launch_runs_started_together(core):
    batch = core.handle(AgentRequests([
        LaunchProcess("b1", 0, ["sleep", "30"]),
        TerminateProcess("b1", 0),  # after b1's launch, before b2's
        LaunchProcess("b2", 0, ["sleep", "30"]),
        LaunchProcess("b3", 0, ["sleep", "30"]),  # 2 slots: free only if b1 died already
    ]))
    assert isinstance(batch, Ok)
    states_ = [v["state"] for v in batch.value]
    # the terminate saw the launch before it; b2 started after it
    assert states_[:3] == ["RUNNING", "TERMINATING", "RUNNING"]
    assert states_[3] in ("REJECTED", "RUNNING")  # b1's SIGTERM may have ended it meanwhile
    wait_for(lambda: core.supervisor.get("b1", 0).state == "TERMINATED")


def test_a_batch_of_cleanups_answers_each(core):
    core.handle(AgentRequests([LaunchProcess("c1", 0, ["true"]), LaunchProcess("c2", 0, ["sleep", "30"])]))
    wait_for(lambda: core.supervisor.get("c1", 0).state == "EXITED")
    batch = core.handle(AgentRequests([
        CleanupProcess("c1", 0), CleanupProcess("c2", 0), CleanupProcess("zz", 0), CleanupProcess("c1", 0),
    ]))
    assert isinstance(batch, Ok)
    assert batch.value[0] is True and batch.value[2] is False and batch.value[3] is False
    assert batch.value[1]["error"] == "conflict"  # c2 still runs
    assert core.supervisor.get("c1", 0) is None and core.supervisor.get("c2", 0).state == "RUNNING"
    mixed = core.handle(AgentRequests([CleanupProcess("c1", 0), LaunchProcess("c3", 0, ["true"])]))
    assert mixed.value[0] is False and mixed.value[1]["state"] in ("RUNNING", "EXITED")


def test_a_long_batch_lets_heartbeats_out_between_chunks(tmp_path):
    from cei_actors.eeagent.actor import LAUNCH_CHUNK

    col = Collect()
    n = 2 * LAUNCH_CHUNK + 3
    c = AgentCore("a1", "n1", n, str(tmp_path / "sd"), send=col.send, min_gap=0.0)
    try:
        assert c.flush()
        batch = c.handle(AgentRequests([LaunchProcess(f"c{i}", 0, ["true"]) for i in range(n)]))
        assert [v["state"] for v in batch.value] == ["RUNNING"] * n
        assert len(col.sent) == 3  # the first one, then one after each of the first two chunks
        assert len(col.sent[-1].processes) == 2 * LAUNCH_CHUNK
    finally:
        c.close(kill=True, grace=0.5)


def test_core_runs_requests_and_sends_level_based_heartbeats(core):
    col = core.col
    assert core.flush() and states(col.sent[-1]) == {}  # the first one goes out at once
    assert not core.flush()  # nothing changed, not due
    reply = core.handle(LaunchProcess("u1", 0, ["sleep", "30"]))
    assert isinstance(reply, Ok) and reply.value["state"] == "RUNNING"
    assert core.flush() and states(col.sent[-1]) == {("u1", 0): "RUNNING"}
    assert core.handle(LaunchProcess("u1", 0, ["sleep", "30"])).value["state"] == "RUNNING"  # dup
    batch = core.handle(
        AgentRequests([LaunchProcess("u2", 0, ["sleep", "0.3"]), LaunchProcess("u3", 0, ["true"]),
                       TerminateProcess("x", 0)])
    )
    assert [p.get("state") for p in batch.value] == ["RUNNING", "REJECTED", None]  # 2 slots
    assert batch.value[2]["error"] == "not_found"
    assert core.handle(AgentRequests([LaunchProcess("", 0, ["true"])])).code == "bad_request"
    core.flush()  # the host flushes after each request; a change after that wakes it
    assert col.woken.wait(5)  # u2's exit (after this flush), seen by the watcher thread
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


@pytest.mark.parametrize(
    "message, code",
    [
        (ReadOutput("", 0), "bad_request"),
        (ReadOutput("u", -1), "bad_request"),
        (ReadOutput("u", 0, offset=-1), "bad_request"),
        (ReadOutput("u", 0, offset="0"), "bad_request"),
        (ReadOutput("u", 0, limit=0), "bad_request"),
        (ReadOutput("u", 0, limit=256 * 1024 + 1), "bad_request"),
        (ReadOutput("u", 0, limit=2**70), "bad_request"),
        (ReadOutput("u", 0, tail=-1), "bad_request"),
        (ReadOutput("u", 0, tail=10**9), "bad_request"),
        (ReadOutput("u", 0, stream="../etc/passwd"), "bad_request"),
        (ReadOutput("u", 0, offset=2**62), "not_found"),  # valid, but no such process
        (ReadOutput("../../lock", 0), "not_found"),
    ],
)
def test_core_refuses_bad_output_reads(core, message, code):
    reply = core.handle(message)
    assert isinstance(reply, ErrorReply) and reply.code == code, reply


def test_core_reads_output_by_offset_and_tail_in_capped_chunks(core):
    script = "i=0; while [ $i -lt 30000 ]; do echo line $i; i=$((i+1)); done; echo err >&2"
    core.handle(LaunchProcess("big", 0, ["sh", "-c", script]))
    assert core.supervisor.wait("big", 0, timeout=30).state == "EXITED"
    want = "".join(f"line {i}\n" for i in range(30000)).encode()
    got, offset, replies = b"", 0, 0
    while True:
        value = core.handle(ReadOutput("big", 0, offset=offset)).value
        assert value["offset"] == offset and value["size"] == len(want) and value["state"] == "EXITED"
        assert len(value["data"]) <= 256 * 1024
        if not value["data"]:
            break
        got += value["data"]
        offset = value["next_offset"]
        replies += 1
    assert got == want and replies == 2
    tail = core.handle(ReadOutput("big", 0, tail=2, limit=100)).value
    assert tail["data"] == b"line 29998\nline 29999\n" and tail["next_offset"] == len(want)
    assert core.handle(ReadOutput("big", 0, stream="stderr")).value["data"] == b"err\n"
    assert core.handle(ReadOutput("big", 0, offset=10**12)).value["data"] == b""  # past the end
    assert core.handle(CleanupProcess("big", 0)) == Ok(True)  # the files stay for the retention
    value = core.handle(ReadOutput("big", 0, offset=len(want) - 11)).value
    assert value["data"] == b"line 29999\n" and value["state"] is None
    assert core.handle(ReadOutput("big", 1)).code == "not_found"


def test_output_removed_by_the_retention_is_not_found(tmp_path):
    col = Collect()
    core = AgentCore("a1", "n1", 1, str(tmp_path / "sd"), send=col.send, grace=1.0, output_retention=0)
    try:
        core.handle(LaunchProcess("u", 0, ["echo", "hi"]))
        assert core.supervisor.wait("u", 0, timeout=30).state == "EXITED"
        assert core.handle(ReadOutput("u", 0)).value["data"] == b"hi\n"
        core.handle(CleanupProcess("u", 0))
        wait_for(lambda: isinstance(core.handle(ReadOutput("u", 0)), ErrorReply), timeout=30)
        reply = core.handle(ReadOutput("u", 0))
        assert reply.code == "not_found" and "output retention" in reply.message
    finally:
        core.close(kill=True, grace=0.5)


def test_core_cleanup_of_a_live_process_is_refused(core):
    core.handle(LaunchProcess("u", 0, ["sleep", "30"]))
    assert core.handle(CleanupProcess("u", 0)).code == "conflict"
    assert core.handle(CleanupProcess("unknown", 3)) == Ok(False)


def test_heartbeat_is_due_on_the_interval(tmp_path):
    t = [100.0]
    col = Collect()
    c = AgentCore("a", "n", 1, str(tmp_path), send=col.send, heartbeat_interval=5.0, clock=lambda: t[0],
                  fence=40.0)  # renewals (every fence / 4) come less often than heartbeats
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
        from cei_actors.runtime.client import ServiceClient

        with ServiceClient(asys, agent, timeout=10) as client:  # a client's call, as the CLI's
            assert client.call(ReadOutput("u1", 0)) == {
                "upid": "u1", "round": 0, "stream": "stdout", "offset": 0, "next_offset": 0,
                "size": 0, "data": b"", "state": "EXITED"}
        assert asys.ask(agent, ReadOutput("u1", 0, offset=-1), 5).code == "bad_request"
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
        from cei_actors.eeagent.supervisor import read_table

        ended = {p["upid"]: p["ended_at"] for p in read_table(tmp_path / "n1")["processes"]}
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


def test_agent_process_answers_a_client_s_output_read(tmp_path):
    """The agent's loop answers a client's call (``Request`` with an id) to its sender: a
    read of a process's output, a refused one, and it still serves after both."""
    from cei_actors.runtime.client import BadRequest, NotFound, ServiceClient

    asys = start_system()
    proc = None
    try:
        pd = asys.createActor(FakePD, globalName="pd")
        proc = _agent_proc(asys.cei_admin_port, tmp_path, heartbeat="0.5")
        wait_for(lambda: asys.ask(pd, "dump", 5)[0] == ["eeagent:n1"], timeout=15)
        asys.tell(pd, ("send", "eeagent:n1", LaunchProcess("u1", 0, ["sh", "-c", "echo hello"])))
        wait_for(lambda: any(states(h).get(("u1", 0)) == "EXITED" for _, h in asys.ask(pd, "dump", 5)[1]),
                 timeout=15)
        address = asys.ask(pd, ("peer", "eeagent:n1"), 5)
        with ServiceClient(asys, address, timeout=10) as agent:
            got = agent.call(ReadOutput("u1", 0))
            assert got["data"] == b"hello\n" and got["next_offset"] == 6 and got["state"] == "EXITED"
            with pytest.raises(BadRequest, match="limit"):
                agent.call(ReadOutput("u1", 0, limit=10**9))
            with pytest.raises(NotFound):
                agent.call(ReadOutput("ghost", 0))
            assert agent.call(ReadOutput("u1", 0, offset=2))["data"] == b"llo\n"
        assert proc.poll() is None
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
    for bad in ("-5", "soon", "nan"):
        r = subprocess.run([sys.executable, "-m", "cei_actors.eeagent", "--pd", "1", "--node-id", "n",
                            "--output-retention", bad], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and "--output-retention" in r.stderr


def test_output_retention_reaches_the_supervisor(tmp_path):
    from cei_actors.eeagent.__main__ import build_parser
    from cei_actors.eeagent.actor import AgentConfig
    from cei_actors.eeagent.retention import DEFAULT_OUTPUT_RETENTION
    from cei_actors.runtime.messages import InvalidMessage

    parse = build_parser().parse_args
    assert parse(["--pd", "1"]).output_retention == DEFAULT_OUTPUT_RETENTION
    assert parse(["--pd", "1", "--output-retention", "forever"]).output_retention is None
    assert parse(["--pd", "1", "--output-retention", "0"]).output_retention == 0.0
    with pytest.raises(InvalidMessage):
        validate(AgentConfig("a", "n", 1, str(tmp_path), output_retention=-1.0))
    c = AgentCore("a1", "n1", 1, str(tmp_path / "sd"), send=lambda m: None, output_retention=None)
    try:
        assert c.supervisor._retention.retention is None
    finally:
        c.close(kill=True, grace=0.5)


# ---- health heartbeats to EPUM -------------------------------------------------------------


class FakeEPUM(ActorTypeDispatcher):
    """Stands in for EPUM: records Hellos and (validated) NodeHeartbeats; ``("send", peer,
    msg)`` sends to a greeted peer; ``"dump"`` answers ``(hellos, heartbeats)``."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: dict = {}
        self.hellos: list[str] = []
        self.heartbeats: list = []

    def receiveMessage(self, msg, sender):  # noqa: N802
        from cei_actors.runtime.control import Hello

        if isinstance(msg, Hello):
            self.peers[msg.name] = sender
            self.hellos.append(msg.name)
            self.send(sender, Ok(msg.name))
        elif isinstance(msg, NodeHeartbeat):
            validate(msg)
            self.heartbeats.append(msg)
        elif isinstance(msg, tuple) and msg and msg[0] == "send":
            self.send(self.peers[msg[1]], msg[2])
        elif msg == "dump":
            self.send(sender, (list(self.hellos), list(self.heartbeats)))


def test_core_health_heartbeats_report_failures_once(tmp_path):
    sent: list[NodeHeartbeat] = []
    c = AgentCore("a1", "n1", 4, str(tmp_path / "sd"), send=lambda m: None, send_epum=sent.append)
    try:
        assert c.flush_health() and sent[-1].state == "OK" and sent[-1].agent == "eeagent:a1"
        assert not c.flush_health()  # not due
        c.handle(LaunchProcess("bad", 0, ["sh", "-c", "exit 3"]))
        c.handle(LaunchProcess("good", 0, ["true"]))
        c.supervisor.wait("bad", 0, timeout=5)
        c.supervisor.wait("good", 0, timeout=5)
        wait_for(lambda: c.node_heartbeat().state == "PROCESS_ERROR", timeout=5)
        assert c.flush_health(force=True)
        hb = sent[-1]
        validate(hb)
        assert (hb.node_id, hb.state) == ("n1", "PROCESS_ERROR") and "exit code 3" in hb.error
        assert [(p["upid"], p["round"], p["state"]) for p in hb.failed_processes] == [("bad", 0, "FAILED")]
        assert c.flush_health(force=True) and sent[-1].state == "OK"  # reported once
        # a send that fails keeps the failure for the next heartbeat
        c.handle(LaunchProcess("bad2", 0, ["false"]))
        c.supervisor.wait("bad2", 0, timeout=5)
        wait_for(lambda: c.node_heartbeat().state == "PROCESS_ERROR", timeout=5)

        def broken(m):
            raise RuntimeError("no EPUM")

        assert not c.flush_health(force=True, send=broken)
        assert c.flush_health(force=True) and sent[-1].failed_processes[0]["upid"] == "bad2"
    finally:
        c.close(kill=True, grace=0.5)
    quiet = AgentCore("a2", None, 1, str(tmp_path / "sd2"), send=lambda m: None, send_epum=sent.append)
    try:
        assert not quiet.flush_health(force=True)  # no node id: nothing to report
    finally:
        quiet.close()


def test_agent_actor_sends_health_and_answers_probes(tmp_path):
    asys = start_system()
    try:
        pd = asys.createActor(FakePD)
        epum = asys.createActor(FakeEPUM)
        agent = asys.createActor(EEAgentActor)
        conf = AgentConfig("a1", "n1", 2, str(tmp_path / "sd"), pd=pd, heartbeat_interval=30, epum=epum)
        assert asys.ask(agent, conf, 10) == Ok("a1")
        wait_for(lambda: asys.ask(epum, "dump", 5)[0] == ["eeagent:a1"] and asys.ask(epum, "dump", 5)[1])
        assert [h.state for h in asys.ask(epum, "dump", 5)[1]] == ["OK"]
        assert asys.ask(agent, LaunchProcess("bad", 0, ["false"]), 5).value["state"] == "RUNNING"
        time.sleep(0.3)
        asys.tell(epum, ("send", "eeagent:a1", HealthProbe("n1")))  # long before the interval
        wait_for(lambda: len(asys.ask(epum, "dump", 5)[1]) == 2)
        hb = asys.ask(epum, "dump", 5)[1][-1]
        assert hb.state == "PROCESS_ERROR" and hb.failed_processes[0]["upid"] == "bad"
        assert asys.ask(agent, AgentStop(kill=True), 10) == Ok(None)
    finally:
        shutdown_system(asys)


def test_agent_process_finds_epum_by_name_and_answers_probes(tmp_path):
    asys = start_system()
    proc = None
    try:
        asys.createActor(FakePD, globalName="pd")
        epum = asys.createActor(FakeEPUM, globalName="epum")
        proc = _agent_proc(asys.cei_admin_port, tmp_path, heartbeat="30")
        wait_for(lambda: asys.ask(epum, "dump", 5)[0] == ["eeagent:n1"] and asys.ask(epum, "dump", 5)[1],
                 timeout=15)
        first = asys.ask(epum, "dump", 5)[1]
        assert [(h.node_id, h.state, h.agent) for h in first] == [("n1", "OK", "eeagent:n1")]
        asys.tell(epum, ("send", "eeagent:n1", HealthProbe("n1")))
        wait_for(lambda: len(asys.ask(epum, "dump", 5)[1]) == 2, timeout=5)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        shutdown_system(asys)


# ---- the lease (decision PD9) -----------------------------------------------------------------


def test_agent_stops_its_processes_when_its_lease_runs_out(tmp_path):
    """Real processes; the agent's monotonic clock is driven by the test."""
    mono = [500.0]
    col = Collect()
    c = AgentCore("a", "n", 2, str(tmp_path), send=col.send, heartbeat_interval=1.0, fence=10.0,
                  mono=lambda: mono[0], grace=5.0)
    try:
        c.handle(LaunchProcess("u", 0, ["sleep", "30"]))
        c.handle(LaunchProcess("v", 0, ["sleep", "30"]))
        assert wait_for(lambda: all(p.state == "RUNNING" for p in c.supervisor.processes()))
        pids = [p.pid for p in c.supervisor.processes()]
        assert c.flush(force=True)
        seq = col.sent[-1].seq
        assert seq > 0  # it asks for a lease
        mono[0] += 4.0
        assert c.handle(AgentRequests([LeaseGrant(seq, 10.0)])) == Ok([True])
        assert c.lease.until == 510.0  # from when that heartbeat was sent, not received
        assert c.next_delay() <= 6.0
        mono[0] = 509.9
        assert c.check_lease() == 0
        mono[0] = 510.0
        c.flush()
        assert wait_for(lambda: all(p.state == "TERMINATED" for p in c.supervisor.processes()), 5)
        assert not any(os.path.exists(f"/proc/{pid}") and _live(pid) for pid in pids)
        assert c.fenced == 1
        # a grant for a heartbeat it never sent changes nothing
        assert c.handle(LeaseGrant(9999, 10.0)) == Ok(False)
    finally:
        c.close(kill=True, grace=0.5)


def test_agent_lease_before_the_first_grant_is_its_own_fence(tmp_path):
    mono = [0.0]
    c = AgentCore("a", "n", 1, str(tmp_path), send=Collect().send, fence=3.0, mono=lambda: mono[0])
    try:
        c.handle(LaunchProcess("u", 0, ["sleep", "30"]))
        mono[0] = 2.9
        assert c.check_lease() == 0
        mono[0] = 3.0
        assert c.check_lease() == 1
    finally:
        c.close(kill=True, grace=0.5)


def test_a_frozen_agent_s_reaper_stops_its_processes_when_the_lease_runs_out(tmp_path):
    """Issue 12 §3 (decision EA8): the agent process is SIGSTOPped after a short grant, so its
    fence thread is frozen too; its reaper stops the commands within the lease (+ the kill
    grace) while the agent is still stopped. Resumed, the agent reports them ended."""
    from cei_actors.eeagent.supervisor import FENCED_MSG, read_table
    from tests.test_eeagent_reaper import STUBBORN, Client

    asys = start_system()
    proc = None
    try:
        pd = asys.createActor(FakePD, globalName="pd")
        proc = _agent_proc(asys.cei_admin_port, tmp_path, heartbeat="0.5")  # fence 15 s
        wait_for(lambda: asys.ask(pd, "dump", 5)[0] == ["eeagent:n1"], timeout=15)
        asys.tell(pd, ("send", "eeagent:n1", LaunchProcess("soft", 0, ["sleep", "300"])))
        asys.tell(pd, ("send", "eeagent:n1", LaunchProcess("hard", 0, STUBBORN)))
        both = {("hard", 0): "RUNNING", ("soft", 0): "RUNNING"}
        hb = wait_for(lambda: (h := asys.ask(pd, "dump", 5)[1]) and states(h[-1][1]) == both
                      and h[-1][1], timeout=15)
        pids = {p["upid"]: p["pid"] for p in read_table(tmp_path / "n1")["processes"]}
        lease = 3.0
        asys.tell(pd, ("send", "eeagent:n1", LeaseGrant(hb.seq, lease)))
        reaper = Client(str(tmp_path / "n1"))
        try:  # the agent passed the grant on to its reaper: far less than its own 15 s left
            left = wait_for(lambda: (x := reaper.ask({"op": "stats", "id": 1})["lease"]) is not None
                            and x <= lease and x, timeout=10)
            deadline = time.monotonic() + left  # the reaper's, at most the agent's
        finally:
            reaper.close()
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            assert all(_live(p) for p in pids.values())
            wait_for(lambda: not any(_live(p) for p in pids.values()), timeout=left + 10, every=0.02)
            gone = time.monotonic()
            assert gone <= deadline + 1.0 + 1.5, gone - deadline  # the grace, and some slack
            assert _stopped(proc.pid), "the agent was resumed meanwhile"
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        resumed = time.time()

        def reported():
            hbs = asys.ask(pd, "dump", 5)[1]
            return any(t > resumed and states(h) == {k: "TERMINATED" for k in both} for t, h in hbs)

        wait_for(reported, timeout=15)
        assert proc.poll() is None  # no crash
        table = {p["upid"]: p for p in read_table(tmp_path / "n1")["processes"]}
        assert (table["soft"]["state"], table["soft"]["exit_code"]) == ("TERMINATED", -signal.SIGTERM)
        assert (table["hard"]["state"], table["hard"]["exit_code"]) == ("TERMINATED", -signal.SIGKILL)
        assert all(FENCED_MSG in table[u]["msg"] for u, _ in both), table
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        shutdown_system(asys)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return raw[raw.rindex(b")") + 2 :][:1] == b"T"


def _live(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


def test_an_agent_that_took_a_standby_switches_to_the_leader_that_comes_later(monkeypatch):
    """Found by the fault suite: during a failover no replica leads, so the agent takes one that
    answers (a standby); the other then wins. Lookups every heartbeat (1 s) used to count as
    probes, so with a 2 s probe interval the agent never asked again and stayed with the
    standby: its heartbeats and leases went nowhere. A lookup alone is no probe now."""
    import cei_actors.eeagent.actor as agent_mod

    clock = [100.0]
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: clock[0])
    found = {"pd": "addr-pd", "pd.1": "addr-pd1"}
    monkeypatch.setattr(agent_mod, "global_actors", lambda asys, timeout=2.0: dict(found))
    leading: set[str] = set()

    class Core:
        _dirty = False

    class Asys:
        def tell(self, addr, msg):
            pass

    agent = agent_mod.EndpointAgent.__new__(agent_mod.EndpointAgent)
    agent.asys, agent.core, agent.agent_id = Asys(), Core(), "a1"
    agent.leaders = {"pd": agent_mod._Leader("pd")}
    agent.probe_interval, agent.probe_timeout, agent.lookup_interval = 2.0, 1.0, 1.0
    agent._last_lookup = float("-inf")
    agent.admins, agent._admin_down, agent.admin_retry = [], {}, 10.0
    monkeypatch.setattr(agent, "_status", lambda addr: {"leader": addr in leading, "ready": addr in leading,
                                                        "mode": "ready" if addr in leading else "standby"})
    agent._find_pd()
    assert agent.pd == "addr-pd"  # nobody leads: one that answers
    leading.add("addr-pd1")  # the other replica wins the election
    for _ in range(8):  # 4 s of steps, a lookup every second
        clock[0] += 0.5
        agent._find_pd()
    assert agent.pd == "addr-pd1"


def test_an_agent_given_every_hosts_admin_merges_their_names_and_skips_a_lost_one(monkeypatch):
    """NH6: each lookup asks every admin and merges the names (each host's admin knows its own
    replicas); an admin that does not answer is left out for ``admin_retry`` while another
    answers, then asked again; with none answering the agent keeps what it had."""
    import cei_actors.eeagent.actor as agent_mod
    from cei_actors.runtime.system import SystemNotRunning

    clock = [100.0]
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: clock[0])
    names = {"h0": {"pd": "addr-pd"}, "h1": {"pd.1": "addr-pd1"}}
    lost: set[str] = set()
    asked: list[str] = []

    def global_actors(asys, timeout=2.0, admin=None):
        asked.append(admin)
        if admin in lost:
            raise SystemNotRunning(f"{admin} does not answer")
        return dict(names[admin])

    monkeypatch.setattr(agent_mod, "global_actors", global_actors)

    class Core:
        _dirty = False

    class Asys:
        def tell(self, addr, msg):
            pass

    agent = agent_mod.EndpointAgent.__new__(agent_mod.EndpointAgent)
    agent.asys, agent.core, agent.agent_id = Asys(), Core(), "a1"
    agent.leaders = {"pd": agent_mod._Leader("pd")}
    agent.probe_interval, agent.probe_timeout, agent.lookup_interval = 2.0, 1.0, 1.0
    agent._last_lookup = float("-inf")
    agent.admins, agent._admin_down, agent.admin_retry = [("h0", "h0"), ("h1", "h1")], {}, 10.0
    leading = {"addr-pd"}
    monkeypatch.setattr(agent, "_status", lambda addr: {"leader": addr in leading, "ready": addr in leading,
                                                        "mode": "ready" if addr in leading else "standby"})
    agent._find_pd()
    assert agent.pd == "addr-pd" and agent.leaders["pd"].replicated  # both hosts' replicas seen
    assert asked == ["h0", "h1"]

    lost.add("h0")  # host 0 is lost with the leader; host 1's replica leads
    leading = {"addr-pd1"}
    asked.clear()
    clock[0] += 2.0
    agent._find_pd()
    assert agent.pd == "addr-pd1" and asked == ["h0", "h1"]
    asked.clear()
    for _ in range(9):  # 9 s: host 0's admin is not asked again
        clock[0] += 1.0
        agent._find_pd()
    assert asked and "h0" not in asked and agent.pd == "addr-pd1"
    clock[0] += 1.5  # past admin_retry: asked again (it may be back)
    asked.clear()
    agent._find_pd()
    assert sorted(asked) == ["h0", "h1"]

    lost.add("h1")  # no admin answers: the agent keeps the leader it had
    clock[0] += 20.0
    agent._find_pd()
    assert agent.pd == "addr-pd1"


def test_agent_process_stopped_with_its_node_reports_the_node_as_the_cause(tmp_path):
    """F3/OP7: the agent gets SIGTERM (its VM is going away): the heartbeat it sends last
    reports the processes it stopped with ``cause`` node; one that had crashed on its own
    carries no cause."""
    asys = start_system()
    proc = None
    try:
        pd = asys.createActor(FakePD, globalName="pd")
        proc = _agent_proc(asys.cei_admin_port, tmp_path, heartbeat="0.5")
        wait_for(lambda: asys.ask(pd, "dump", 5)[0] == ["eeagent:n1"], timeout=15)
        asys.tell(pd, ("send", "eeagent:n1", LaunchProcess("long", 0, ["sleep", "60"])))
        asys.tell(pd, ("send", "eeagent:n1", LaunchProcess("crash", 0, ["sh", "-c", "exit 3"])))

        def settled():
            hbs = asys.ask(pd, "dump", 5)[1]
            return hbs and states(hbs[-1][1]) == {("long", 0): "RUNNING", ("crash", 0): "FAILED"}
        wait_for(settled, timeout=15)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        proc = None
        last = {p["upid"]: p for p in asys.ask(pd, "dump", 5)[1][-1][1].processes}
        assert last["long"]["state"] == "TERMINATED" and last["long"]["cause"] == "node"
        assert "stopped with its node" in last["long"]["msg"]
        assert "cause" not in last["crash"]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        shutdown_system(asys)


def test_a_heartbeat_cause_must_be_a_string():
    from cei_actors.runtime.messages import InvalidMessage

    row = {"upid": "u", "round": 0, "state": "TERMINATED", "msg": ""}
    validate(AgentHeartbeat("a", "n", 1.0, [{**row, "cause": "node"}, row]))
    with pytest.raises(InvalidMessage, match=r"processes\[0\]\.cause: expected a str"):
        validate(AgentHeartbeat("a", "n", 1.0, [{**row, "cause": 7}]))
