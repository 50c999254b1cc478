"""EPUM as a real thespian actor on a real ZooKeeper log, with the Provisioner actor on its
simulated cloud. Skipped until the runtime shell and the Provisioner actor exist."""

from __future__ import annotations

import time
import uuid

import pytest

shell = pytest.importorskip("cei_actors.runtime.shell")
prov_actor = pytest.importorskip("cei_actors.provisioner.actor")

from waiting import wait_for  # noqa: E402

from cei_actors.epum.actor import EPUMActor  # noqa: E402
from cei_actors.epum.messages import (  # noqa: E402
    AddDomain,
    AddDomainDefinition,
    DescribeDomain,
    ListDomains,
    RemoveDomain,
)
from cei_actors.provisioner.messages import AddDeployableType, AddSite  # noqa: E402
from cei_actors.runtime.control import Request, Response, SetPeers, Start, Started, Stop  # noqa: E402
from cei_actors.runtime.messages import Ok  # noqa: E402
from cei_actors.runtime.system import SIMPLE_BASE, shutdown_system, start_system  # noqa: E402


def call(asys, addr, msg, timeout=10.0):
    rid = uuid.uuid4().hex
    reply = asys.ask(addr, Request(rid, msg), timeout)
    assert isinstance(reply, Response) and reply.rid == rid, reply
    return reply.reply


def test_epum_actor_with_provisioner_on_zookeeper(zk_hosts):
    log_url = f"zk://{zk_hosts}"
    asys = start_system(SIMPLE_BASE)
    try:
        prov = asys.createActor(prov_actor.ProvisionerActor)
        epum = asys.createActor(EPUMActor)
        epum_cfg = {"decider_interval": 0.2, "doctor_interval": 1.0, "default_site": "sim1",
                    "default_deployable_type": "dt1"}
        assert isinstance(asys.ask(prov, Start(log_url, peers={"epum": epum}), 20), Started)
        assert isinstance(asys.ask(epum, Start(log_url, config=epum_cfg, peers={"provisioner": prov}), 20), Started)
        assert isinstance(call(asys, prov, AddSite("sim1", {"type": "sim", "seed": 1, "boot_delay": 0.2})), Ok)
        assert isinstance(call(asys, prov, AddDeployableType("dt1", {
            "mappings": {"sim1": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"}},
            "contextualization": {"method": "userdata", "userdata": "cei"}})), Ok)
        call(asys, epum, AddDomainDefinition("def", {"general": {"engine_class": "preserve_n"}}))
        assert isinstance(call(asys, epum, AddDomain("d", "def", {"engine_conf": {"preserve_n": 2}})), Ok)

        def running():
            v = call(asys, epum, DescribeDomain("d")).value
            return v["counts"].get("RUNNING", 0) == 2 and v

        first = wait_for(running)
        ids = {i["instance_id"] for i in first["instances"]}
        # a new EPUM leader recovers from ZooKeeper and decides nothing twice
        asys.ask(epum, Stop(), 10)
        epum2 = asys.createActor(EPUMActor)
        asys.ask(prov, SetPeers({"epum": epum2}), 10)
        assert isinstance(asys.ask(epum2, Start(log_url, config=epum_cfg, peers={"provisioner": prov}), 20), Started)
        again = wait_for(lambda: call(asys, epum2, DescribeDomain("d")).value)
        time.sleep(1.0)
        again = call(asys, epum2, DescribeDomain("d")).value
        assert {i["instance_id"] for i in again["instances"]} == ids
        assert call(asys, epum2, RemoveDomain("d")).value["removing"]
        wait_for(lambda: call(asys, epum2, ListDomains()).value == [])
    finally:
        shutdown_system(asys)


def test_a_new_provisioner_leader_is_asked_at_once_for_every_live_instance(zk_hosts):
    """Decision H4: a Provisioner replica that starts leading greets EPUM (``Hello``), and EPUM
    asks it for every live instance at once (``DumpState``), not a refresh interval (here 600 s)
    later: what its predecessor recorded but never sent is heard again."""
    from thespian.actors import Actor

    from cei_actors.provisioner.messages import DumpState
    from cei_actors.runtime.control import Hello

    class Recorder(Actor):
        def __init__(self):
            super().__init__()
            self.seen = []

        def receiveMessage(self, msg, sender):  # noqa: N802
            if isinstance(msg, tuple) and msg[0] == "greet":
                self.send(msg[1], Hello("provisioner"))
            elif msg == "seen":
                self.send(sender, list(self.seen))
            else:
                inner = msg.message if isinstance(msg, Request) else msg
                if isinstance(inner, DumpState):
                    self.seen.extend(inner.node_ids)

    log_url = f"zk://{zk_hosts}"
    asys = start_system(SIMPLE_BASE)
    try:
        prov = asys.createActor(prov_actor.ProvisionerActor)
        epum = asys.createActor(EPUMActor)
        epum_cfg = {"decider_interval": 0.2, "default_site": "sim1", "default_deployable_type": "dt1",
                    "refresh_interval": 600.0}
        assert isinstance(asys.ask(prov, Start(log_url, peers={"epum": epum}), 20), Started)
        assert isinstance(asys.ask(epum, Start(log_url, config=epum_cfg, peers={"provisioner": prov}), 20), Started)
        assert isinstance(call(asys, prov, AddSite("sim1", {"type": "sim", "seed": 1, "boot_delay": 0.2})), Ok)
        assert isinstance(call(asys, prov, AddDeployableType("dt1", {
            "mappings": {"sim1": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"}},
            "contextualization": {"method": "userdata", "userdata": "cei"}})), Ok)
        call(asys, epum, AddDomainDefinition("def", {"general": {"engine_class": "preserve_n"}}))
        assert isinstance(call(asys, epum, AddDomain("d", "def", {"engine_conf": {"preserve_n": 2}})), Ok)
        done = wait_for(lambda: (v := call(asys, epum, DescribeDomain("d")).value)["counts"].get("RUNNING", 0) == 2 and v)
        live = sorted(i["instance_id"] for i in done["instances"])
        recorder = asys.createActor(Recorder)
        asys.tell(recorder, ("greet", epum))
        assert wait_for(lambda: sorted(set(asys.ask(recorder, "seen", 5))) == live, timeout=10)
    finally:
        shutdown_system(asys)
