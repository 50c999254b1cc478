"""A VM launched on moto's EC2 by one namespace host's system, its agent booted on another.

docs/multi-host.md, "Walkthrough: a VM's agent on another host", step by step: host A runs
the PD, EPUM and the Provisioner (log on A, SQLite), whose only site is EC2 at moto's server
on the hosts' bridge (standing for the region's endpoint); work scheduled with ``cei process
schedule`` makes EPUM launch a VM; the userdata moto holds for it is read back (as the VM
reads its metadata service) and ``python -m cei_actors.eeagent --from-userdata FILE`` started
on host B from it (the VM's image put the system secret at the userdata's ``secret_ref``).
Used by ``tests/test_netns.py`` and ``scripts/netns-demo`` (:func:`hostloss.demo`).

    with Hosts(2) as hosts, MotoServer(host=hosts.gateway) as moto:
        vm = CloudVM(hosts, workdir, moto)
        vm.up()
        vm.cei("process", "schedule", "--upid", "p1", "--", "sleep", "600")
        instance = vm.launched_vm()
        userdata, doc = vm.userdata(instance)
        agent = vm.boot(userdata)           # runs in host B
        ...
        vm.down()                           # `cei down` on A: terminates the VM first
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ..launch.plan import default_plan_text
from ..runtime.secure import new_secret_file
from .hostloss import ADMIN_PORT, ScenarioError, _wait, child_env
from .moto_server import MotoServer
from .netns import Host, Hosts

__all__ = ["CloudVM", "cloud_plan"]


def cloud_plan(home: Path, host: Host, cidr: str, moto: MotoServer, vm_secret: Path) -> dict[str, Any]:
    """Host A's plan (walkthrough step 1): PD, EPUM and the Provisioner, whose only site is
    EC2 at ``moto``; each VM's userdata names A's admin and the secret's path on the VM."""
    data = yaml.safe_load(default_plan_text())
    data["log"] = f"sqlite:///{home}/log.sqlite"
    data["components"] = {c: data["components"][c] for c in ("provisioner", "epum", "pd")}
    data["components"]["epum"]["config"].update(default_site="ec2", decider_interval=0.5)
    data["components"]["provisioner"]["config"].update(query_interval=0.5)
    data["pd"]["engines"]["default"].update(slots=1, maximum_vms=1, heartbeat_period=1)
    data["registry"] = {
        "sites": {"ec2": moto.site()},
        "credentials": {"ec2": moto.credentials()},
        "deployable_types": {"eeagent": {
            "mappings": {"ec2": {"iaas_image": moto.image_id(), "iaas_allocation": "t2.micro"}},
            "contextualization": {"method": "cei-agent", "pd": f"{host.address}:{ADMIN_PORT}",
                                  "secret_ref": f"file:{vm_secret}", "slots": "${slots}",
                                  "heartbeat": "${heartbeat}", "fence": "${fence}", "grace": 1}}},
    }
    data["network"] = {"listen": host.address, "allow": [cidr], "admin_port": ADMIN_PORT,
                       "secret_file": str(home / "operator-secret")}
    data["metrics"] = "off"
    return data


class CloudVM:
    """Host ``a`` of ``hosts`` runs the system, host ``b`` is the VM (module docstring)."""

    def __init__(self, hosts: Hosts, workdir: Path, moto: MotoServer, a: int = 0, b: int = 1) -> None:
        self.hosts, self.moto = hosts, moto
        self.a, self.b = hosts[a], hosts[b]
        self.workdir = Path(workdir).resolve()
        self.home = self.workdir / "a"  # host A's cei home
        self.vm = self.workdir / "vm"  # the VM's disk
        self.env = child_env()
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log = self.workdir / "agent.log"
        for d in (self.workdir, self.home, self.vm):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self.secret = new_secret_file(self.home / "operator-secret")
        self.plan = self.home / "plan.yaml"

    def cei(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``cei --home HOME ARGS`` run on host A."""
        argv = [sys.executable, "-m", "cei_actors.cli", "--home", str(self.home), *args]
        return self.a.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)

    def up(self) -> None:
        """Steps 1-2: write host A's plan and ``cei up`` it on host A."""
        self.plan.write_text(yaml.safe_dump(
            cloud_plan(self.home, self.a, self.hosts.cidr, self.moto, self.vm / "secret"), sort_keys=False))
        up = self.cei("up", "--plan", str(self.plan), timeout=180)
        if up.returncode != 0:
            raise ScenarioError(f"cei up on host A failed ({up.returncode}): "
                                f"{up.stderr.strip()[-2000:]} {up.stdout.strip()[-2000:]}")

    def ec2(self) -> Any:
        return self.moto.boto3()

    def vms(self, state: str = "running") -> list[dict[str, Any]]:
        """The instances moto has in ``state``."""
        out = self.ec2().describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": [state]}])
        return [i for r in out["Reservations"] for i in r["Instances"]]

    def launched_vm(self, timeout: float = 60) -> dict[str, Any]:
        """Step 3: the one VM EPUM launched (waits for it; ScenarioError if not exactly one)."""
        running = _wait(self.vms, timeout, "a VM launched at moto's EC2")
        if len(running) != 1:
            raise ScenarioError(f"{len(running)} VMs running, expected 1")
        return running[0]

    def userdata(self, instance: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """Step 4: the userdata moto holds for ``instance`` (DescribeInstanceAttribute, as
        the VM reads its metadata service) and its JSON document."""
        attr = self.ec2().describe_instance_attribute(InstanceId=instance["InstanceId"],
                                                      Attribute="userData")
        raw = base64.b64decode(attr["UserData"]["Value"])
        return raw, json.loads(raw.decode().split("\n", 1)[1])

    def boot(self, userdata: bytes) -> subprocess.Popen[bytes]:
        """Step 4: the VM boots on host B: its image puts the system secret at the userdata's
        ``secret_ref`` and starts the agent from the userdata, listening on B."""
        new_secret_file(self.vm / "secret", self.secret.read_bytes())
        (self.vm / "user-data").write_bytes(userdata)
        with open(self.agent_log, "w") as log:
            self.agent = self.b.popen(
                [sys.executable, "-m", "cei_actors.eeagent", "--from-userdata", str(self.vm / "user-data"),
                 "--state-dir", str(self.vm / "eeagent"), "--listen", self.b.address,
                 "--allow", self.hosts.cidr], env=self.env, stdout=subprocess.DEVNULL, stderr=log)
        return self.agent

    def agent_log_tail(self, chars: int = 2000) -> str:
        try:
            return self.agent_log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def down(self) -> subprocess.CompletedProcess[str]:
        """Step 6: stop the agent (the VM's shutdown), ``cei down`` on host A (it terminates
        the VM first)."""
        if self.agent is not None:
            self.agent.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.wait(timeout=30)
            if self.agent.poll() is None:
                self.agent.kill()
                self.agent.wait(timeout=10)
            self.agent = None
        return self.cei("down", timeout=120)
