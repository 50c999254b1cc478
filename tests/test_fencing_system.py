"""Issue 12 §3 end to end: a process never runs twice. Real actor system, real EEAgent "VMs"
booted by the local cloud driver, real processes; the test looks only at the pids it learned
from the node's agent table (decision PV1, PD9)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from waiting import wait_for

from cei_actors.eeagent.supervisor import read_table
from cei_actors.launch.launcher import connect, down, read_info, up
from cei_actors.launch.plan import default_plan_text, load_plan

UPIDS = [f"w{i}" for i in range(4)]


def make_plan(tmp_path: Path, **pd_config) -> Path:
    data = yaml.safe_load(default_plan_text())
    comps = data["components"]
    comps["provisioner"]["config"].update(query_interval=0.5, boot_query_interval=0.2)
    comps["epum"]["config"].update(decider_interval=0.3)
    comps["pd"]["config"].update(dispatch_retry_seconds=2.0, **pd_config)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    try:
        yield path
    finally:
        if read_info(path) is not None:
            down(path)


def live(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


def node_record(home: Path, iaas_id: str) -> dict:
    return json.loads((home / "nodes" / "nodes.json").read_text())["nodes"][iaas_id]


def worker_pids(home: Path, iaas_id: str, round_: int) -> dict[str, int]:
    """upid -> pid of the round's processes, from the node's EEAgent table."""
    table = read_table(Path(node_record(home, iaas_id)["node_dir"]) / "eeagent") or {}
    return {
        r["upid"]: r["pid"]
        for r in table.get("processes", [])
        if r["round"] == round_ and r.get("pid") and r["upid"] in UPIDS
    }


def start_four(conn, home: Path) -> tuple[str, dict[str, int]]:
    pd = conn.pd
    for upid in UPIDS:
        pd.schedule_process(upid, command=["sleep", "300"], restart_mode="always")
    for upid in UPIDS:
        assert pd.wait_process(upid, "RUNNING", timeout=60)["state"] == "RUNNING"
    [node] = {pd.describe_process(u)["node_id"] for u in UPIDS}
    iaas_id = conn.provisioner.describe_node(node)["iaas_id"]
    pids = wait_for(lambda: (p := worker_pids(home, iaas_id, 0)) and len(p) == 4 and p)
    assert pids and all(live(p) for p in pids.values()), pids
    return iaas_id, pids


def test_killed_agent_round_0_is_gone_before_round_1_runs(home, tmp_path):
    """The reproduction: 4 x `sleep 300` (restart always) on one node, kill -9 of its agent.
    The PD moves them to round 1; by then no round-0 worker may be alive."""
    plan = load_plan(make_plan(tmp_path), home=home)
    info = up(plan, home)
    with connect(home) as conn:
        iaas_id, pids = start_four(conn, home)
        agent = node_record(home, iaas_id)["pid"]  # the node's process: the agent or its init
        if b"cei_actors.eeagent" not in Path(f"/proc/{agent}/cmdline").read_bytes():
            agent = int(Path(f"/proc/{agent}/task/{agent}/children").read_text().split()[0])
        assert b"cei_actors.eeagent" in Path(f"/proc/{agent}/cmdline").read_bytes()
        os.kill(agent, signal.SIGKILL)

        def round_1_running():
            ps = [conn.pd.describe_process(u) for u in UPIDS]
            return all(p["round"] >= 1 and p["state"] == "RUNNING" for p in ps) and ps

        ps = wait_for(round_1_running, timeout=90, every=0.02)
        alive = {u: p for u, p in pids.items() if live(p)}
        assert ps, [conn.pd.describe_process(u) for u in UPIDS]
        assert not alive, f"round-0 workers still alive while round 1 runs: {alive}"
    down(home)
    assert not [p for p in (*pids.values(), *info["pids"].values()) if live(p)]


def test_agent_cut_off_from_its_pd_stops_its_work_after_the_fence_time(home, tmp_path):
    """The PD leader is suspended (SIGSTOP): its agent hears no lease for fence_time and stops
    its processes, while the PD, suspended, can have placed nothing elsewhere. Resumed, the PD
    starts them again in a new round; the old copies are dead."""
    fence = 4.0
    plan = load_plan(make_plan(tmp_path, fence_time=fence, fence_margin=2.0), home=home)
    up(plan, home)
    with connect(home) as conn:
        iaas_id, pids = start_four(conn, home)
        pd_pid = conn.status()["components"]["pd"][0]["pid"]
        os.kill(pd_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            # not before the lease (at most fence_time old when the PD stopped) ...
            time.sleep(fence / 3)
            assert all(live(p) for p in pids.values()), "stopped long before its lease ran out"
            # ... but soon after it
            assert wait_for(lambda: not any(live(p) for p in pids.values()), timeout=fence + 5)
            took = time.monotonic() - stopped_at
            assert took <= fence + 5, took
        finally:
            os.kill(pd_pid, signal.SIGCONT)

        def round_1_running():
            ps = [conn.pd.describe_process(u) for u in UPIDS]
            return all(p["round"] >= 1 and p["state"] == "RUNNING" for p in ps)

        assert wait_for(round_1_running, timeout=60), [conn.pd.describe_process(u) for u in UPIDS]
        assert not any(live(p) for p in pids.values())
    down(home)


def test_frozen_agent_round_0_is_gone_before_round_1_runs(home, tmp_path):
    """The node's agent is frozen (SIGSTOP), so its own fence is frozen too: its reaper stops
    round 0 when the lease runs out, before the PD (fence_time + fence_margin later) moves the
    work to round 1 (decision EA8)."""
    fence = 4.0
    plan = load_plan(make_plan(tmp_path, fence_time=fence, fence_margin=2.0), home=home)
    up(plan, home)
    with connect(home) as conn:
        iaas_id, pids = start_four(conn, home)
        agent = node_record(home, iaas_id)["pid"]  # the node's process: its init (PV1) ...
        while b"vminit.py" in Path(f"/proc/{agent}/cmdline").read_bytes():  # ... whose command
            agent = int(Path(f"/proc/{agent}/task/{agent}/children").read_text().split()[0])
        argv = Path(f"/proc/{agent}/cmdline").read_bytes().split(b"\0")
        assert argv[1:3] == [b"-m", b"cei_actors.eeagent"], argv
        os.kill(agent, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            assert wait_for(lambda: not any(live(p) for p in pids.values()), timeout=fence + 5)
            took = time.monotonic() - stopped_at
            assert took <= fence + 1.0 + 2.0, took  # the lease, the kill grace, some slack

            def moved():  # round 1 may wait for a node: the frozen one's VM still lives
                return all(conn.pd.describe_process(u)["round"] >= 1 for u in UPIDS)

            assert wait_for(moved, timeout=60), [conn.pd.describe_process(u) for u in UPIDS]
            assert not any(live(p) for p in pids.values())
        finally:
            os.kill(agent, signal.SIGCONT)
    down(home)
