"""`up` / `connect` / `down` end to end: real actor processes, real EEAgent "VMs" booted by the
local cloud driver, real processes; SQLite and ZooKeeper logs; a standby taking over."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml
from waiting import wait_for

from cei_actors.launch.launcher import LaunchError, NotRunning, connect, down, read_info, up
from cei_actors.launch.plan import default_plan_text, load_plan
from cei_actors.runtime.secure import new_secret_file


def make_plan(tmp_path: Path, **replicas: int) -> Path:
    """The built-in plan with short timings (and ``replicas`` per component)."""
    data = yaml.safe_load(default_plan_text())
    comps = data["components"]
    comps["provisioner"]["config"].update(query_interval=0.5, boot_query_interval=0.2)
    comps["epum"]["config"].update(decider_interval=0.3)
    comps["pd"]["config"].update(dispatch_retry_seconds=2.0)
    for name, n in replicas.items():
        comps[name]["replicas"] = n
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def live(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def processes_mentioning(*needles: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains any of ``needles`` (a /proc scan)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles) and live(int(entry.name)):
            out.append((int(entry.name), cmd))
    return out


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def assert_nothing_left(home: Path, info: dict) -> None:
    left = processes_mentioning(str(home), f"127.0.0.1:{info['admin_port']} ")
    assert not left, f"left running after down: {left}"
    pids = [*info["pids"].values(), *info["helper_pids"], info.get("admin_pid")]
    assert not [p for p in pids if p and live(p)], info["pids"]
    assert not port_open(info["admin_port"])


def down_clean(home: Path, info: dict, *commands: str) -> None:
    """`down`, then nothing of the system is left, nor any process running ``commands``."""
    down(home)
    assert_nothing_left(home, info)
    assert not processes_mentioning(*commands)


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    try:
        yield path
    finally:
        if read_info(path) is not None:
            down(path)


@pytest.mark.parametrize("log", ["sqlite", "zk"])
def test_up_schedule_down_and_up_again_recovers(home, tmp_path, log, request):
    log_url = f"zk://{request.getfixturevalue('zk_hosts')}" if log == "zk" else None
    plan = load_plan(make_plan(tmp_path), home=home, log_url=log_url)
    steps: list[str] = []
    info = up(plan, home, progress=steps.append)
    assert any("pd ready" in s for s in steps) and any("registry" in s for s in steps)
    assert read_info(home)["admin_port"] == info["admin_port"]
    with pytest.raises(LaunchError, match="already up"):
        up(plan, home)
    with connect(home) as conn:
        status = conn.status()
        assert all(r["ready"] and r["leader"] for reps in status["components"].values() for r in reps)
        assert status["domains"] == ["pd_domain_default"]
        pd = conn.pd
        pd.schedule_process("hello", command=["sh", "-c", "echo hello"])
        pd.schedule_process("long", command=["sleep", "30"], restart_mode="never")
        assert pd.wait_process("hello", ["EXITED", "FAILED"], timeout=40)["state"] == "EXITED"
        assert pd.wait_process("long", "RUNNING", timeout=20)["state"] == "RUNNING"
        nodes = conn.provisioner.describe_nodes()
        assert [n["state"] for n in nodes] == ["RUNNING"]
        assert processes_mentioning("cei_actors.eeagent", "sleep 30")
    result = down(home)
    assert result["nodes_terminated"] is True
    assert sorted(result["stopped"]) == ["epum", "ha", "pd", "provisioner"]
    assert_nothing_left(home, info)
    assert not (home / "system.json").exists()
    with pytest.raises(NotRunning):
        connect(home)

    again = up(plan, home)
    with connect(home) as conn:
        pd = conn.pd
        assert pd.describe_process("hello")["state"] == "EXITED"
        # it was RUNNING on a node that `down` terminated: never restarted, so it ended
        assert pd.describe_process("long")["state"] in ("FAILED", "TERMINATED")
        status = conn.status()
        assert all(r["epoch"] >= 2 for reps in status["components"].values() for r in reps)
        assert status["processes"].get("EXITED") == 1
    down(home)
    assert_nothing_left(home, again)


def test_connect_without_a_system(home):
    with pytest.raises(NotRunning, match="no system.json"):
        connect(home)
    home.mkdir(parents=True)
    (home / "system.json").write_text('{"admin_port": 9, "components": {}}')
    with pytest.raises(NotRunning, match="no secret"):
        connect(home)
    new_secret_file(home / "secret")
    with pytest.raises(NotRunning, match="nothing answers"):
        connect(home)
    assert down(home)["stopped"] == []  # a dead system: only what it left is cleaned up
    assert not (home / "system.json").exists()
    with pytest.raises(NotRunning):
        down(home)


def test_standby_takes_over_after_kill_9(home, tmp_path):
    """kill -9 of the EPUM leader: the standby serves, and the running EEAgent finds it among
    the replicas and greets it (its health heartbeats go there)."""
    plan = load_plan(make_plan(tmp_path, epum=2), home=home)
    info = up(plan, home)
    assert info["components"]["epum"] == ["epum", "epum.1"]
    with connect(home) as conn:
        conn.pd.schedule_process("long", command=["sleep", "60.75"])
        conn.pd.wait_process("long", "RUNNING", timeout=40)  # a node, so an agent, exists
        reps = conn.status()["components"]["epum"]
        assert [(r["name"], r["leader"]) for r in reps] == [("epum", True), ("epum.1", False)]
        assert reps[1]["mode"] == "standby" and reps[1]["running"]
        os.kill(reps[0]["pid"], signal.SIGKILL)

    def new_leader():
        with connect(home) as conn:
            reps = conn.status()["components"]["epum"]
            return reps[1]["leader"] and conn
    assert wait_for(new_leader, timeout=20)

    def agents_greeted_standby():
        with connect(home) as conn:
            standby = conn.members("epum")[1].status or {}
            return [p for p in standby.get("peers", []) if p.startswith("eeagent:")]
    assert wait_for(agents_greeted_standby, timeout=20)
    with connect(home) as conn:
        assert conn.epum.list_domains() == ["pd_domain_default"]  # served by epum.1
        conn.pd.schedule_process("hello", command=["true"])
        assert conn.pd.wait_process("hello", ["EXITED", "FAILED"], timeout=40)["state"] == "EXITED"
    down_clean(home, info, "sleep 60.75")


def test_up_after_a_crash_cleans_up_and_recovers(home, tmp_path):
    plan = load_plan(make_plan(tmp_path), home=home)
    info = up(plan, home)
    marker = f"30.{os.getpid()}{time.monotonic_ns() % 10**6:06d}"  # this test's own sleep
    with connect(home) as conn:
        conn.pd.schedule_process("long", command=["sleep", marker], restart_mode="never")
        conn.pd.wait_process("long", "RUNNING", timeout=30)
    agents = processes_mentioning(f"--pd 127.0.0.1:{info['admin_port']} ")
    assert agents
    assert info["helper_pids"]  # thespian's logger
    for pid in [*info["pids"].values(), info["admin_pid"]]:  # the system dies, its logger lives
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not live(info["admin_pid"]), timeout=10)
    # at once: the logger may still hold the admin port for seconds; up must not call that "up"
    steps: list[str] = []
    again = up(plan, home, progress=steps.append)
    assert any("cleaning up" in s for s in steps)
    assert not [p for p, _ in agents if live(p)]  # the orphaned "VMs" were stopped
    # the new system may boot a VM of its own on the same port: only this test's sleep counts
    assert not processes_mentioning(f"sleep {marker} ")
    with connect(home) as conn:
        assert conn.pd.describe_process("long")["state"] in ("FAILED", "TERMINATED")
    down(home)
    assert_nothing_left(home, again)


def test_down_with_no_provisioner_replica_left_still_stops_everything(home, tmp_path):
    """`down` when every Provisioner replica is dead: its terminate-all cannot be asked, so the
    local nodes are cleaned up directly; nothing is left running and `down` does not raise."""
    plan = load_plan(make_plan(tmp_path), home=home)
    info = up(plan, home)
    marker = f"40.{os.getpid()}{time.monotonic_ns() % 10**6:06d}"  # this test's own sleep
    with connect(home) as conn:
        conn.pd.schedule_process("long", command=["sleep", marker], restart_mode="never")
        conn.pd.wait_process("long", "RUNNING", timeout=30)
    agents = processes_mentioning(f"--pd 127.0.0.1:{info['admin_port']} ")
    assert agents
    provisioner = info["pids"]["provisioner"]
    os.kill(provisioner, signal.SIGKILL)
    wait_for(lambda: not live(provisioner), timeout=10, what="the Provisioner's death")
    steps: list[str] = []
    result = down(home, progress=steps.append)
    assert any("terminate-all failed" in s for s in steps), steps
    assert "provisioner" not in result["stopped"]
    assert not [p for p, _ in agents if live(p)]
    assert not processes_mentioning(f"sleep {marker} ")
    assert_nothing_left(home, info)


def test_pd_standby_takes_over_and_agents_and_epum_follow(home, tmp_path):
    """kill -9 of the PD leader: the standby leads, the EEAgents find it by asking each replica
    for Status, EPUM learns it from its announcement (no client re-points anything here)."""
    from cei_actors.pd.client import PDClient
    from cei_actors.runtime.client import ServiceClient

    plan = load_plan(make_plan(tmp_path, pd=2), home=home)
    info = up(plan, home)
    assert info["components"]["pd"] == ["pd", "pd.1"]
    with connect(home) as conn:
        conn.pd.schedule_process("long", command=["sleep", "60.25"])
        before = conn.pd.wait_process("long", "RUNNING", timeout=30)
        reps = conn.status()["components"]["pd"]
        assert [(r["name"], r["leader"]) for r in reps] == [("pd", True), ("pd.1", False)]
        os.kill(reps[0]["pid"], signal.SIGKILL)

    with connect(home) as conn:
        address = wait_for(lambda: second_leads(conn, "pd"), timeout=20)
        assert address is not None
        pd = PDClient(ServiceClient(conn.asys, address, timeout=10.0))
        # past heartbeat_missing (5 s): the node is still heard from, the process not moved
        time.sleep(6)
        after = pd.describe_process("long")
        assert after["state"] == "RUNNING" and after["round"] == before["round"], (before, after)
        # one on the running node (PD -> agent) and four more: a second node (PD -> EPUM -> PD)
        for i in range(5):
            pd.schedule_process(f"new{i}", command=["sleep", "60.5"])
        for i in range(5):
            assert pd.wait_process(f"new{i}", "RUNNING", timeout=40)["state"] == "RUNNING"
        assert pd.describe_process("long")["round"] == before["round"]
        # one copy: never started again elsewhere
        assert len([p for p, cmd in processes_mentioning("sleep 60.25") if cmd.startswith("sleep")]) == 1
    down_clean(home, info, "sleep 60.25", "sleep 60.5")


def test_static_node_agent_follows_a_pd_failover(home, tmp_path):
    """kill -9 of the PD leader with a static node (an in-system EEAgent, no EPUM): the standby
    holds the agent as a peer, greets it when it leads, and the agent heartbeats there; its
    process keeps running in the same round and new ones are dispatched to it."""
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "log": "sqlite:///${home}/log.sqlite",
        "components": {"pd": {"replicas": 2, "config": {"dispatch_retry_seconds": 2.0}}},
        "pd": {"engines": {"e1": {"slots": 3, "heartbeat_period": 1, "heartbeat_warning": 2,
                                  "heartbeat_missing": 3}}},
        "static_nodes": [{"node_id": "n1"}],
    }))
    info = up(load_plan(path, home=home), home)
    with connect(home) as conn:
        before = conn.pd.schedule_process("long", command=["sleep", "60.125"])
        before = conn.pd.wait_process("long", "RUNNING", timeout=30)
        reps = conn.status()["components"]["pd"]
        assert [(r["name"], r["leader"]) for r in reps] == [("pd", True), ("pd.1", False)]
        assert "eeagent:n1" in (conn.members("pd")[1].status or {}).get("peers", [])
        os.kill(reps[0]["pid"], signal.SIGKILL)
    with connect(home) as conn:
        assert wait_for(lambda: (conn.members("pd")[1].status or {}).get("ready"), timeout=20)
        time.sleep(4)  # past heartbeat_missing: only heartbeats to the new leader keep n1 OK
        after = conn.pd.describe_process("long")
        assert (after["state"], after["round"]) == ("RUNNING", before["round"]), (before, after)
        conn.pd.schedule_process("hello", command=["true"])
        assert conn.pd.wait_process("hello", ["EXITED", "FAILED"], timeout=30)["state"] == "EXITED"
    down_clean(home, info, "sleep 60.125")


def second_leads(conn, component):
    """The address of ``component``'s second replica once it is the ready leader (asked by
    ``Status`` only: ``Connection.pd``/``.epum`` would re-point the connection)."""
    new = conn.members(component)[1]
    return new.address if new.status and new.status["leader"] and new.status["ready"] else None


def new_pd_leader_places_more(conn, before: dict, command: list[str], timeout: float) -> None:
    """Once the PD's second replica leads: five processes more than the running node holds
    run (a second node must boot), and ``long`` still runs in its round ``before``."""
    from cei_actors.pd.client import PDClient
    from cei_actors.runtime.client import ServiceClient

    address = wait_for(lambda: second_leads(conn, "pd"), timeout=20)
    pd = PDClient(ServiceClient(conn.asys, address, timeout=10.0))
    for i in range(5):
        pd.schedule_process(f"more{i}", command=command)
    for i in range(5):
        assert pd.wait_process(f"more{i}", "RUNNING", timeout=timeout)["state"] == "RUNNING"
    after = pd.describe_process("long")
    assert (after["state"], after["round"]) == ("RUNNING", before["round"])


def test_epum_then_pd_failover_each_new_leader_knows_the_other(home, tmp_path):
    """kill -9 of the EPUM leader, then of the PD leader, no client re-pointing anything: the
    PD standby heard the new EPUM leader's announcement while it was still a standby (every
    replica of a peer is told), so when it leads its needs reach that EPUM, and its own
    announcement reaches EPUM: processes that need a new node get one."""
    plan = load_plan(make_plan(tmp_path, pd=2, epum=2), home=home)
    info = up(plan, home)
    with connect(home) as conn:
        conn.pd.schedule_process("long", command=["sleep", "60.375"])
        before = conn.pd.wait_process("long", "RUNNING", timeout=30)
        reps = conn.status()["components"]
    os.kill(reps["epum"][0]["pid"], signal.SIGKILL)
    with connect(home) as conn:
        assert wait_for(lambda: second_leads(conn, "epum"), timeout=20)
    os.kill(reps["pd"][0]["pid"], signal.SIGKILL)
    with connect(home) as conn:
        new_pd_leader_places_more(conn, before, ["sleep", "60.5"], timeout=40)
    down_clean(home, info, "sleep 60.375", "sleep 60.5")
