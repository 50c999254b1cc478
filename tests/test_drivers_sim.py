"""The simulated cloud driver: idempotency, quotas, boot delays, faults, concurrency."""

from __future__ import annotations

import contextlib
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libcloud.common.types import InvalidCredsError
from libcloud.compute.base import NodeDriver, NodeImage, NodeSize
from libcloud.compute.types import NodeState

from cei_actors.provisioner.drivers import (
    SimulatedCloudDriver,
    SimulatedCloudError,
    SimulatedTimeout,
)


class ManualClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make(clock: ManualClock | None = None, seed: int = 1, **opts) -> SimulatedCloudDriver:
    return SimulatedCloudDriver(clock=clock or ManualClock(), rng=random.Random(seed), **opts)


def create(d: SimulatedCloudDriver, token: str | None, name: str = "n"):
    return d.create_node(
        name,
        NodeSize("m1.small", "s", 0, 0, 0, 0, d),
        NodeImage("ami-x", "x", d),
        ex_clienttoken=token,
        ex_userdata="ud",
    )


def listed(d: SimulatedCloudDriver) -> dict[str, object]:
    return {n.id: n for n in d.list_nodes()}


def test_is_a_libcloud_driver_with_catalog():
    d = make()
    assert isinstance(d, NodeDriver)
    assert [i.id for i in d.list_images()]
    assert "m1.small" in [s.id for s in d.list_sizes()]
    assert d.list_locations()[0].driver is d


def test_create_lists_node_with_token_and_ips():
    d = make()
    node = create(d, "tok-1", name="vm1")
    assert node.extra["client_token"] == "tok-1"
    (listed_node,) = d.list_nodes()
    assert listed_node.id == node.id and listed_node.name == "vm1"
    assert listed_node.state == NodeState.RUNNING  # boot delay 0
    assert listed_node.public_ips and listed_node.private_ips
    assert listed_node.extra["client_token"] == "tok-1"
    assert listed_node.extra["userdata"] == "ud"


def test_create_is_idempotent_by_token():
    d = make()
    a = create(d, "tok")
    b = create(d, "tok")
    assert a.id == b.id
    assert d.stats().vms_created == 1
    assert d.stats().creates_attempted == 2
    assert len(d.list_nodes()) == 1


def test_token_reused_with_other_parameters_is_refused():
    d = make()
    create(d, "tok")
    with pytest.raises(SimulatedCloudError, match="IdempotentParameterMismatch"):
        d.create_node("n", "m1.large", "ami-x", ex_clienttoken="tok")


def test_lost_reply_then_retry_returns_the_same_vm():
    d = make(lose_reply_rate=1.0)
    with pytest.raises(TimeoutError) as info:  # socket.timeout is TimeoutError
        create(d, "tok")
    assert isinstance(info.value, SimulatedTimeout) and info.value.reply_lost
    assert d.stats().vms_created == 1  # the VM exists although the caller saw a timeout
    d.lose_reply_rate = 0.0
    node = create(d, "tok")
    assert d.stats().vms_created == 1
    assert [n.id for n in d.list_nodes()] == [node.id]


def test_timeout_has_no_effect():
    d = make(timeout_rate=1.0)
    with pytest.raises(TimeoutError) as info:
        create(d, "tok")
    assert not info.value.reply_lost
    with pytest.raises(TimeoutError):
        d.list_nodes()
    d.timeout_rate = 0.0
    assert d.list_nodes() == [] and d.stats().vms_created == 0


def test_create_failure_makes_no_vm():
    d = make(create_failure_rate=1.0)
    with pytest.raises(SimulatedCloudError) as info:
        create(d, "tok")
    assert "InsufficientInstanceCapacity" in str(info.value)
    assert d.stats().vms_created == 0
    d.create_failure_rate = 0.0
    create(d, "tok")
    assert d.stats().vms_created == 1


def test_quota_error_text_is_instance_limit_exceeded():
    d = make(max_instances=2)
    create(d, "a")
    create(d, "b")
    with pytest.raises(Exception) as info:
        create(d, "c")
    assert "InstanceLimitExceeded" in str(info.value)
    # a replay of a known token is not a new instance, so it is not refused
    assert create(d, "a").extra["client_token"] == "a"
    # destroying one frees a slot
    d.destroy_node(listed(d)[create(d, "b").id])
    create(d, "c")
    assert d.stats().live == 2


def test_auth_failure_mode():
    d = make(auth_failure=True)
    with pytest.raises(InvalidCredsError):
        create(d, "tok")
    with pytest.raises(InvalidCredsError):
        d.list_nodes()
    assert d.stats().vms_created == 0


def test_boot_delay_under_virtual_clock():
    clock = ManualClock()
    d = make(clock, boot_delay=(10.0, 20.0))
    node = create(d, "tok")
    assert node.state == NodeState.PENDING
    assert node.public_ips == []  # like EC2, the public address comes with RUNNING
    boot_at = node.extra["boot_at"]
    assert clock.t + 10 <= boot_at <= clock.t + 20
    clock.t = boot_at - 0.001
    assert d.list_nodes()[0].state == NodeState.PENDING
    clock.t = boot_at
    running = d.list_nodes()[0]
    assert running.state == NodeState.RUNNING and running.public_ips


def test_api_latency_uses_injected_sleep():
    slept: list[float] = []
    d = make(api_latency=0.25, sleep=slept.append)
    create(d, "tok")
    d.list_nodes()
    assert slept == [0.25, 0.25]


def test_virtual_clock_does_not_really_sleep_by_default():
    d = make(api_latency=3600.0)  # would hang the test if it slept
    create(d, "tok")


def test_destroy_then_terminated_lingers_then_gone():
    clock = ManualClock()
    d = make(clock, terminated_linger=30.0)
    node = create(d, "tok")
    assert d.destroy_node(node) is True
    assert listed(d)[node.id].state == NodeState.TERMINATED
    assert d.destroy_node(node) is True  # destroying a listed TERMINATED node is fine
    assert d.stats().vms_destroyed == 1 and d.stats().live == 0
    clock.advance(30.0)
    assert d.list_nodes() == []
    with pytest.raises(SimulatedCloudError, match="InvalidInstanceID.NotFound"):
        d.destroy_node(node)
    # the token still answers with the same, now terminated, VM: no second VM
    again = create(d, "tok")
    assert again.id == node.id and again.state == NodeState.TERMINATED
    assert d.stats().vms_created == 1


def test_shutdown_delay_shows_unknown_while_shutting_down():
    clock = ManualClock()
    d = make(clock, shutdown_delay=5.0)
    node = create(d, "tok")
    d.destroy_node(node)
    shutting = listed(d)[node.id]
    assert shutting.state == NodeState.UNKNOWN and shutting.extra["status"] == "shutting-down"
    assert d.stats().live == 0
    clock.advance(5.0)
    assert listed(d)[node.id].state == NodeState.TERMINATED


def test_kill_out_of_band():
    clock = ManualClock()
    d = make(clock, terminated_linger=10.0)
    node = create(d, "tok")
    d.kill(node.id)
    killed = listed(d)[node.id]
    assert killed.state == NodeState.TERMINATED and killed.extra["reason"] == "killed"
    assert d.stats().killed == 1 and d.stats().vms_destroyed == 0
    clock.advance(10.0)
    assert d.list_nodes() == []
    with pytest.raises(KeyError):
        d.kill("i-nope")


def test_vanish_out_of_band():
    d = make()
    keep = create(d, "a")
    gone = create(d, "b")
    d.vanish(gone.id)
    assert list(listed(d)) == [keep.id]
    assert d.stats().vanished == 1 and d.stats().live == 1
    with pytest.raises(SimulatedCloudError, match="NotFound"):
        d.destroy_node(gone)


def test_vanish_and_kill_rates_take_running_nodes_over_time():
    clock = ManualClock()
    d = make(clock, boot_delay=5.0, vanish_rate=0.01, kill_rate=0.01, terminated_linger=1e9)
    nodes = [create(d, f"t{i}") for i in range(200)]
    clock.advance(4.9)  # still pending: no hazard before boot
    assert d.stats().live == 200
    clock.advance(100.1)
    s = d.stats()
    assert s.vanished + s.killed == 200 - s.live
    assert 40 < s.vanished < 120 and 40 < s.killed < 120  # ~ 200 * (1 - e^-2) / 2 each
    states = {n.id: n.state for n in d.list_nodes()}
    assert len(states) == 200 - s.vanished
    assert sum(st_ == NodeState.TERMINATED for st_ in states.values()) == s.killed
    d.vanish_rate = d.kill_rate = 0.0
    live = s.live
    clock.advance(1000.0)
    assert d.stats().live == live
    assert all(n.id in {m.id for m in nodes} for n in d.list_nodes())


def test_ids_are_never_reused():
    clock = ManualClock()
    d = make(clock, terminated_linger=0.0)
    seen: set[str] = set()
    for i in range(50):
        node = create(d, f"t{i}" if i % 2 else None)
        assert node.id not in seen
        seen.add(node.id)
        d.destroy_node(node)
        clock.advance(1.0)
    assert d.list_nodes() == []


def test_same_seed_same_cloud():
    def run(seed: int) -> list[tuple[str, float]]:
        d = make(ManualClock(), seed=seed, boot_delay=(1, 100))
        return [(n.id, n.extra["boot_at"]) for n in (create(d, f"t{i}") for i in range(20))]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_concurrent_creates_with_distinct_tokens_give_exact_count():
    d = SimulatedCloudDriver(rng=random.Random(3), api_latency=0.001, lose_reply_rate=0.2)
    tokens = [f"tok-{i}" for i in range(400)]
    errors: list[BaseException] = []

    def worker(mine: list[str]) -> None:
        for token in mine:
            for _ in range(50):  # retry until a reply arrives, as the Provisioner will
                try:
                    create(d, token)
                    break
                except TimeoutError:
                    continue
                except BaseException as e:  # pragma: no cover - reported below
                    errors.append(e)
                    return

    threads = [threading.Thread(target=worker, args=(tokens[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    # a second wave with the same tokens, racing the first
    dup = [threading.Thread(target=worker, args=(tokens[i::8],)) for i in range(8)]
    for t in dup:
        t.start()
    for t in threads + dup:
        t.join()
    assert not errors
    s = d.stats()
    assert s.vms_created == len(tokens) == s.live
    nodes = d.list_nodes()
    assert sorted(n.extra["client_token"] for n in nodes) == sorted(tokens)
    assert len({n.id for n in nodes}) == len(tokens)


def test_concurrent_creates_respect_quota():
    d = SimulatedCloudDriver(rng=random.Random(4), max_instances=25)
    failures: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            create(d, f"q-{i}")
        except SimulatedCloudError as e:
            with lock:
                failures.append(str(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.stats().live == 25
    assert len(failures) == 35 and all("InstanceLimitExceeded" in f for f in failures)


# ---------------------------------------------------------------------- properties

ops = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.integers(0, 7)),
        st.tuples(st.just("advance"), st.floats(0, 50)),
        st.tuples(st.just("destroy"), st.integers(0, 7)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, seed=st.integers(0, 2**16), lose=st.sampled_from([0.0, 0.3, 1.0]))
def test_one_vm_per_distinct_token(ops, seed, lose):
    clock = ManualClock()
    d = make(clock, seed=seed, boot_delay=(0, 20), lose_reply_rate=lose, terminated_linger=25)
    used: set[str] = set()
    ids: dict[str, str] = {}
    for op, arg in ops:
        if op == "create":
            token = f"tok-{arg}"
            try:
                node = create(d, token)
            except TimeoutError:
                node = d.node_for_token(token)
            used.add(token)
            assert ids.setdefault(token, node.id) == node.id
        elif op == "advance":
            clock.advance(arg)
        else:
            node_id = ids.get(f"tok-{arg}")
            if node_id is not None:
                with contextlib.suppress(SimulatedCloudError):  # no longer listed
                    d.destroy_node(node_id)
    s = d.stats()
    assert s.vms_created == len(used) == len(set(ids.values()))
    for node in d.list_nodes():
        assert ids[node.extra["client_token"]] == node.id


_ORDER = {NodeState.PENDING: 0, NodeState.RUNNING: 1, NodeState.TERMINATED: 2}


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.floats(0, 30), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
    kills=st.lists(st.integers(0, 9), max_size=5),
)
def test_node_states_only_move_forward(steps, seed, kills):
    clock = ManualClock()
    d = make(clock, seed=seed, boot_delay=(0, 60), kill_rate=0.01, terminated_linger=1e9)
    nodes = [create(d, f"t{i}") for i in range(10)]
    last = {n.id: _ORDER[n.state] for n in nodes}
    for i, dt in enumerate(steps):
        clock.advance(dt)
        if i < len(kills):
            d.kill(nodes[kills[i]].id)
        for n in d.list_nodes():
            assert _ORDER[n.state] >= last[n.id]
            last[n.id] = _ORDER[n.state]


def test_listing_builds_a_node_again_only_when_its_vm_changed():
    clock = ManualClock()
    d = make(clock, boot_delay=(10.0, 10.0))
    node = create(d, "tok")
    first = d.list_nodes()[0]
    assert d.list_nodes()[0] is first  # unchanged: the same Node, not built again
    clock.advance(10.0)
    running = d.list_nodes()[0]
    assert running is not first and running.state == NodeState.RUNNING and running.public_ips
    assert first.state == NodeState.PENDING  # a Node already handed out is not changed
    d.destroy_node(node)
    gone = d.list_nodes()[0]
    assert gone.state == NodeState.TERMINATED and gone.extra["reason"] == "destroyed"


def _shown(n):
    return (n.id, n.state, n.public_ips, n.private_ips, dict(n.extra))


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["wait", "kill", "vanish", "destroy", "create"]),
                           st.integers(0, 9), st.floats(0, 40)), max_size=30),
    seed=st.integers(0, 2**16),
)
def test_a_listing_shows_every_vm_as_a_node_built_now_would(ops, seed):
    """RT9: a VM's Node is kept until a field it shows changes (whatever changes it): each
    listing equals Nodes built afresh, through boots, shutdowns, kills, vanishes and lingers."""
    clock = ManualClock()
    d = make(clock, seed=seed, boot_delay=(0, 30), shutdown_delay=5.0, terminated_linger=60.0, kill_rate=0.01)
    nodes = [create(d, f"t{i}") for i in range(4)]
    for op, k, dt in ops:
        pick = nodes[k % len(nodes)]
        if op == "wait":
            clock.advance(dt)
        elif op == "create":
            nodes.append(create(d, f"t{len(nodes)}"))
        else:
            with contextlib.suppress(Exception):  # a VM already gone
                getattr(d, op if op != "destroy" else "destroy_node")(pick.id if op != "destroy" else pick)
        listed = d.list_nodes()
        assert [_shown(n) for n in listed] == [_shown(d._to_node(d._vms[n.id])) for n in listed]
