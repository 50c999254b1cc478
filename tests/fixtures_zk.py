"""pytest fixtures for real ZooKeeper servers (see ``cei_actors.testing.zkserver``).

- ``zk_server`` (session): one standalone server shared by the whole test session.
- ``zk_hosts`` (function): ``"127.0.0.1:PORT/<chroot>"`` on ``zk_server``; the chroot node is
  created fresh for each test (isolation by path) and deleted afterwards.
- ``zk_client`` (function): a started ``KazooClient`` on such a chroot, stopped after the test.
- ``zk_ensemble`` (function): a fresh 3-server ensemble for each test (~2-3 s to start),
  because failover tests kill, pause and restart its members.

Without java or the ZooKeeper jars these fixtures skip the test, unless the environment
variable ``CI`` is set (and not ``0``/``false``): there a missing ZooKeeper fails the test.
Tests that use any of them get the ``zk`` marker, so ``-m "not zk"`` deselects them.
Server directories (configs, logs) stay under pytest's ``tmp_path`` for post-mortems.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
import warnings
from collections.abc import Iterator

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException

from cei_actors.testing.zkserver import ZkEnsemble, ZkServer, unavailable_reason

ZK_FIXTURES = frozenset({"zk_server", "zk_hosts", "zk_client", "zk_ensemble"})
CHROOT_PARENT = "/tests"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_zookeeper() -> None:
    """Skip the test if ZooKeeper cannot run here; fail instead when running in CI."""
    reason = unavailable_reason()
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"ZooKeeper is required in CI (CI is set): {reason}", pytrace=False)
    pytest.skip(f"no real ZooKeeper here: {reason} (with CI set this fails instead)")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark tests that use a ZooKeeper fixture with ``zk``."""
    if ZK_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.zk)


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkServer]:
    """One standalone ZooKeeper server for the whole test session."""
    require_zookeeper()
    with ZkServer(tmp_path_factory.mktemp("zk-server")) as server:
        yield server


@pytest.fixture(scope="session")
def _zk_admin(zk_server: ZkServer) -> Iterator[KazooClient]:
    """A session-wide client on the server's root, used to create and delete chroots."""
    client = KazooClient(hosts=zk_server.hosts, timeout=10.0)
    client.start(timeout=15.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture
def zk_hosts(
    zk_server: ZkServer, _zk_admin: KazooClient, request: pytest.FixtureRequest
) -> Iterator[str]:
    """``"127.0.0.1:PORT/tests/<test>-<random>"``: a fresh, existing chroot for this test."""
    if not zk_server.nodes[0].running:
        warnings.warn(
            "the session ZooKeeper server had died (did a test kill it? use your own "
            "ZkServer for that); restarting it",
            stacklevel=1,
        )
        zk_server.restart()
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
    chroot = f"{CHROOT_PARENT}/{name}-{uuid.uuid4().hex[:8]}"
    _zk_admin.ensure_path(chroot)
    yield f"{zk_server.hosts}{chroot}"
    with contextlib.suppress(KazooException):
        _zk_admin.delete(chroot, recursive=True)


@pytest.fixture
def zk_client(zk_hosts: str) -> Iterator[KazooClient]:
    """A started ``KazooClient`` on a fresh chroot; stopped and closed after the test."""
    client = KazooClient(hosts=zk_hosts, timeout=10.0)
    client.start(timeout=15.0)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture
def zk_ensemble(tmp_path: os.PathLike[str]) -> Iterator[ZkEnsemble]:
    """A fresh 3-server ensemble (tickTime 500 ms) for this test; stopped afterwards."""
    require_zookeeper()
    with ZkEnsemble(3, os.path.join(tmp_path, "zk-ensemble")) as ensemble:
        yield ensemble
