"""A replica (re)started on one actor system after another joined it is announced to that other
system too (launcher.start_replica, decision OP10): two real thespian systems in a convention,
the log on ZooKeeper."""

from __future__ import annotations

import os
import signal

import pytest
from test_launch_system import assert_nothing_left, processes_mentioning, wait_for
from test_multihost import homes, up_epum_and_pd_apart  # noqa: F401 (homes: a fixture)

from cei_actors.launch.launcher import (
    LaunchError,
    connect,
    down,
    read_info,
    replicas_everywhere,
    start_replica,
)
from cei_actors.pd.client import PDClient
from cei_actors.runtime.client import ServiceClient
from cei_actors.runtime.system import lookup


def leads(conn, component: str, index: int):
    """The address of replica ``index`` of ``component`` once it is the ready leader (asked by
    ``Status`` only: nothing is re-pointed)."""
    member = conn.members(component)[index]
    return member.address if member.status and member.status["leader"] and member.status["ready"] else None


def test_a_restarted_replica_is_announced_to_the_joined_system(homes, tmp_path, zk_hosts):  # noqa: F811
    """The PD (2 replicas) on system B, joined to A which runs EPUM (2 replicas). The PD
    leader dies; its replica is started again on B (a new address) as a standby. Then the EPUM
    leader dies: the new EPUM leader greets the PD replicas it knows, which includes the
    restarted one only if it was announced to A. Then the PD leader dies: the restarted
    replica leads, and processes that need a new node get one only if it heard of the new
    EPUM leader (else its needs go to the dead one)."""
    home_a, home_b = homes
    info_a, info_b = up_epum_and_pd_apart(tmp_path, homes, zk_hosts)
    with connect(home_a) as conn_a, connect(home_b) as conn_b:
        # each side finds the other's replicas through its convention (A was told nothing of B)
        for conn in (conn_a, conn_b):
            every = replicas_everywhere(conn.asys, conn.info)
            assert {c: len(v) for c, v in every.items()} == {"pd": 2, "epum": 2, "provisioner": 1}
        with pytest.raises(LaunchError, match="runs already"):
            start_replica(conn_b, "pd", 1)
        with pytest.raises(LaunchError, match="not a replica of this system"):
            start_replica(conn_b, "epum", 0)

        pd0 = PDClient(ServiceClient(conn_b.asys, wait_for(lambda: leads(conn_b, "pd", 0), timeout=20), timeout=10.0))
        pd0.schedule_process("long", command=["sleep", "300.875"])
        before = pd0.wait_process("long", "RUNNING", timeout=40)
        old = conn_b.members("pd")[0]
        os.kill(old.status["pid"], signal.SIGKILL)
        wait_for(lambda: leads(conn_b, "pd", 1), timeout=20)
        wait_for(lambda: lookup(conn_b.asys, "pd") is None, timeout=15)
        new = start_replica(conn_b, "pd", 0)
        assert new != old.address and lookup(conn_b.asys, "pd") == new
        status = conn_b.members("pd")[0].status
        assert not status["leader"]  # a standby: pd.1 leads
        new_pid = status["pid"]

        os.kill(conn_a.members("epum")[0].status["pid"], signal.SIGKILL)
        wait_for(lambda: leads(conn_a, "epum", 1), timeout=20)
        os.kill(conn_b.members("pd")[1].status["pid"], signal.SIGKILL)
        address = wait_for(lambda: leads(conn_b, "pd", 0), timeout=30)
        assert address == new
        pd = PDClient(ServiceClient(conn_b.asys, address, timeout=10.0))
        for i in range(5):  # more than the running node holds: EPUM must start another
            pd.schedule_process(f"more{i}", command=["sleep", "300.75"])
        for i in range(5):
            assert pd.wait_process(f"more{i}", "RUNNING", timeout=60)["state"] == "RUNNING"
        after = pd.describe_process("long")
        assert (after["state"], after["round"]) == ("RUNNING", before["round"])
    info_b = read_info(home_b)  # the restarted replica's pid is recorded (down sweeps it)
    assert info_b["pids"]["pd"] == new_pid
    down(home_b)
    down(home_a)
    assert_nothing_left(home_b, info_b)
    assert_nothing_left(home_a, info_a)
    assert not processes_mentioning("sleep 300.875", "sleep 300.75")
