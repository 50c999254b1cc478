"""EPUM's pure core: domains, definitions, instance records, needs, notifications, replay."""

from __future__ import annotations

import logging

import pytest
from epum_harness import Sim, definition
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cei_actors.epum.events import InstanceDestroyRequested, InstanceLaunchRequested
from cei_actors.epum.logic import EPUM
from cei_actors.epum.messages import (
    AddDomain,
    AddDomainDefinition,
    DeciderPass,
    DescribeDomain,
    DescribeDomainDefinition,
    ListDomainDefinitions,
    ListDomains,
    ReconfigureDomain,
    RegisterNeed,
    RemoveDomain,
    RemoveDomainDefinition,
    SubscribeDomain,
    UpdateDomainDefinition,
)
from cei_actors.epum.state import restore, snapshot
from cei_actors.provisioner.messages import DumpState, NodeStateChanged, Provision
from cei_actors.runtime.core import Send
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.runtime.runner import replay


def sim_with(n: int = 2, engine: str = "preserve_n", **kw) -> Sim:
    s = Sim(**kw)
    assert s.send(AddDomainDefinition("def", definition(engine))) == Ok("def")
    assert isinstance(s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": n}}, subscriber="pd")), Ok)
    return s


def err(reply) -> tuple[str, str]:
    assert isinstance(reply, ErrorReply), reply
    return reply.code, reply.message


def events_of(s: Sim, cls) -> list:
    decode = s.runner.component.registry.from_record
    return [e for e in map(decode, s.runner.log.read("epum", 1)) if isinstance(e, cls)]


def test_definitions_lifecycle():
    s = Sim()
    assert s.send(AddDomainDefinition("a", definition("needy"))) == Ok("a")
    assert err(s.send(AddDomainDefinition("a", definition())))[0] == "conflict"
    d = s.send(DescribeDomainDefinition("a")).value
    assert d["name"] == "a" and "PD" in d["documentation"]
    assert s.send(ListDomainDefinitions()) == Ok(["a"])
    assert s.send(UpdateDomainDefinition("a", definition("sensor"))) == Ok("a")
    assert s.send(RemoveDomainDefinition("a")) == Ok("a")
    assert err(s.send(DescribeDomainDefinition("a")))[0] == "not_found"
    code, msg = err(s.send(AddDomainDefinition("b", definition("no.such.Engine"))))
    assert code == "bad_request" and "no.such.Engine" in msg
    code, msg = err(s.send(AddDomainDefinition("c", {"general": {}, "bogus": {}})))
    assert code == "bad_request" and "bogus" in msg


def test_add_domain_merges_sections_and_validates():
    s = Sim()
    s.send(AddDomainDefinition("def", {"general": {"engine_class": "preserve_n"},
                                       "engine_conf": {"preserve_n": 1, "site": "ec2"},
                                       "health": {"boot_timeout": 50}}))
    v = s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": 4}, "health": {"monitor_health": True}})).value
    assert v["config"]["engine_conf"] == {"preserve_n": 4, "site": "ec2"}
    assert v["config"]["health"] == {"boot_timeout": 50, "monitor_health": True}
    code, msg = err(s.send(AddDomain("e", "def", {"engine_conf": {"preserve_n": 1, "colour": "red"}})))
    assert code == "bad_request" and "unknown key(s) colour" in msg
    s.send(AddDomainDefinition("bare", definition()))
    code, msg = err(s.send(AddDomain("e", "bare", {})))
    assert code == "bad_request" and "missing required key(s) preserve_n" in msg
    code, msg = err(s.send(AddDomain("e", "bare", {"engine_conf": {"preserve_n": -1}})))
    assert code == "bad_request" and "preserve_n" in msg
    code, msg = err(s.send(AddDomain("e", "bare", {"engine_conf": {"preserve_n": 1}, "health": {"boot_timeout": "x"}})))
    assert code == "bad_request" and "boot_timeout" in msg
    assert err(s.send(AddDomain("e", "nodef", {})))[0] == "not_found"
    assert err(s.send(AddDomain("d", "def", {})))[0] == "conflict"
    assert err(s.send(AddDomain("a/b", "def", {})))[0] == "bad_request"
    assert s.send(ListDomains()) == Ok(["d"])


def test_domains_are_isolated_per_caller():
    s = sim_with(1)
    assert s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": 2}}, caller="alice")).value["domain_id"] == "d"
    assert s.send(ListDomains("alice")) == Ok(["d"])
    assert s.send(ListDomains("bob")) == Ok([])
    assert err(s.send(DescribeDomain("d", "bob")))[0] == "not_found"
    assert err(s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 0}}, "bob")))[0] == "not_found"
    assert err(s.send(RemoveDomain("d", "bob")))[0] == "not_found"
    s.run(20)
    assert s.send(DescribeDomain("d", "alice")).value["counts"] == {"RUNNING": 2}
    assert s.send(DescribeDomain("d")).value["counts"] == {"RUNNING": 1}
    assert s.vms() == 3


def test_reconfigure_rules():
    s = sim_with(1)
    code, msg = err(s.send(ReconfigureDomain("d", {"general": {"engine_class": "needy"}})))
    assert code == "bad_request" and "engine_class" in msg
    code, msg = err(s.send(ReconfigureDomain("d", {"engine_conf": {"site": "elsewhere"}})))
    assert code == "bad_request" and "cannot be reconfigured" in msg
    code, msg = err(s.send(ReconfigureDomain("d", {"engine_conf": {"nope": 1}})))
    assert code == "bad_request" and "nope" in msg
    assert err(s.send(ReconfigureDomain("zz", {})))[0] == "not_found"
    assert s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 3}})).value["config_version"] == 2
    s.run(20)
    assert s.running() == 3
    assert s.state.domains["default/d"].applied_version == 2


def test_remove_drains_then_disappears():
    s = sim_with(3)
    s.run(20)
    assert s.send(RemoveDomain("d")) == Ok({"domain_id": "d", "removing": True})
    assert s.send(RemoveDomain("d")) == Ok({"domain_id": "d", "removing": True})
    assert err(s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 1}})))[0] == "conflict"
    assert err(s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": 1}})))[0] == "conflict"
    s.step()
    assert s.send(ListDomains()) == Ok(["d"])  # still draining
    s.run(15)
    assert s.send(ListDomains()) == Ok([]) and s.vms() == 0
    assert s.state.instances == {} and not s.state.open_terminations
    assert s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": 1}})).value["domain_id"] == "d"


def test_instance_updates_ordering(caplog):
    s = sim_with(1)
    s.run(20)
    iid = next(iter(s.state.instances))
    inst = s.state.instances[iid]
    assert inst.state == "RUNNING"
    head, counter = s.runner.head, inst.update_counter
    base = s.prov.nodes[iid].record()
    caplog.set_level(logging.DEBUG, "cei_actors.epum")
    for node in [
        {**base, "state": "PENDING", "update_counter": counter + 5},  # older state
        {**base, "update_counter": counter},  # duplicate
        {**base, "update_counter": counter - 1},  # stale
        {**base, "node_id": "i-unknown"},  # unknown instance
        {**base, "state": "SMASHED"},  # malformed
        {"node_id": iid},  # malformed
    ]:
        assert s.send(NodeStateChanged(node)) is None
    assert s.runner.head == head
    assert "unknown instance i-unknown" in caplog.text and "malformed" in caplog.text
    s.send(NodeStateChanged({**base, "update_counter": counter + 1, "hostname": "new"}))
    assert s.runner.head == head + 1 and s.state.instances[iid].properties["hostname"] == "new"


def test_subscribers_hear_running_and_every_loss():
    s = sim_with(2)
    s.send(SubscribeDomain("d", "watcher"))
    s.run(20)
    assert [m.state for m in s.inbox["pd"]] == ["RUNNING", "RUNNING"]
    assert [m.state for m in s.inbox["watcher"]] == ["RUNNING", "RUNNING"]
    victim = s.inbox["pd"][0].node_id
    node = s.prov.nodes[victim]
    s.prov._move(node, "FAILED", "IAAS_PROBLEM")  # e.g. a FAILED report: loss too
    s.deliver()
    assert s.inbox["pd"][-1].state == "FAILED" and s.inbox["pd"][-1].node_id == victim
    assert s.inbox["pd"][-1].domain_id == "d" and "hostname" in s.inbox["pd"][-1].properties


def test_register_need_is_level_based_and_retires_first():
    s = Sim()
    s.send(AddDomainDefinition("pd", definition("needy")))
    s.send(AddDomain("pd_domain_e", "pd", {}, subscriber="pd"))
    assert s.send(RegisterNeed("pd_domain_e", 3, [])) == Ok({"domain_id": "pd_domain_e", "count": 3})
    head = s.runner.head
    assert s.send(RegisterNeed("pd_domain_e", 3, [])).value["count"] == 3
    assert s.runner.head == head  # same level: nothing written
    s.run(20)
    assert s.running() == 3
    newest = max(s.state.instances.values(), key=lambda i: i.seq).instance_id
    s.send(RegisterNeed("pd_domain_e", 2, [newest]))
    s.step()
    assert s.state.instances[newest].state == "TERMINATING"
    assert err(s.send(RegisterNeed("nope", 1, [])))[0] == "not_found"
    s.send(AddDomainDefinition("plain", definition()))
    s.send(AddDomain("p", "plain", {"engine_conf": {"preserve_n": 0}}))
    code, msg = err(s.send(RegisterNeed("p", 1, ["x"])))
    assert code == "bad_request" and "does not take needs" in msg


def test_engine_failure_is_contained_to_its_domain():
    s = Sim()
    s.send(AddDomainDefinition("bad", definition("epum_harness:BrokenEngine")))
    s.send(AddDomainDefinition("good", definition()))
    s.send(AddDomain("b", "bad", {"engine_conf": {"preserve_n": 1, "broken": True}}))
    s.send(AddDomain("g", "good", {"engine_conf": {"preserve_n": 2}}))
    s.run(30)
    assert s.running() == 2
    desc = s.send(DescribeDomain("b")).value
    assert desc["engine_error"] == "RuntimeError: engine exploded" and desc["counts"] == {}
    from cei_actors.epum.events import EngineFailed

    assert len(events_of(s, EngineFailed)) == 1  # recorded once, not every pass
    s.send(ReconfigureDomain("b", {"engine_conf": {"broken": False}}))
    s.run(20)
    assert s.running() == 3 and s.send(DescribeDomain("b")).value["engine_error"] is None


def test_engine_memory_survives_failover():
    s = Sim()
    s.send(AddDomainDefinition("c", definition("epum_harness:CountingEngine")))
    s.send(AddDomain("d", "c", {}))
    s.step()
    assert s.state.domains["default/d"].engine_state == {"decides": 1}
    s.recover()
    s.step()
    assert s.state.domains["default/d"].engine_state == {"decides": 2}


def test_unacknowledged_launches_are_resent_not_redecided():
    s = sim_with(0)
    s.prov.handle = lambda msg: None  # the Provisioner is deaf for now
    s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 2}}))
    d = s.runner.handle(DeciderPass())
    assert sum(isinstance(e, Send) and isinstance(e.message, Provision) for e in d.effects) == 2
    s.clock.t += 1
    d = s.runner.handle(DeciderPass())
    assert d.effects == [] and d.events == []  # nothing dirty, not yet time to resend
    s.clock.t += 5
    d = s.runner.handle(DeciderPass())
    assert sum(isinstance(e.message, Provision) for e in d.effects) == 2 and d.events == []
    s.recover()  # a new leader resends at once, decides nothing new
    d = s.runner.handle(DeciderPass())
    assert sum(isinstance(e.message, Provision) for e in d.effects) == 2
    assert len(events_of(s, InstanceLaunchRequested)) == 2


def test_pass_decides_only_dirty_domains():
    s = Sim()
    s.send(AddDomainDefinition("def", definition()))
    for i in range(20):
        s.send(AddDomain(f"d{i}", "def", {"engine_conf": {"preserve_n": 1}}))
    s.run(20)
    assert s.running() == 20
    assert s.send(DeciderPass()) == Ok({"decided": 0})
    s.prov.kill(next(iter(s.prov.live_vms())).node_id)
    s.deliver()
    assert s.send(DeciderPass()) == Ok({"decided": 1})


def test_state_equals_replay_and_snapshot_roundtrip():
    s = sim_with(3)
    s.send(AddDomain("x", "def", {"engine_conf": {"preserve_n": 2}}, caller="alice"))
    s.run(20)
    s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 1}}))
    s.run(10)
    s.send(RemoveDomain("x", "alice"))
    s.step()
    rebuilt = replay(EPUM(), s.runner.log, "epum")
    assert rebuilt == s.state
    import msgpack

    data = msgpack.unpackb(msgpack.packb(snapshot(s.state)), strict_map_key=False)
    assert restore(data) == s.state
    assert len(events_of(s, InstanceDestroyRequested)) >= 2


def test_initial_definitions_and_domains_from_config():
    cfg = {"initial_definitions": {"def": definition()},
           "initial_domains": {"boot": {"definition": "def", "config": {"engine_conf": {"preserve_n": 2}}},
                               "broken": {"definition": "missing"}}}
    s = Sim(config=cfg)
    s.run(20)
    assert s.send(ListDomains()) == Ok(["boot"]) and s.running() == 2
    s.send(RemoveDomain("boot"))
    s.run(10)
    s.recover()
    s.run(10)
    assert s.send(ListDomains()) == Ok(["boot"])  # as the original: recreated at start


def test_reaper_forgets_old_finished_records():
    s = sim_with(2, config={"record_reaping_max_age": 100})
    s.run(20)
    victim = next(iter(s.state.instances))
    s.prov.kill(victim)
    s.run(20)
    from cei_actors.epum.messages import ReapPass

    s.send(ReapPass())
    assert victim in s.state.instances  # not old enough yet
    s.clock.t += 101
    s.send(ReapPass())
    assert victim not in s.state.instances and len(s.state.instances) == 2
    assert victim not in s.state.domains["default/d"].instances
    assert replay(EPUM(), s.runner.log, "epum") == s.state


def test_recovery_from_a_snapshot(tmp_path):
    import random

    from epum_harness import Clock

    from cei_actors.eventlog import open_log
    from cei_actors.runtime.runner import Runner

    clock = Clock()
    url = f"sqlite:///{tmp_path}/epum.db"
    r = Runner(EPUM(timers=False), open_log(url), clock=clock, rng=random.Random(5), snapshot_every=3)
    r.recover()
    r.handle(AddDomainDefinition("def", definition()))
    r.handle(AddDomain("d", "def", {"engine_conf": {"preserve_n": 2}}))
    d = r.handle(DeciderPass())
    for e in d.effects:
        if isinstance(e.message, Provision):
            r.handle(NodeStateChanged({"node_id": e.message.node_ids[0], "state": "RUNNING", "update_counter": 1}))
    assert r.log.load_snapshot("epum") is not None
    again = Runner(EPUM(timers=False), open_log(url), clock=clock, rng=random.Random(6))
    again.recover()
    assert again.state == r.state and again.head == r.head


def test_subscribe_answers_with_the_current_node_states():
    s = sim_with(2)
    s.run(20)
    first, second = (m.node_id for m in s.inbox["pd"])
    s.prov.kill(first)
    s.deliver()
    assert s.state.instances[first].state == "TERMINATED"
    s.inbox.clear()
    head = s.runner.head
    # a subscriber naming the nodes it holds hears the loss of the ones it named, and nothing
    # of a running one it holds (SC3)
    assert s.send(SubscribeDomain("d", "pd", known=[first, second, "i-unknown"])) == Ok(["pd"])
    assert [(m.node_id, m.state) for m in s.inbox["pd"]] == [(first, "TERMINATED")]
    assert s.runner.head == head  # a repeat subscription writes nothing
    assert s.send(SubscribeDomain("d", "pd", known=[second])) == Ok(["pd"])
    assert s.inbox["pd"][1:] == []
    # one that does not name a running node hears it is RUNNING
    assert s.send(SubscribeDomain("d", "pd", known=[])) == Ok(["pd"])
    assert [(m.node_id, m.state) for m in s.inbox["pd"][1:]] == [(second, "RUNNING")]
    # a new subscriber without ``known``: every loss still on record
    s.send(SubscribeDomain("d", "late"))
    assert [(m.node_id, m.state) for m in s.inbox["late"]] == [(second, "RUNNING"), (first, "TERMINATED")]
    assert s.inbox["late"][0].domain_id == "d" and "hostname" in s.inbox["late"][0].properties


def test_an_instance_the_provisioner_no_longer_knows_is_replaced():
    """The Provisioner lost its record of a running node (a new log, or reaped past its
    tombstones): asked after it, it answers UNKNOWN_NODE, and EPUM replaces the instance
    instead of asking forever."""
    s = sim_with(1, config={"refresh_interval": 60.0})
    s.run(20)
    (iid,) = s.state.instances
    assert s.state.instances[iid].state == "RUNNING"
    del s.prov.nodes[iid]  # forgotten, without a word to EPUM
    s.run(40)
    assert s.state.instances[iid].state == "RUNNING"
    s.run(30)  # past refresh_interval: a DumpState, answered UNKNOWN_NODE
    inst = s.state.instances[iid]
    assert inst.state == "TERMINATED" and inst.properties["state_desc"] == "UNKNOWN_NODE"
    s.run(20)
    assert s.running() == 1 and len(s.state.instances) == 2


def test_live_instances_unchanged_for_a_while_are_asked_for_again():
    s = sim_with(1, config={"refresh_interval": 60.0})
    s.run(20)
    (iid,) = s.state.instances
    assert s.state.instances[iid].state == "RUNNING"
    s.prov.kill(iid)
    s.prov.outbox.clear()  # the Provisioner's TERMINATED is lost
    head = s.runner.head
    s.run(40)
    assert s.state.instances[iid].state == "RUNNING" and s.runner.head == head
    s.run(30)  # past refresh_interval: a DumpState, answered TERMINATED; a replacement
    assert s.state.instances[iid].state == "TERMINATED"
    s.run(20)
    assert s.running() == 1 and len(s.state.instances) == 2


def test_a_refresh_names_the_counters_held_and_hears_only_news():
    """Decision SC2: EPUM's refresh sends the update counters it holds; the Provisioner
    answers only records that changed since, so an unchanged pool costs no notices."""
    s = sim_with(2, config={"refresh_interval": 60.0})
    s.run(20)
    assert s.running() == 2
    asked: list[tuple[DumpState, int]] = []  # (request, notices it brought)
    real = s.prov.handle

    def handle(msg):
        before = len(s.prov.outbox)
        real(msg)
        if isinstance(msg, DumpState):
            asked.append((msg, len(s.prov.outbox) - before))

    s.prov.handle = handle
    s.run(80)  # past refresh_interval: both are asked for, and nothing comes back
    assert asked and all(m.counters == [s.state.instances[i].update_counter for i in m.node_ids]
                         for m, _ in asked)
    assert sorted(i for m, _ in asked for i in m.node_ids) == sorted(s.state.instances)
    assert [n for _, n in asked] == [0] * len(asked)
    victim = next(iter(s.state.instances))
    s.prov.kill(victim)
    s.prov.outbox.clear()  # its TERMINATED is lost; the next refresh brings it
    s.run(80)
    assert s.state.instances[victim].state == "TERMINATED"


def test_a_new_provisioner_leader_is_asked_for_every_live_instance_at_once():
    """Decision H4: a Provisioner leader that died between recording TERMINATED and telling
    EPUM lost that notice; its successor's ``Hello`` makes EPUM ask at once, long before the
    refresh interval."""
    from cei_actors.epum.messages import ProvisionerLeads

    s = sim_with(2, config={"refresh_interval": 600.0})
    s.run(20)
    first, second = sorted(s.state.instances)
    s.prov.kill(first)
    s.prov.outbox.clear()  # the old leader's TERMINATED is lost with it
    s.run(5)
    assert s.state.instances[first].state == "RUNNING"
    head = s.runner.head
    decision = s.runner.handle(ProvisionerLeads())
    asked = sorted(i for e in decision.effects if isinstance(e, Send) for i in e.message.node_ids)
    assert asked == [first, second] and s.runner.head == head
    s.perform(decision.effects)
    s.deliver()
    assert s.state.instances[first].state == "TERMINATED"
    s.run(20)
    assert s.running() == 2


# ---- bounded state: tombstones of forgotten instances and removed domains (decision E5) -----


def _reaped_victim(s: Sim, **config):
    from cei_actors.epum.messages import ReapPass

    s.run(20)
    victim = next(iter(s.state.instances))
    s.prov.kill(victim)
    s.run(20)
    last = s.state.instances[victim].describe()
    s.clock.t += 101
    s.send(ReapPass())
    assert victim not in s.state.instances and victim in s.state.forgotten
    return victim, last


def test_a_forgotten_instance_is_answered_from_its_tombstone(caplog):
    """After the reaper forgot an instance: a late node state of it writes nothing and never
    brings it back; a heartbeat from it is dropped (a zombie: the Provisioner's listing
    destroys it); a subscriber that still holds it hears its end; snapshots keep it."""
    from cei_actors.epum.messages import NodeHeartbeat, SubscribeDomain

    s = sim_with(2, config={"record_reaping_max_age": 100})
    victim, last = _reaped_victim(s)
    assert last["state"] in ("TERMINATED", "FAILED")
    head = s.runner.head
    caplog.set_level(logging.INFO, logger="cei_actors.epum.logic")
    late = {"node_id": victim, "state": "RUNNING", "update_counter": 99}
    s.send(NodeStateChanged(late))
    s.send(NodeHeartbeat(victim, "OK", s.clock.t))
    assert victim not in s.state.instances and s.runner.head == head
    assert "forgotten instance" in caplog.text
    s.inbox.clear()
    assert isinstance(s.send(SubscribeDomain("d", "pd", known=[victim, "never"])), Ok)
    ends = [m for m in s.inbox["pd"] if m.node_id == victim]
    assert [(m.state, m.domain_id) for m in ends] == [(last["state"], "d")]
    assert restore(snapshot(s.state)) == s.state
    assert replay(EPUM(), s.runner.log, "epum") == s.state
    assert s.state.forgotten.get(victim).record["owner"] == "default"


def test_epum_tombstones_are_bounded_by_config_and_replay_without_it():
    from cei_actors.epum.messages import ReapPass

    s = sim_with(2, config={"record_reaping_max_age": 100, "tombstone_max_age": 50})
    victim, _ = _reaped_victim(s)
    s.clock.t += 51
    s.send(ReapPass())
    assert victim not in s.state.forgotten
    assert replay(EPUM(), s.runner.log, "epum") == s.state  # default config, same map
    for bad in ({"tombstone_limit": -1}, {"tombstone_max_age": "later"}):
        with pytest.raises(ValueError, match="epum config: tombstone_"):
            EPUM(bad)


def test_a_removed_domain_leaves_tombstones():
    s = sim_with(2)
    s.run(20)
    ids = set(s.state.instances)
    s.send(RemoveDomain("d"))
    s.run(20)
    assert s.state.domains == {} and s.state.instances == {}
    assert ids <= set(s.state.forgotten) and "default/d" in s.state.removed
    code, msg = err(s.send(DescribeDomain("d")))
    assert code == "not_found" and "removed at" in msg
    assert err(s.send(DescribeDomain("other")))[1] == "no domain 'other'"
    assert replay(EPUM(), s.runner.log, "epum") == s.state
    assert restore(snapshot(s.state)) == s.state
    assert s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": 1}})).value["domain_id"] == "d"
    assert "default/d" not in s.state.removed


def test_an_epum_snapshot_and_reap_events_from_before_tombstones_still_restore():
    from cei_actors.epum.events import InstancesReaped
    from cei_actors.epum.state import apply

    s = sim_with(2)
    s.run(20)
    data = snapshot(s.state)
    del data["forgotten"], data["removed_domains"]
    state = restore(data)
    assert state == s.state and len(state.forgotten) == 0
    iid = next(iter(state.instances))
    apply(state, InstancesReaped([iid]))  # an event written before tombstones: no time
    assert state.forgotten.get(iid).forgotten_at == state.forgotten.get(iid).ended_at


def test_launches_that_keep_failing_back_off_and_say_why():
    """A domain whose launches all fail (a full site) retries the first round at once, then
    after 2, 4, 8 ... s (capped), recorded as events so a new leader keeps the schedule;
    describe says why and when; a launch that runs ends it; a reconfigure clears it (OP2)."""
    from cei_actors.epum.events import LaunchBackoff

    s = sim_with(2, quota={"local": 0}, config={"launch_backoff_max": 8.0})
    launches = []
    for _ in range(60):  # 60 s in 1 s decider passes
        s.step(1.0)
        launches.append(len(events_of(s, InstanceLaunchRequested)))
    # without a backoff: two launches a second (120); with it: rounds at 0, 0, +2, +4, +8, +8 ...
    assert launches[-1] <= 2 * 12, launches
    backoffs = [e for e in events_of(s, LaunchBackoff) if e.failures]
    assert [e.failures for e in backoffs][:4] == [1, 2, 3, 4]
    gaps = [b.retry_at - b.at for b in backoffs]
    assert gaps[:4] == [0.0, 2.0, 4.0, 8.0] and max(gaps) == 8.0
    desc = s.send(DescribeDomain("d")).value
    (held,) = desc["launch_backoff"]
    assert held["site"] == "local" and held["failures"] == backoffs[-1].failures
    assert held["retry_at"] > s.clock.t - 8 and "IAAS_FULL" in held["last_error"]
    # a new leader keeps the backoff (it is state, from events)
    s.recover()
    assert s.send(DescribeDomain("d")).value["launch_backoff"] == desc["launch_backoff"]
    # the site has room again: the next round runs, the backoff ends
    s.prov.quota = {}
    s.run(30, dt=1.0)
    assert s.running() == 2
    assert s.send(DescribeDomain("d")).value["launch_backoff"] == []
    assert events_of(s, LaunchBackoff)[-1].failures == 0


def test_a_reconfigure_clears_the_launch_backoff():
    s = sim_with(1, quota={"local": 0}, config={"launch_backoff_max": 300.0})
    s.run(40, dt=1.0)
    assert s.send(DescribeDomain("d")).value["launch_backoff"][0]["failures"] >= 3
    before = len(events_of(s, InstanceLaunchRequested))
    s.prov.quota = {}
    s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 2}}))
    assert s.send(DescribeDomain("d")).value["launch_backoff"] == []
    s.step(1.0)
    assert len(events_of(s, InstanceLaunchRequested)) == before + 2


# ---- RT3: the refresh looks only at instances not asked for within an interval -------------


def _old_refresh(state, vol, now, gap, below):
    """The refresh before RT3 (SC7's one pass over every live instance), on its own ``vol``:
    the stale ids it asks for, sorted."""
    if gap <= 0 or now < vol["refresh_at"]:
        return []
    vol["refresh_at"] = now + gap / 4
    kept, stale = {}, []
    for dom in state.domains.values():
        for s in below:
            for i in dom.by_state.get(s, ()):
                if i in state.open_launches:
                    continue
                at = vol["refreshed"].get(i)
                if at is not None:
                    kept[i] = at
                seen = state.instances[i].state_time
                if now - (seen if at is None or at < seen else at) >= gap:
                    stale.append(i)
    stale.sort()
    vol["refreshed"] = kept
    for i in stale:
        kept[i] = now
    return stale


@settings(max_examples=150, deadline=None)
@example([("wait", 8, 0), ("ask_all", 0, 0), ("open", 1, 0), ("wait", 4, 0), ("close", 1, 0), ("wait", 8, 0)],
         60.0)  # an ask forgotten while its launch was open no longer hides the instance
@example([("wait", 8, 0), ("ask_all", 0, 0), ("wait", 16, 0)], 60.0)  # stale exactly an interval after the ask
@given(st.lists(st.tuples(st.sampled_from(["wait", "news", "end", "open", "close", "new", "ask_all"]),
                          st.integers(0, 40), st.integers(0, 9)), max_size=80),
       st.sampled_from([60.0, 0.7, 13.0]))
def test_the_refresh_asks_for_what_the_pass_over_every_instance_asked_for(ops, gap):
    """RT3 against the code before it: the same asks (ids and counters) at every refresh,
    through news, ends, open launches, new instances and asks of every live instance (a
    recovery, a new Provisioner leader), with time moving by odd fractions of the interval."""
    from types import SimpleNamespace

    from cei_actors.epum.logic import _BELOW_TERMINATED, R_TERMINATED, _Pass
    from cei_actors.epum.state import Volatile
    from cei_actors.runtime.core import Context

    epum = EPUM(refresh_interval=gap)
    live_states = ["RUNNING", "PENDING", "REQUESTED"]
    state = SimpleNamespace(domains={"a": SimpleNamespace(by_state={}), "b": SimpleNamespace(by_state={})},
                            instances={}, open_launches=set(), vol=Volatile(refresh_at=gap / 4))
    old = {"refresh_at": gap / 4, "refreshed": {}}
    now, n = 0.0, 0

    def add(now):
        nonlocal n
        iid = f"i{n:03d}"
        dom = state.domains["ab"[n % 2]]
        dom.by_state.setdefault(live_states[n % 3], set()).add(iid)
        state.instances[iid] = SimpleNamespace(instance_id=iid, state_time=now, update_counter=n, rank=0,
                                               dom=dom, state=live_states[n % 3])
        n += 1

    for _ in range(6):
        add(now)
    for op, k, j in ops:
        ids = sorted(state.instances)
        pick = ids[(k * 7 + j) % len(ids)] if ids else None
        inst = state.instances.get(pick)
        if op == "wait":
            now += gap * k / 16 + j * 0.001
        elif op == "news" and inst is not None:
            inst.state_time = now
            inst.update_counter += 1
        elif op == "end" and inst is not None and inst.rank == 0:
            inst.dom.by_state[inst.state].discard(pick)
            inst.rank = R_TERMINATED
        elif op == "open" and pick is not None:
            state.open_launches.add(pick)
        elif op == "close":
            state.open_launches.discard(pick)
        elif op == "new":
            add(now)
        elif op == "ask_all":  # what a recovery or a new Provisioner leader does
            live = sorted(i for i, x in state.instances.items() if x.rank == 0 and i not in state.open_launches)
            epum._ask_every_live(state, now)
            old["refreshed"].update(dict.fromkeys(live, now))
        out = _Pass()
        epum._refresh(state, Context(now, None), out)
        asked = [(e.message.node_ids, e.message.counters) for e in out.effects]
        stale = _old_refresh(state, old, now, gap, _BELOW_TERMINATED)
        expected = [(stale[i:i + 1000], [state.instances[x].update_counter for x in stale[i:i + 1000]])
                    for i in range(0, len(stale), 1000)]
        assert asked == expected, (op, now)
        assert state.vol.refreshed == old["refreshed"]
        assert state.vol.refresh_at == old["refresh_at"]
