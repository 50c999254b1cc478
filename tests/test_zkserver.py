"""The ZooKeeper test tooling itself: real servers, failover, session expiry, loopback only."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_zk import require_zookeeper
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import NodeExistsError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from cei_actors.testing.zkserver import (
    ZkEnsemble,
    ZkError,
    ZkServer,
    expire_session,
    listening_sockets,
    unreachable_address,
)

LOOPBACK_ADDRESSES = {"127.0.0.1", "::ffff:127.0.0.1"}
REPO = Path(__file__).resolve().parent.parent


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _assert_loopback_only(pid: int, client_port: int) -> None:
    sockets = listening_sockets(pid)
    assert client_port in {port for _, port in sockets}, sockets
    assert {addr for addr, _ in sockets} <= LOOPBACK_ADDRESSES, sockets


def _started_client(hosts: str) -> KazooClient:
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=15.0)
    return client


def _create_once(client: KazooClient, path: str, data: bytes) -> None:
    """Create ``path``; a retry after a lost reply finds it already there."""
    with contextlib.suppress(NodeExistsError):
        client.create(path, data)


def test_standalone_serves_on_a_private_chroot(zk_server, zk_client, zk_hosts):
    assert zk_server.modes() == ["standalone"]
    assert zk_hosts.startswith(zk_server.hosts + "/tests/")
    zk_client.create("/greeting", b"hello")
    data, stat = zk_client.get("/greeting")
    assert data == b"hello" and stat.version == 0
    assert zk_client.get_children("/") == ["greeting"]  # nothing from other tests


def test_standalone_listens_only_on_loopback(zk_server):
    _assert_loopback_only(zk_server.pid, zk_server.port)


def test_ensemble_survives_killing_the_leader_and_it_rejoins(zk_ensemble: ZkEnsemble):
    assert sorted(zk_ensemble.modes()) == ["follower", "follower", "leader"]
    for node in zk_ensemble.nodes:  # client, election and (leader) quorum ports
        _assert_loopback_only(node.pid, node.client_port)

    client = _started_client(zk_ensemble.hosts)
    try:
        session = client.client_id
        client.create("/before", b"1")
        old_leader = zk_ensemble.leader_index()
        assert old_leader is not None

        zk_ensemble.kill(old_leader)
        killed = time.monotonic()
        retry = KazooRetry(max_tries=-1, delay=0.05, max_delay=0.2, deadline=10.0)
        retry(_create_once, client, "/after", b"2")
        recovery = time.monotonic() - killed
        assert recovery < 5.0, f"writes resumed only after {recovery:.1f}s"
        assert client.client_id == session  # the session moved to the new leader intact
        new_leader = zk_ensemble.wait_for_leader()
        assert new_leader != old_leader

        assert zk_ensemble.restart(old_leader) == "follower"
        rejoined = _started_client(zk_ensemble.nodes[old_leader].address)
        try:
            rejoined.sync("/")
            assert rejoined.get("/after")[0] == b"2"  # it caught up with the new leader
        finally:
            rejoined.stop()
            rejoined.close()
    finally:
        client.stop()
        client.close()


def test_expire_session_is_real(zk_client):
    states: list[str] = []
    reconnected = threading.Event()

    def listener(state: str) -> None:
        states.append(state)
        if state == KazooState.CONNECTED and KazooState.LOST in states:
            reconnected.set()

    zk_client.add_listener(listener)
    zk_client.create("/mine", ephemeral=True)
    old_session = zk_client.client_id

    expire_session(zk_client)

    assert KazooState.LOST in states
    assert reconnected.wait(10.0), states
    assert zk_client.client_id[0] != old_session[0]  # kazoo opened a new session
    assert zk_client.exists("/mine") is None  # the old session's ephemeral died with it


def test_unreachable_server_fails_with_timeout_not_hang():
    with unreachable_address() as address:
        client = KazooClient(hosts=address, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(KazooTimeoutError, match="Connection time-out"):
            client.start(timeout=1.5)
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 5.0
    assert not client.connected


def test_clear_errors(zk_server, tmp_path):
    with pytest.raises(ZkError, match="already in use"):
        ZkServer(tmp_path / "clash", port=zk_server.port).start()
    with pytest.raises(
        ZkError, match=r"(?s)exited with code 2.*Last lines of .*zookeeper\.log.*Invalid config"
    ):
        ZkServer(tmp_path / "broken", settings={"tickTime": "soon"}).start()
    with pytest.raises(ZkError, match="no session"):
        expire_session(KazooClient(hosts=zk_server.hosts))


@pytest.mark.zk
def test_stop_kills_a_paused_server_and_cleans_up():
    require_zookeeper()
    with ZkServer() as zk:
        pid, directory = zk.pid, zk.directory
        assert (directory / "server1" / "zookeeper.pid").read_text().strip() == str(pid)
        zk.pause()
    assert not _pid_alive(pid)
    assert not directory.exists()  # a temporary directory is removed


@pytest.mark.zk
def test_cli_servers_outlive_the_script_and_stop_by_pid_file(tmp_path):
    require_zookeeper()
    zk = [sys.executable, str(REPO / "scripts" / "zk")]
    state = str(tmp_path / "zk")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*zk, *args, "--dir", state], capture_output=True, text=True, timeout=60, env=env
        )

    started = run("start", "--ensemble", "1")
    try:
        assert started.returncode == 0, started.stderr
        hosts = started.stdout.strip()
        assert hosts.startswith("127.0.0.1:")
        pid = int((tmp_path / "zk" / "server1" / "zookeeper.pid").read_text())
        assert _pid_alive(pid)  # the script has exited; the server has not

        status = run("status")
        assert status.returncode == 0 and "standalone" in status.stdout, status
        client = _started_client(hosts)
        client.stop()
        client.close()
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0 and "stopped 1" in stopped.stdout, stopped
    assert not _pid_alive(pid)
    assert run("status").returncode == 1
