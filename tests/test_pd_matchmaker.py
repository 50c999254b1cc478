"""The matchmaker: placement rules and invariants, property-tested on the fold."""

from __future__ import annotations

import copy
import math

from hypothesis import given, settings
from hypothesis import strategies as st
from pd_harness import Sim, check_invariants, check_no_placeable_waiting, config

from cei_actors.pd import states as ps
from cei_actors.pd.events import NodeAdded, ProcessAssigned, ProcessScheduled, ResourceAdded
from cei_actors.pd.matchmaker import naive_place
from cei_actors.pd.messages import KillProcess, ScheduleProcess
from cei_actors.pd.state import PDState

ZONES = ["a", "b", "c"]


def spec(engine="e1", constraints=None, tag=None):
    c = dict(constraints or {})
    c["engine"] = engine
    return {
        "command": ["x"], "constraints": c, "engine": engine, "node_exclusive": tag,
        "queueing_mode": ps.QUEUE_ALWAYS, "restart_mode": ps.RESTART_ABNORMAL,
        "subscribers": [], "configuration": {}, "min_start_interval": None,
        "omit_from_system_restart": False,
    }


def build(nodes: int, slots: int, queued: int, agents: int = 1) -> PDState:
    s = PDState()
    for i in range(queued):
        s.apply(ProcessScheduled(f"p{i}", 0, spec(), 0.0))
    for n in range(nodes):
        s.apply(NodeAdded(f"n{n}", "pd_domain_e1", "e1", {"zone": ZONES[n % 3]}, 0.0))
        for a in range(agents):
            s.apply(ResourceAdded(f"n{n}-a{a}", f"n{n}", slots, 0.0))
    return s


def place_all(s: PDState) -> list[tuple[str, str]]:
    out = []
    while True:
        pick = s.mm.next_placement()
        if pick is None:
            return out
        p, res = pick
        s.apply(ProcessAssigned(p.upid, p.round, res.resource_id, 1.0))
        out.append((p.upid, res.resource_id))


@given(st.integers(1, 12), st.integers(1, 4), st.integers(0, 60), st.integers(1, 2))
@settings(max_examples=60, deadline=None)
def test_one_pass_places_as_many_as_fit_fifo_and_packs(nodes, slots, queued, agents):
    s = build(nodes, slots, queued, agents)
    naive_state = copy.deepcopy(s)
    placed = place_all(s)
    capacity = nodes * slots * agents
    assert len(placed) == min(queued, capacity)
    assert [u for u, _ in placed] == [f"p{i}" for i in range(len(placed))]  # FIFO
    check_invariants(s)
    # bin-packing: at most one node is partly used
    partly = [n for n in s.nodes.values() if 0 < n.used < slots * agents]
    assert len(partly) <= 1
    queue = [naive_state.processes[f"p{i}"] for i in range(queued)]
    naive = naive_place(queue, naive_state.nodes, naive_state.resources)
    assert len(naive) == len(placed)
    assert sorted(r for _, r in naive) == sorted(r for _, r in placed)


def test_a_process_that_matches_nothing_is_not_rescanned():
    s = build(50, 2, 0)
    for i in range(100):
        s.apply(ProcessScheduled(f"z{i}", 0, spec(constraints={"zone": "nowhere"}), 0.0))
    calls = []
    real = s.mm._find
    s.mm._find = lambda k: calls.append(k) or real(k)
    assert place_all(s) == []
    assert len(calls) == 1  # one look for the whole class
    calls.clear()
    s.apply(ProcessScheduled("plain", 0, spec(), 0.0))
    assert place_all(s) == [("plain", "n0-a0")]
    assert all(k.pool.ckey == () for k in calls)  # the clean class was skipped
    calls.clear()
    s.apply(NodeAdded("far", "pd_domain_e1", "e1", {"zone": "nowhere"}, 0.0))
    s.apply(ResourceAdded("far-a0", "far", 2, 0.0))
    assert [u for u, _ in place_all(s)] == ["z0", "z1"]


# ---- random operations through the whole core ---------------------------------------------------

op = st.one_of(
    st.tuples(st.just("node"), st.sampled_from(ZONES), st.integers(1, 3)),
    st.tuples(
        st.just("schedule"),
        st.sampled_from([None, "a", "b", ["a", "c"]]),
        st.sampled_from([None, None, "T", "U"]),
        st.sampled_from(list(ps.QUEUEING_MODES)),
    ),
    st.tuples(st.just("end"), st.integers(0, 1000), st.sampled_from([ps.EXITED, ps.FAILED])),
    st.tuples(st.just("kill"), st.integers(0, 1000)),
    st.tuples(st.just("lose"), st.integers(0, 1000)),
    st.tuples(st.just("heartbeat"),),
)


@given(st.lists(op, max_size=40))
@settings(max_examples=60, deadline=None)
def test_random_operations_keep_the_invariants(ops):
    sim = Sim(config(engines={"e1": {"slots": 2, "replicas": 2}}))
    n_nodes = n_procs = 0
    for o in ops:
        kind = o[0]
        if kind == "node":
            sim.add_node(f"n{n_nodes}", agents=2, zone=o[1])
            n_nodes += 1
        elif kind == "schedule":
            zone, tag, qmode = o[1], o[2], o[3]
            sim.ok(
                ScheduleProcess(
                    f"p{n_procs}", command=["x"], node_exclusive=tag, queueing_mode=qmode,
                    constraints={"zone": zone} if zone is not None else None,
                )
            )
            n_procs += 1
        elif kind == "end" and n_procs:
            upid = f"p{o[1] % n_procs}"
            copies = sim.running_copies()
            live = [k for k in copies if k[0] == upid]
            if live:
                for aid in copies[live[0]]:
                    sim.agents[aid].procs[live[0]] = o[2]
        elif kind == "kill" and n_procs:
            sim.ok(KillProcess(f"p{o[1] % n_procs}"))
        elif kind == "lose" and sim.state.nodes:
            nodes = sorted(sim.state.nodes)
            sim.lose_node(nodes[o[1] % len(nodes)])
        elif kind == "heartbeat":
            sim.heartbeat_all()
        check_invariants(sim.state)
        check_no_placeable_waiting(sim.state)
        for key, agents in sim.running_copies().items():
            assert len(agents) == 1, f"{key} runs on {agents}"
    assert sim.state == sim.replayed()


def test_a_later_sort_of_a_bucket_looks_only_at_the_members_added_since():
    """Decision SC9: members sorted once stay sorted; a sort after a few adds calls the key
    for those adds only (a reused pool's bucket costs what changed, not its size)."""
    from cei_actors.pd.matchmaker import FifoSet

    calls: list[int] = []

    def key(k: int) -> int:
        calls.append(k)
        return -k

    bucket = FifoSet()
    for k in range(1000):
        bucket.add(k)
    bucket.sort_members(key)
    assert bucket.first() == (999, None)
    calls.clear()
    bucket.discard(999)
    bucket.add(5000)
    bucket.add(3)  # moved to the end: it is a later add
    bucket.sort_members(key)
    assert sorted(calls) == [3, 5000]
    assert list(bucket)[:3] == [5000, 998, 997] and list(bucket)[-1] == 0
    assert len(bucket) == 1000


def test_capacity_formula_matches_placements():
    s = build(10, 3, 25)
    place_all(s)
    assert sum(n.used for n in s.nodes.values()) == 25
    assert sum(1 for n in s.nodes.values() if n.used) == math.ceil(25 / 3)


def _unique_key(k: int) -> int:
    return (k * 7) % 10  # an order unlike the keys' own and unlike arrival


def _tied_key(k: int) -> int:
    return k % 3  # ties: a stable sort keeps them in their order


@given(st.lists(st.tuples(st.sampled_from(["add", "discard", "sort", "sort2", "read"]),
                          st.integers(0, 9)), max_size=80))
@settings(max_examples=300, deadline=None)
def test_a_lazy_sort_of_a_bucket_reads_as_the_eager_one(ops):
    """Decisions SC4, SC9: ``FifoSet.sort_members`` (members sorted so far kept in a heap,
    later adds joining it at the next sort) gives the order an immediate stable sort of the
    members then present would give, later adds after; also with ties and another key."""
    from cei_actors.pd.matchmaker import FifoSet

    lazy, eager = FifoSet(), []  # the model: sorted at once

    for op, k in ops:
        if op == "add":
            lazy.add(k)
            eager = [x for x in eager if x != k] + [k]
        elif op == "discard":
            lazy.discard(k)
            eager = [x for x in eager if x != k]
        elif op in ("sort", "sort2"):
            key = _unique_key if op == "sort" else _tied_key
            lazy.sort_members(key)
            eager.sort(key=key)
        else:
            assert list(lazy) == eager
            assert lazy.first() == ((eager[0], None) if eager else None)
        assert len(lazy) == len(eager) and all(x in lazy for x in eager)
    assert list(lazy) == eager
