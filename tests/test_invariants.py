"""Each component's invariants: sound after a real (simulated) run, and they catch damage."""

from __future__ import annotations

import copy

import pytest

from cei_actors.epum import invariants as epum_inv
from cei_actors.pd import invariants as pd_inv
from cei_actors.provisioner import invariants as prov_inv
from cei_actors.sim.system import CEISystem, SystemConfig


@pytest.fixture(scope="module")
def states():
    system = CEISystem(3, SystemConfig(slots=2))
    system.run_for(5.0)
    for i in range(12):
        system.schedule(f"p{i}", 600.0)
    system.run_for(120.0)
    got = {name: system.sim.state(name) for name in ("provisioner", "epum", "pd")}
    assert all(got.values())
    return got


def test_a_real_run_is_sound(states):
    assert prov_inv.broken(states["provisioner"]) == []
    assert epum_inv.broken(states["epum"]) == []
    assert pd_inv.broken(states["pd"]) == []
    assert any(r.assigned for r in states["pd"].resources.values())


def test_provisioner_damage_is_caught(states):
    s = copy.deepcopy(states["provisioner"])
    a, b = [n for n in s.nodes.values() if n.iaas_id][:2]
    b.iaas_id = a.iaas_id
    assert any("claimed by nodes" in p for p in prov_inv.broken(s))
    s = copy.deepcopy(states["provisioner"])
    next(iter(s.nodes.values())).state = "BOGUS"
    assert any("unknown state" in p for p in prov_inv.broken(s))


def test_epum_damage_is_caught(states):
    s = copy.deepcopy(states["epum"])
    inst = next(iter(s.instances.values()))
    s.domains[inst.domain_key].by_state[inst.state].discard(inst.instance_id)
    assert any("not indexed" in p for p in epum_inv.broken(s))


def test_pd_damage_is_caught(states):
    s = copy.deepcopy(states["pd"])
    res = next(r for r in s.resources.values() if r.assigned)
    other = next(r for r in s.resources.values() if r is not res)
    upid, rnd = next(iter(res.assigned.items()))
    other.assigned[upid] = rnd
    found = pd_inv.broken(s)
    assert any("placed on both" in p for p in found)
    s = copy.deepcopy(states["pd"])
    res = next(r for r in s.resources.values() if r.assigned)
    for i in range(res.slots + 1):
        res.assigned[f"ghost{i}"] = 0
    found = pd_inv.broken(s)
    assert any("slots" in p for p in found) and any("unknown process" in p for p in found)
