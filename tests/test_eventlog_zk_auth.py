"""ZooKeeper digest authentication and ACLs on the log's chroot (issue 12 §6), against a real
server: without the credentials a client can neither read the log nor fence it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import make_digest_acl

from cei_actors.eventlog import BadLogUrl, Fence, Fenced, PendingEvent, Snapshot, open_log
from cei_actors.eventlog.zookeeper import AccessDenied, ZkLog
from cei_actors.private_files import write_secret_file
from cei_actors.runtime.leadership import leadership_for

PASSWORD = "pw-5d1c9e-zk"


def ev(i: int) -> PendingEvent:
    return PendingEvent("T", 1, float(i), {"i": i})


def auth_file(path: Path, text: str = f"cei:{PASSWORD}") -> Path:
    write_secret_file(path, text.encode())
    return path


def split(zk_hosts: str) -> tuple[str, str]:
    """``("127.0.0.1:PORT", "/tests/<chroot>")`` of the fixture's host string."""
    hosts, _, chroot = zk_hosts.partition("/")
    return hosts, f"/{chroot}"


@pytest.fixture
def secured(zk_hosts: str, tmp_path: Path) -> Iterator[tuple[str, ZkLog, Fence]]:
    """A log URL with credentials on this test's chroot (which the fixture created open), an
    open log on it that has appended 3 events and saved a snapshot, and its fence."""
    url = f"zk://{zk_hosts}?auth_file={auth_file(tmp_path / 'zk-auth')}"
    log = open_log(url)
    assert isinstance(log, ZkLog)
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1), ev(2), ev(3)])
    log.save_snapshot(Snapshot("s", 3, 3.0, 1, b"state"))
    try:
        yield url, log, fence
    finally:
        log.close()


def walk(client: KazooClient, path: str) -> list[str]:
    out = [path]
    for child in client.get_children(path):
        out += walk(client, f"{path}/{child}")
    return out


def test_without_the_credentials_a_client_can_neither_read_nor_fence(zk_hosts, secured) -> None:
    url, log, fence = secured
    hosts, chroot = split(zk_hosts)
    assert [r.body["i"] for r in log.read("s")] == [1, 2, 3]
    with pytest.raises(AccessDenied, match="no credentials"):
        open_log(f"zk://{zk_hosts}")
    owner = KazooClient(hosts=hosts, auth_data=[("digest", f"cei:{PASSWORD}")])
    stranger = KazooClient(hosts=hosts)
    owner.start(timeout=15.0)
    stranger.start(timeout=15.0)
    try:
        paths = walk(owner, chroot)
        epoch, batches = f"{chroot}/streams/s/epoch", [p for p in paths if "/b/" in p]
        assert epoch in paths and batches and any("/snap/" in p for p in paths)
        acl = [make_digest_acl("cei", PASSWORD, all=True)]
        for path in paths:  # every znode, the chroot itself included, carries only our ACL
            assert list(owner.get_acls(path)[0]) == acl, path
            with pytest.raises(NoAuthError):
                stranger.get(path)
            with pytest.raises(NoAuthError):
                stranger.get_children(path)
        with pytest.raises(NoAuthError):  # no fencing: the epoch cannot be bumped
            stranger.set(epoch, b"99")
        with pytest.raises(NoAuthError):
            stranger.delete(batches[0])
        with pytest.raises(NoAuthError):
            stranger.create(f"{chroot}/streams/s/b/intruder", b"x")
        assert owner.get(epoch)[0] == b"1"
    finally:
        for client in (owner, stranger):
            client.stop()
            client.close()
    log.append(fence, 3, [ev(4)])  # the writer was not fenced by any of this


def test_other_credentials_are_refused_and_the_same_ones_work(zk_hosts, secured, tmp_path) -> None:
    url, log, fence = secured
    wrong = auth_file(tmp_path / "wrong", f"cei:not-{PASSWORD}")
    with pytest.raises(AccessDenied, match="other credentials") as info:
        open_log(f"zk://{zk_hosts}?auth_file={wrong}")
    assert PASSWORD not in str(info.value)
    with open_log(url) as other:  # a second client with the credentials reads and fences
        assert [r.body["i"] for r in other.read("s")] == [1, 2, 3]
        other.append(other.acquire("s"), 3, [ev(4)])
    with open_log(url) as stale, pytest.raises(Fenced):  # the first writer is fenced out
        stale.append(fence, 4, [ev(5)])


def test_auth_file_must_be_private_and_well_formed(zk_hosts, tmp_path) -> None:
    open_file = tmp_path / "open"
    open_file.write_text(f"cei:{PASSWORD}")
    open_file.chmod(0o644)
    with pytest.raises(BadLogUrl, match="chmod 600") as info:
        open_log(f"zk://{zk_hosts}?auth_file={open_file}")
    assert PASSWORD not in str(info.value)
    with pytest.raises(BadLogUrl, match="USER:PASSWORD") as info:
        open_log(f"zk://{zk_hosts}?auth_file={auth_file(tmp_path / 'bad', PASSWORD)}")
    assert PASSWORD not in str(info.value)
    with pytest.raises(BadLogUrl, match="No such file"):
        open_log(f"zk://{zk_hosts}?auth_file={tmp_path / 'missing'}")
    hosts, _ = split(zk_hosts)
    with pytest.raises(BadLogUrl, match="needs a chroot"):
        open_log(f"zk://{hosts}/?auth_file={auth_file(tmp_path / 'ok')}")


def test_leader_election_under_a_protected_chroot(zk_hosts, secured) -> None:
    url, _, _ = secured
    hosts, chroot = split(zk_hosts)
    leadership = leadership_for("auto", url, "s")
    try:
        deadline = time.monotonic() + 15.0
        while not leadership.try_acquire():
            assert time.monotonic() < deadline, "the election under the protected chroot never won"
            time.sleep(0.05)
    finally:
        leadership.close()
    owner = KazooClient(hosts=hosts, auth_data=[("digest", f"cei:{PASSWORD}")])
    owner.start(timeout=15.0)
    try:
        acl = [make_digest_acl("cei", PASSWORD, all=True)]
        assert list(owner.get_acls(f"{chroot}/leaders/s")[0]) == acl
    finally:
        owner.stop()
        owner.close()


def test_a_whole_system_runs_on_a_protected_chroot(zk_hosts, tmp_path) -> None:
    """`up` with the plan's log URL naming the credentials file: every component elects a
    leader and writes; a process runs; the chroot stays closed to a client without them."""
    from test_launch_system import make_plan

    from cei_actors.launch.launcher import connect, down, up
    from cei_actors.launch.plan import load_plan

    home = tmp_path / "home"
    url = f"zk://{zk_hosts}?auth_file={auth_file(tmp_path / 'zk-auth')}"
    plan = load_plan(make_plan(tmp_path), home=home, log_url=url)
    up(plan, home)
    try:
        with connect(home) as conn:
            status = conn.status()
            assert all(r["ready"] and r["leader"] for reps in status["components"].values()
                       for r in reps)
            conn.pd.schedule_process("hello", command=["true"])
            assert conn.pd.wait_process("hello", ["EXITED", "FAILED"], timeout=40)["state"] == "EXITED"
    finally:
        down(home)
    with pytest.raises(AccessDenied):
        open_log(f"zk://{zk_hosts}")
