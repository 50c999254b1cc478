"""The Provisioner actor on a real thespian system and a real ZooKeeper log.

Includes kill -9 of the actor's process between the cloud call and the event recording its
result: the next leader re-drives the create with the same client token and finds the VM.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from waiting import wait_for

from cei_actors.eventlog import open_log
from cei_actors.provisioner.actor import ProvisionerActor
from cei_actors.provisioner.client import ProvisionerClient
from cei_actors.provisioner.drivers import LocalProcessDriver
from cei_actors.provisioner.logic import Provisioner, client_token
from cei_actors.provisioner.messages import Provision
from cei_actors.provisioner.state import public_node
from cei_actors.runtime import control
from cei_actors.runtime.client import BadRequest, Forbidden, NotFound, ServiceClient
from cei_actors.runtime.runner import replay
from cei_actors.runtime.system import (
    SIMPLE_BASE,
    TCP_BASE,
    shutdown_system,
    start_actor,
    start_system,
)

SIM = {"type": "sim", "seed": 3}
DT = {
    "mappings": {
        "sim1": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"},
        "full": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"},
        "noauth": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"},
        "slow": {"iaas_image": "ami-sim-base", "iaas_allocation": "t1.micro"},
        "local1": {"iaas_image": "local", "iaas_allocation": "local"},
    },
    "contextualization": {"method": "userdata", "userdata": "hello ${who}"},
}
FAST = {"query_interval": 0.3, "boot_query_interval": 0.1, "disappear_grace": 2.0,
        "reaper_interval": 0.0}


def states(client, ids=None):
    return {n["node_id"]: n["state"] for n in client.describe_nodes(ids)}


def actor_instance(asys, address):
    """The actor object of a simpleSystemBase actor (to look at its simulated cloud)."""
    for ref in asys._systemBase.actorRegistry.values():
        if ref is not None and ref.address == address:
            return ref.instance
    raise LookupError(address)


def replayed_nodes(log_url):
    log = open_log(log_url)
    try:
        state = replay(Provisioner(), log, "provisioner")
    finally:
        log.close()
    return sorted((public_node(n, full=True) for n in state.nodes.values()),
                  key=lambda n: n["node_id"])


def sorted_nodes(nodes):
    return sorted(nodes, key=lambda n: n["node_id"])


# ---------------------------------------------------------------------- in one process


@pytest.fixture
def simple(zk_hosts):
    asys = start_system(SIMPLE_BASE)
    log_url = f"zk://{zk_hosts}"
    try:
        yield asys, log_url
    finally:
        shutdown_system(asys)


def start(asys, log_url, config=None, leadership="auto"):
    addr = start_actor(asys, ProvisionerActor,
                       control.Start(log_url, config={**FAST, **(config or {})},
                                     leadership=leadership))
    service = ServiceClient(asys, addr, timeout=10.0)
    return addr, service, ProvisionerClient(service)


def test_provision_run_terminate_and_errors_through_the_actor(simple):
    asys, log_url = simple
    addr, service, client = start(asys, log_url)
    client.add_site("sim1", SIM)
    client.add_site("full", {**SIM, "max_instances": 0})
    client.add_site("noauth", {**SIM, "auth_failure": True})
    client.add_dt("dt1", DT)
    head = service.call(control.Status())["head"]
    for bad, cls in [
        (Provision("L", "dt1", "sim1", [], {}), BadRequest),
        (Provision("L", "dt1", "nowhere", ["a"], {}), BadRequest),
        (Provision("L", "nope", "sim1", ["a"], {}), BadRequest),
        (Provision("L", "dt1", "sim1", "a", {}), BadRequest),
        (Provision("L", "dt1", "sim1", ["a"], "vars"), BadRequest),
    ]:
        with pytest.raises(cls):
            service.call(bad)
    assert service.call(control.Status())["head"] == head  # nothing written

    client.provision("L1", "dt1", "sim1", ["n1", "n2"], {"who": "me"})
    again = client.provision("L1", "dt1", "sim1", ["n1", "n2"], {"who": "me"})
    assert [n["node_id"] for n in again["nodes"]] == ["n1", "n2"]
    wait_for(lambda: set(states(client, ["n1", "n2"]).values()) == {"RUNNING"})
    cloud = actor_instance(asys, addr).cloud.shared_drivers()
    sim = next(d for d in cloud if d.stats().creates_attempted)
    assert sim.stats().vms_created == 2
    vm = sim.node_for_token(client_token("cei-", "L1", "n1"))
    assert vm.extra["userdata"] == "hello me"

    for site, reason in (("full", "IAAS_FULL"), ("noauth", "IAAS_AUTH")):
        client.provision(f"L-{site}", "dt1", site, [f"x-{site}"], {"who": "me"})
        node = wait_for(lambda s=site: (n := client.describe_node(f"x-{s}"))["state"] == "FAILED"
                        and n)
        assert node["state_desc"].startswith(reason)
    assert client.status()["nodes"]["RUNNING"] == 2  # alive and serving

    alice = ProvisionerClient(service, caller="alice")
    with pytest.raises(NotFound):
        alice.describe_nodes(["n1"])
    with pytest.raises(Forbidden):
        alice.terminate_nodes(["n1"])
    assert alice.describe_nodes() == []

    client.terminate_nodes(["n1"])
    wait_for(lambda: states(client, ["n1"]) == {"n1": "TERMINATED"})
    assert client.terminate_all(wait=True, timeout=20.0) is True
    assert client.provision("L2", "dt1", "sim1", ["n3"], {"who": "x"})["nodes"][0][
        "state_desc"] == "PROVISIONER_DISABLED"
    client.enable()
    assert sim.stats().live == 0

    before = sorted_nodes(client.describe_nodes())
    service.call(control.Stop())
    assert replayed_nodes(log_url) == before
    _, _, again = start(asys, log_url)
    assert sorted_nodes(again.describe_nodes()) == before


def test_terminate_before_the_create_is_issued_never_creates(simple):
    asys, log_url = simple
    addr, service, client = start(asys, log_url, {"create_concurrency": 1})
    client.add_site("slow", {**SIM, "api_latency": 0.5})
    client.add_dt("dt1", DT)
    client.provision("L1", "dt1", "slow", ["n1"], {"who": "a"})
    client.provision("L2", "dt1", "slow", ["n2"], {"who": "b"})
    client.terminate_nodes(["n1", "n2"])  # n1's create is in flight, n2's is not issued
    wait_for(lambda: set(states(client).values()) == {"TERMINATED"}, timeout=20)
    assert client.describe_node("n2")["state_desc"] == "TERMINATED_BEFORE_LAUNCH"
    sim = actor_instance(asys, addr).cloud.shared_drivers()[0]
    assert sim.node_for_token(client_token("cei-", "L2", "n2")) is None
    assert sim.stats().vms_created == 1 and sim.stats().live == 0


# ---------------------------------------------------------------------- kill -9 (TCP base)


class SlowLocalDriver(LocalProcessDriver):
    """Creates the "VM", writes a marker, then takes long to answer (so we can kill -9)."""

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        (self.state_dir / "created").write_text(node.id)
        time.sleep(60)
        return node


def slow_factory(site, credentials):
    return SlowLocalDriver(site["state_dir"], site["command"], grace_period=0.5)


def test_kill_between_the_cloud_call_and_its_record(zk_hosts, tmp_path):
    log_url = f"zk://{zk_hosts}"
    leadership = f"zk://{zk_hosts}?timeout=2"
    state_dir = tmp_path / "cloud"
    site = {"type": "local", "state_dir": str(state_dir), "command": ["sleep", "600"],
            "grace_period": 0.5}
    asys = start_system(TCP_BASE)
    services = []

    def launch(config):
        addr = start_actor(asys, "cei_actors.provisioner.actor.ProvisionerActor",
                           control.Start(log_url, config={**FAST, **config},
                                         leadership=leadership), timeout=30.0)
        service = ServiceClient(asys, addr, timeout=15.0)
        services.append(service)
        return service, ProvisionerClient(service)

    def kill(service):
        os.kill(service.call(control.Status())["pid"], signal.SIGKILL)

    try:
        service, client = launch({"driver_factory": "test_provisioner_actor:slow_factory"})
        client.add_site("local1", site)
        client.add_dt("dt1", DT)
        client.provision("L1", "dt1", "local1", ["n1"], {"who": "k"})
        marker = Path(state_dir, "created")
        wait_for(marker.exists, timeout=15)
        vm_id = marker.read_text()
        kill(service)  # the VM exists; the event recording it was never written
        assert [n["state"] for n in replayed_nodes(log_url)] == ["REQUESTED"]

        service, client = launch({})
        node = wait_for(lambda: (n := client.describe_node("n1"))["state"] == "RUNNING" and n)
        assert node["iaas_id"] == vm_id
        cloud = LocalProcessDriver(state_dir)
        assert [n.id for n in cloud.list_nodes()] == [vm_id]  # exactly one VM

        before = sorted_nodes(client.describe_nodes())
        kill(service)
        assert replayed_nodes(log_url) == before
        service, client = launch({})
        assert sorted_nodes(client.describe_nodes()) == before  # state after kill -9 == before

        assert client.terminate_all(wait=True, timeout=30.0) is True
        assert all(n.state == "terminated" for n in cloud.list_nodes())
    finally:
        for service in services:
            service.close()
        shutdown_system(asys)
        cloud = LocalProcessDriver(state_dir)
        for n in cloud.list_nodes():
            if n.state != "terminated":
                cloud.destroy_node(n)


def test_unknown_config_is_refused(simple):
    asys, log_url = simple
    with pytest.raises(BadRequest, match="unknown provisioner config key"):
        start_actor(asys, ProvisionerActor, control.Start(log_url, config={"query_intervall": 1}))
