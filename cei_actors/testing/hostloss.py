"""CEI deployed over three network-namespace hosts, and a whole host lost and brought back.

The deployment follows docs/multi-host.md, one plan per host (``WORKDIR/hN/plan.yaml``),
each host started with ``cei up`` run inside its namespace:

- every host: a ZooKeeper server of a 3-server ensemble (digest ACL, ``WORKDIR/zk.auth``), an
  actor system listening on its own address (``198.18.X.N``), admin port :data:`ADMIN_PORT`,
  accepting the hosts' /24 only, authenticated with the operator's secret (a copy per host);
- host 0 and host 1: a Provisioner, an EPUM and a PD replica each;
- host 2: a PD replica and the EEAgents (static nodes ``n1``, ``n2``), whose processes run there.

Every plan names the other hosts' admins as ``peers``, so whichever host starts (or comes
back) learns the others' replicas and they learn its own. The process using this module sits
on the hosts' bridge (its own address ``198.18.X.254``) and talks to the systems like any
client. Used by ``tests/test_netns.py``, ``scripts/netns-demo`` and ``benchmarks/hostloss.py``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..launch.components import component_for
from ..launch.plan import default_plan_text, load_plan
from ..pd.client import PDClient
from ..private_files import write_secret_file
from ..runtime.client import OutcomeUnknown, RequestFailed, ServiceClient
from ..runtime.control import Status
from ..runtime.core import Context
from ..runtime.messages import ErrorReply, Ok
from ..runtime.network import (
    ADVERTISE_ENV,
    ALLOW_ENV,
    LISTEN_ENV,
    Network,
    current_network,
    use_network,
)
from ..runtime.secure import SECRET_ENV, new_secret_file, use_secret_file
from ..runtime.system import (
    SystemNotRunning,
    admin_address,
    attach_system,
    detach_system,
    global_actors,
    replica_names,
)
from .netns import Hosts
from .zkserver import ZkEnsemble

__all__ = ["ADMIN_PORT", "KILLED", "HostLoss", "ScenarioError"]

ADMIN_PORT = 1900
#: The components that fail over (each has a replica on two hosts at least).
KILLED = ("pd", "epum", "provisioner")
PLACEMENT: dict[int, tuple[str, ...]] = {0: KILLED, 1: KILLED, 2: ("pd",)}
AGENT_HOST = 2
NODES = ("n1", "n2")


class ScenarioError(AssertionError):
    """A check of the scenario did not hold (the message says which)."""


def child_env() -> dict[str, str]:
    """This process's environment without its own network and secret settings (``CEI_*``,
    ``THESPIAN_*``), for a command that must take a host's from its plan or options."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CEI_", "THESPIAN_"))}


def _wait(fn: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > end:
            raise ScenarioError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def _normal(data: Any) -> Any:
    import msgpack

    return msgpack.unpackb(msgpack.packb(data, use_bin_type=True, default=str), raw=False,
                           strict_map_key=False)


class _Replay:
    """Answers a read-only request from a state rebuilt by replaying the log."""

    def __init__(self, component: Any, state: Any) -> None:
        self.component, self.state = component, state

    def call(self, message: Any, timeout: float | None = None) -> Any:
        decision = self.component.decide(self.state, message, Context(time.time()))
        if decision.events or not isinstance(decision.reply, Ok):
            raise ScenarioError(f"replay: {type(message).__name__} is not read-only or failed: "
                                f"{decision.reply if isinstance(decision.reply, ErrorReply) else ''}")
        return decision.reply.value


class HostLoss:
    """The three-host deployment in ``workdir`` (see the module docstring)."""

    def __init__(self, workdir: Path, *, say: Callable[[str], None] | None = None,
                 session_timeout: float = 4.0, fence_time: float = 15.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.say = say or (lambda _line: None)
        self.session_timeout = session_timeout
        self.fence_time = fence_time
        self.hosts: Hosts | None = None
        self.zk: ZkEnsemble | None = None
        self.log_url = ""
        self.down_hosts: set[int] = set()
        self._asys: Any = None
        self._asys_host: int | None = None
        self.runs_file = self.workdir / "runs.log"
        self._previous: tuple[Network, str | None] | None = None

    # ------------------------------------------------------------------------- set up

    def __enter__(self) -> HostLoss:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def home(self, i: int) -> Path:
        return self.workdir / f"h{i}"

    def admin(self, i: int) -> str:
        assert self.hosts is not None
        return f"{self.hosts[i].address}:{ADMIN_PORT}"

    def start(self) -> None:
        """Make the hosts, the ZooKeeper ensemble, the plans; start every host's system."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self.hosts = Hosts(3)
        self.hosts.start()
        self.say(f"hosts: {', '.join(f'{h.ns} ({h.address})' for h in self.hosts)} on bridge "
                 f"{self.hosts.bridge}; this process is {self.hosts.gateway}")
        # this process is a client on the bridge: it listens on its bridge address (until stop)
        self._previous = (current_network(), os.environ.get(SECRET_ENV))
        use_network(Network.build(self.hosts.gateway, allow=[self.hosts.cidr]))
        secret = new_secret_file(self.workdir / "secret")
        use_secret_file(secret)
        auth = self.workdir / "zk.auth"
        if not auth.exists():
            write_secret_file(auth, f"cei:{secrets.token_hex(12)}\n".encode())
        for i in range(len(self.hosts)):  # the operator copies the secret to every host
            self.home(i).mkdir(parents=True, exist_ok=True)
            os.chmod(self.home(i), 0o700)
            new_secret_file(self.home(i) / "operator-secret", secret.read_bytes())
        self.zk = ZkEnsemble(3, self.workdir / "zk", hosts=[h.address for h in self.hosts],
                             wrappers=[h.prefix for h in self.hosts])
        self.zk.start()
        from kazoo.client import KazooClient

        client = KazooClient(hosts=self.zk.hosts, timeout=10.0)
        client.start(timeout=15.0)
        try:
            client.ensure_path("/cei")
        finally:
            client.stop()
            client.close()
        self.log_url = f"zk://{self.zk.hosts}/cei?auth_file={auth}"
        self.say(f"ZooKeeper ensemble {self.zk.hosts} (digest ACL from {auth.name})")
        for i in range(len(self.hosts)):
            self.write_plan(i)
        for i in range(len(self.hosts)):
            self.up(i)

    def plan_data(self, i: int) -> dict[str, Any]:
        """Host ``i``'s plan (the built-in plan's settings, this host's components and network)."""
        assert self.hosts is not None
        data = yaml.safe_load(default_plan_text())
        data["log"] = self.log_url
        data["session_timeout"] = self.session_timeout
        data["log_history"] = {"archive": "none"}  # an archive is per host; keep the log whole
        comps = data["components"]
        comps["pd"]["config"].update(static_resources=True, fence_time=self.fence_time,
                                     fence_margin=2.0, dispatch_retry_seconds=2.0)
        comps["epum"]["config"].update(decider_interval=0.5)
        data["components"] = {c: comps[c] for c in PLACEMENT[i]}
        data["registry"] = {"sites": {}, "deployable_types": {}, "credentials": {}}
        data["pd"]["engines"]["default"].update(slots=4, heartbeat_period=1)
        data["static_nodes"] = [{"node_id": n, "engine": "default"} for n in NODES] if i == AGENT_HOST else []
        data["network"] = {
            "listen": self.hosts[i].address,
            "allow": self.allowlist(),
            "admin_port": ADMIN_PORT,
            "peers": [self.admin(j) for j in range(len(self.hosts)) if j != i],
            "secret_file": str(self.home(i) / "operator-secret"),
        }
        return data

    def allowlist(self) -> list[str]:
        """The peer networks every host accepts: the hosts' half of the /24 and this process."""
        assert self.hosts is not None and self.hosts.network is not None
        return [str(next(self.hosts.network.subnets(1))), f"{self.hosts.gateway}/32"]

    def write_plan(self, i: int) -> Path:
        path = self.home(i) / "plan.yaml"
        path.write_text(yaml.safe_dump(self.plan_data(i), sort_keys=False))
        return path

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in (LISTEN_ENV, ALLOW_ENV, ADVERTISE_ENV, SECRET_ENV):
            env.pop(key, None)
        return env

    def up(self, i: int) -> None:
        """``cei up`` of host ``i``'s plan, run inside its namespace."""
        assert self.hosts is not None
        argv = [sys.executable, "-m", "cei_actors.cli", "--home", str(self.home(i)), "up",
                "--plan", str(self.home(i) / "plan.yaml")]
        started = time.monotonic()
        proc = self.hosts[i].run(argv, capture_output=True, text=True, env=self._env(), timeout=180)
        if proc.returncode != 0:
            raise ScenarioError(f"cei up on host {i} failed ({proc.returncode}): "
                                f"{proc.stderr.strip()[-2000:]} {proc.stdout.strip()[-2000:]}")
        self.down_hosts.discard(i)
        self.say(f"host {i}: `cei up --plan h{i}/plan.yaml` ({', '.join(PLACEMENT[i])}"
                 f"{' + EEAgents ' + ', '.join(NODES) if i == AGENT_HOST else ''}) in "
                 f"{time.monotonic() - started:.1f}s")

    def stop(self) -> None:
        """Tear everything down: every process of every host, the namespaces, ZooKeeper."""
        if self._asys is not None:
            with contextlib.suppress(Exception):
                detach_system(self._asys)
            self._asys = None
        if self.hosts is not None:
            self.hosts.stop()
        if self.zk is not None:
            self.zk.stop(grace=1.0)
        if self._previous is not None:  # this process's own settings again
            net, secret = self._previous
            self._previous = None
            use_network(net)
            if secret is None:
                os.environ.pop(SECRET_ENV, None)
            else:
                os.environ[SECRET_ENV] = secret

    # --------------------------------------------------------------------- host loss

    def kill_host(self, i: int) -> list[int]:
        """Power cut: SIGKILL every process in host ``i`` (its system, actors, ZooKeeper server)."""
        assert self.hosts is not None and self.zk is not None
        killed = self.hosts[i].kill_all()
        self.down_hosts.add(i)
        with contextlib.suppress(Exception):
            self.zk.nodes[i].kill()  # reaps the server's process
        if self._asys_host == i:
            self._detach()
        return killed

    def restart_host(self, i: int) -> None:
        """Bring host ``i`` back: its ZooKeeper server, then ``cei up`` of its plan."""
        assert self.zk is not None
        self.zk.restart(i)
        self.up(i)

    # ------------------------------------------------------------------------- looking

    def _detach(self) -> None:
        if self._asys is not None:
            with contextlib.suppress(Exception):
                detach_system(self._asys)
        self._asys, self._asys_host = None, None

    def endpoint(self) -> Any:
        """This process's endpoint, attached to a live host's admin."""
        if self._asys is None:
            assert self.hosts is not None
            for i in range(len(self.hosts)):
                if i in self.down_hosts:
                    continue
                with contextlib.suppress(SystemNotRunning):
                    self._asys, self._asys_host = attach_system(self.admin(i)), i
                    break
            else:
                raise ScenarioError("no host's admin answers")
        return self._asys

    def members(self, comp: str) -> list[dict[str, Any]]:
        """Every replica of ``comp`` on the live hosts: host, name, address, Status (or None)."""
        assert self.hosts is not None
        asys = self.endpoint()
        out = []
        for i in range(len(self.hosts)):
            if i in self.down_hosts:
                continue
            try:
                names = global_actors(asys, timeout=3.0, admin=admin_address(self.admin(i)))
            except SystemNotRunning:
                continue
            for name in replica_names(comp, names):
                status = None
                with contextlib.suppress(RequestFailed, OutcomeUnknown), \
                        ServiceClient(asys, names[name], timeout=3.0) as client:
                    status = client.call(Status())
                out.append({"host": i, "name": name, "address": names[name], "status": status})
        return out

    def leader(self, comp: str) -> dict[str, Any] | None:
        """The replica of ``comp`` that leads and is ready, or None."""
        for member in self.members(comp):
            status = member["status"] or {}
            if status.get("leader") and status.get("ready"):
                return member
        return None

    def leaders(self) -> dict[str, int | None]:
        """Per component, the host of its serving leader (None: none serves)."""
        return {c: (m["host"] if (m := self.leader(c)) else None) for c in KILLED}

    def client(self, comp: str, timeout: float = 15.0) -> ServiceClient:
        member = _wait(lambda: self.leader(comp), 60, f"a {comp} leader")
        return ServiceClient(self.endpoint(), member["address"], timeout=timeout)

    def pd(self) -> PDClient:
        return PDClient(self.client("pd"))

    def wait_failover(self, lost: int, timeout: float = 60.0, since: float | None = None) -> float:
        """Seconds (from ``since``, a ``time.monotonic()``, default now) until every component
        has a serving leader on another host than ``lost``."""
        started = time.monotonic() if since is None else since

        def led() -> bool:
            where = self.leaders()
            return all(h is not None and h != lost for h in where.values())

        _wait(led, timeout, f"every component to be led off host {lost}", every=0.1)
        return time.monotonic() - started

    # ------------------------------------------------------------------------- work

    def schedule(self, prefix: str, n: int, seconds: float,
                 constraints: dict[str, Any] | None = None) -> list[str]:
        """Schedule ``n`` processes that note their start in the runs file, then sleep
        (``constraints``, e.g. ``{"node_id": "ep1"}``: only where they hold)."""
        pd = self.pd()
        upids = [f"{prefix}-{k}" for k in range(n)]
        for upid in upids:
            pd.schedule_process(upid, command=["sh", "-c", f"echo {upid} >> {self.runs_file}; "
                                                          f"exec sleep {seconds}"],
                                constraints=constraints)
        return upids

    def start_agent(self, node_id: str, state_dir: Path, log: Path, host: int = AGENT_HOST,
                    slots: int = 2) -> subprocess.Popen[bytes]:
        """``python -m cei_actors.eeagent --node-id NODE --pd ADMIN ...`` on host ``host``,
        given every host's admin (as a VM's agent is, decision NH6), listening on that host,
        with the operator's secret; then the node announced to the PD leader (the agents
        here are static nodes: nothing launches them). Its stderr goes to ``log``."""
        from ..pd.logic import parse_config

        assert self.hosts is not None
        where = self.hosts[host]
        argv = [sys.executable, "-m", "cei_actors.eeagent", "--node-id", node_id, "--slots", str(slots),
                "--heartbeat", "1", "--fence", str(self.fence_time),
                *[a for i in range(len(self.hosts)) for a in ("--pd", self.admin(i))],
                "--state-dir", str(state_dir), "--secret-file", str(self.home(host) / "operator-secret"),
                "--listen", where.address, *[a for net in self.allowlist() for a in ("--allow", net)]]
        with open(log, "w") as out:
            agent = where.popen(argv, env=child_env(), stdout=subprocess.DEVNULL, stderr=out)
        plan = self.plan_data(0)
        config = parse_config(plan["components"]["pd"]["config"] | {"engines": plan["pd"]["engines"]})
        self.pd().node_state(node_id, config.domain_id("default"), "RUNNING")
        return agent

    def states(self) -> dict[str, str]:
        return {p["upid"]: p["state"] for p in self.pd().describe_processes()}

    def wait_states(self, upids: list[str], wanted: set[str], timeout: float) -> dict[str, str]:
        def reached() -> dict[str, str] | None:
            try:
                states = self.states()
            except (RequestFailed, OutcomeUnknown):
                return None
            return states if all(states.get(u) in wanted for u in upids) else None

        return _wait(reached, timeout, f"{len(upids)} processes to be {'/'.join(sorted(wanted))}")

    def runs(self) -> collections.Counter[str]:
        """How many times each process started (from the runs file)."""
        try:
            return collections.Counter(self.runs_file.read_text().split())
        except FileNotFoundError:
            return collections.Counter()

    def check_ran_once(self, upids: list[str]) -> None:
        runs = self.runs()
        twice = {u: runs[u] for u in upids if runs[u] > 1}
        never = [u for u in upids if runs[u] == 0]
        if twice or never:
            raise ScenarioError(f"processes run twice: {twice}; never run: {never}")

    # ------------------------------------------------------------------------- replay

    def check_replay(self, timeout: float = 30.0) -> None:
        """Each leader's answers equal those of its log's replay at the same head."""
        last: list[str] = [""]

        def matches() -> bool:
            try:
                self._compare_replay()
            except (ScenarioError, RequestFailed, OutcomeUnknown) as exc:
                last[0] = str(exc)
                return False
            return True

        try:
            _wait(matches, timeout, "live state = replay", every=0.5)
        except ScenarioError:
            raise ScenarioError(f"live state differs from the replay: {last[0]}") from None

    def _views(self, clients: dict[str, Any]) -> dict[str, Any]:
        from ..epum.client import EPUMClient
        from ..provisioner.client import ProvisionerClient

        pd, epum = PDClient(clients["pd"]), EPUMClient(clients["epum"])
        prov = ProvisionerClient(clients["provisioner"])
        dump = pd.dump()
        return {
            "pd": {k: dump[k] for k in ("processes", "nodes", "resources", "queue", "definitions")},
            "epum": {d: epum.describe_domain(d) for d in sorted(epum.list_domains())},
            "provisioner": sorted(prov.describe_nodes(), key=lambda n: n["node_id"]),
        }

    def _compare_replay(self) -> None:
        from ..eventlog import open_log

        leaders = {c: self.leader(c) for c in KILLED}
        if any(m is None for m in leaders.values()):
            raise ScenarioError("a component has no leader")
        heads = {c: m["status"]["head"] for c, m in leaders.items()}  # type: ignore[index]
        clients = {c: ServiceClient(self.endpoint(), m["address"], timeout=10.0)  # type: ignore[index]
                   for c, m in leaders.items()}
        live = self._views(clients)
        after = {c: (self.leader(c) or {}).get("status", {}).get("head") for c in KILLED}
        if after != heads:
            raise ScenarioError(f"the log moved while reading ({heads} -> {after})")
        plan = load_plan(self.home(0) / "plan.yaml", home=self.home(0))
        replayed = {}
        with open_log(self.log_url) as log:
            for comp in KILLED:
                config = {"config": plan.start_config("pd")} if comp == "pd" else None
                component = component_for(comp, config)
                state = component.initial_state()
                for record in log.read(comp, 1, heads[comp]):
                    state = component.apply(state, component.registry.from_record(record))
                    broken = component.invariants(state)
                    if broken:
                        raise ScenarioError(f"{comp} offset {record.offset}: invariant broken: {broken}")
                replayed[comp] = _Replay(component, state)
        replay = self._views(replayed)
        for comp in KILLED:
            if _normal(live[comp]) != _normal(replay[comp]):
                raise ScenarioError(f"{comp}: live state differs from the replay of its log at head {heads[comp]}")


# ---------------------------------------------------------------------------------- demo

_OUTSIDER_PROBE = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(b"12>" + b"x" * 12)
    try:
        print("closed" if s.recv(100) == b"" else "answered")
    except ConnectionError:
        print("closed")
"""


class _Checks:
    """The demo's narration: numbered steps with the time since the start, and checks."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.failed: list[str] = []
        self.started = time.monotonic()

    def step(self, text: str) -> None:
        self.say(f"\n[{time.monotonic() - self.started:6.1f}s] {text}")

    def __call__(self, what: str, ok: bool, detail: str = "") -> bool:
        self.say(f"  CHECK {'ok    ' if ok else 'FAILED'} {what}{': ' + detail if detail and not ok else ''}")
        if not ok:
            self.failed.append(what)
        return ok


def demo(workdir: Path, say: Callable[[str], None] = print) -> bool:
    """The walkthrough of ``scripts/netns-demo`` (docs/multi-host.md, step by step): the
    three-host deployment loses host 0 and gets it back (:func:`_deployment_part`), then a VM
    launched on moto's EC2 gets its agent on another host (:func:`_cloud_part`). Tears
    everything down after each part, also after a failure. True if every check held."""
    check = _Checks(say)
    for part in (_deployment_part, _cloud_part):
        try:
            part(workdir, check)
        except Exception as exc:  # a failed step: the part's `with` blocks tore it down
            check(f"{part.__doc__.split(':')[0]} ran to its end", False,  # type: ignore[union-attr]
                  f"{type(exc).__name__}: {exc}")
    say(f"\n{'every check held' if not check.failed else 'FAILED: ' + '; '.join(check.failed)} "
        f"({time.monotonic() - check.started:.0f}s)")
    return not check.failed


def _deployment_part(workdir: Path, check: _Checks) -> None:
    """The three-host deployment: sections 1-7 of docs/multi-host.md, host 0 lost and back."""
    say, step = check.say, check.step
    step("§1-5. Hosts, the operator's secret and ZooKeeper credentials, the ensemble, one plan "
         "per host, `cei up` on each")
    with HostLoss(workdir / "hosts", say=lambda line: say(f"  {line}")) as sc:
        assert sc.hosts is not None
        say(f"  host 0's plan ({sc.home(0) / 'plan.yaml'}):")
        for line in (sc.home(0) / "plan.yaml").read_text().splitlines():
            if not line.startswith(("registry", "  sites", "  deployable", "  credentials")):
                say(f"    | {line}")
        where = sc.leaders()
        check("every component is led (by host 0, the first up)", where == {c: 0 for c in KILLED}, str(where))

        step("§1-2. Trust: a host outside the allowlist is cut off at accept; every host "
             "listens on its own address only")
        net = sc.hosts.network.network_address.packed[2]  # type: ignore[union-attr]
        outsider = sc.hosts.add_host(f"198.18.{net}.200")
        say(f"  every host accepts {sc.allowlist()}; an outsider host {outsider.address} on the "
            "same bridge sends a frame to host 0's admin")
        probe = sc.workdir / "outsider.py"
        probe.write_text(_OUTSIDER_PROBE)
        answer = outsider.run([sys.executable, str(probe), sc.hosts[0].address, str(ADMIN_PORT)],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        check("the outsider's connection is closed before anything is read", answer == "closed", answer)
        logged = [line for line in (sc.home(0) / "system.log").read_text().splitlines()
                  if f"refused a connection from {outsider.address}" in line]
        check("host 0 logged the refusal once", len(logged) == 1, str(logged))
        from .zkserver import listening_sockets

        # each host's metrics endpoint is on its own loopback (the plan's default `metrics`),
        # which in a namespace only that host reaches
        metrics = [json.loads((sc.home(i) / "system.json").read_text())["metrics"]["port"] for i in range(3)]
        wild = [(i, pid, a, port) for i in range(3) for pid in sc.hosts[i].pids()
                for a, port in _quiet(listening_sockets, pid)
                if a != sc.hosts[i].address and (a, port) != ("127.0.0.1", metrics[i])]
        check("no process of a host listens on a wildcard or another address (but its metrics "
              "endpoint on its own loopback)", not wild, str(wild))

        step("§6. Work: 4 long processes and 2 short ones on the static EEAgents of host 2; an "
             "agent process `ep1` on host 2 given every host's admin, as a VM's is, runs one more")
        static = {"node_id": list(NODES)}
        long = sc.schedule("long", 4, 600, constraints=static)
        short = sc.schedule("short", 2, 2, constraints=static)
        ep1_log = sc.workdir / "ep1.log"
        agent = sc.start_agent("ep1", sc.workdir / "ep1", ep1_log)
        try:
            say(f"  python -m cei_actors.eeagent --node-id ep1 "
                f"{' '.join('--pd ' + sc.admin(i) for i in range(3))} --listen {sc.hosts[AGENT_HOST].address} ...")
            pinned = sc.schedule("on-ep1", 1, 600, constraints={"node_id": "ep1"})
            sc.wait_states(long + pinned, {"RUNNING"}, 60)
            rounds = {p["upid"]: p.get("round") for p in sc.pd().describe_processes(long + pinned)}
            say(f"  running: {', '.join(long + pinned)}")
            check("ep1 runs its process, attached to host 0's admin",
                  sc.pd().describe_process(pinned[0])["node_id"] == "ep1"
                  and f"attached to {sc.admin(0)}" in ep1_log.read_text())

            step("§7. Host 0 lost: SIGKILL to every process in its namespace (its ZooKeeper "
                 "server, admin and the leaders)")
            t0 = time.monotonic()
            killed = sc.kill_host(0)
            say(f"  killed pids {killed}")
            took = sc.wait_failover(0, since=t0)
            after = sc.leaders()
            say(f"  leaders now on hosts {after}, {took:.1f}s after the kill")
            check("every component fails over to another host",
                  all(h not in (0, None) for h in after.values()), str(after))
            more = sc.schedule("after", 2, 600, constraints=static)
            pinned_after = sc.schedule("on-ep1-after", 1, 600, constraints={"node_id": "ep1"})
            states = sc.wait_states(more, {"RUNNING"}, 60)
            check("new work runs after the loss", all(states[u] == "RUNNING" for u in more))
            check("the long processes and ep1's kept running, not restarted",
                  all(states[u] == "RUNNING" for u in long + pinned)
                  and {p["upid"]: p.get("round") for p in sc.pd().describe_processes(long + pinned)} == rounds)
            try:
                sc.wait_states(pinned_after, {"RUNNING"}, 60)
                why = ""
            except ScenarioError as exc:
                why = f"{exc}; ep1's log: {ep1_log.read_text(errors='replace')[-300:]}"
            check(f"ep1 follows the PD, led on host {after['pd']} now: new work runs on it, the agent "
                  "process lives on",
                  not why and sc.pd().describe_process(pinned_after[0])["node_id"] == "ep1"
                  and agent.poll() is None, why or f"agent exit code {agent.poll()}")
            sc.wait_states(short, {"EXITED"}, 30)
            check("the short processes finished", True)

            step("§7. Host 0 back: its ZooKeeper server, then `cei up` with the same plan")
            sc.restart_host(0)
            modes = {m["name"]: (m["status"] or {}).get("mode") for c in KILLED for m in sc.members(c)
                     if m["host"] == 0}
            say(f"  host 0's replicas: {modes}")
            check("host 0's replicas are standbys (the leaders stay where they are)",
                  set(modes.values()) == {"standby"}, str(modes))

            step("Outcome")
            try:
                sc.check_ran_once(long + short + more + pinned + pinned_after)
                check("nothing lost, nothing run twice", True)
            except ScenarioError as exc:
                check("nothing lost, nothing run twice", False, str(exc))
            try:
                sc.check_replay()
                check("live state = replay of the log, for PD, EPUM and the Provisioner", True)
            except ScenarioError as exc:
                check("live state = replay of the log, for PD, EPUM and the Provisioner", False, str(exc))
        finally:
            agent.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(timeout=30)
        step("Tear down: every process of every host, the namespaces, the bridge")


def _cloud_part(workdir: Path, check: _Checks) -> None:
    """The VM walkthrough: docs/multi-host.md, "Walkthrough: a VM's agent on another host"."""
    from .cloudvm import CloudVM
    from .moto_server import MotoServer

    say, step = check.say, check.step
    step("W0. A VM's agent on another host: two new hosts A and B; moto's EC2 server on their "
         "bridge stands for the region's endpoint")
    runs = workdir / "cloud-runs.log"
    with Hosts(2) as hosts, MotoServer(host=hosts.gateway) as moto:
        say(f"  hosts: A {hosts[0].address}, B {hosts[1].address}; EC2 endpoint {moto.endpoint}")
        cloud = CloudVM(hosts, workdir / "cloud", moto)
        down = None
        try:
            step("W1-2. Host A's plan (PD, EPUM, Provisioner; site `ec2`, the `cei-agent` "
                 "contextualization); `cei up` on host A")
            cloud.up()
            plan = yaml.safe_load(cloud.plan.read_text())
            plan["registry"]["credentials"] = {site: "..." for site in plan["registry"]["credentials"]}
            excerpt = {"components": list(plan["components"]),
                       "epum.config.default_site": plan["components"]["epum"]["config"]["default_site"],
                       "registry": plan["registry"], "network": plan["network"]}
            say(f"  host A's plan ({cloud.plan}), in part:")
            for line in yaml.safe_dump(excerpt, sort_keys=False).splitlines():
                say(f"    | {line}")

            step("W3. `cei process schedule --upid p1` on host A: EPUM launches a VM at `ec2`")
            sched = cloud.cei("process", "schedule", "--upid", "p1", "--", "sh", "-c",
                              f"echo p1 $$ >> {runs}; exec sleep 600")
            check("p1 is scheduled", sched.returncode == 0, sched.stderr.strip())
            instance = cloud.launched_vm()
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            say(f"  VM {instance['InstanceId']} ({instance['InstanceType']}, {instance['ImageId']}), "
                f"tags {tags}")
            check("the VM is tagged with its node and launch", "cei:node_id" in tags and "cei:launch_id" in tags,
                  str(tags))

            step("W4. The VM boots: its userdata read back (DescribeInstanceAttribute), the secret "
                 "put at its secret_ref, `python -m cei_actors.eeagent --from-userdata` started on host B")
            userdata, doc = cloud.userdata(instance)
            say(f"  userdata: {userdata.decode().strip()}")
            check("the userdata names A's admin and the secret's path on the VM, never the secret",
                  doc["pd"] == f"{hosts[0].address}:{ADMIN_PORT}" and doc["secret_ref"] == f"file:{cloud.vm / 'secret'}"
                  and doc["node_id"] == tags.get("cei:node_id") and cloud.secret.read_bytes() not in userdata,
                  str(doc))
            agent = cloud.boot(userdata)

            step("W5. The agent attaches to A's admin, registers; the PD places p1 on the VM's node, "
                 "the agent runs it on host B")
            wait = cloud.cei("process", "wait", "p1", "--state", "RUNNING", "--timeout", "60", timeout=90)
            check("p1 is RUNNING (`cei process wait p1 --state RUNNING`)", wait.returncode == 0,
                  wait.stderr.strip() + " " + cloud.agent_log_tail(500))
            described = cloud.cei("--json", "process", "describe", "p1")
            node = json.loads(described.stdout).get("node_id") if described.returncode == 0 else None
            check("p1 was placed on the VM's node", node == doc["node_id"], f"{node} (VM: {doc['node_id']})")
            lines = _wait(lambda: runs.exists() and runs.read_text().splitlines(), 30, "p1 to start")
            pids = [int(line.split()[1]) for line in lines]
            check("p1 ran exactly once, on host B", len(lines) == 1 and pids[0] in hosts[1].pids(),
                  f"runs {lines}, host B's pids {hosts[1].pids()}")
            check("the VM's agent process lives on", agent.poll() is None, cloud.agent_log_tail(500))

            step("W6. `cei down` on host A: it terminates the VM first")
            down = cloud.down()
            check("`cei down` on host A", down.returncode == 0, down.stderr.strip())
            check("the VM is terminated at EC2", not cloud.vms("running")
                  and [i["InstanceId"] for i in cloud.vms("terminated")] == [instance["InstanceId"]])
        finally:
            if down is None:
                cloud.down()
        step("Tear down: the agent, host A's system, moto's server, the namespaces, the bridge")


def _quiet(fn: Callable[[int], list[Any]], pid: int) -> list[Any]:
    try:
        return fn(pid)
    except OSError:
        return []


if __name__ == "__main__":
    import tempfile

    from .netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"netns-demo: cannot run here: {reason}", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="netns-demo-") as tmp:
        sys.exit(0 if demo(Path(tmp) / "w") else 1)
