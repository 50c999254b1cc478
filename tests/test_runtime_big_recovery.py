"""Recovering a big state must not starve the process's other threads (FO3).

A cold leader on ZooKeeper decodes its newest snapshot while kazoo's connection thread must
ping within the session timeout: one ``msgpack.unpackb`` of a 1M-entry state held the GIL for
1.5-3 s and the session expired, so the freshly recovered leader stepped down, again and again.
``unpack_state`` decodes the same bytes to the same value in short pieces.
"""

from __future__ import annotations

import gc
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cei_actors.eventlog import Snapshot, batch, open_log
from cei_actors.eventlog.batch import unpack_state
from cei_actors.runtime import runner as runner_module
from cei_actors.runtime.client import ServiceClient
from cei_actors.runtime.control import Start, Status, Stop
from cei_actors.runtime.example import Add, CounterAdded, Counters
from cei_actors.runtime.runner import Runner
from cei_actors.runtime.system import start_actor

ACTOR = "cei_actors.runtime.example_actor.ExampleActor"

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20),
)
_plain = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=80),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 300)), inner, max_size=80),
    ),
    max_leaves=200,
)


@settings(max_examples=60, deadline=None)
@given(value=_plain, piece=st.sampled_from([1, 7, 64, 1000]))
def test_unpack_state_reads_back_what_unpackb_reads(value, piece):
    data = msgpack.packb(value, use_bin_type=True)
    saved = batch.STATE_PIECE_BYTES
    batch.STATE_PIECE_BYTES = piece  # tiny pieces: every path (walk, pieces, one at once) runs
    try:
        got = unpack_state(data)
    finally:
        batch.STATE_PIECE_BYTES = saved
    assert got == msgpack.unpackb(data, raw=False, strict_map_key=False)
    assert type(got) is type(value) or isinstance(value, tuple)


def test_unpack_state_of_big_shapes_equals_unpackb_in_order():
    shapes = [
        {"counters": {f"k{i:07d}": i for i in range(200_000)}, "ticks": 3},
        {"processes": {f"u{i}": {"state": "500-RUNNING", "argv": ["a", i], "node": None}
                       for i in range(30_000)}, "nodes": [[i, b"x" * 30] for i in range(20_000)]},
        [[list(range(50_000))], {"deep": {"deeper": {"big": b"y" * 300_000, "n": list(range(40_000))}}}],
    ]
    for value in shapes:
        data = msgpack.packb(value, use_bin_type=True)
        want = msgpack.unpackb(data, raw=False, strict_map_key=False)
        got = unpack_state(data)
        assert got == want
        if isinstance(want, dict):
            assert list(got) == list(want)  # same key order


def test_unpack_state_refuses_damaged_data_like_unpackb():
    data = msgpack.packb({"counters": {f"k{i}": i for i in range(100_000)}}, use_bin_type=True)
    for bad in (data[:-1], data[: len(data) // 2]):
        with pytest.raises(ValueError):
            unpack_state(bad)
    with pytest.raises(msgpack.ExtraData):
        unpack_state(data + b"\x01")
    listed_key = msgpack.packb({(1, 2): "x", "n": list(range(100_000))}, use_bin_type=True)
    for decode in (unpack_state, lambda d: msgpack.unpackb(d, raw=False, strict_map_key=False)):
        with pytest.raises(TypeError, match="unhashable"):  # a list as a map key
            decode(listed_key)


class _GcWitness(Counters):
    """Counters whose snapshot records whether the collector was on while it was taken."""

    def snapshot(self, state):
        return {**super().snapshot(state), "gc": gc.isenabled()}


def test_the_forked_snapshot_child_runs_without_the_collector(tmp_path, monkeypatch):
    """A collection in the child writes to every object's header: a copy of every page of
    the heap (the child of a 100k-process PD took 13 s instead of 6 to store its snapshot)."""
    monkeypatch.setattr(runner_module, "BACKGROUND_SNAPSHOT_BYTES", 0)  # every state is "big"
    r = Runner(_GcWitness(), open_log(f"sqlite:///{tmp_path}/log.db"), snapshot_every=5)
    r.recover()
    assert gc.isenabled()
    for i in range(5):
        r.handle(Add("a", i + 1))  # the 5th makes one due: taken by a forked child
    assert r.wait_history(30)
    snap = r.log.load_snapshot("example")
    assert snap is not None and snap.offset == 5
    assert unpack_state(snap.data) == {"counters": {"a": 15}, "ticks": 0, "gc": False}
    assert gc.isenabled()  # this process keeps collecting


# ---- a real leader process on ZooKeeper with the shortest session ---------------------------


def test_a_leader_recovering_a_big_snapshot_keeps_its_short_zookeeper_session(tcp_system, zk_hosts):
    """A cold leader loads a 1.5M-counter snapshot (~20 MB) with a 1 s session (the server's
    minimum at tickTime 500 ms): it leads once, serves, and keeps leading."""
    url = f"zk://{zk_hosts}?session_timeout=1"
    n = 1_500_000
    state = {"counters": {f"k{i:07d}": 1 for i in range(n)}, "ticks": 0}
    with open_log(url) as log:
        fence = log.acquire("example")
        first = CounterAdded("k0000000", 1, 1.0)
        log.append(fence, 0, [Counters.registry.to_pending(first, first.at)])
        blob = msgpack.packb(state, use_bin_type=True)
        del state
        # the state at offset 1 as a snapshot holds it: what a long history would have left
        log.save_snapshot(Snapshot("example", 1, time.time(), Counters.snapshot_version, blob))
        del blob
    address = start_actor(tcp_system, ACTOR, Start(url, config={"standby": "cold"}), timeout=120)
    with ServiceClient(tcp_system, address, timeout=60) as client:
        try:
            assert client.call(Add("k0000001", 1)) == 2  # served from the loaded state
            first_status = client.call(Status())
            assert first_status["mode"] == "ready" and first_status["epoch"] == 2, first_status
            # three session timeouts later still the same leadership: never down, never a new
            # epoch (a scheduling pause of this busy machine may suspend it for a moment)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                status = client.call(Status())
                assert status["mode"] in ("ready", "suspended") and status["epoch"] == 2, status
                time.sleep(0.1)
            assert client.call(Add("k1499999", 2)) == 3
        finally:
            client.call(Stop())
