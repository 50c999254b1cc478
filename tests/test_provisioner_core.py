"""The Provisioner's pure core, driven synchronously against a simulated cloud."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from provisioner_harness import DT, SIM_SITE, FakeClock, Harness, make_core, sim_vms

from cei_actors.provisioner import events as ev
from cei_actors.provisioner.cloud import CloudWorker
from cei_actors.provisioner.logic import Provisioner, client_token
from cei_actors.provisioner.messages import (
    AddDeployableType,
    AddSite,
    CreateResult,
    DescribeNodes,
    DescribeProvisioner,
    DumpState,
    Enable,
    NodeStateChanged,
    Provision,
    QuerySites,
    ReapRecords,
    RetryWork,
    Subscribe,
    TerminateAll,
    TerminateNodes,
)
from cei_actors.provisioner.states import InstanceState, rank
from cei_actors.runtime.messages import ErrorReply
from cei_actors.runtime.runner import replay


def prov(launch, ids, site="sim1", dt="dt1", caller=None, **vars):
    return Provision(launch, dt, site, list(ids), {"name": "x", **vars}, caller)


def states(h):
    return {nid: n.state for nid, n in h.state.nodes.items()}


def live_vms(h):
    cloud = h.cloud()
    return [v for v in sim_vms(cloud) if v.status in ("pending", "running")] if cloud else []


def events_of(h, kind=None):
    decode = h.core.registry.from_record
    out = [decode(r) for r in h.runner.log.read("provisioner", 1)]
    return [e for e in out if kind is None or isinstance(e, kind)]


@pytest.fixture
def h():
    harness = Harness()
    harness.setup_sim()
    return harness


# ---------------------------------------------------------------------- states


def test_instance_states_are_ordered_by_lifecycle():
    names = [s.value for s in sorted(InstanceState)]
    assert names == ["REQUESTING", "REQUESTED", "ERROR_RETRYING", "PENDING", "STARTED",
                     "RUNNING", "RUNNING_FAILED", "TERMINATING", "TERMINATED", "FAILED",
                     "REJECTED"]
    assert InstanceState.RUNNING < "TERMINATING" and InstanceState.FAILED > InstanceState.TERMINATED
    assert InstanceState.RUNNING.code == "600-RUNNING" and rank("800-TERMINATED") == 800


def test_client_token_is_stable_prefixed_and_short():
    t = client_token("cei-", "launch-" + "x" * 80, "node-1")
    assert t == client_token("cei-", "launch-" + "x" * 80, "node-1")
    assert t.startswith("cei-") and len(t) <= 64
    assert t != client_token("cei-", "launch-" + "x" * 80, "node-2")


# ---------------------------------------------------------------------- provision


def test_provision_launch_run_and_terminate(h):
    value = h.ok(prov("L1", ["n1", "n2"]))
    assert [n["state"] for n in value["nodes"]] == ["REQUESTED", "REQUESTED"]
    assert [w.kind for w in h.work] == ["create", "create"]
    payload = h.work[0].payload
    assert payload["client_token"] == client_token("cei-", "L1", "n1")
    assert payload["userdata"] == "node x" and payload["image"] == "ami-sim-base"
    assert "userdata" not in str(value)  # callers never see userdata
    h.drain()
    assert states(h) == {"n1": "PENDING", "n2": "PENDING"}
    h.reconcile()
    assert states(h) == {"n1": "RUNNING", "n2": "RUNNING"}
    n1 = h.state.nodes["n1"]
    assert n1.iaas_id and n1.public_ip and n1.private_ip
    h.ok(TerminateNodes(["n1", "n2"]))
    assert states(h) == {"n1": "TERMINATING", "n2": "TERMINATING"}
    h.drain()
    assert states(h) == {"n1": "TERMINATED", "n2": "TERMINATED"}
    assert live_vms(h) == []
    assert h.replayed() == h.state


def test_same_provision_twice_is_one_vm(h):
    h.ok(prov("L1", ["n1"]))
    head = h.runner.head
    again = h.ok(prov("L1", ["n1"]))
    assert h.runner.head == head and again["nodes"][0]["state"] == "REQUESTED"
    assert len(h.work) == 1
    h.drain()
    h.ok(prov("L1", ["n1"]))
    assert h.work == []
    assert h.cloud().vms_created == 1
    assert h.error(prov("L1", ["n1", "n9"])).code == "bad_request"
    assert "already belongs" in h.error(prov("L2", ["n1"])).message


@pytest.mark.parametrize(
    "msg, text",
    [
        (Provision("L", "dt1", "sim1", [], {}), "at least one node id"),
        (Provision("L", "dt1", "sim1", ["a", "a"], {}), "given twice"),
        (Provision("L", "dt1", "sim1", [""], {}), "must not be empty"),
        (Provision("", "dt1", "sim1", ["a"], {}), "launch_id: must not be empty"),
        (Provision("L", "dt1", "nowhere", ["a"], {}), "unknown site 'nowhere'"),
        (Provision("L", "nothing", "sim1", ["a"], {}), "unknown deployable type 'nothing'"),
        (Provision("L", "dt1", "sim1", "a", {}), "node_ids: expected list"),
        (Provision("L", "dt1", "sim1", ["a", 3], {}), "node_ids: expected list"),
        (Provision("L", "dt1", "sim1", ["a"], []), "vars: expected dict"),
        (Provision("L", "dt1", 5, ["a"], {}), "site: expected str"),
        (TerminateNodes([]), "at least one node id"),
        (TerminateNodes(["n1", ""]), "must not be empty"),
        (Provision("L", "dt1", "sim1", [f"x{i}" for i in range(501)], {}), "at most 500"),
        (TerminateNodes("n1"), "expected list"),
        (DescribeNodes(["x"]), "unknown node 'x'"),
        ("provision please", "not a message"),
    ],
)
def test_malformed_requests_get_a_clear_error_and_write_nothing(h, msg, text):
    head = h.runner.head
    reply = h.handle(msg)
    assert isinstance(reply, ErrorReply), reply
    assert text in reply.message
    assert h.runner.head == head and h.work == [] and "a" not in h.state.nodes


def test_lookup_failures_are_failed_nodes_with_reasons(h):
    h.ok(AddSite("sim2", SIM_SITE))
    value = h.ok(prov("L1", ["n1"], site="sim2"))
    assert value["nodes"][0]["state"] == "FAILED"
    assert value["nodes"][0]["state_desc"].startswith("DTRS_LOOKUP_FAILED")
    value = h.ok(Provision("L2", "dt1", "sim1", ["n2"], {}))  # ${name} missing
    node = value["nodes"][0]
    assert node["state"] == "FAILED"
    assert node["state_desc"] == (
        "DTRS_VALIDATION_FAILED: userdata template variable 'name' is missing"
    )
    assert h.work == []


@pytest.mark.parametrize(
    "site_options, reason",
    [
        ({"max_instances": 0}, "IAAS_FULL: InstanceLimitExceeded"),
        ({"create_failure_rate": 1.0}, "IAAS_FULL: InsufficientInstanceCapacity"),
        ({"timeout_rate": 1.0}, "IAAS_TIMEOUT"),
        ({"auth_failure": True}, "IAAS_AUTH"),
        ({"strict_catalog": True}, "IAAS_PROBLEM: InvalidAMIID.NotFound"),
    ],
)
def test_every_cloud_exception_leaves_the_node_failed_with_a_reason(site_options, reason):
    h = Harness()
    h.ok(AddSite("sim1", {**SIM_SITE, **site_options}))
    h.ok(AddDeployableType("dt1", {"mappings": {"sim1": {"iaas_image": "nope",
                                                         "iaas_allocation": "t1.micro"}}}))
    h.ok(prov("L1", ["n1"]))
    h.drain()
    node = h.state.nodes["n1"]
    assert node.state == "FAILED" and node.state_desc.startswith(reason), node.state_desc
    h.ok(DescribeProvisioner())  # still serving
    assert h.replayed() == h.state


def test_an_unexpected_driver_exception_is_a_failed_node():
    class Broken:
        def create_node(self, **kw):
            raise RuntimeError("kaboom")

        def list_nodes(self):
            raise ZeroDivisionError()

    h = Harness(worker=CloudWorker(driver_factory=lambda site, creds: Broken()))
    h.setup_sim()
    h.ok(prov("L1", ["n1"]))
    h.drain()
    assert h.state.nodes["n1"].state_desc == "IAAS_PROBLEM: kaboom"
    h.reconcile()  # a failing listing changes nothing
    assert h.state.nodes["n1"].state == "FAILED"
    errors = h.ok(DescribeProvisioner())["listing_errors"]
    assert list(errors.values()) == ["IAAS_PROBLEM: ZeroDivisionError"]


def test_a_lost_create_reply_fails_the_node_and_the_vm_is_destroyed(h):
    h.ok(prov("L1", ["n1"]))
    h.worker.driver(h.work[0].payload).lose_reply_rate = 1.0
    h.drain()
    assert h.state.nodes["n1"].state_desc.startswith("IAAS_TIMEOUT")
    assert live_vms(h) == []  # the listing issued at once found the orphan
    assert h.cloud().vms_created == 1 and h.cloud().destroys == 1


# ---------------------------------------------------------------------- terminate


def test_terminate_before_create_is_issued_never_makes_a_vm():
    h = Harness(create_concurrency=1)
    h.setup_sim()
    h.ok(prov("L1", ["n1"]))
    h.ok(prov("L2", ["n2"]))
    assert [w.payload["node_id"] for w in h.work] == ["n1"]
    h.ok(TerminateNodes(["n2"]))
    assert h.state.nodes["n2"].state == "TERMINATED"
    assert h.state.nodes["n2"].state_desc == "TERMINATED_BEFORE_LAUNCH"
    h.drain()
    h.reconcile()
    token = client_token("cei-", "L2", "n2")
    assert all(v.client_token != token for v in sim_vms(h.cloud()))
    assert h.cloud().vms_created == 1


def test_terminate_while_the_create_runs_destroys_the_vm_on_arrival(h):
    h.ok(prov("L1", ["n1"]))
    h.ok(TerminateNodes(["n1"]))
    assert h.state.nodes["n1"].state == "TERMINATING"
    h.run_one()  # the create lands
    assert h.state.nodes["n1"].iaas_id is not None
    assert [w.kind for w in h.work] == ["destroy"]
    h.drain()
    assert h.state.nodes["n1"].state == "TERMINATED" and live_vms(h) == []


def test_terminate_of_an_unknown_id_blocks_a_later_provision(h):
    value = h.ok(TerminateNodes(["ghost"], caller="alice"))
    assert value[0]["state"] == "TERMINATED" and value[0]["state_desc"] == "UNKNOWN_NODE"
    value = h.ok(prov("L1", ["ghost", "n2"], caller="alice"))
    assert [n["state"] for n in value["nodes"]] == ["TERMINATED", "REQUESTED"]
    assert h.state.nodes["ghost"].launch_id == "L1"
    assert [w.payload["node_id"] for w in h.work] == ["n2"]
    h.ok(TerminateNodes(["ghost3"], caller="alice"))
    assert h.error(prov("L3", ["ghost3"], caller="bob")).code == "forbidden"


def test_terminate_all_waits_for_creates_in_flight_then_terminates_everything():
    h = Harness(create_concurrency=1)
    h.setup_sim()
    for i in range(3):
        h.ok(prov(f"L{i}", [f"n{i}"]))
    h.run_one()  # n0 launched; n1's create is now in flight
    assert [w.payload["node_id"] for w in h.work] == ["n1"]
    assert h.ok(TerminateAll()) is False
    assert states(h) == {"n0": "PENDING", "n1": "REQUESTED", "n2": "REQUESTED"}
    assert not events_of(h, ev.TerminateRequested)  # nothing while a create can still land
    assert h.ok(prov("L9", ["n9"]))["nodes"][0]["state_desc"] == "PROVISIONER_DISABLED"
    h.run_one()  # n1's create lands: phase two
    assert states(h) == {"n0": "TERMINATING", "n1": "TERMINATING", "n2": "TERMINATED",
                         "n9": "REJECTED"}
    assert h.ok(TerminateAll()) is False
    h.drain()
    assert h.ok(TerminateAll()) is True
    assert live_vms(h) == [] and h.cloud().vms_created == 2
    h.ok(Enable())
    assert h.ok(prov("L10", ["n10"]))["nodes"][0]["state"] == "REQUESTED"


# ---------------------------------------------------------------------- crashes


def test_crash_between_create_and_its_record_finds_the_vm_by_token(h):
    h.ok(prov("L1", ["n1"]))
    h.run_one(deliver=False)  # the VM exists; the actor dies before recording it
    assert h.cloud().vms_created == 1 and h.state.nodes["n1"].state == "REQUESTED"
    d = h.crash()
    assert [w.kind for w in d.effects if hasattr(w, "kind")] == ["create"]
    h.drain()
    node = h.state.nodes["n1"]
    assert node.state == "PENDING"
    assert node.iaas_id == sim_vms(h.cloud())[0].id
    assert h.cloud().vms_created == 1


def test_crash_with_a_terminated_node_whose_vm_may_exist(h):
    h.ok(prov("L1", ["n1"]))
    h.run_one(deliver=False)
    h.ok(TerminateNodes(["n1"]))
    assert h.state.nodes["n1"].state == "TERMINATING"
    h.crash()
    h.fire("query")
    h.drain()
    assert h.state.nodes["n1"].state == "TERMINATED" and live_vms(h) == []


def test_crash_then_terminate_of_a_waiting_node_settles_by_listing():
    h = Harness(create_concurrency=1)
    h.setup_sim()
    h.ok(prov("L1", ["n1", "n2"]))
    h.work.clear()  # the actor dies before the create runs
    h.crash()
    assert [w.payload["node_id"] for w in h.work] == ["n1"]  # n2 waits for a slot
    h.ok(TerminateNodes(["n2"]))
    assert h.state.nodes["n2"].state == "TERMINATING"  # a previous leader may have made it
    h.drain()
    assert h.state.nodes["n2"].state_desc == "TERMINATED_BEFORE_LAUNCH"
    assert h.cloud().vms_created == 1


def test_recovery_from_a_snapshot_and_its_tail(tmp_path):
    h = Harness(url=f"sqlite:///{tmp_path}/log.db", snapshot_every=5)
    h.setup_sim()
    h.ok(Subscribe("epum"))
    h.ok(prov("L1", ["n1", "n2", "n3"]))
    h.drain()
    h.reconcile()
    h.ok(TerminateNodes(["n2", "ghost"]))
    h.drain()
    assert h.runner.log.load_snapshot("provisioner") is not None
    before = h.state
    h.crash()
    assert h.state == before == h.replayed()


def test_state_after_recovery_equals_state_before(h):
    h.ok(prov("L1", ["n1", "n2"]))
    h.drain()
    h.reconcile()
    h.ok(TerminateNodes(["n2"]))
    h.drain()
    before = h.state
    h.crash()
    assert h.state == before == h.replayed()
    data = msgpack.unpackb(msgpack.packb(h.core.snapshot(h.state)), strict_map_key=False)
    assert h.core.restore(data) == before


# ---------------------------------------------------------------------- reconciliation


def test_zombies_with_our_prefix_are_destroyed_others_left_alone(h):
    h.ok(prov("L1", ["n1"]))
    h.drain()
    cloud = h.cloud()
    zombie = cloud.create_node(name="z", size="t1.micro", image="ami-sim-base",
                               ex_clienttoken="cei-" + "0" * 40)
    foreign = cloud.create_node(name="f", size="t1.micro", image="ami-sim-base",
                                ex_clienttoken="someone-else")
    bare = cloud.create_node(name="b", size="t1.micro", image="ami-sim-base")
    h.reconcile()
    live = {v.id for v in live_vms(h)}
    assert zombie.id not in live
    assert {foreign.id, bare.id, h.state.nodes["n1"].iaas_id} <= live
    assert h.ok(DescribeProvisioner())["zombies_destroyed"] == 1


def test_vanished_and_killed_nodes(h):
    h.ok(prov("L1", ["n1", "n2"]))
    h.drain()
    h.reconcile()
    cloud = h.cloud()
    cloud.vanish(h.state.nodes["n1"].iaas_id)
    cloud.kill(h.state.nodes["n2"].iaas_id)
    h.reconcile()
    assert h.state.nodes["n1"].state == "RUNNING"  # within the grace window
    assert h.state.nodes["n2"].state_desc == "IAAS_TERMINATED"
    h.clock.advance(31)
    h.reconcile()
    assert h.state.nodes["n1"].state == "TERMINATED"
    assert h.state.nodes["n1"].state_desc == "NODE_DISAPPEARED"


def test_a_failed_destroy_is_retried_and_the_actor_lives(h):
    h.ok(prov("L1", ["n1"]))
    h.drain()
    cloud = h.cloud()
    cloud.auth_failure = True
    h.ok(TerminateNodes(["n1"]))
    h.drain()
    assert h.state.nodes["n1"].state == "TERMINATING" and "retry" in h.timers
    h.fire("retry")
    assert h.work == []  # not before the delay
    cloud.auth_failure = False
    h.clock.advance(5)
    h.handle(RetryWork())
    h.drain()
    assert h.state.nodes["n1"].state == "TERMINATED" and live_vms(h) == []


def test_a_stale_or_foreign_create_result_is_ignored(h):
    h.ok(prov("L1", ["n1"]))
    head = h.runner.head
    h.handle(CreateResult("n1", "cei-wrong", iaas_id="i-x"))
    h.handle(CreateResult("nope", "cei-wrong", iaas_id="i-x"))
    assert h.runner.head == head


# ---------------------------------------------------------------------- tenancy, subscribers, reaper


def test_nodes_belong_to_their_caller(h):
    h.ok(prov("L1", ["a1"], caller="alice"))
    h.ok(prov("L2", ["b1"], caller="bob"))
    assert [n["node_id"] for n in h.ok(DescribeNodes(caller="alice"))] == ["a1"]
    assert h.error(DescribeNodes(["b1"], caller="alice")).code == "not_found"
    assert h.error(TerminateNodes(["b1"], caller="alice")).code == "forbidden"
    assert h.error(TerminateNodes(["a1", "b1"], caller="alice")).code == "forbidden"
    assert h.state.nodes["a1"].state == "REQUESTED"
    assert h.error(prov("L2", ["b1"], caller="alice")).code == "forbidden"
    assert {n["node_id"] for n in h.ok(DescribeNodes())} == {"a1", "b1"}  # superuser
    h.ok(TerminateNodes(["b1"], caller="bob"))
    h.drain()
    assert h.state.nodes["b1"].state == "TERMINATED"


def test_default_user_owns_requests_without_caller():
    h = Harness(default_user="ops")
    h.setup_sim()
    h.ok(prov("L1", ["n1"]))
    assert h.state.nodes["n1"].caller == "ops"


def test_subscribers_get_every_change_with_a_growing_counter(h):
    h.ok(Subscribe("epum"))
    h.ok(prov("L1", ["n1"]))
    h.drain()
    h.reconcile()
    h.ok(TerminateNodes(["n1"]))
    h.drain()
    seen = [(s.message.node["state"], s.message.node["update_counter"])
            for s in h.sent if s.to == "epum"]
    assert seen == [("REQUESTED", 1), ("PENDING", 2), ("RUNNING", 3), ("TERMINATING", 4),
                    ("TERMINATED", 5)]
    assert all(isinstance(s.message, NodeStateChanged) for s in h.sent)
    h.sent.clear()
    head = h.runner.head
    assert h.ok(DumpState(["n1", "unknown"])) == 2
    (known, unknown) = [s.message.node for s in h.sent]
    assert known["node_id"] == "n1" and known["update_counter"] == 5
    # an id never had is answered as gone, and recorded so: a provision of it arriving
    # later (a message overtaken by this DumpState) makes no VM
    assert (unknown["node_id"], unknown["state"], unknown["state_desc"]) == (
        "unknown", "TERMINATED", "UNKNOWN_NODE")
    assert h.state.nodes["unknown"].state == "TERMINATED" and h.runner.head == head + 1
    work = len(h.work)
    value = h.ok(prov("L9", ["unknown"]))
    assert [n["state"] for n in value["nodes"]] == ["TERMINATED"] and len(h.work) == work
    head = h.runner.head
    assert h.ok(DumpState([])) == 0 and h.ok(DumpState(["n1", "n1"])) == 1
    assert h.runner.head == head  # a known id is only re-sent
    assert h.error(DumpState(["n1", " "])).code == "bad_request"
    # with the counters the asker holds (SC2): a record at that counter is not sent again
    h.sent.clear()
    assert h.ok(DumpState(["n1", "unknown", "new"], [5, 0, 3])) == 2
    assert [(s.message.node["node_id"], s.message.node["state"]) for s in h.sent] == [
        ("unknown", "TERMINATED"), ("new", "TERMINATED")]
    h.sent.clear()
    assert h.ok(DumpState(["n1"], [4])) == 1 and h.sent[0].message.node["update_counter"] == 5
    assert h.error(DumpState(["n1", "new"], [5])).code == "bad_request"


def test_configured_subscribers_and_ip_refresh_counts():
    h = Harness(subscribers=["epum"], query_interval=5.0)
    h.setup_sim()
    h.ok(prov("L1", ["n1"]))
    h.drain()
    assert [s.to for s in h.sent] == ["epum", "epum"]


def test_reaper_removes_old_finished_records(h):
    h.ok(prov("L1", ["n1", "n2"]))
    h.drain()
    h.ok(TerminateNodes(["n1"]))
    h.drain()
    h.clock.advance(7201)
    h.handle(ReapRecords())
    assert set(h.state.nodes) == {"n2"}
    assert h.state.launches["L1"].node_ids == ["n2"]
    h.ok(TerminateNodes(["n2"]))
    h.drain()
    h.clock.advance(7201)
    h.handle(ReapRecords())
    assert h.state.nodes == {} and h.state.launches == {}
    assert "reap" in h.timers
    assert h.replayed() == h.state


def test_a_reaped_record_still_answers_a_late_dump_state(h):
    """A subscriber that missed a node's end for longer than record_max_age (EPUM down) asks
    DumpState: it gets the node's last record, across a restart from the log or a snapshot."""
    h.ok(Subscribe("epum"))
    h.ok(prov("L1", ["n1"]))
    h.drain()
    h.ok(TerminateNodes(["n1"]))
    h.drain()
    last = [s.message.node for s in h.sent if s.to == "epum"][-1]
    assert last["state"] == "TERMINATED"
    h.clock.advance(7201)
    h.handle(ReapRecords())
    assert "n1" not in h.state.nodes
    for restart in (None, "replay", "snapshot"):
        if restart == "replay":
            h.crash()
        elif restart == "snapshot":
            h.runner.take_snapshot()
            h.crash()
        h.sent.clear()
        assert h.ok(DumpState(["n1", "never"])) == 2
        notice, never = [s.message for s in h.sent if s.to == "epum"]
        assert notice.node == last
        assert never.node["node_id"] == "never" and never.node["state_desc"] == "UNKNOWN_NODE"
    assert h.replayed() == h.state


def test_tombstones_are_bounded_by_count_and_age_and_replay_the_same():
    """tombstone_limit and tombstone_max_age bound the reaped records' tombstones; the bounds
    travel in the NodesReaped event, so a replay under another config gives the same map."""
    h = Harness(tombstone_limit=3, tombstone_max_age=100_000.0)
    h.setup_sim()
    for i in range(5):
        h.ok(prov(f"L{i}", [f"n{i}"]))
        h.drain()
        h.ok(TerminateNodes([f"n{i}"]))
        h.drain()
        h.clock.advance(7201)
        h.handle(ReapRecords())
    assert list(h.state.reaped) == ["n2", "n3", "n4"]
    assert h.state.reaped.get("n4").forgotten_at == h.clock.now()
    other = replay(make_core(tombstone_limit=100, tombstone_max_age="forever"),
                   h.runner.log, "provisioner")
    assert other == h.state
    h.clock.advance(100_001)  # older than tombstone_max_age: all go, by an event
    head = h.runner.head
    h.handle(ReapRecords())
    assert len(h.state.reaped) == 0 and h.runner.head == head + 1
    h.handle(ReapRecords())
    assert h.runner.head == head + 1  # nothing left to bound: no event
    assert h.replayed() == h.state


def test_tombstone_bounds_are_checked():
    for bad in ({"tombstone_limit": -1}, {"tombstone_limit": 2.5},
                {"tombstone_max_age": "soon"}, {"tombstone_max_age": -1}):
        with pytest.raises(ValueError, match="tombstone_"):
            make_core(**bad)


def test_a_legacy_snapshot_and_legacy_reap_events_still_restore():
    """A snapshot written before the shared tombstones (bare records under ``reaped``) and
    a NodesReaped without bounds (the old fold's 20,000 cap) still read."""
    from cei_actors.provisioner import events as pev
    from cei_actors.provisioner.state import MAX_TOMBSTONES, ProvisionerState, apply_event

    data = ProvisionerState().to_data()
    del data["tombstones"]
    data["reaped"] = [{"node_id": "old", "state": "TERMINATED"}]
    state = ProvisionerState.from_data(data)
    assert state.reaped.get("old").record["state"] == "TERMINATED"
    apply_event(state, pev.NodesReaped([], 5.0))
    assert list(state.reaped) == ["old"] and MAX_TOMBSTONES == 20_000


def test_events_per_node_in_a_plain_lifecycle(h):
    head = h.runner.head
    ids = [f"n{i}" for i in range(50)]
    for nid in ids:
        h.ok(prov(f"L-{nid}", [nid]))
    h.drain()
    h.ok(TerminateNodes(ids))
    h.drain()
    per_node = (h.runner.head - head) / len(ids)
    assert per_node <= 3.05, per_node  # LaunchRequested, NodeLaunched, NodeTerminated (+ batch)


def test_query_timer_rearms_and_lists_each_account_once(h):
    h.handle(QuerySites())
    assert [w.kind for w in h.work] == ["list"] and "query" in h.timers
    h.handle(QuerySites())
    assert len(h.work) == 1  # a listing already in flight is not doubled


# ---------------------------------------------------------------------- stateful property test


class ProvisionerMachine(RuleBasedStateMachine):
    """Random provisions, terminations, cloud results, faults and crashes."""

    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        self.clock = FakeClock()
        self.h = Harness(clock=self.clock, seed=seed, snapshot_every=7, create_concurrency=3,
                         terminator_concurrency=2, disappear_grace=20.0)
        self.h.ok(AddSite("sim1", {**SIM_SITE, "boot_delay": [0, 4]}))
        self.h.ok(AddDeployableType("dt1", DT))
        self.n = 0
        self.ids: list[str] = []
        self.max_rank: dict[str, int] = {}
        self.terminated_early: set[str] = set()
        self.rng = random.Random(seed)

    @property
    def cloud(self):
        return self.h.worker.driver({"account": '["","sim1",null]', "definition":
                                     self.h.state.registry.sites[""]["sim1"],
                                     "credentials": None})

    @rule(k=st.integers(1, 3))
    def provision(self, k):
        ids = [f"n{self.n + i}" for i in range(k)]
        self.n += k
        self.ids += ids
        self.h.ok(prov(f"L{ids[0]}", ids))

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def provision_again(self, data):
        nid = data.draw(st.sampled_from(self.ids))
        node = self.h.state.nodes.get(nid)
        if node is not None and node.launch_id.startswith("L"):
            launch = self.h.state.launches.get(node.launch_id)
            if launch is not None:
                self.h.ok(prov(node.launch_id, launch.node_ids))

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), unknown=st.booleans())
    def terminate(self, data, unknown):
        ids = data.draw(st.lists(st.sampled_from(self.ids), min_size=1, max_size=3, unique=True))
        for nid in ids:
            node = self.h.state.nodes.get(nid)
            if node is not None and node.state == "REQUESTED" and not self._maybe_has_vm(nid):
                self.terminated_early.add(nid)
        if unknown:
            ids.append(f"u{self.n}")
            self.terminated_early.add(f"u{self.n}")
            self.n += 1
        self.h.ok(TerminateNodes(ids))

    def _maybe_has_vm(self, nid):
        v = self.h.state.volatile
        return nid in v.creating or nid in v.maybe_created

    @rule()
    def terminate_all(self):
        self.h.ok(TerminateAll())

    @rule()
    def enable(self):
        self.h.ok(Enable())

    @precondition(lambda self: self.h.work)
    @rule(data=st.data())
    def run_work(self, data):
        self.h.run_one(data.draw(st.integers(0, len(self.h.work) - 1)))

    @precondition(lambda self: self.h.work)
    @rule(data=st.data())
    def cloud_call_then_crash(self, data):
        """The cloud call happens; the actor dies before recording its result."""
        self.h.run_one(data.draw(st.integers(0, len(self.h.work) - 1)), deliver=False)
        self.h.crash()

    @rule()
    def crash(self):
        self.h.crash()

    @rule()
    def query(self):
        self.h.handle(QuerySites())

    @rule(dt=st.sampled_from([1.0, 5.0, 25.0]))
    def advance(self, dt):
        self.clock.advance(dt)
        self.h.handle(RetryWork())

    @rule(which=st.sampled_from(["kill", "vanish"]), data=st.data())
    def cloud_fault(self, which, data):
        live = [v for v in sim_vms(self.cloud) if v.status in ("pending", "running")]
        if live:
            getattr(self.cloud, which)(data.draw(st.sampled_from(live)).id)

    @rule(timeout=st.sampled_from([0.0, 0.5]), lose=st.sampled_from([0.0, 0.5]),
          full=st.sampled_from([None, 2]))
    def set_faults(self, timeout, lose, full):
        self.cloud.timeout_rate = timeout
        self.cloud.lose_reply_rate = lose
        self.cloud.max_instances = full

    @rule()
    def quiesce_and_check(self):
        """Faults off, everything run: no VM the log does not know, nothing stuck."""
        c = self.cloud
        c.timeout_rate = c.lose_reply_rate = 0.0
        c.max_instances = None
        for _ in range(4):
            self.h.drain()
            self.clock.advance(25.0)
            self.h.handle(RetryWork())
            self.h.reconcile()
        state = self.h.state
        for vm in sim_vms(c):
            if vm.status not in ("pending", "running"):
                continue
            nid = state.by_token.get(vm.client_token)
            assert nid is not None, f"zombie {vm.id} survived reconciliation"
            node = state.nodes[nid]
            assert node.iaas_id == vm.id and rank(node.state) < rank("TERMINATED"), (node, vm)
        for node in state.nodes.values():
            assert node.state not in ("TERMINATING",), node

    def teardown(self):
        if hasattr(self, "h"):
            self.quiesce_and_check()

    @invariant()
    def never_two_vms_per_node(self):
        if not hasattr(self, "h") or not self.h.worker.shared_drivers():
            return
        tokens = [v.client_token for v in sim_vms(self.cloud)]
        assert len(tokens) == len(set(tokens))
        for nid in self.terminated_early:
            node = self.h.state.nodes.get(nid)
            if node is not None and node.client_token:
                assert node.client_token not in tokens, f"{nid} was created after terminate"

    @invariant()
    def states_only_move_forward(self):
        if not hasattr(self, "h"):
            return
        for nid, node in self.h.state.nodes.items():
            r = rank(node.state)
            assert r >= self.max_rank.get(nid, 0), (nid, node.state)
            self.max_rank[nid] = r

    @invariant()
    def state_equals_replay(self):
        if hasattr(self, "h"):
            assert self.h.replayed() == self.h.state


ProvisionerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_provisioner_state_machine = ProvisionerMachine.TestCase


def test_core_config_is_checked():
    with pytest.raises(ValueError, match="unknown provisioner config key"):
        Provisioner.from_config({"query_intervall": 3})
    with pytest.raises(ValueError):
        Provisioner(client_token_prefix="")


def test_boot_queries_ask_only_about_booting_vms():
    h = Harness(boot_query_interval=1.0)
    h.ok(AddSite("sim1", {**SIM_SITE, "boot_delay": 3.0}))
    h.ok(AddDeployableType("dt1", DT))
    h.ok(prov("L1", ["n1", "n2"]))
    h.drain()
    assert "boot" in h.timers and states(h) == {"n1": "PENDING", "n2": "PENDING"}
    h.fire("boot")
    (work,) = h.work
    assert work.kind == "list" and sorted(work.payload["node_ids"]) == sorted(
        h.state.nodes[n].iaas_id for n in ("n1", "n2"))
    h.drain()
    assert states(h) == {"n1": "PENDING", "n2": "PENDING"} and "boot" in h.timers
    h.cloud().vanish(h.state.nodes["n2"].iaas_id)
    h.clock.advance(3.5)
    h.fire("boot")
    h.drain()
    assert states(h) == {"n1": "RUNNING", "n2": "PENDING"}  # absence in a boot query: no verdict
    h.clock.advance(31)
    h.reconcile()
    h.clock.advance(31)
    h.reconcile()
    assert h.state.nodes["n2"].state_desc == "NODE_DISAPPEARED"
    h.fire("boot")
    assert h.work == [] and "boot" not in h.timers  # nothing left booting


def test_listings_of_a_cloud_that_shares_unchanged_nodes_share_their_records():
    """RT4: the simulated cloud lists an unchanged VM as the same Node, so its record is built
    once and shared; a VM that changed gets a new record, equal to ``vm_record`` of its Node.
    A driver that does not say it shares Nodes gets records built at each listing."""
    from cei_actors.provisioner.cloud import vm_record
    from cei_actors.provisioner.drivers.simcloud import SimulatedCloudDriver

    clock = FakeClock()
    cloud = SimulatedCloudDriver(clock=clock, boot_delay=10.0)
    assert cloud.shares_listed_nodes
    for name in ("a", "b"):
        cloud.create_node(name, "t1.micro", "ami-1", ex_clienttoken=f"tok-{name}")

    def listing(worker):
        return worker.list({"account": "acct", "seq": 1, "definition": {"type": "sim"}}).vms

    worker = CloudWorker(clock=clock, driver_factory=lambda definition, creds: cloud)
    first, again = listing(worker), listing(worker)
    assert [r["state"] for r in first] == ["PENDING", "PENDING"]
    assert all(x is y for x, y in zip(first, again, strict=True))
    clock.t += 11  # both boot
    booted = listing(worker)
    assert [r["state"] for r in booted] == ["STARTED", "STARTED"] and booted[0] is not first[0]
    assert booted == [vm_record(n) for n in cloud.list_nodes()]

    class Fresh(SimulatedCloudDriver):
        shares_listed_nodes = False

    plain = Fresh(clock=clock)
    plain.create_node("c", "t1.micro", "ami-1")
    worker = CloudWorker(clock=clock, driver_factory=lambda definition, creds: plain)
    one, two = listing(worker), listing(worker)
    assert one == two and one[0] is not two[0]


def test_a_previewed_node_is_a_copy_of_every_field_with_its_own_history():
    """RT12: ``copy_node`` gives what ``copy.copy`` and a new ``state_changes`` list gave."""
    import copy
    import dataclasses

    from cei_actors.provisioner.state import Node, copy_node

    values = {f.name: f"v-{i}" for i, f in enumerate(dataclasses.fields(Node))}
    values.update(update_counter=7, requested_at=1.5, changed_at=2.5, state_changes=[["RUNNING", 2.5]])
    node = Node(**values)
    copied = copy_node(node)
    assert copied == copy.copy(node) and copied is not node
    assert copied.state_changes == node.state_changes and copied.state_changes is not node.state_changes
    copied.state_changes.append(["TERMINATED", 3.0])
    copied.state = "TERMINATED"
    assert node.state_changes == [["RUNNING", 2.5]] and node.state == "v-3"
