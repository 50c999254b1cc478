"""Leadership: file locks, ZooKeeper elections (real server), and how the shell follows them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from thespian.actors import ActorExitRequest
from waiting import wait_for

from cei_actors.runtime.client import ServiceClient, Unavailable
from cei_actors.runtime.control import Request, Response, Start, Status, Stop
from cei_actors.runtime.example import Add, Counters, Get
from cei_actors.runtime.example_actor import ExampleActor
from cei_actors.runtime.leadership import (
    AlwaysLeader,
    FileLockLeadership,
    Leadership,
    ZkLeadership,
    leadership_for,
)
from cei_actors.runtime.messages import Ok
from cei_actors.runtime.runner import replay
from cei_actors.runtime.system import (
    SIMPLE_BASE,
    TCP_BASE,
    shutdown_system,
    start_actor,
    start_system,
)
from cei_actors.testing.zkserver import ZkServer, expire_session

ACTOR = "cei_actors.runtime.example_actor.ExampleActor"


@pytest.fixture
def simple_system():
    asys = start_system(SIMPLE_BASE)
    try:
        yield asys
    finally:
        shutdown_system(asys)


@pytest.fixture
def tcp_system():
    asys = start_system(TCP_BASE)
    try:
        yield asys
    finally:
        shutdown_system(asys)


def actor_instance(asys, address):
    """The actor object behind ``address`` (simple base only: it lives in this process)."""
    return asys._systemBase.actorRegistry[address.actorAddressString].instance


# ---- the leadership objects ----------------------------------------------------------------


def test_always_leader_leads_until_fenced():
    lead = AlwaysLeader()
    assert lead.try_acquire() and lead.is_leader
    lead.release()
    assert not lead.is_leader and lead.try_acquire()
    lead.fenced()
    assert not lead.try_acquire() and not lead.is_leader


def test_file_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "s.lock"
    a, b = FileLockLeadership(path), FileLockLeadership(path)
    assert a.try_acquire() and a.is_leader
    assert a.try_acquire()  # idempotent
    assert not b.try_acquire() and not b.is_leader
    a.release()
    assert b.try_acquire() and not a.try_acquire()
    b.close()
    assert path.exists()  # never deleted: deleting would let two holders appear


def test_file_lock_dies_with_its_process_and_is_not_kept_by_forked_children(tmp_path):
    path = tmp_path / "s.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from cei_actors.runtime.leadership import FileLockLeadership as F; "
         "l = F(sys.argv[1]); assert l.try_acquire(); print('held', flush=True); time.sleep(60)",
         str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = FileLockLeadership(path)
        assert not mine.try_acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert mine.try_acquire()
        pid = os.fork()
        if pid == 0:  # the child inherited the descriptor; the at-fork hook closed its copy
            time.sleep(5)
            os._exit(0)
        try:
            mine.release()
            other = FileLockLeadership(path)
            assert other.try_acquire(), "a forked child kept the lock alive"
            other.close()
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_leadership_is_derived_from_the_log_url(tmp_path):
    assert isinstance(leadership_for("auto", "memory://x", "s"), AlwaysLeader)
    lock = leadership_for("auto", f"sqlite:///{tmp_path}/log.db", "pd")
    assert isinstance(lock, FileLockLeadership) and str(lock.path) == f"{tmp_path}/log.db.pd.lock"
    lock = leadership_for(f"flock:{tmp_path}/locks", "memory://x", "pd")
    assert str(lock.path) == f"{tmp_path}/locks/pd.lock"
    zk = leadership_for("auto", "zk://127.0.0.1:2181,127.0.0.1:2182/cei", "epum")
    assert isinstance(zk, ZkLeadership)
    assert zk.hosts == "127.0.0.1:2181,127.0.0.1:2182" and zk.path == "/cei/leaders/epum"
    zk = leadership_for("zk://127.0.0.1:2181/x?timeout=3", f"sqlite:///{tmp_path}/l.db", "pd")
    assert zk.path == "/x/leaders/pd" and zk.timeout == 3.0
    # the log URL's session_timeout (the plan's session_timeout key) is the election's
    zk = leadership_for("auto", "zk://127.0.0.1:2181/c?timeout=30&session_timeout=2.5", "pd")
    assert zk.timeout == 2.5
    assert isinstance(leadership_for("always", f"sqlite:///{tmp_path}/l.db", "pd"), AlwaysLeader)
    with pytest.raises(ValueError):
        leadership_for("flock", "memory://x", "s")
    with pytest.raises(ValueError):
        leadership_for("zk", "memory://x", "s")


def test_zk_election_one_leader_and_handover(zk_hosts):
    hosts, _, chroot = zk_hosts.partition("/")
    path = f"/{chroot}/leaders/s"
    a = ZkLeadership(hosts, path, "a", timeout=2.0)
    b = ZkLeadership(hosts, path, "b", timeout=2.0)
    try:
        wait_for(lambda: a.try_acquire(), timeout=15, what="a to win")
        time.sleep(0.3)
        assert not b.try_acquire() and not b.is_leader
        time.sleep(0.3)
        assert not b.try_acquire()
        a.release()
        wait_for(lambda: b.try_acquire(), timeout=15, what="b to win after a released")
        assert not a.is_leader
        # the session of b expires for real: b loses at once and can win again later
        expire_session(b._client)
        assert not b.is_leader
        wait_for(lambda: a.try_acquire() or b.try_acquire(), timeout=15, what="a new leader")
        assert a.is_leader != b.is_leader
    finally:
        a.close()
        b.close()


def test_zk_suspended_pauses_leadership_until_connected(tmp_path):
    from kazoo.client import KazooState

    with ZkServer(tmp_path / "zk") as server:
        changes = []
        lead = ZkLeadership(server.hosts, "/cei/leaders/s", timeout=4.0)
        lead.on_change = lambda: changes.append(lead._client.state if lead._client else None)
        try:
            wait_for(lambda: lead.try_acquire(), timeout=15, what="winning")
            server.pause(0)
            try:
                wait_for(lambda: lead.suspended, timeout=15, what="SUSPENDED")
                assert not lead.is_leader
            finally:
                server.resume(0)
            wait_for(lambda: lead.is_leader, timeout=15, what="CONNECTED again")
            assert KazooState.SUSPENDED in changes
        finally:
            lead.close()


# ---- the shell following its leadership ------------------------------------------------------


class FakeLeadership(Leadership):
    """Controlled by the test: lead, suspend or lose at will."""

    instances: list[FakeLeadership] = []

    def __init__(self) -> None:
        self.won = True
        self.doubt = False
        FakeLeadership.instances.append(self)

    def try_acquire(self) -> bool:
        return self.won

    @property
    def is_leader(self) -> bool:
        return self.won and not self.doubt

    @property
    def suspended(self) -> bool:
        return self.won and self.doubt

    def release(self) -> None:
        pass


class FakeLedActor(ExampleActor):
    def make_leadership(self, spec, log_url, stream):
        return FakeLeadership()


def test_shell_holds_while_suspended_and_steps_down_when_lost(simple_system):
    FakeLeadership.instances.clear()
    url = f"memory://{uuid.uuid4().hex}"
    address = start_actor(simple_system, FakeLedActor, Start(url))
    lead = FakeLeadership.instances[-1]
    asys = simple_system
    assert asys.ask(address, Request("1", Add("a", 1)), 10) == Response("1", Ok(1))

    lead.doubt = True  # SUSPENDED: no appends, no effects, messages held
    asys.tell(address, Request("2", Add("a", 2)))
    status = asys.ask(address, Request("s", Status()), 10).reply.value
    assert status["mode"] == "suspended" and status["held"] == 1 and status["head"] == 1
    lead.doubt = False  # CONNECTED again: the held message is served
    assert asys.listen(10) == Response("2", Ok(3))

    lead.won = False  # LOST: step down; requests are refused until leading again
    with ServiceClient(asys, address) as client:
        time.sleep(0.6)
        with pytest.raises(Unavailable):
            client.call(Add("a", 1))
        assert client.call(Status())["mode"] == "down"
        lead.won = True  # wins again: recovers (a new epoch) and serves
        wait_for(lambda: client.call(Status())["ready"], timeout=10, what="recovery")
        assert client.call(Status())["epoch"] == 2
        assert client.call(Add("a", 4)) == 7
        client.call(Stop())


def test_shell_on_zookeeper_steps_down_when_its_session_expires(simple_system, zk_hosts, tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    address = start_actor(simple_system, ExampleActor, Start(url, leadership=f"zk://{zk_hosts}?timeout=2"))
    with ServiceClient(simple_system, address) as client:
        assert client.call(Add("a", 1)) == 1
        lead = actor_instance(simple_system, address)._leadership
        assert isinstance(lead, ZkLeadership) and lead.is_leader
        expire_session(lead._client)
        with pytest.raises(Unavailable):
            client.call(Add("a", 1))
        # nobody else contends: it wins again on a new session, recovers at a new epoch
        wait_for(lambda: client.call(Status())["ready"], timeout=15, what="re-election")
        assert client.call(Status())["epoch"] == 2
        assert client.call(Add("a", 1)) == 2
        client.call(Stop())


def test_zk_standby_takes_over_after_kill9(tcp_system, zk_hosts, tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    start = Start(url, leadership=f"zk://{zk_hosts}?timeout=1.5")
    a = start_actor(tcp_system, ACTOR, start)
    b = start_actor(tcp_system, ACTOR, start, wait=False)
    with ServiceClient(tcp_system, a) as ca, ServiceClient(tcp_system, b, timeout=20) as cb:
        assert ca.call(Add("z", 5)) == 5
        assert not cb.call(Status())["leader"]
        pid = ca.call(Status())["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: cb.call(Status())["ready"], timeout=20, what="the standby to take over")
        status = cb.call(Status())
        assert status["leader"] and status["epoch"] == 2 and status["head"] == 1
        assert cb.call(Get("z")) == 5
        assert cb.call(Add("z", 1)) == 6
        cb.call(Stop())
    tcp_system.tell(a, ActorExitRequest())
    from cei_actors.eventlog import open_log

    with open_log(url) as log:
        assert replay(Counters(), log, "example").counters == {"z": 6}
