"""A waiting process says why: ``describe``/``list`` give ``why``, one line made from the
matchmaker's own verdicts (Matchmaker.held_back, the checks ``cei log why`` shows per node)."""

from __future__ import annotations

from pd_harness import ENGINE, Sim

from cei_actors.pd import states as ps
from cei_actors.pd.messages import DescribeProcess, DescribeProcesses, ScheduleProcess
from cei_actors.plaindata import count


def test_a_process_no_node_matches_says_which_constraint_and_what_the_nodes_have():
    sim = Sim()
    assert sim.ok(ScheduleProcess("early", command=["x"]))["state"] == ps.WAITING
    assert sim.ok(DescribeProcess("early"))["why"] == f"no node of engine {ENGINE!r} yet"
    sim.add_node("n1", site="local")
    sim.add_node("n2", site="local")
    assert sim.ok(DescribeProcess("early"))["state"] == ps.ASSIGNED
    assert sim.ok(DescribeProcess("early"))["why"] is None  # not waiting: nothing to explain
    sim.ok(ScheduleProcess("far", command=["x"], constraints={"site": "nowhere"}))
    sim.ok(ScheduleProcess("far2", command=["x"], constraints={"site": "nowhere"}))
    sim.ok(ScheduleProcess("either", command=["x"], constraints={"site": ["a", "b"]}))
    p = sim.ok(DescribeProcess("far"))
    assert p["state"] == ps.WAITING and p["msg"] == ""
    assert p["why"] == "no node fits (constraint site='nowhere', 2 nodes have 'local')"
    listed = {d["upid"]: d for d in sim.ok(DescribeProcesses())}
    assert listed["far"]["why"] == listed["far2"]["why"] == p["why"]
    assert listed["either"]["why"] == "no node fits (constraint site=['a', 'b'], 2 nodes have 'local')"
    assert listed["early"]["why"] is None


def test_a_process_without_a_free_slot_or_with_its_tag_taken_says_so():
    sim = Sim()
    [aid] = sim.add_node("n1", slots=1)
    slots = sim.state.resources[aid].slots
    sim.ok(ScheduleProcess("tagged", command=["x"], node_exclusive="t"))
    for i in range(slots - 1):
        sim.ok(ScheduleProcess(f"fill{i}", command=["x"]))
    sim.ok(ScheduleProcess("b", command=["x"]))
    assert sim.ok(DescribeProcess("b"))["why"] == "no node fits (1 node has no free slot)"
    sim.add_node("n2", agents=2)  # b and c take two of its four slots
    sim.ok(ScheduleProcess("c", command=["x"], node_exclusive="t"))
    assert sim.ok(DescribeProcess("b"))["state"] == ps.ASSIGNED
    assert sim.ok(DescribeProcess("c"))["state"] == ps.ASSIGNED  # n2 is free of the tag
    sim.ok(ScheduleProcess("d", command=["x"], node_exclusive="t"))
    assert sim.ok(DescribeProcess("d"))["why"] == (
        "no node fits (1 node has no free slot; 1 node holds node_exclusive 't')")


def test_count_is_singular_for_one():
    assert [count(n, "process") for n in (0, 1, 2)] == ["0 processes", "1 process", "2 processes"]
    assert count(1, "node") == "1 node" and count(3, "node") == "3 nodes"
    assert count(2, "replica set", "replica sets") == "2 replica sets" and count(2, "match") == "2 matches"
