"""EPUM and the Provisioner's own core on its simulated cloud, in one deterministic loop:
out-of-band kills, quota refusals, crashes of EPUM at every step, random operations."""

from __future__ import annotations

import collections

import pytest
from epum_harness import Sim, definition
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cei_actors.epum.events import InstanceDestroyRequested, InstanceLaunchRequested
from cei_actors.epum.logic import EPUM
from cei_actors.epum.messages import (
    AddDomain,
    AddDomainDefinition,
    ListDomains,
    ReconfigureDomain,
    RemoveDomain,
)
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.runtime.runner import replay


def decisions(s: Sim) -> tuple[list[str], list[str]]:
    decode = s.runner.component.registry.from_record
    launched, destroyed = [], []
    for e in map(decode, s.runner.log.read("epum", 1)):
        if isinstance(e, InstanceLaunchRequested):
            launched.append(e.instance_id)
        elif isinstance(e, InstanceDestroyRequested):
            destroyed += e.instance_ids
    return launched, destroyed


def assert_no_decision_twice(s: Sim) -> None:
    launched, destroyed = decisions(s)
    assert len(launched) == len(set(launched))
    dup = [i for i, c in collections.Counter(destroyed).items() if c > 1]
    assert not dup, f"destroyed twice: {dup}"
    assert all(c == 1 for c in s.prov.creates.values())


def test_preserve_n_holds_under_out_of_band_kills():
    s = Sim(seed=3, real=True)
    s.send(AddDomainDefinition("def", definition()))
    s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": 5}}))
    s.run(20)
    assert s.running() == 5
    rng = s.runner.rng
    for _ in range(20):
        victims = rng.sample([n.node_id for n in s.prov.live_vms()], 2)
        for v in victims:
            s.prov.kill(v)
        s.step()
        assert s.vms() <= 5
        s.run(15)
        assert s.running() == 5 and s.vms() == 5
    assert_no_decision_twice(s)


def test_preserve_n_catches_up_when_capacity_returns():
    s = Sim(quota={"local": 2}, real=True)
    s.send(AddDomainDefinition("def", definition()))
    s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": 4}}))
    s.run(60)
    assert s.running() == 2
    failed = sum(1 for i in s.state.instances.values() if i.state == "FAILED")
    assert failed >= 4  # refused, retried
    s.prov.quota.clear()  # capacity returns
    s.run(60)  # within the launch backoff (decision OP2: at 32 s by now) and a boot
    assert s.running() == 4 and s.vms() == 4
    assert_no_decision_twice(s)


def scenario(s: Sim) -> None:
    """add (n=3) -> reconfigure (n=1) -> remove, each followed by time; retried if lost."""
    def request(msg):
        for _ in range(3):
            reply = s.send(msg)
            if reply is not None:
                return reply
        raise AssertionError("request lost three times")

    request(AddDomainDefinition("def", definition()))
    request(AddDomain("d", "def", {"engine_conf": {"preserve_n": 3}}))
    s.run(30)
    request(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 1}}))
    s.run(30)
    request(RemoveDomain("d"))
    s.run(40)


def count_messages() -> int:
    s = Sim(real=True)
    scenario(s)
    return s.handled


@pytest.mark.parametrize("before", [False, True], ids=["after-append", "before-append"])
def test_crash_at_every_step_converges(before):
    total = count_messages()
    assert total >= 25
    for k in range(1, total + 1):
        s = Sim(seed=k, real=True)
        s.crash_at, s.crash_before = k, before
        checkpoints = []
        real_run = s.run

        def run(seconds, _real=real_run, _s=s, _cp=checkpoints):
            _real(seconds)
            _cp.append(_s.vms())

        s.run = run
        scenario(s)
        assert s.crashes == 1
        # converged at each stage: 3, then 1, then 0 (replies may be lost: a retried
        # request after a persisted one gets conflict / an idempotent Ok)
        assert checkpoints == [3, 1, 0], (k, checkpoints)
        assert s.send(ListDomains()) == Ok([]) and s.state.instances == {}
        assert_no_decision_twice(s)
        assert replay(EPUM(), s.runner.log, "epum") == s.state


def test_crash_and_recover_on_a_zookeeper_log(zk_hosts):
    """The same scenario with EPUM's log in a real ZooKeeper, crashing at a few steps."""
    total = count_messages()
    for k in (3, total // 3, total // 2, total - 2):
        s = Sim(seed=k, real=True, url=f"zk://{zk_hosts}/epum-{k}")
        try:
            s.crash_at = k
            scenario(s)
            assert s.crashes == 1 and s.vms() == 0
            assert s.send(ListDomains()) == Ok([])
            assert_no_decision_twice(s)
            assert replay(EPUM(), s.runner.log, "epum") == s.state
        finally:
            s.close()


class EPUMMachine(RuleBasedStateMachine):
    """Random operations and faults; invariants after every step."""

    @initialize()
    def setup(self):
        self.s = Sim(seed=7, real=True)
        self.s.send(AddDomainDefinition("def", definition()))
        self.targets: dict[str, int] = {}
        self.removed: set[str] = set()

    @rule(i=st.integers(0, 3), n=st.integers(0, 4))
    def add(self, i, n):
        reply = self.s.send(AddDomain(f"d{i}", "def", {"engine_conf": {"preserve_n": n}}))
        if isinstance(reply, Ok):
            self.targets[f"d{i}"] = n
            self.removed.discard(f"d{i}")

    @rule(i=st.integers(0, 3), n=st.integers(0, 4))
    def reconfigure(self, i, n):
        reply = self.s.send(ReconfigureDomain(f"d{i}", {"engine_conf": {"preserve_n": n}}))
        if isinstance(reply, Ok):
            self.targets[f"d{i}"] = n
        else:
            assert isinstance(reply, ErrorReply) and reply.code in ("not_found", "conflict")

    @rule(i=st.integers(0, 3))
    def remove(self, i):
        if isinstance(self.s.send(RemoveDomain(f"d{i}")), Ok):
            self.targets.pop(f"d{i}", None)
            self.removed.add(f"d{i}")

    @rule(k=st.integers(0, 10))
    def kill(self, k):
        vms = self.s.prov.live_vms()
        if vms:
            self.s.prov.kill(vms[k % len(vms)].node_id)

    @rule(dt=st.sampled_from([1.0, 5.0, 12.0]))
    def tick(self, dt):
        self.s.step(dt)

    @rule(quota=st.sampled_from([None, 0, 3]))
    def set_quota(self, quota):
        self.s.prov.quota = {} if quota is None else {"local": quota}

    @rule(before=st.booleans())
    def crash(self, before):
        self.s.crash_at, self.s.crash_before = self.s.handled + 1, before
        self.s.step(1.0)
        self.s.crash_at = None

    @invariant()
    def state_is_replay(self):
        s = self.s
        assert replay(EPUM(), s.runner.log, "epum") == s.state

    @invariant()
    def no_decision_twice(self):
        assert_no_decision_twice(self.s)

    def teardown(self):
        s = self.s
        s.prov.quota = {}
        s.run(60)
        for dom in self.removed:
            assert s.state.domain("default", dom) is None
        for dom, n in self.targets.items():
            d = s.state.domain("default", dom)
            assert d is not None and d.count(["RUNNING"]) == n, (dom, n, d.by_state)
        assert s.vms() == sum(self.targets.values())


EPUMMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEPUMMachine = EPUMMachine.TestCase
