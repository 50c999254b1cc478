"""Components spread over two actor systems joined in a convention (two "hosts" on loopback
ports of this machine), with the log on ZooKeeper."""

from __future__ import annotations

import os
import signal

import pytest
import yaml
from test_launch_system import (
    assert_nothing_left,
    make_plan,
    new_pd_leader_places_more,
    processes_mentioning,
    second_leads,
    wait_for,
)

from cei_actors.launch.launcher import LaunchError, connect, down, read_info, up
from cei_actors.launch.plan import load_plan


def split_plan(tmp_path, name, components, **replicas):
    data = yaml.safe_load(make_plan(tmp_path, **replicas).read_text())
    data["components"] = {k: v for k, v in data["components"].items() if k in components}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def homes(tmp_path):
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    try:
        yield a, b
    finally:
        for home in (b, a):
            if read_info(home) is not None:
                down(home)


def test_provisioner_and_epum_on_one_system_pd_on_another(homes, tmp_path, zk_hosts):
    home_a, home_b = homes
    log = f"zk://{zk_hosts}"
    plan_a = load_plan(split_plan(tmp_path, "a", {"provisioner", "epum"}), home=home_a, log_url=log)
    plan_b = load_plan(split_plan(tmp_path, "b", {"pd"}), home=home_b, log_url=log)
    steps: list[str] = []
    info_a = up(plan_a, home_a, progress=steps.append)
    assert any("another system must join" in s for s in steps)
    with pytest.raises(LaunchError, match="cannot join"):
        up(plan_b, home_b, join=1)
    info_b = up(plan_b, home_b, join=f"127.0.0.1:{info_a['admin_port']}")
    assert info_b["remote"] == {"admin_port": info_a["admin_port"], "admin_host": "127.0.0.1",
                                "components": ["epum", "provisioner"]}
    with connect(home_b) as conn:
        status = conn.status()
        assert sorted(status["components"]) == ["epum", "pd", "provisioner"]
        assert all(r["leader"] for reps in status["components"].values() for r in reps)
        pids = {reps[0]["pid"] for reps in status["components"].values()}
        assert len(pids) == 3
        conn.pd.schedule_process("hello", command=["sh", "-c", "echo hello"])
        assert conn.pd.wait_process("hello", ["EXITED", "FAILED"], timeout=40)["state"] == "EXITED"
        assert conn.epum.list_domains() == ["pd_domain_default"]  # EPUM on the other system
        # a running process keeps its node up (an idle one may be retired meanwhile)
        conn.pd.schedule_process("stay", command=["sleep", "60.75"])
        assert conn.pd.wait_process("stay", "RUNNING", timeout=40)["state"] == "RUNNING"
        # the EEAgent "VM" joined the PD's system (host b)
        assert processes_mentioning(f"--pd 127.0.0.1:{info_b['admin_port']} ")
    down(home_b)
    # host a's nodes (joined to b's admin) are a's to stop
    assert processes_mentioning(f"--pd 127.0.0.1:{info_b['admin_port']} ")
    down(home_a)
    assert_nothing_left(home_b, info_b)
    assert_nothing_left(home_a, info_a)


def up_epum_and_pd_apart(tmp_path, homes, zk_hosts) -> tuple[dict, dict]:
    """System A runs the Provisioner and EPUM (2 replicas), system B joins it with the PD (2
    replicas), one ZooKeeper log; returns both systems' info."""
    home_a, home_b = homes
    log = f"zk://{zk_hosts}"
    plan_a = load_plan(split_plan(tmp_path, "a", {"provisioner", "epum"}, epum=2), home=home_a, log_url=log)
    plan_b = load_plan(split_plan(tmp_path, "b", {"pd"}, pd=2), home=home_b, log_url=log)
    info_a = up(plan_a, home_a)
    return info_a, up(plan_b, home_b, join=f"127.0.0.1:{info_a['admin_port']}")


def test_failovers_on_either_system_reach_the_other(homes, tmp_path, zk_hosts):
    """EPUM (2 replicas) on one system, the PD (2 replicas) on another. kill -9 of the EPUM
    leader, then of the PD leader, no client re-pointing anything: every replica on each side
    knows every replica on the other (the joining system tells them all, and they are in its
    own components' Start), so each new leader's greeting crosses the systems, and processes
    that need a new node get one."""
    home_a, home_b = homes
    info_a, info_b = up_epum_and_pd_apart(tmp_path, homes, zk_hosts)
    with connect(home_b) as conn:
        conn.pd.schedule_process("long", command=["sleep", "60.625"])
        before = conn.pd.wait_process("long", "RUNNING", timeout=40)
        pd_pid = conn.status()["components"]["pd"][0]["pid"]
    with connect(home_a) as conn:  # each system sees its own replicas by name
        epum_pid = conn.status()["components"]["epum"][0]["pid"]

    os.kill(epum_pid, signal.SIGKILL)
    with connect(home_a) as conn:
        assert wait_for(lambda: second_leads(conn, "epum"), timeout=20)
    os.kill(pd_pid, signal.SIGKILL)
    with connect(home_b) as conn:
        new_pd_leader_places_more(conn, before, ["sleep", "60.75"], timeout=30)
    down(home_b)
    down(home_a)
    assert_nothing_left(home_b, info_b)
    assert_nothing_left(home_a, info_a)
    assert not processes_mentioning("sleep 60.625", "sleep 60.75")
