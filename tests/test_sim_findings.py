"""Bugs in the component cores found by the whole-system simulation (cei_actors/sim/system.py).

Each test is the smallest run that showed one; all three are fixed (docs/decisions.md H1-H3)
and the tests stay as regression tests.
"""

from __future__ import annotations

import logging
import math

import pytest

from cei_actors.sim.system import PD_DOMAIN, CEISystem


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_pd_down_while_its_node_boots_still_gets_the_node():
    s = CEISystem(seed=3)
    s.run_for(5)
    s.schedule("p1", math.inf)
    s.run_for(2)  # the PD registered its need of 1 node
    s.crash("pd")
    s.run_for(60)  # the VM boots; EPUM's NodeState(RUNNING) finds the PD down
    assert [i.state for i in s.sim.state("epum").instances.values()] == ["RUNNING"]
    s.restart("pd")
    s.run_for(300)
    assert s.sim.state("pd").processes["p1"].state == "RUNNING"
    assert s.convergence() == []


def test_lost_register_need_is_sent_again():
    s = CEISystem(seed=3)
    s.run_for(5)
    s.crash("epum")
    s.schedule("p1", math.inf)
    s.run_for(5)  # the PD's RegisterNeed finds EPUM down
    s.restart("epum")
    s.run_for(300)
    assert s.sim.state("epum").domain("default", PD_DOMAIN).engine_conf["preserve_n"] == 1
    assert s.sim.state("pd").processes["p1"].state == "RUNNING"


def test_lost_node_state_change_is_healed():
    s = CEISystem(seed=3)
    s.add_domain("d", 1)
    s.run_for(60)
    assert s.convergence() == []
    s.sim.faults.lossy = lambda sender, to: (sender, to) == ("provisioner", "epum")
    s.set_network(drop_rate=1.0)  # every Provisioner -> EPUM message is lost ...
    s.kill_vm(0)  # ... while the cloud loses the domain's VM
    s.run_for(60)
    s.heal()
    s.run_for(600)
    assert s.convergence() == []
