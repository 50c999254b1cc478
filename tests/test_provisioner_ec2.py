"""The Provisioner actor driving libcloud's EC2 driver against moto's EC2 server.

Launch, describe, terminate, VMs that vanish behind the Provisioner's back (terminated, or
deleted outright) and the reconciliation that follows; a kill -9 between a create and its
record (the new leader's retried create finds the VM by its client token: one VM); and the
contextualization: a real EEAgent started from the userdata a moto instance received
registers with a real PD and runs a process.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pd_system import PDSystem, pd_config
from test_provisioner_actor import FAST, replayed_nodes, sorted_nodes, states, wait_for

from cei_actors.private_files import write_secret_file
from cei_actors.provisioner.actor import ProvisionerActor
from cei_actors.provisioner.client import ProvisionerClient
from cei_actors.provisioner.drivers.ec2 import CEIEC2NodeDriver, ec2_driver
from cei_actors.provisioner.drivers.sites import validate_site
from cei_actors.provisioner.sealing import CredentialsKey
from cei_actors.runtime import control
from cei_actors.runtime.client import ServiceClient
from cei_actors.runtime.secure import read_secret
from cei_actors.runtime.system import SIMPLE_BASE, shutdown_system, start_actor, start_system
from cei_actors.testing.moto_server import MotoServer, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=unavailable_reason() or "")

REPO = Path(__file__).resolve().parent.parent
MARKER_ENV = "CEI_TEST_EC2_CREATED"


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "credentials.key"
    write_secret_file(path, CredentialsKey.generate())
    return str(path)


def dt(moto: MotoServer, contextualization: dict | None = None) -> dict:
    return {"mappings": {"ec2": {"iaas_image": moto.image_id(), "iaas_allocation": "t2.micro"}},
            "contextualization": contextualization
            or {"method": "userdata", "userdata": "hello ${who}"}}


def setup_registry(client: ProvisionerClient, moto: MotoServer, definition: dict) -> None:
    client.add_site("ec2", moto.site())
    client.add_credentials("ec2", moto.credentials())
    client.add_dt("dt1", definition)


def instances(moto: MotoServer, node_id: str) -> list[dict]:
    out = moto.boto3().describe_instances(
        Filters=[{"Name": "tag:cei:node_id", "Values": [node_id]}])
    return [i for r in out["Reservations"] for i in r["Instances"]]


def userdata_of(moto: MotoServer, iaas_id: str) -> bytes:
    attr = moto.boto3().describe_instance_attribute(InstanceId=iaas_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"])


# ---------------------------------------------------------------------- in one process


def test_launch_describe_terminate_vanish_and_reconcile(moto, tmp_path, key_file):
    log_url = f"sqlite:///{tmp_path}/log.sqlite"
    asys = start_system(SIMPLE_BASE)
    try:
        addr = start_actor(asys, ProvisionerActor, control.Start(
            log_url, config={**FAST, "credentials_key_file": key_file}))
        service = ServiceClient(asys, addr, timeout=10.0)
        client = ProvisionerClient(service)
        setup_registry(client, moto, dt(moto))
        ids = ["v-term", "v-gone", "v-deleted"]
        client.provision("L1", "dt1", "ec2", ids, {"who": "moto", "domain_id": "dom1"})
        wait_for(lambda: set(states(client, ids).values()) == {"RUNNING"})
        nodes = {n["node_id"]: n for n in client.describe_nodes(ids)}
        for nid, node in nodes.items():
            [inst] = instances(moto, nid)  # one VM per node, tagged with it
            assert inst["InstanceId"] == node["iaas_id"]
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            assert (tags["cei:domain"], tags["cei:launch_id"], tags["cei:system"]) == (
                "dom1", "L1", "cei-")
            assert node["private_ip"] == inst["PrivateIpAddress"]
            assert userdata_of(moto, node["iaas_id"]) == b"hello moto"

        # terminate through the Provisioner
        client.terminate_nodes(["v-term"])
        wait_for(lambda: states(client, ["v-term"]) == {"v-term": "TERMINATED"})
        assert instances(moto, "v-term")[0]["State"]["Name"] == "terminated"

        # terminated behind its back (an operator with boto3): noticed by the next listing
        moto.boto3().terminate_instances(InstanceIds=[nodes["v-gone"]["iaas_id"]])
        gone = wait_for(lambda: (n := client.describe_node("v-gone"))["state"] == "TERMINATED"
                        and n)
        assert gone["state_desc"] == "IAAS_TERMINATED"
        assert client.describe_node("v-deleted")["state"] == "RUNNING"

        # every VM deleted outright: missing past disappear_grace (2 s here)
        moto.reset()
        deleted = wait_for(
            lambda: (n := client.describe_node("v-deleted"))["state"] == "TERMINATED" and n)
        assert deleted["state_desc"] == "NODE_DISAPPEARED"
        assert client.status()["nodes"]["TERMINATED"] == 3  # and the actor still serves

        before = sorted_nodes(client.describe_nodes())
        service.call(control.Stop())
        assert replayed_nodes(log_url) == before  # live state = replay
    finally:
        shutdown_system(asys)


def test_api_errors_fail_the_node_with_a_reason(moto, tmp_path, key_file):
    asys = start_system(SIMPLE_BASE)
    try:
        addr = start_actor(asys, ProvisionerActor, control.Start(
            f"sqlite:///{tmp_path}/log.sqlite", config={**FAST, "credentials_key_file": key_file}))
        client = ProvisionerClient(ServiceClient(asys, addr, timeout=10.0))
        definition = dt(moto)
        definition["mappings"]["ec2"]["iaas_image"] = "ami-0000000000badbad"
        setup_registry(client, moto, definition)
        client.provision("L1", "dt1", "ec2", ["e1"], {"who": "x"})
        node = wait_for(lambda: (n := client.describe_node("e1"))["state"] == "FAILED" and n)
        assert node["state_desc"].startswith("IAAS_PROBLEM: InvalidAMIID.NotFound"), node
        assert instances(moto, "e1") == []
        client.add_dt("dt2", dt(moto))
        client.provision("L2", "dt2", "ec2", ["e2"], {"who": "x"}, allocation="x9.nonexistent")
        node = wait_for(lambda: (n := client.describe_node("e2"))["state"] == "FAILED" and n)
        assert node["state_desc"].startswith("IAAS_PROBLEM: InvalidInstanceType"), node
        assert client.status()["nodes"]["FAILED"] == 2
    finally:
        shutdown_system(asys)


# ---------------------------------------------------------------------- kill -9 (TCP base)


class SlowEC2Driver(CEIEC2NodeDriver):
    """Makes the VM, says so in a marker file, then takes long to answer (so we can kill -9)."""

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        Path(os.environ[MARKER_ENV]).write_text(node.id)
        time.sleep(60)
        return node


def slow_ec2_factory(site, credentials):
    return ec2_driver(validate_site(site), credentials["access_key"], credentials["secret_key"],
                      cls=SlowEC2Driver)


def test_kill_between_the_create_and_its_record_makes_one_vm(moto, tmp_path, key_file,
                                                             monkeypatch):
    """The next leader re-drives the create with the same client token and gets that VM."""
    log_url = f"sqlite:///{tmp_path}/log.sqlite"
    marker = tmp_path / "created"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    asys = start_system()
    services = []

    def launch(config):
        addr = start_actor(asys, "cei_actors.provisioner.actor.ProvisionerActor",
                           control.Start(log_url, config={**FAST, "credentials_key_file": key_file,
                                                          **config}), timeout=30.0)
        service = ServiceClient(asys, addr, timeout=15.0)
        services.append(service)
        return service, ProvisionerClient(service)

    try:
        service, client = launch({"driver_factory": "test_provisioner_ec2:slow_ec2_factory"})
        setup_registry(client, moto, dt(moto))
        client.provision("L1", "dt1", "ec2", ["k1"], {"who": "k"})
        wait_for(marker.exists, timeout=20)
        vm_id = marker.read_text()
        os.kill(service.call(control.Status())["pid"], signal.SIGKILL)
        assert [n["state"] for n in replayed_nodes(log_url)] == ["REQUESTED"]

        service, client = launch({})
        node = wait_for(lambda: (n := client.describe_node("k1"))["state"] == "RUNNING" and n)
        assert node["iaas_id"] == vm_id
        assert [i["InstanceId"] for i in instances(moto, "k1")] == [vm_id]  # exactly one VM
        assert client.terminate_all(wait=True, timeout=30.0) is True
        assert instances(moto, "k1")[0]["State"]["Name"] == "terminated"
    finally:
        for service in services:
            service.close()
        shutdown_system(asys)


# ---------------------------------------------------------------------- contextualization


def test_an_agent_started_from_a_moto_instances_userdata_registers_and_runs_work(
        moto, tmp_path, key_file):
    system = PDSystem(f"sqlite:///{tmp_path}/pd.sqlite", str(tmp_path), pd_config())
    secret_path = os.environ["CEI_SECRET_FILE"]  # the system's secret file (set by its start)
    secret = read_secret(secret_path)
    agent = None
    try:
        addr = start_actor(system.asys, "cei_actors.provisioner.actor.ProvisionerActor",
                           control.Start(f"sqlite:///{tmp_path}/prov.sqlite",
                                         config={**FAST, "credentials_key_file": key_file}),
                           timeout=30.0)
        client = ProvisionerClient(ServiceClient(system.asys, addr, timeout=15.0))
        setup_registry(client, moto, dt(moto, {
            "method": "cei-agent",
            "pd": f"127.0.0.1:{system.port}",
            "secret_ref": f"file:{secret_path}",
            "epum_name": "",
            "slots": "${slots}",
            "heartbeat": "${heartbeat}",
            "grace": 1,
        }))
        client.provision("L1", "dt1", "ec2", ["vm1"], {"slots": 2, "heartbeat": 0.3})
        node = wait_for(lambda: (n := client.describe_node("vm1"))["state"] == "RUNNING" and n)

        # what the VM received, as the cloud keeps it
        userdata = userdata_of(moto, node["iaas_id"])
        assert userdata.startswith(b"#cei-agent v1\n") and b'"node_id":"vm1"' in userdata
        for form in (secret, secret.hex().encode(), base64.b64encode(secret),
                     base64.urlsafe_b64encode(secret).rstrip(b"=")):
            assert form not in userdata  # the secret goes by reference only
            for log in tmp_path.glob("*.sqlite*"):
                assert form not in log.read_bytes()
        path = tmp_path / "user-data"
        path.write_bytes(userdata)

        env = {k: v for k, v in os.environ.items() if k not in ("CEI_SECRET_FILE", "CEI_NODE_ID")}
        with open(tmp_path / "agent.log", "ab") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "cei_actors.eeagent", "--from-userdata", str(path),
                 "--state-dir", str(tmp_path / "vm1")],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        system.agents["vm1"] = agent  # closed (and its processes killed) with the system
        system.announce("vm1")  # as EPUM would, once the node runs
        system.client.schedule_process("p1", command=["sleep", "30"])
        proc = wait_for(lambda: (p := system.client.describe_process("p1"))["state"]
                        == "RUNNING" and p, timeout=30)
        assert proc["assigned"] == "vm1" or proc.get("node_id") == "vm1", proc
        assert [p["upid"] for p in system.agent_table("vm1")] == ["p1"]
        logged = (tmp_path / "agent.log").read_bytes()
        assert secret not in logged and secret.hex().encode() not in logged
    finally:
        system.close()
