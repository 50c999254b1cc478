"""A real CEI system under load for the fault suite, and the checks made after every kill.

The system is the launcher's (``up``): thespian TCP base, ZooKeeper log, two replicas each of
PD, EPUM and Provisioner, EEAgent "VMs" booted by the local cloud driver. The test looks only
at its own processes: the replicas' pids (``Status``), the VMs of its home's local driver
(``nodes.json`` and the processes marked with its node directories: ``live_vms``) and the
worker processes it scheduled, whose command line carries a marker
made of this run's random tag.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from waiting import wait_for

from cei_actors.cli.logcmds import check_snapshot
from cei_actors.epum.client import EPUMClient
from cei_actors.eventlog import open_log
from cei_actors.ha.client import HAClient
from cei_actors.launch.components import component_for
from cei_actors.launch.launcher import Connection, connect, start_replica
from cei_actors.launch.plan import Plan, default_plan_text, load_plan
from cei_actors.pd.client import PDClient
from cei_actors.provisioner.client import ProvisionerClient
from cei_actors.provisioner.drivers import LocalProcessDriver
from cei_actors.runtime.client import NotFound, OutcomeUnknown, RequestFailed, ServiceClient
from cei_actors.runtime.control import Status
from cei_actors.runtime.core import Context
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.runtime.system import lookup

KILLED = ("pd", "epum", "provisioner", "ha")
CLIENTS = {"pd": PDClient, "epum": EPUMClient, "provisioner": ProvisionerClient, "ha": HAClient}
#: the HA group the load keeps alive, and its size
HA_GROUP, HA_N = "fgroup", 2
#: Crash points a restarted replica may be armed with, per component (runtime/faults.py).
POINTS = {
    "pd": ["after_append", "after_effects", "after_recovery"],
    "epum": ["after_append", "after_effects", "after_recovery"],
    "ha": ["after_append", "after_effects", "after_recovery"],
    "provisioner": ["after_work.create", "after_work.list", "after_append", "after_effects"],
}
FAILURES = (RequestFailed, OutcomeUnknown)


def live(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def live_vms(state_dir: Path) -> dict[str, dict]:
    """iaas_id -> the local driver's record (``nodes.json`` under ``state_dir``), for every VM
    whose init lives or whose processes carry its ``CEI_LOCAL_VM`` marker; plus, as
    ``unrecorded <node dir>``, each node directory of that driver whose marked processes run
    though the table does not record it (a create that died before its record): a VM no node
    can hold, so a leak. Only this driver's node directories are looked at."""
    if not (state_dir / "nodes.json").exists():
        return {}
    table = json.loads((state_dir / "nodes.json").read_text())
    marked = LocalProcessDriver(state_dir).marked_node_dirs()
    out = {k: r for k, r in table["nodes"].items() if live(r["pid"]) or r["node_dir"] in marked}
    recorded = {r["node_dir"] for r in table["nodes"].values()}
    out.update({f"unrecorded {d}": {"node_dir": d} for d in sorted(marked - recorded)})
    return out


def make_plan(tmp_path: Path, home: Path, zk_hosts: str) -> Plan:
    """The built-in plan, short timings, 2 replicas of each killed component, a 3 s session."""
    data = yaml.safe_load(default_plan_text())
    comps = data["components"]
    comps["provisioner"]["config"].update(query_interval=0.5, boot_query_interval=0.2)
    comps["epum"]["config"].update(decider_interval=0.3)
    comps["pd"]["config"].update(dispatch_retry_seconds=2.0, fence_time=8.0, fence_margin=2.0)
    # The load kills HA copies within seconds of their start, which HA rightly takes for a crash
    # loop; its backoff (up to 60 s by default) would outlast a settle. Backoff has its own tests
    # (test_ha_core); here it is capped so a group converges within a settle (decision F4).
    comps["ha"]["config"].update(poll_interval=0.5, backoff_max=8.0)
    for name in KILLED:
        comps[name]["replicas"] = 2
    # the test's own domain boots EEAgents with fixed settings (no PD engine passes them)
    dts = data["registry"]["deployable_types"]
    dts["faultnode"] = {**dts["eeagent"], "contextualization": {
        "method": "userdata", "userdata": "--slots 1 --heartbeat 1"}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_plan(path, home=home, log_url=f"zk://{zk_hosts}?timeout=3")


class ReplayService:
    """Answers a client's read-only request from a state rebuilt by replaying the log."""

    def __init__(self, component: Any, state: Any) -> None:
        self.component, self.state = component, state

    def call(self, message: Any, timeout: float | None = None) -> Any:
        decision = self.component.decide(self.state, message, Context(time.time()))
        assert not decision.events, f"{type(message).__name__} is not read-only"
        reply = decision.reply
        if isinstance(reply, ErrorReply):
            raise AssertionError(f"replay refused {type(message).__name__}: {reply}")
        assert isinstance(reply, Ok), reply
        return reply.value


def _views(clients: dict[str, Any]) -> dict[str, Any]:
    """What each component answers to its read-only requests (compared live vs replay)."""
    pd, epum, prov, ha = (clients[c] for c in KILLED)
    dump = pd.dump()
    return {
        "pd": {k: dump[k] for k in ("processes", "nodes", "resources", "queue", "definitions")},
        "epum": {d: epum.describe_domain(d) for d in sorted(epum.list_domains())},
        "provisioner": sorted(prov.describe_nodes(), key=lambda n: n["node_id"]),
        # what HA persists (what it observed of the PDs is volatile, rebuilt by asking them)
        "ha": [{"name": g["name"], "policy": g["policy"], "parameters": g["parameters"],
                "target": g["target"], "failed": g["failed"], "removing": g["removing"],
                "copies": sorted((c["upid"], c["pd"], c["terminating"]) for c in g["copies"])}
               for g in (ha.describe_group(x["name"]) for x in ha.list_groups())],
    }


@dataclass
class FaultSystem:
    """The system in ``home`` and what the load did to it."""

    home: Path
    plan: Plan
    info: dict[str, Any]
    rng: random.Random
    tag: str = field(default_factory=lambda: f"{random.randrange(10**6):06d}")
    conn: Connection | None = None
    long_upids: list[str] = field(default_factory=list)
    short_acked: set[str] = field(default_factory=set)
    short_unknown: set[str] = field(default_factory=set)
    short_n: int = 0
    domain_target: int | None = None
    epochs: dict[str, int] = field(default_factory=dict)
    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KILLED, 0))
    crash_kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KILLED, 0))
    restarts: int = 0
    sigkilled: set[int] = field(default_factory=set)
    pids: dict[str, int] = field(default_factory=dict)  # replica name -> its process
    #: chance that a restarted replica is armed with a crash point, and how many per
    #: component may be (None: no limit)
    arm_chance: float = 0.5
    arm_budget: int | None = None
    armed_restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KILLED, 0))
    #: node churn also terminates the PD's own nodes (else only the test domain's)
    churn_pd_nodes: bool = True
    #: the HA group has reached its N copies once (from then on never more than N may run)
    ha_converged: bool = False
    #: replica name -> the crash point it was started with (until its pid is known), and
    #: pid -> that point
    armed_pids_pending: dict[str, str] = field(default_factory=dict)
    armed_pids: dict[int, str] = field(default_factory=dict)
    #: seconds of load an armed leader gets to reach its crash point before kill -9
    armed_grace: float = 20.0
    #: what the last ``converged`` found unsettled (upids, node ids, a domain or group)
    stuck: list[str] = field(default_factory=list)

    # ---- connection and leaders ------------------------------------------------------------

    def connection(self) -> Connection:
        if self.conn is None:
            self.conn = connect(self.home, timeout=5.0)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def members(self, comp: str) -> list[tuple[str, Any, dict | None]]:
        conn = self.connection()
        return [(m.name, m.address, m.status) for m in conn.members(comp)]

    def leader(self, comp: str) -> tuple[Any, dict] | None:
        """The ready leader's (address, status), found by ``Status`` (nothing is re-pointed)."""
        for _, address, status in self.members(comp):
            if status and status.get("ready") and status.get("leader"):
                return address, status
        return None

    def client(self, comp: str, timeout: float = 5.0) -> Any:
        found = self.leader(comp)
        if found is None:
            raise OutcomeUnknown(f"{comp}: no ready leader", request="leader")
        service = ServiceClient(self.connection().asys, found[0], timeout=timeout)
        return CLIENTS[comp](service)

    # ---- load ------------------------------------------------------------------------------

    def marker(self, i: int) -> str:
        return f"{8600 + i}.{self.tag}"

    def start_long(self, n: int) -> None:
        pd = self.client("pd", timeout=20.0)
        for i in range(n):
            upid = f"long{i}"
            pd.schedule_process(upid, command=["sleep", self.marker(i)], restart_mode="always")
            self.long_upids.append(upid)

    def ha_marker(self) -> str:
        return f"9700.{self.tag}"

    def add_ha_group(self) -> None:
        """An npreserving group of HA_N copies, each a ``sleep`` carrying this run's HA marker."""
        self.client("ha", timeout=20.0).create_group(
            HA_GROUP, "npreserving", {"preserve_n": HA_N},
            {"command": ["sleep", self.ha_marker()], "restart_mode": "never"})

    def add_domain(self) -> None:
        epum = self.client("epum", timeout=20.0)
        with contextlib.suppress(RequestFailed):
            epum.add_domain_definition("preserve_n", {"general": {"engine_class": "preserve_n"}})
        epum.add_domain("fdom", "preserve_n", {
            "general": {"engine_class": "preserve_n"},
            "engine_conf": {"preserve_n": 1, "deployable_type": "faultnode"}})
        self.domain_target = 1

    def load_step(self) -> None:
        """One random operation: schedules, a domain change or node churn; failures (the leader
        is being killed) are tolerated: a schedule with an unknown outcome is resolved later."""
        op = self.rng.random()
        try:
            if op < 0.5:
                pd = self.client("pd")
                for _ in range(3):
                    upid = f"s{self.short_n}"
                    self.short_n += 1
                    self.short_unknown.add(upid)
                    pd.schedule_process(upid, command=["true"], restart_mode="abnormal")
                    self.short_unknown.discard(upid)
                    self.short_acked.add(upid)
            elif op < 0.65:
                target = self.rng.choice([0, 1, 2])
                self.client("epum").reconfigure_domain("fdom", {"engine_conf": {"preserve_n": target}})
                self.domain_target = target
            elif op < 0.8 and self.ha_converged:
                copies = self.marker_pids().get("ha", [])
                if copies:  # a copy dies: HA starts another, never more than N at once
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.rng.choice(copies), 9)
            else:
                prov = self.client("provisioner")
                running = [n for n in prov.describe_nodes() if n["state"] == "RUNNING"
                           and (self.churn_pd_nodes or n["deployable_type"] == "faultnode")]
                if running:
                    prov.terminate_nodes([self.rng.choice(running)["node_id"]])
        except FAILURES:
            pass
        self.check_no_double_run()

    # ---- kills -----------------------------------------------------------------------------

    def replica_pids(self, comp: str) -> dict[str, int | None]:
        return {name: (status or {}).get("pid") for name, _, status in self.members(comp)}

    def kill_leader(self, comp: str, deadline: float) -> str:
        """Wait under load for an armed leader to crash by itself (until ``deadline``, at least
        ``armed_grace`` s for one armed with a crash point), else
        kill -9 it; returns how it died."""
        found = wait_for(lambda: self.leader(comp), 30, what=f"a {comp} leader")
        pid = found[1]["pid"]
        if pid in self.armed_pids:  # its point may need a kind of load (a create, an append)
            deadline = max(deadline, time.monotonic() + self.armed_grace)
        self.pids.update({n: (s or {}).get("pid") for n, _, s in self.members(comp)})
        while time.monotonic() < deadline and live(pid):
            self.load_step()
        how = "crash point"
        if live(pid):
            self.sigkilled.add(pid)
            os.kill(pid, 9)
            how = "kill -9"
        wait_for(lambda: not live(pid), 10, 0.02, f"{comp} leader pid {pid} to die")
        return how

    def restart_dead(self) -> None:
        """Start every dead replica again under its name, as a standby, by the launcher's
        ``start_replica`` (every replica of the other components learns it); with probability
        ``arm_chance`` it carries a random crash point (so it may die at one once it leads)."""
        conn = self.connection()
        for comp in KILLED:
            for name, _address, status in self.members(comp):
                if status is not None and live(status.get("pid")):
                    continue
                pid = self.pids.get(name)
                self.kills[comp] += 1  # every death is a kill: ours, or a crash point's
                if pid not in self.sigkilled:
                    self.crash_kills[comp] += 1
                wait_for(lambda n=name: lookup(conn.asys, n) is None, 15, what=f"{name} to be freed")
                config = self.plan.start_config(comp)
                budget = self.arm_budget is None or self.armed_restarts[comp] < self.arm_budget
                if budget and self.rng.random() < self.arm_chance:
                    point = self.rng.choice(POINTS[comp])
                    p = 1.0 if self.arm_chance >= 1.0 else self.rng.choice([0.2, 0.5, 1.0])
                    config["crash_at"] = f"{comp}:{point}:{p}"
                    self.armed_pids_pending[name] = point
                    self.armed_restarts[comp] += 1
                try:
                    new = start_replica(conn, comp, conn.info["components"][comp].index(name), config=config)
                    with ServiceClient(conn.asys, new) as c:
                        self.pids[name] = c.call(Status())["pid"]
                except FAILURES:
                    # no other replica led, so it led at once and its crash point (after
                    # recovery, say) ended it before it answered: the next round counts it
                    if self.armed_pids_pending.pop(name, None) is None:
                        raise
                    self.pids[name] = None
                if name in self.armed_pids_pending:
                    self.armed_pids[self.pids[name]] = self.armed_pids_pending.pop(name)
                self.restarts += 1

    # ---- checks ----------------------------------------------------------------------------

    def marker_pids(self) -> dict[str, list[int]]:
        """upid -> live pids of this run's long workers, and "ha" -> those of its HA group's
        copies (a /proc scan for the markers)."""
        pattern = re.compile(rb"^sleep\x00(86\d\d|9700)\." + self.tag.encode() + rb"\x00?$")
        out: dict[str, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            m = pattern.match(cmd)
            if m and live(int(entry.name)):
                key = "ha" if m.group(1) == b"9700" else f"long{int(m.group(1)) - 8600}"
                out.setdefault(key, []).append(int(entry.name))
        return out

    def check_no_double_run(self) -> None:
        pids = self.marker_pids()
        copies = pids.pop("ha", [])
        doubled = {u: p for u, p in pids.items() if len(p) > 1}
        assert not doubled, f"a process runs twice: {doubled}"
        if self.ha_converged:
            assert len(copies) <= HA_N, f"{len(copies)} HA copies run for a group of {HA_N}: {copies}"

    def vms(self) -> dict[str, dict]:
        """The VMs of this system's local driver that have a live process (:func:`live_vms`)."""
        return live_vms(self.home / "nodes")

    def converged(self) -> str | None:
        """None once everything has settled; else what has not yet (and ``stuck`` names the
        processes, nodes, domain or group concerned, for ``capture``)."""
        self.stuck = []
        try:
            for comp in KILLED:
                reps = self.members(comp)
                if any(s is None for _, _, s in reps):
                    return f"{comp}: a replica does not answer"
                if self.leader(comp) is None:
                    return f"{comp}: no ready leader"
            pd, epum, prov = (self.client(c, timeout=10.0) for c in ("pd", "epum", "provisioner"))
            for upid in sorted(self.short_unknown):  # a schedule whose outcome is unknown
                try:
                    pd.describe_process(upid)
                except NotFound:
                    pd.schedule_process(upid, command=["true"], restart_mode="abnormal")
                self.short_unknown.discard(upid)
                self.short_acked.add(upid)
            procs = {p["upid"]: p for p in pd.describe_processes()}
            lost = sorted(u for u in [*self.short_acked, *self.long_upids] if u not in procs)
            assert not lost, f"processes lost by the PD: {lost}"
            waiting = [u for u in self.short_acked if procs[u]["state"] not in ("EXITED",)]
            if waiting:
                self.stuck = sorted(waiting)[:3]
                return f"{len(waiting)} short processes not EXITED yet (e.g. {procs[waiting[0]]})"
            markers = self.marker_pids()
            for upid in self.long_upids:
                p = procs[upid]
                self.stuck = [upid]
                if p["state"] != "RUNNING":
                    return f"{upid} is {p['state']}"
                if len(markers.get(upid, [])) != 1:
                    return f"{upid}: {len(markers.get(upid, []))} live copies"
            group = self.client("ha", timeout=10.0).describe_group(HA_GROUP)
            self.stuck = [HA_GROUP]
            if group["status"] != "STEADY":
                return f"{HA_GROUP}: {group['status']} ({group['why']})"
            copies = markers.get("ha", [])
            if len(copies) != HA_N:
                return f"{HA_GROUP}: {len(copies)} copies run, {HA_N} wanted"
            self.ha_converged = True
            dom = epum.describe_domain("fdom")
            self.stuck = ["fdom"]
            insts = [i for i in dom["instances"] if i["state"] not in ("TERMINATED", "FAILED", "REJECTED")]
            if len(insts) != self.domain_target or any(i["state"] != "RUNNING" for i in insts):
                return f"fdom: {[i['state'] for i in insts]} for a target of {self.domain_target}"
            nodes = prov.describe_nodes()
            vms = self.vms()
            held = [n for n in nodes if n.get("iaas_id") and n["state"] not in ("TERMINATED", "FAILED", "REJECTED")]
            iaas = [n["iaas_id"] for n in held]
            assert len(iaas) == len(set(iaas)), f"a VM is held by two nodes: {held}"
            leaked = sorted(set(vms) - set(iaas))
            if leaked:
                self.stuck = [n["node_id"] for n in nodes if n.get("iaas_id") in leaked][:3] or ["fdom"]
                return f"VMs no node holds (yet): {leaked}"
            missing = sorted(n["node_id"] for n in held if n["state"] == "RUNNING" and n["iaas_id"] not in vms)
            if missing:
                self.stuck = missing[:3]
                return f"RUNNING nodes without a live VM: {missing}"
            if any(n["state"] != "RUNNING" for n in held):
                self.stuck = [n["node_id"] for n in held if n["state"] != "RUNNING"][:3]
                return f"nodes still changing: {sorted(n['state'] for n in held)}"
        except FAILURES as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def diagnosis(self) -> str:
        """What the PD and EPUM leaders say about nodes and needs (for a failure message)."""
        try:
            dump = self.client("pd", timeout=10.0).dump()
            epum = self.client("epum", timeout=10.0)
            doms = {d: [(i["instance_id"][:10], i["state"]) for i in epum.describe_domain(d)["instances"]]
                    for d in epum.list_domains()}
            pids = {c: {n: (s or {}).get("pid") for n, _, s in self.members(c)} for c in KILLED}
            return (f"PD needs {dump.get('needs')}, nodes {[(n.get('node_id'), n.get('state')) for n in dump['nodes']]}, "
                    f"resources {len(dump['resources'])}; EPUM domains {doms}; replicas {pids}")
        except Exception as exc:  # noqa: BLE001 - a diagnosis only
            return f"(no diagnosis: {exc})"

    def replicas(self) -> str:
        """One line per replica: its pid and what ``Status`` says of its leadership."""
        lines = []
        for comp in KILLED:
            for name, _, s in self.members(comp):
                if s is None:
                    lines.append(f"  {name}: no answer (pid {self.pids.get(name)})")
                    continue
                armed = self.armed_pids.get(s.get("pid"))
                lines.append(f"  {name}: pid {s.get('pid')} mode {s.get('mode')} leader {s.get('leader')} "
                             f"epoch {s.get('epoch')} head {s.get('head')} held {s.get('held')}"
                             + (f" armed {armed}" if armed else "")
                             + (f" last_error {s.get('last_error')}" if s.get("last_error") else ""))
        return "\n".join(lines)

    def log_why(self, entity: str, tail: int = 30) -> str:
        """``cei log why ENTITY`` on this system's log (its last ``tail`` lines of history)."""
        cmd = [sys.executable, "-c", "from cei_actors.cli_entry import entry; entry()",
               "--home", str(self.home), "--log", self.plan.log_url, "log", "why", entity]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return f"  (cei log why {entity}: timed out)"
        lines = (done.stdout + done.stderr).splitlines()
        if len(lines) > tail + 8:
            lines = [*lines[:8], f"  ... {len(lines) - tail - 8} lines ...", *lines[-tail:]]
        return "\n".join(f"  | {line}" for line in lines)

    def capture(self, killed: str | None, problem: str) -> str:
        """Why the system has not converged: the problem, every replica's leadership, the
        leaders' view of nodes and needs, and ``cei log why`` of what is stuck."""
        parts = [f"NOT CONVERGED after killing {killed}: {problem}",
                 f"kills so far {self.kills}, by crash points {self.crash_kills}, restarts {self.restarts}",
                 "replicas:"]
        for step in (self.replicas, self.diagnosis):
            try:
                parts.append(step())
            except Exception as exc:  # noqa: BLE001 - a diagnosis only
                parts.append(f"  ({step.__name__} failed: {exc})")
        for entity in self.stuck:
            parts.append(f"cei log why {entity}:")
            parts.append(self.log_why(entity))
        return "\n".join(parts)

    def check_epochs(self, killed: str | None) -> None:
        for comp in KILLED:
            found = self.leader(comp)
            assert found is not None, comp
            epoch = found[1]["epoch"]
            before = self.epochs.get(comp, 0)
            assert epoch >= before, f"{comp}: epoch went down from {before} to {epoch}"
            if comp == killed:
                assert epoch > before, f"{comp}: a new leader at the old epoch {epoch}"
            self.epochs[comp] = epoch

    def check_replay(self) -> None:
        """Each leader's answers equal the answers of its log's replay at the same head, and
        ``cei log check``'s checks hold (every invariant after every event; the snapshot
        restores to the replay up to it)."""
        heads = {c: self.leader(c)[1]["head"] for c in KILLED}  # type: ignore[index]
        live_views = _views({c: self.client(c, timeout=10.0) for c in KILLED})
        after = {c: self.leader(c)[1]["head"] for c in KILLED}  # type: ignore[index]
        if heads != after:
            raise _Moved(f"heads moved {heads} -> {after}")
        replayed: dict[str, Any] = {}
        with open_log(self.plan.log_url) as log:
            for comp in KILLED:
                config = {"config": self.plan.start_config("pd")} if comp == "pd" else None
                component = component_for(comp, config)
                state = component.initial_state()
                snap = log.load_snapshot(comp)
                at_snap = None
                for record in log.read(comp, 1, heads[comp]):
                    state = component.apply(state, component.registry.from_record(record))
                    broken = component.invariants(state)
                    assert not broken, f"{comp} offset {record.offset}: {broken}"
                    if snap is not None and record.offset == snap.offset:
                        at_snap = _normal(component.snapshot(state))
                if snap is not None and snap.offset <= heads[comp]:
                    problem = check_snapshot(component, snap, at_snap, heads[comp])
                    assert problem is None, f"{comp} snapshot: {problem}"
                replayed[comp] = ReplayService(component, state)
        replay_views = _views({c: CLIENTS[c](replayed[c]) for c in KILLED})
        for comp in KILLED:
            assert _normal(live_views[comp]) == _normal(replay_views[comp]), \
                f"{comp}: live state differs from the replay of its log at head {heads[comp]}"

    def settle_and_check(self, killed: str | None, timeout: float = 45.0) -> None:
        """Wait (no load) for convergence, then check epochs and live state vs replay."""
        self.restart_dead()
        last = [""]

        def settled() -> bool:
            self.restart_dead()  # a standby armed with a crash point may die as it leads
            problem = self.converged()
            last[0] = problem or ""
            self.check_no_double_run()
            if problem is None and any(self.leader(c) is None for c in KILLED):
                return False
            return problem is None

        try:
            wait_for(settled, timeout, 0.25, "convergence")
        except AssertionError:
            text = self.capture(killed, last[0])
            print(text, flush=True)  # an xfail's message is not shown; -s shows this
            raise NotConverged(text) from None
        self.check_epochs(killed)

        def replay_matches() -> bool:
            try:
                self.check_replay()
            except (_Moved, *FAILURES):
                return False
            return True

        wait_for(replay_matches, 30, 0.2, "a quiet moment to compare live state and replay")


class NotConverged(AssertionError):
    """The system did not settle in time after a kill (a liveness failure, not a safety one)."""


class _Moved(Exception):
    """The log moved while the live state was read: try again."""


def _normal(data: Any) -> Any:
    import msgpack

    return msgpack.unpackb(msgpack.packb(data, use_bin_type=True, default=str), raw=False,
                           strict_map_key=False)


def run_faults(system: FaultSystem, kills_per_component: int, dwell: tuple[float, float]) -> list[str]:
    """Kill each component's leader ``kills_per_component`` times (components in a random
    order each round), each at a random moment within ``dwell`` seconds of load, checking
    everything after each. Returns one line per kill."""
    lines = []
    for _ in range(kills_per_component):
        for comp in system.rng.sample(KILLED, len(KILLED)):
            before = system.kills[comp]
            deadline = time.monotonic() + system.rng.uniform(*dwell)
            t0 = time.monotonic()
            how = system.kill_leader(comp, deadline)
            system.settle_and_check(comp)
            assert system.kills[comp] >= before + 1
            lines.append(f"{comp}: {how}, settled in {time.monotonic() - t0:.1f}s")
            print(lines[-1], flush=True)  # progress, for a long run under -s
    # an armed replica that came to lead at the last kill gets its load too (some points need
    # a create or an append, which a settling system without load does not make)
    for comp in KILLED:
        found = system.leader(comp)
        if found is not None and found[1]["pid"] in system.armed_pids:
            t0 = time.monotonic()
            how = system.kill_leader(comp, t0)
            system.settle_and_check(comp)
            lines.append(f"{comp} (armed, last): {how}, settled in {time.monotonic() - t0:.1f}s")
            print(lines[-1], flush=True)
    return lines
