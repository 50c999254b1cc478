"""Health: heartbeats, the doctor's rules, the probe before MISSING, failover timing, zombies."""

from __future__ import annotations

import logging

from epum_harness import Sim, definition

from cei_actors.epum.health import doctor_check, on_heartbeat
from cei_actors.epum.messages import (
    AddDomain,
    AddDomainDefinition,
    DoctorPass,
    HealthProbe,
    NodeHeartbeat,
)
from cei_actors.epum.state import Instance
from cei_actors.provisioner.messages import DumpState
from cei_actors.runtime.messages import ErrorReply

HEALTH = {"monitor_health": True, "boot_timeout": 30, "missing_timeout": 20,
          "really_missing_timeout": 10, "zombie_seconds": 30}


def monitored(n: int = 1, health: dict | None = None) -> Sim:
    s = Sim()
    s.send(AddDomainDefinition("def", definition()))
    s.send(AddDomain("d", "def", {"engine_conf": {"preserve_n": n}, "health": health or HEALTH}))
    s.run(15)
    assert s.running() == n
    return s


def beat(s: Sim, iid: str, state: str = "OK", **kw) -> None:
    s.send(NodeHeartbeat(iid, state, s.clock.t, agent=f"agent:{iid}", **kw))


def first(s: Sim):
    return min(s.state.instances.values(), key=lambda i: i.seq)


def test_malformed_and_unknown_heartbeats(caplog):
    s = monitored()
    head = s.runner.head
    for bad in [NodeHeartbeat("n", "FINE", 1.0), NodeHeartbeat("n", "OK", "soon"), NodeHeartbeat("", "OK", 1.0)]:
        reply = s.send(bad)
        assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
    caplog.set_level(logging.INFO, "cei_actors.epum")
    s.send(NodeHeartbeat("i-nobody", "OK", 1.0))
    assert "unknown node i-nobody" in caplog.text
    assert s.runner.head == head


def test_heartbeats_ignored_without_monitoring():
    s = monitored(health={"monitor_health": False})
    iid = first(s).instance_id
    beat(s, iid, "PROCESS_ERROR", failed_processes=["p1"])
    assert first(s).health == "UNKNOWN"
    s.run(200, doctor=True)
    assert first(s).instance_id == iid and first(s).health == "UNKNOWN"


def test_never_heard_goes_out_of_contact_then_probed_then_missing_then_replaced():
    s = monitored()
    iid = first(s).instance_id
    s.run(25, doctor=True)
    assert first(s).health == "UNKNOWN"  # boot_timeout not yet passed since RUNNING
    s.run(15, doctor=True)
    assert s.state.instances[iid].health == "OUT_OF_CONTACT"
    s.run(15, doctor=True)
    assert s.state.instances[iid].state in ("TERMINATING", "TERMINATED")
    assert s.state.instances[iid].health in ("MISSING", "UNKNOWN")
    s.run(15)
    assert s.running() == 1 and iid not in {n.node_id for n in s.prov.live_vms()}


def test_probe_goes_to_agent_and_provisioner_and_an_answer_saves_the_node():
    s = monitored()
    iid = first(s).instance_id
    beat(s, iid)
    assert first(s).health == "OK" and first(s).heard
    s.clock.t += 25
    d = s.runner.handle(DoctorPass())
    assert s.state.instances[iid].health == "OUT_OF_CONTACT"
    sent = {(e.to, type(e.message)) for e in d.effects}
    assert ("agent:" + iid, HealthProbe) in sent and ("provisioner", DumpState) in sent
    s.clock.t += 5
    beat(s, iid)  # the agent answers the probe
    assert s.state.instances[iid].health == "OK"
    s.run(15, doctor=True)
    assert s.state.instances[iid].health == "OK" and s.state.instances[iid].state == "RUNNING"


def test_error_heartbeats_make_the_engine_replace_the_node():
    s = monitored(2)
    a, b = sorted(s.state.instances.values(), key=lambda i: i.seq)
    beat(s, a.instance_id, "PROCESS_ERROR", failed_processes=["upid-1"])
    beat(s, b.instance_id, "MONITOR_ERROR", error="disk full")
    assert a.health == "PROCESS_ERROR" and a.failed_processes == ["upid-1"]
    assert b.health == "MONITOR_ERROR" and b.error == "disk full"
    s.run(20)
    assert a.state == "TERMINATED" and b.state == "TERMINATED" and s.running() == 2


def test_failover_causes_no_false_alarm():
    s = monitored()
    iid = first(s).instance_id
    beat(s, iid)
    s.clock.t += 15  # silent 15 s of the allowed 20
    s.recover()  # the new leader has no last-heard times; it measures from its own start
    s.clock.t += 15
    s.send(DoctorPass())
    assert s.state.instances[iid].health == "OK"
    s.clock.t += 10
    s.send(DoctorPass())
    assert s.state.instances[iid].health == "OUT_OF_CONTACT"


def test_zombie_is_terminated_again_then_forgotten():
    s = monitored()
    iid = first(s).instance_id
    s.prov.kill(iid)
    s.deliver()
    s.clock.t += 31
    beat(s, iid)  # a heartbeat long after it was TERMINATED
    assert s.state.instances[iid].health == "ZOMBIE"
    sent = []
    real = s.prov.handle
    s.prov.handle = lambda m: sent.append(m) or real(m)
    s.step()
    assert any(iid in getattr(m, "node_ids", ()) for m in sent)
    s.run(40, doctor=True)
    assert s.state.instances[iid].health == "UNKNOWN"


def test_pure_rules():
    conf = {**HEALTH}
    inst = Instance("i", "o", "d", "l", "dt", "s", None, {}, {}, 1, "RUNNING", 100.0)
    assert on_heartbeat(inst, "OK", None, None, 101, conf).health == "OK"
    assert doctor_check(inst, conf, 131, None, None, 0).health == "OUT_OF_CONTACT"
    assert doctor_check(inst, conf, 131, None, None, 120).health is None  # measured from start
    inst.heard, inst.health = True, "OK"
    assert doctor_check(inst, conf, 121, 100.0, None, 0).health == "OUT_OF_CONTACT"
    assert doctor_check(inst, conf, 119, 100.0, None, 0).health is None
    inst.health = "OUT_OF_CONTACT"
    v = doctor_check(inst, conf, 200, None, None, 0)
    assert v.probe and v.health is None  # new leader: probe again first
    assert doctor_check(inst, conf, 211, None, 200.0, 0).health == "MISSING"
