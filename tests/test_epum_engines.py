"""Decision engines: preserve_n, needy, sensor, overflow; loading and config validation."""

from __future__ import annotations

import pytest
from epum_harness import Sim, definition

from cei_actors.epum.engines import EngineConfigError, load_engine
from cei_actors.epum.engines.sensor import sample
from cei_actors.epum.messages import (
    AddDomain,
    AddDomainDefinition,
    DescribeDomain,
    ReconfigureDomain,
    RegisterNeed,
    SensorData,
)
from cei_actors.runtime.messages import ErrorReply, Ok


def domain(engine: str, conf: dict, **kw) -> Sim:
    s = Sim(**kw)
    s.send(AddDomainDefinition("def", definition(engine)))
    reply = s.send(AddDomain("d", "def", {"engine_conf": conf}))
    assert isinstance(reply, Ok), reply
    return s


def live(s: Sim) -> list:
    return [i for i in s.state.instances.values() if i.rank < 700]


def test_loader_by_name_and_dotted_path():
    assert load_engine("preserve_n").__name__ == "PreserveNEngine"
    assert load_engine("cei_actors.epum.engines.needy.NeedyEngine").__name__ == "NeedyEngine"
    assert load_engine("cei_actors.epum.engines.overflow:OverflowEngine").__name__ == "OverflowEngine"
    for bad in ("nope", "no.such.Module", "cei_actors.epum.logic.EPUM", "os.path"):
        with pytest.raises(EngineConfigError):
            load_engine(bad)


def test_preserve_n_scales_both_ways():
    s = domain("preserve_n", {"preserve_n": 4})
    s.run(20)
    assert s.running() == 4
    s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 1}}))
    s.run(10)
    assert s.running() == 1 and s.vms() == 1
    s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 0}}))
    s.run(10)
    assert s.vms() == 0


def test_preserve_n_uses_configured_site_and_type():
    s = domain("preserve_n", {"preserve_n": 1, "force_site": "ec2", "epuworker_type": "worker"})
    s.step()
    (inst,) = s.state.instances.values()
    assert (inst.site, inst.deployable_type) == ("ec2", "worker")
    assert inst.vars["node_id"] == inst.instance_id and inst.vars["heartbeat_dest"] == "epum"
    assert inst.vars["domain_id"] == inst.domain_id  # the VM's cei:domain tag


def test_needy_unique_values_are_handed_out_and_reused():
    s = domain("needy", {"preserve_n": 0, "unique_key": "slot", "unique_values": "a, b, c"})
    s.send(RegisterNeed("d", 2, []))
    s.run(20)
    assert sorted(i.extravars["slot"] for i in live(s)) == ["a", "b"]
    a = next(i for i in live(s) if i.extravars["slot"] == "a")
    s.prov.kill(a.instance_id)
    s.run(20)
    assert sorted(i.extravars["slot"] for i in live(s)) == ["a", "b"]  # "a" reused
    assert s.state.instances[a.instance_id].state == "TERMINATED"
    s.send(RegisterNeed("d", 5, []))
    s.run(20)
    assert sorted(i.extravars["slot"] for i in live(s)) == ["a", "b", "c"]  # none left
    assert s.running() == 3
    assert isinstance(s.send(AddDomain("e", "def", {"engine_conf": {"unique_values": ["x"]}})), ErrorReply)


def test_needy_takes_the_pd_domain_config_and_caps_the_need():
    s = domain("needy", {"preserve_n": 0, "maximum_vms": 2, "iaas_allocation": "small",
                         "provisioner_vars": {"slots": 4, "replicas": 1, "heartbeat": 30}})
    s.send(RegisterNeed("d", 5, []))
    s.run(20)
    assert s.running() == 2
    inst = live(s)[0]
    assert inst.allocation == "small" and inst.vars["slots"] == 4


def test_needy_kills_retirable_first():
    s = domain("needy", {"preserve_n": 4})
    s.run(20)
    ids = sorted(i.instance_id for i in live(s))
    s.send(RegisterNeed("d", 2, [ids[3], ids[1], "not-mine"]))
    s.step()
    assert {i.instance_id for i in live(s)} == {ids[0], ids[2]}


def sensor_conf(**kw):
    return {"minimum_vms": 1, "maximum_vms": 5, "metric": "load", "sensor_type": "message",
            "scale_up_threshold": 0.8, "scale_down_threshold": 0.2, "scale_up_n_vms": 2,
            "scale_down_n_vms": 1, "cooldown_period": 60, **kw}


def test_sensor_engine_scales_with_cooldown_and_still_replaces_failures():
    s = domain("sensor", sensor_conf())
    s.run(20)
    assert s.running() == 1
    s.send(SensorData("d", "load", {i.instance_id: 0.95 for i in live(s)}))
    s.run(20)
    assert s.running() == 3  # 1 + 2
    assert s.state.domains["default/d"].engine_state["target"] == 3
    s.send(SensorData("d", "load", {i.instance_id: 0.99 for i in live(s)}))
    s.run(10)
    assert s.running() == 3  # cooling down
    s.prov.kill(live(s)[0].instance_id)
    s.run(20)
    assert s.running() == 3  # replaced during the cooldown (the original did not)
    s.run(40)  # cooldown over; the replacement has no sample yet: average 0.66, stay
    assert s.running() == 3
    s.send(SensorData("d", "load", {i.instance_id: 0.99 for i in live(s)}))
    s.run(20)
    assert s.running() == 5  # 3 + 2 (the max)
    s.recover()  # target and cooldown are engine memory: they survive failover
    s.run(10)
    assert s.running() == 5 and s.state.domains["default/d"].engine_state["target"] == 5
    s.send(SensorData("d", "load", {}, domain_value=0.0))
    s.run(100)
    assert s.running() == 3  # down by one per cooldown (60 s)


def test_sensor_engine_with_simulated_sensor():
    steps = [[0, 0.5], [1100, 0.9]]
    s = domain("sensor", sensor_conf(sensor_type="simulated", sample_period=10, cooldown_period=0,
                                     sensor_config={"steps": steps, "per_instance": True}))
    s.run(60)
    assert s.running() == 1  # the clock starts at 1000: value 0.5, no scaling
    s.run(80)
    assert s.running() == 5
    data = s.send(DescribeDomain("d")).value["sensor_data"]["load"]
    assert set(data["values"].values()) == {0.9}


def test_sensor_config_validation():
    s = Sim()
    s.send(AddDomainDefinition("def", definition("sensor")))
    for conf, words in [
        (sensor_conf(minimum_vms=6), "minimum_vms"),
        (sensor_conf(scale_down_threshold=0.9), "scale_down_threshold"),
        (sensor_conf(sample_function="Median"), "sample_function"),
        (sensor_conf(sensor_type="no.such:Sensor"), "no.such"),
        ({k: v for k, v in sensor_conf().items() if k != "metric"}, "metric"),
    ]:
        reply = s.send(AddDomain("d", "def", {"engine_conf": conf}))
        assert isinstance(reply, ErrorReply) and words in reply.message, (conf, reply)


def test_sample_functions():
    data = {"values": {"a": 1.0, "b": 3.0}, "domain": 7.0}
    assert sample(data, ["a", "b", "c", "d"], "Average") == 1.0  # no-data instances pull it down
    assert sample(data, ["a", "b"], "Maximum") == 3.0
    assert sample(data, ["a", "b"], "Sum") == 4.0
    assert sample(data, ["x"], "Average") == 7.0  # the domain sample
    assert sample(None, ["a"], "Average") is None


CLOUDS = [{"site_name": "cheap", "size": 2, "rank": 1}, {"site_name": "dear", "size": 4, "rank": 2}]


def test_overflow_fills_by_rank_and_scales_down_from_highest():
    s = domain("overflow", {"clouds": CLOUDS, "preserve_n": 4})
    s.run(20)
    assert (s.running("cheap"), s.running("dear")) == (2, 2)
    s.send(ReconfigureDomain("d", {"engine_conf": {"preserve_n": 3}}))
    s.run(10)
    assert (s.running("cheap"), s.running("dear")) == (2, 1)
    lowered = [{**CLOUDS[0], "size": 1}, CLOUDS[1]]
    s.send(ReconfigureDomain("d", {"engine_conf": {"clouds": lowered}}))
    s.run(20)
    assert (s.running("cheap"), s.running("dear")) == (1, 2)


def test_overflow_backoff_and_detected_capacity_survive_failover():
    s = domain("overflow", {"clouds": CLOUDS, "preserve_n": 4, "capacity_failures": 3},
               quota={"cheap": 1})
    s.run(120)
    mem = s.state.domains["default/d"].engine_state["sites"]["cheap"]
    assert mem["capacity"] == 1
    assert (s.running("cheap"), s.running("dear")) == (1, 3)
    failures = sum(1 for i in s.state.instances.values() if i.state == "FAILED")
    # one failed before anything ran, three more at the plateau of 1 RUNNING: capacity 1;
    # the backoff spaced these retries out
    assert failures == 4
    s.recover()
    s.run(60)
    assert s.state.domains["default/d"].engine_state["sites"]["cheap"]["capacity"] == 1
    assert sum(1 for i in s.state.instances.values() if i.state == "FAILED") == failures
    assert (s.running("cheap"), s.running("dear")) == (1, 3)


def test_overflow_validation():
    s = Sim()
    s.send(AddDomainDefinition("def", definition("overflow")))
    for clouds in ([{"site_name": "a", "size": 1, "rank": 2}],
                   [{"site_name": "a", "size": 1, "rank": 1}, {"site_name": "a", "size": 1, "rank": 2}],
                   [{"site_name": "a", "size": -1, "rank": 1}], []):
        reply = s.send(AddDomain("d", "def", {"engine_conf": {"clouds": clouds, "preserve_n": 1}}))
        assert isinstance(reply, ErrorReply) and "clouds" in reply.message, reply


def test_pick_to_destroy_from_a_set_picks_as_from_the_launch_ordered_list():
    """RT5: the needy engines hand ``pick_to_destroy`` the valid ids as a set; they are put in
    launch order only when the random pick needs them, and the pick (retirable first, then the
    seeded sample) is the one the ordered list gives."""
    import random
    from types import SimpleNamespace

    from cei_actors.epum.engines.base import State, pick_to_destroy

    ids = [f"i{k:02d}" for k in range(30)]
    seqs = list(range(30))
    random.Random(3).shuffle(seqs)  # launch order differs from the ids' order
    instances = {i: SimpleNamespace(seq=s) for i, s in zip(ids, seqs, strict=True)}
    dom = SimpleNamespace(by_state={"RUNNING": set(ids[:20]), "PENDING": set(ids[20:25]), "TERMINATED": set(ids[25:])},
                          instances=set(ids))
    state = State(dom, instances, 0.0)
    assert state.valid_id_set() == set(ids[:25])
    ordered = state.valid_ids()
    assert ordered == sorted(ids[:25], key=lambda i: instances[i].seq)
    orderings = []
    real = state.in_launch_order
    state.in_launch_order = lambda got: orderings.append(1) or real(got)
    for n, first in ((3, ["i03", "i27", "i05", "i07"]), (6, ["i03", "i27"]), (25, []), (40, ["i01"])):
        picks = []
        for candidates in (ordered, state.valid_id_set()):
            control = SimpleNamespace(rng=random.Random(n))
            picks.append(pick_to_destroy(control, state, candidates, n, first))
        assert picks[0] == picks[1], (n, first)
    assert len(orderings) == 3  # not for the pick that the retirable ids cover
