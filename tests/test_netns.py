"""Real hosts on one machine: network namespaces (cei_actors.testing.netns), a deployment over
three of them that loses a whole host (cei_actors.testing.hostloss), and peers refused by the
allowlist or for lacking the secret. Root only: skipped elsewhere with the reason (with CI set,
a machine that cannot make namespaces fails instead, as for ZooKeeper)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from fixtures_zk import _in_ci, require_zookeeper

from cei_actors.runtime.secure import new_secret_file
from cei_actors.testing import netns
from cei_actors.testing.hostloss import HostLoss
from cei_actors.testing.zkserver import listening_sockets


def require_netns() -> None:
    reason = netns.unavailable_reason()
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"network namespaces are required in CI (CI is set): {reason}", pytrace=False)
    pytest.skip(f"no network namespaces here: {reason}")


@pytest.fixture
def hosts():
    require_netns()
    with netns.Hosts(2) as made:
        yield made


# ------------------------------------------------------------------------------ harness


def _connects(host: netns.Host, address: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1).close()"
    return host.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_hosts_reach_each_other_and_nothing_else(hosts):
    a, b = hosts[0], hosts[1]
    server = b.popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.socket(); s.bind(({b.address!r}, 7001)); s.listen()
        while True:
            s.accept()[0].close()
    """)])
    try:
        assert _wait(lambda: _connects(a, b.address, 7001))
        assert b.pids() == [server.pid]
        # no default route, no NAT: this machine's own address is unreachable from a host
        route = a.run(["ip", "route"], capture_output=True, text=True).stdout
        assert "default" not in route and route.strip().startswith(hosts.cidr)
        b.link(False)
        assert not _connects(a, b.address, 7001)
        b.link(True)
        assert _wait(lambda: _connects(a, b.address, 7001))
        assert b.kill_all() == [server.pid]
        server.wait(timeout=5)
        assert b.pids() == []
    finally:
        server.kill()


def _wait(fn, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def test_teardown_and_the_stale_sweeper():
    require_netns()
    made = netns.Hosts(1)
    made.start()
    ns, bridge = made[0].ns, made.bridge
    made.stop()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns not in listed
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    # a run killed before its teardown: its creator pid is dead, the sweeper removes it
    child = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os
        from cei_actors.testing.netns import Hosts
        h = Hosts(1); h.start(); print(h[0].ns, h.bridge, flush=True); os._exit(0)
    """)], capture_output=True, text=True, check=True)
    ns, bridge = child.stdout.split()
    assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert ns in netns.sweep_stale()
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0


# ------------------------------------------------------------------------------ refusals

PROBE = textwrap.dedent("""
    import socket, sys
    from cei_actors.runtime.client import ServiceClient
    from cei_actors.runtime.control import Status
    from cei_actors.runtime.network import Network, use_network
    from cei_actors.runtime.system import SystemNotRunning, attach_system, lookup
    listen, admin, secret, cidr = sys.argv[1:5]
    host, port = admin.split(":")
    closed = 0
    for _ in range(5):  # raw connections: does the server read what we send?
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(b"12>" + b"x" * 12)
                closed += s.recv(100) == b""
            except ConnectionError:
                closed += 1
    print("closed", closed, end=" ")
    use_network(Network.build(listen, allow=[cidr]))
    try:
        asys = attach_system(admin, secret_file=secret)
    except SystemNotRunning as exc:
        print("refused", exc)
        sys.exit(3)
    with ServiceClient(asys, lookup(asys, "pd"), timeout=10) as pd:
        print("accepted", pd.call(Status())["mode"])
""")


def test_a_peer_outside_the_allowlist_or_without_the_secret_is_refused(hosts, tmp_path):
    server, member = hosts[0], hosts[1]
    net = hosts.network.network_address.packed[2]
    outsider = hosts.add_host(f"198.18.{net}.100")
    allowed = f"198.18.{net}.0/30"  # .1 (server) and .2 (member); not .100, not this process (.254)
    home = tmp_path / "server"
    home.mkdir(mode=0o700)
    secret = new_secret_file(tmp_path / "secret")
    other_secret = new_secret_file(tmp_path / "other-secret")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "log": f"sqlite:///{home}/log.sqlite",
        "components": {"pd": {}},
        "pd": {"engines": {"default": {"slots": 1}}},
        "network": {"listen": server.address, "allow": [allowed], "admin_port": 1900,
                    "secret_file": str(secret)},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CEI_", "THESPIAN_"))}
    up = server.run([sys.executable, "-m", "cei_actors.cli", "--home", str(home), "up", "--plan", str(plan)],
                    capture_output=True, text=True, env=env, timeout=120)
    assert up.returncode == 0, up.stderr + up.stdout
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)

    def attempt(host: netns.Host, key) -> subprocess.CompletedProcess:
        return host.run([sys.executable, str(probe), host.address, f"{server.address}:1900", str(key),
                         hosts.cidr], capture_output=True, text=True, env=env, timeout=120)

    ok = attempt(member, secret)  # the control: an allowed peer with the secret gets through
    assert ok.returncode == 0 and ok.stdout.startswith("closed 0 accepted ready"), ok.stdout + ok.stderr[-2000:]
    outside = attempt(outsider, secret)  # closed at accept, before a byte is read
    assert outside.returncode == 3 and outside.stdout.startswith("closed 5 refused"), \
        outside.stdout + outside.stderr[-2000:]
    keyless = attempt(member, other_secret)
    assert keyless.returncode == 3 and "refused" in keyless.stdout, keyless.stdout + keyless.stderr[-2000:]
    log = (home / "system.log").read_text()
    refusals = [line for line in log.splitlines() if "refused a connection from" in line]
    assert len(refusals) == 1 and outsider.address in refusals[0], refusals  # once, not per frame
    assert "unauthenticated frame" in log  # the keyless peer's frames, refused by the HMAC
    # nothing of the system listens anywhere but its own address (and its metrics endpoint on
    # the host's loopback, as the plan's default metrics key says)
    metrics_port = json.loads((home / "system.json").read_text())["metrics"]["port"]
    for pid in server.pids():
        for address, port in listening_sockets(pid):
            want = "127.0.0.1" if port == metrics_port else server.address
            assert address == want, (pid, address, port)
    down = server.run([sys.executable, "-m", "cei_actors.cli", "--home", str(home), "down"],
                      capture_output=True, text=True, env=env, timeout=120)
    assert down.returncode == 0, down.stderr



def test_a_wildcard_bind_when_allowed_advertises_the_given_address(hosts, tmp_path):
    """``cei up --listen 0.0.0.0 --allow-wildcard --advertise ADDR``: every socket binds all
    interfaces, peers reach the system at ADDR, and the allowlist still applies."""
    server, member = hosts[0], hosts[1]
    home = tmp_path / "server"
    home.mkdir(mode=0o700)
    secret = new_secret_file(tmp_path / "secret")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"log": f"sqlite:///{home}/log.sqlite", "components": {"pd": {}},
                                    "pd": {"engines": {"default": {"slots": 1}}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CEI_", "THESPIAN_"))}
    cei = [sys.executable, "-m", "cei_actors.cli", "--home", str(home)]
    up = server.run([*cei, "up", "--plan", str(plan), "--listen", "0.0.0.0", "--allow-wildcard",
                     "--advertise", server.address, "--allow", hosts.cidr, "--admin-port", "1900",
                     "--secret-file", str(secret)], capture_output=True, text=True, env=env, timeout=120)
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        probe = tmp_path / "probe.py"
        probe.write_text(PROBE)
        ok = member.run([sys.executable, str(probe), member.address, f"{server.address}:1900", str(secret),
                         hosts.cidr], capture_output=True, text=True, env=env, timeout=120)
        assert ok.returncode == 0 and ok.stdout.startswith("closed 0 accepted ready"), ok.stdout + ok.stderr[-2000:]
        info = json.loads((home / "system.json").read_text())
        bound = {address for pid in server.pids() for address, port in listening_sockets(pid)
                 if port != info["metrics"]["port"]}  # the metrics endpoint stays on loopback
        assert bound == {"0.0.0.0"}
        assert info["admin_host"] == server.address and info["network"]["listen"] == "0.0.0.0"
    finally:
        server.run([*cei, "down"], capture_output=True, text=True, env=env, timeout=120)


# ------------------------------------------------------------------------------ a cloud VM


def test_an_agent_started_from_a_moto_vms_userdata_on_another_host_runs_work(hosts, tmp_path):
    """The system (PD, EPUM, Provisioner with an EC2 site) on host A drives moto's EC2 server
    (on the hosts' bridge); a process scheduled with `cei process schedule` makes EPUM launch a
    VM; the userdata moto holds for it (DescribeInstanceAttribute) is read back and
    `python -m cei_actors.eeagent --from-userdata FILE` started on host B from it: the agent
    attaches to A's admin over the namespace network (allowlisted, authenticated), registers
    and runs the process, on host B."""
    from cei_actors.testing.cloudvm import CloudVM
    from cei_actors.testing.moto_server import MotoServer
    from cei_actors.testing.moto_server import unavailable_reason as moto_unavailable

    if moto_unavailable():
        pytest.skip(moto_unavailable())
    a, b = hosts[0], hosts[1]
    ran = tmp_path / "ran"
    with MotoServer(host=hosts.gateway) as moto:
        cloud = CloudVM(hosts, tmp_path / "cloud", moto)
        try:
            cloud.up()
            sched = cloud.cei("process", "schedule", "--upid", "p1", "--", "sh", "-c",
                              f"echo $$ > {ran}; exec sleep 600")
            assert sched.returncode == 0, sched.stderr

            # EPUM launches one VM for the need: moto runs it with the cei-agent userdata
            instance = cloud.launched_vm()
            userdata, doc = cloud.userdata(instance)
            assert doc["pd"] == f"{a.address}:1900" and doc["secret_ref"] == f"file:{cloud.vm / 'secret'}"
            assert cloud.secret.read_bytes() not in userdata
            tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
            assert tags["cei:node_id"] == doc["node_id"]

            # the VM: its image put the secret at secret_ref; its agent starts from the userdata
            agent = cloud.boot(userdata)
            wait = cloud.cei("process", "wait", "p1", "--state", "RUNNING", "--timeout", "60", timeout=90)
            assert wait.returncode == 0, wait.stderr + cloud.agent_log_tail()
            described = cloud.cei("--json", "process", "describe", "p1")
            assert json.loads(described.stdout)["node_id"] == doc["node_id"], described.stdout
            assert _wait(lambda: ran.exists() and ran.read_text().strip(), 30)
            assert int(ran.read_text()) in b.pids()  # it runs on host B
            assert agent.poll() is None
        finally:
            cloud.down()


# ------------------------------------------------------------------------------ host loss


@pytest.fixture
def deployment(tmp_path):
    from cei_actors.runtime.network import current_network

    require_netns()
    require_zookeeper()
    before = current_network()
    with HostLoss(tmp_path / "hostloss") as scenario:
        yield scenario
    # the tests after this one in the same process start loopback systems as before
    assert current_network() == before and os.environ.get("THESPIAN_BASE_IPADDR") == before.advertise


def test_a_whole_host_lost_and_brought_back(deployment):
    """3 hosts (ZooKeeper ensemble, PD/EPUM/Provisioner on hosts 0 and 1, a PD replica and the
    EEAgents on host 2). Host 0 leads everything; every process in it is killed: the leaders
    move to host 1, the processes on host 2 keep running (none restarted), new work runs;
    host 0 comes back as standbys. Nothing lost, nothing run twice, live state = replay."""
    sc = deployment
    assert sc.leaders() == {"pd": 0, "epum": 0, "provisioner": 0}
    long = sc.schedule("long", 4, 600)
    short = sc.schedule("short", 2, 2)
    sc.wait_states(long, {"RUNNING"}, 60)
    rounds = {p["upid"]: p.get("round") for p in sc.pd().describe_processes(long)}

    assert sc.kill_host(0)
    assert sc.hosts[0].pids() == []
    sc.wait_failover(0, timeout=60)
    assert set(sc.leaders().values()) <= {1, 2}
    more = sc.schedule("after", 2, 600)
    states = sc.wait_states(more, {"RUNNING"}, 60)
    assert all(states[u] == "RUNNING" for u in long)
    assert {p["upid"]: p.get("round") for p in sc.pd().describe_processes(long)} == rounds
    sc.wait_states(short, {"EXITED"}, 30)
    sc.check_ran_once(long + short + more)
    sc.check_replay()

    sc.restart_host(0)
    modes = {(m["host"], m["name"]): (m["status"] or {}).get("mode") for c in ("pd", "epum") for m in sc.members(c)}
    assert modes[(0, "pd")] == "standby" and modes[(0, "epum")] == "standby"
    assert set(sc.leaders().values()) <= {1, 2}
    sc.check_ran_once(long + short + more)
    sc.check_replay()


def test_an_agent_process_on_one_host_serves_the_pd_on_another_and_follows_it_when_lost(
        deployment, tmp_path):
    """``python -m cei_actors.eeagent --pd HOST:PORT ... --listen ADDR --allow CIDR`` on host 2
    (as a booted VM's agent would be started), given every host's admin, attaches to host 0's
    and runs work for the PD led there. Host 0 is lost: the agent finds the PD replicas in the
    other hosts' admins, follows the new leader and keeps working (its process is not
    restarted, new work runs on it). With host 0's admin only, it lost the PD (NH4's gap)."""
    from cei_actors.testing.hostloss import ADMIN_PORT

    sc = deployment
    fillers = sc.schedule("filler", 8, 600)  # the static nodes' 2 x 4 slots
    sc.wait_states(fillers, {"RUNNING"}, 60)
    admins = [f"{sc.hosts[i].address}:{ADMIN_PORT}" for i in range(3)]
    agent = sc.start_agent("ep1", tmp_path / "ep1", tmp_path / "ep1.log")
    try:
        [upid] = sc.schedule("on-ep1", 1, 600)
        sc.wait_states([upid], {"RUNNING"}, 60)
        first = sc.pd().describe_process(upid)
        assert first["node_id"] == "ep1"
        assert f"attached to {admins[0]}" in (tmp_path / "ep1.log").read_text()

        sc.kill_host(0)  # the admin the agent attached to, and the PD leader
        sc.wait_failover(0, timeout=60)
        [after] = sc.schedule("on-ep1-after", 1, 600)
        states = sc.wait_states([upid, after], {"RUNNING"}, 60)
        assert states[upid] == states[after] == "RUNNING"
        assert sc.pd().describe_process(after)["node_id"] == "ep1"
        assert sc.pd().describe_process(upid).get("round") == first.get("round")
        sc.check_ran_once([*fillers, upid, after])
        assert agent.poll() is None
    finally:
        agent.terminate()
        agent.wait(timeout=30)


@pytest.mark.slow
def test_hosts_lost_in_turn_and_a_pulled_cable(deployment):
    """The long version: host 0 lost and back, then host 1 (the leaders go back to host 0 or
    host 2), then the cable of the host leading the most pulled instead of its processes
    killed, and plugged back."""
    sc = deployment
    all_upids: list[str] = []
    for turn, lost in enumerate((0, 1)):
        where = sc.leaders()
        upids = sc.schedule(f"t{turn}", 2, 900)
        all_upids += upids
        sc.wait_states(upids, {"RUNNING"}, 60)
        sc.kill_host(lost)
        sc.wait_failover(lost, timeout=60)
        assert where != sc.leaders()
        after = sc.schedule(f"t{turn}-after", 1, 900)
        all_upids += after
        sc.wait_states(all_upids, {"RUNNING"}, 60)
        sc.check_ran_once(all_upids)
        sc.check_replay()
        sc.restart_host(lost)
    # a pulled cable: the host that leads the most loses its link; its processes live on, cut off
    where = sc.leaders()
    cut = max((0, 1), key=lambda h: list(where.values()).count(h))
    assert cut in where.values(), where
    sc.hosts[cut].link(False)
    sc.down_hosts.add(cut)
    sc.wait_failover(cut, timeout=60)
    upids = sc.schedule("cut", 1, 900)
    all_upids += upids
    sc.wait_states(all_upids, {"RUNNING"}, 60)
    sc.hosts[cut].link(True)  # its deposed leaders find their sessions expired and step down
    sc.down_hosts.discard(cut)
    sc.check_ran_once(all_upids)
    sc.check_replay(timeout=60)
    assert cut not in sc.leaders().values()


def test_scripts_zk_runs_a_server_in_a_namespace(hosts, tmp_path):
    require_zookeeper()
    host = hosts[0]
    zk = [sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "zk")]
    directory = str(tmp_path / "zk")
    started = subprocess.run([*zk, "start", "--dir", directory, "--host", host.address, "--netns", host.ns],
                             capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip().startswith(f"{host.address}:")
        pids = host.pids()
        assert len(pids) == 1 and all(a == host.address for a, _ in listening_sockets(pids[0]))
        status = subprocess.run([*zk, "status", "--dir", directory], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and f"{host.address}:" in status.stdout and "standalone" in status.stdout
    finally:
        subprocess.run([*zk, "stop", "--dir", directory], capture_output=True, timeout=60)
    assert host.pids() == []


@pytest.mark.slow
def test_the_netns_demo_holds_every_check():
    """`bash scripts/netns-demo` without its install step: both parts, every check, exit 0, and
    none of its namespaces left."""
    require_netns()
    require_zookeeper()
    demo = subprocess.Popen([sys.executable, "-m", "cei_actors.testing.hostloss"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = demo.communicate(timeout=900)
    assert demo.returncode == 0, out[-4000:] + err[-2000:]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{netns.PREFIX}-{demo.pid}-" not in left
