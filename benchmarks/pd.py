"""Process Dispatcher throughput: the matchmaker alone, and launches end to end.

**Matchmaker** (pure, in process). A PD state with ``10,000 x scale`` nodes of 8 slots (one
agent each) and ``100,000 x scale`` queued processes, built by folding events. Then one PD
decision places everything that fits (80% of the queue): the real ``decide`` path, i.e. the
matchmaker's index, the ``ProcessAssigned`` events applied as they are emitted, and the
``LaunchProcess`` effects. Figures:

- placements/s of that decision (goal >= 20,000/s) and of the bare index loop
  (``next_placement`` + fold, no effects);
- the cost of a second pass while the 20% left over match nothing (they are not rescanned);
- baseline: the original's algorithm as a full rescan (``matchmaker.naive_place``: for each
  queued process, gather every candidate resource, group per node, sort), measured on the
  first ``--naive`` queued processes against the same nodes; ``ratio`` = ours / baseline.

**End to end** (one host): a ZooKeeper server, the PD actor on the thespian TCP base with a
ZooKeeper log, ``--agents`` EEAgent processes (``python -m cei_actors.eeagent``), nodes
announced by hand. ``--launches`` processes running ``true`` are scheduled as fast as one
client can send them (50 per ``ScheduleProcesses`` request); the figure is launches per second
from the first request until every process has started (RUNNING or EXITED), sustained: slots
are reused as processes exit. ZooKeeper is first warmed with 4,000 writes (a fresh JVM burns
~4 ms CPU per write until it has compiled itself, ~0.5-1 ms after), and each run has a warm-up
run before it (a fifth as many launches, 500 at most). With it, the CPU each part used per
launch (from ``/proc``: the PD's actor system, the agents, their reapers, the commands
themselves, ZooKeeper, this harness) and what creating one file costs in the work dir
(``--workdir``; each launch creates two output files). On ext4 without a journal (this VM's
disk) a create scans past every recently deleted inode of its block group (the kernel's
``recently_deleted``): it costs 0.03 ms, or up to 1 ms for minutes after a burst of deletions
nearby (such as the cleanup of this benchmark's last run). So the harness deletes nothing until
the end, runs the agents' own ceiling last, and prints the create cost it measured before the
runs (with a warning when it is high). Baseline (500 launches at most, it is slow): one request
per process, group commit off and a heartbeat for every change (one ZooKeeper append per
message and one heartbeat per exit, as the original). Also shown: one request per process with
today's settings, the agents' own ceiling (``ProcessSupervisor`` launching ``true`` with
nothing around it), and the PD pipeline alone (in-system simulated agents whose processes exit
at once).

    python -m benchmarks.pd [--scale 1.0] [--naive 300] [--launches 3000] [--agents 2]
                            [--slots 64] [--workdir DIR] [--skip-e2e] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thespian.actors import ActorTypeDispatcher  # noqa: E402

from benchmarks.disk import check_disk  # noqa: E402
from cei_actors.pd import states as ps  # noqa: E402
from cei_actors.pd.events import NodeAdded, ProcessAssigned, ProcessScheduled, ResourceAdded  # noqa: E402
from cei_actors.pd.logic import ProcessDispatcher  # noqa: E402
from cei_actors.pd.matchmaker import naive_place  # noqa: E402
from cei_actors.pd.messages import Matchmake  # noqa: E402
from cei_actors.pd.state import PDState  # noqa: E402
from cei_actors.runtime.core import Context  # noqa: E402

GOAL = "matchmaker >= 20,000 placements/s (100k queued, 10k nodes x 8 slots); end to end >= 1,000 launches/s"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOTS = 8


# ---- the matchmaker ------------------------------------------------------------------------------


def _spec() -> dict[str, Any]:
    return {
        "command": ["true"], "constraints": {"engine": "e1"}, "engine": "e1",
        "node_exclusive": None, "queueing_mode": ps.QUEUE_ALWAYS,
        "restart_mode": ps.RESTART_NEVER, "subscribers": [], "configuration": {},
        "min_start_interval": None, "omit_from_system_restart": False, "env": None, "cwd": None,
        "definition_id": None, "name": None,
    }


def build_state(nodes: int, queued: int) -> PDState:
    s = PDState()
    spec = _spec()
    for i in range(queued):
        s.apply(ProcessScheduled(f"p{i}", 0, spec, 0.0))
    for n in range(nodes):
        s.apply(NodeAdded(f"n{n}", "pd_domain_e1", "e1", {"hostname": f"h{n}"}, 0.0))
        s.apply(ResourceAdded(f"a{n}", f"n{n}", SLOTS, 0.0))
    return s


def pd_component() -> ProcessDispatcher:
    return ProcessDispatcher(
        {"engines": {"e1": {"slots": SLOTS}}, "static_resources": True,
         "restart_throttling_config": {"minimum_time_between_starts": 0}}
    )


def bench_matchmaker(scale: float, naive_n: int) -> list[dict[str, Any]]:
    nodes, queued = max(1, int(10_000 * scale)), max(1, int(100_000 * scale))
    t = time.perf_counter()
    state = build_state(nodes, queued)
    build_s = time.perf_counter() - t
    fits = min(queued, nodes * SLOTS)

    # the PD's decision: index + events applied as emitted + launch effects
    pd = pd_component()
    gc.collect()
    gc.disable()
    try:
        t = time.perf_counter()
        decision = pd.decide(state, Matchmake(), Context(1.0, random.Random(1)))
        decide_s = time.perf_counter() - t
        placed = sum(1 for e in decision.events if isinstance(e, ProcessAssigned))
        state.pre.clear()
        # a second pass: what is left matches nothing and must not be rescanned
        t = time.perf_counter()
        again = pd.decide(state, Matchmake(), Context(2.0, random.Random(1)))
        idle_s = time.perf_counter() - t
        state.pre.clear()
    finally:
        gc.enable()
    assert placed == fits, (placed, fits)
    assert not [e for e in again.events if isinstance(e, ProcessAssigned)]
    waiting = state.state_count[ps.WAITING]

    # the bare index loop on a fresh state
    state2 = build_state(nodes, queued)
    gc.collect()
    gc.disable()
    try:
        t = time.perf_counter()
        n = 0
        mm = state2.mm
        while (pick := mm.next_placement()) is not None:
            p, res = pick
            state2.apply(ProcessAssigned(p.upid, p.round, res.resource_id, 1.0))
            n += 1
        index_s = time.perf_counter() - t
    finally:
        gc.enable()
    assert n == fits

    # baseline: the full-rescan algorithm on the first naive_n processes, same nodes
    state3 = build_state(nodes, min(queued, naive_n))
    queue = [state3.processes[u] for u in state3.queue()]
    t = time.perf_counter()
    naive = naive_place(queue, state3.nodes, state3.resources)
    naive_s = time.perf_counter() - t
    naive_rate = len(naive) / naive_s
    # the naive second pass: every leftover process scans every resource again
    sample = [state.processes[u] for u in state.queue()[:50]]
    t = time.perf_counter()
    naive_place(sample, state.nodes, state.resources)
    naive_idle_s = (time.perf_counter() - t) / max(1, len(sample)) * waiting

    decide_rate = placed / decide_s
    index_rate = n / index_s
    return [
        _r("matchmaker: PD decision placing the queue", decide_rate, "placements/s", naive_rate,
           note=f"{placed:,} of {queued:,} queued on {nodes:,} nodes x {SLOTS} slots in {decide_s:.2f} s "
           f"(state built in {build_s:.1f} s); baseline: full rescan on {len(naive):,} processes"),
        _r("matchmaker: bare index loop", index_rate, "placements/s", naive_rate,
           note="next_placement + fold, no events kept, no effects"),
        _r("matchmaker: second pass, leftovers match nothing", idle_s * 1000, "ms", naive_idle_s * 1000,
           lower_is_better=True,
           note=f"{waiting:,} waiting; baseline rescans them all (extrapolated from 50)"),
    ]


def _r(metric: str, value: float, unit: str, baseline: float | None, *, lower_is_better: bool = False,
       note: str = "") -> dict[str, Any]:
    ratio = None
    if baseline:
        ratio = (baseline / value) if lower_is_better and value else (value / baseline)
    return {"metric": metric, "value": round(value, 3), "unit": unit,
            "baseline": None if baseline is None else round(baseline, 3),
            "ratio": None if ratio is None else round(ratio, 2), "note": note}


# ---- end to end ------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds per role over a run, read from ``/proc`` (Linux), for a per-launch breakdown.

    Roles: ``zookeeper`` (the server's pid), ``eeagents`` (``python -m cei_actors.eeagent``),
    ``reapers`` (the agents' reaper processes), ``commands`` (reaped children of agents and
    reapers: the processes themselves), ``harness`` (this process) and ``pd system`` (every
    other process forked from this one: the actor system's admin, logger and the PD actor).
    """

    def __init__(self, zk_pid: int | None) -> None:
        self.zk_pid = zk_pid
        self.me = os.getpid()
        self.hz = os.sysconf("SC_CLK_TCK")

    def _role(self, pid: int, cmd: str) -> str | None:
        if pid == self.zk_pid:
            return "zookeeper"
        if pid == self.me:
            return "harness"
        if "cei_actors.eeagent" in cmd and "reaper" not in cmd:
            return "eeagents"
        if "reaper" in cmd:
            return "reapers"
        if cmd == self.my_cmd:
            return "pd system"
        return None

    def snap(self) -> dict[int, tuple[str, float, float]]:
        """pid -> (role, own CPU s, reaped children's CPU s) for the processes of this run."""
        self.my_cmd = _cmdline(self.me)
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                cmd = _cmdline(pid)
            except OSError:
                continue
            role = self._role(pid, cmd)
            if role is None:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            own = (int(fields[11]) + int(fields[12])) / self.hz
            kids = (int(fields[13]) + int(fields[14])) / self.hz
            out[pid] = (role, own, kids)
        return out

    @staticmethod
    def per_role(before: dict[int, tuple[str, float, float]], after: dict[int, tuple[str, float, float]]) -> dict[str, float]:
        """CPU seconds each role used between two snapshots (commands: children of agents/reapers)."""
        roles: dict[str, float] = {}
        for pid, (role, own, kids) in after.items():
            _, own0, kids0 = before.get(pid, (role, 0.0, 0.0))
            roles[role] = roles.get(role, 0.0) + own - own0
            if role in ("eeagents", "reapers"):
                roles["commands"] = roles.get("commands", 0.0) + kids - kids0
        return roles


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def supervisor_ceiling(n: int, workdir: str | None = None) -> float:
    """Launches/s of a bare ProcessSupervisor running ``true``, 50 per ``launch_many`` (until all
    have exited); ``on_change`` does nothing, as the agent's only marks its heartbeat dirty."""
    from cei_actors.eeagent.supervisor import ProcessSupervisor

    d = tempfile.mkdtemp(prefix="pdbench-sup-", dir=workdir)
    sup = ProcessSupervisor(d, n, on_change=lambda snapshot: None)
    try:
        t = time.perf_counter()
        for i in range(0, n, 50):  # as the agent does with a PD's batch
            sup.launch_many([(f"u{j}", 0, ["true"]) for j in range(i, min(n, i + 50))])
        for i in range(n):
            sup.wait(f"u{i}", 0, timeout=120)
        return n / (time.perf_counter() - t)
    finally:
        sup.shutdown()
        shutil.rmtree(d, ignore_errors=True)


class SimAgent(ActorTypeDispatcher):
    """An in-system stand-in for an EEAgent whose processes exit at once (no real process).

    ``("init", pd, agent_id, node_id)`` starts it; it answers the PD's requests like the real
    agent and sends one level-based heartbeat per burst of requests.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pd: Any = None
        self.agent_id = ""
        self.node_id = ""
        self.procs: dict[tuple[str, int], str] = {}
        self.pending = False

    def receiveMessage(self, msg: Any, sender: Any) -> None:  # noqa: N802
        from thespian.actors import WakeupMessage

        from cei_actors.eeagent.messages import (
            AgentHeartbeat,
            AgentRequests,
            CleanupProcess,
            LaunchProcess,
            TerminateProcess,
        )
        from cei_actors.runtime.control import Hello

        if isinstance(msg, tuple) and msg and msg[0] == "init":
            _, self.pd, self.agent_id, self.node_id = msg
            self.send(self.pd, Hello(f"eeagent:{self.agent_id}"))
            self.send(sender, "ok")
            msg = AgentRequests([])
        if isinstance(msg, WakeupMessage):
            self.pending = False
            procs = [{"upid": u, "round": r, "state": st, "msg": ""} for (u, r), st in self.procs.items()]
            self.send(self.pd, AgentHeartbeat(self.agent_id, self.node_id, time.time(), procs))
            return
        requests = msg.requests if isinstance(msg, AgentRequests) else [msg]
        for m in requests:
            if isinstance(m, LaunchProcess):
                self.procs.setdefault((m.upid, m.round), "EXITED")
            elif isinstance(m, CleanupProcess):
                self.procs.pop((m.upid, m.round), None)
            elif isinstance(m, TerminateProcess) and (m.upid, m.round) in self.procs:
                self.procs[(m.upid, m.round)] = "TERMINATED"
        if not self.pending and self.pd is not None:
            self.pending = True
            self.wakeupAfter(timedelta(0))


class E2E:
    """One PD + agents + ZooKeeper log; ``run()`` returns launches/s."""

    def __init__(
        self, zk_hosts: str, agents: int, slots: int, group_commit: bool, workdir: str, simulated: bool = False,
        pd_config: dict[str, Any] | None = None, agent_args: tuple[str, ...] = (),
    ) -> None:
        from cei_actors.pd.actor import ProcessDispatcherActor
        from cei_actors.runtime.control import Start, Started
        from cei_actors.runtime.system import start_system

        self.workdir = workdir
        self.asys = start_system()
        self.procs: list[subprocess.Popen] = []
        self.log_url = f"zk://{zk_hosts}/pdbench-{uuid.uuid4().hex[:8]}"
        config = {
            "engines": {"e1": {"slots": slots, "heartbeat_period": 5.0}},
            "static_resources": True, "dispatch_retry_seconds": 30.0,
            "group_commit": group_commit, **(pd_config or {}),
        }
        self.pd = self.asys.createActor(ProcessDispatcherActor, globalName="pd")
        started = self.asys.ask(self.pd, Start(self.log_url, config=config), 60)
        assert isinstance(started, Started), started
        port = self.asys.cei_admin_port
        for i in range(agents):
            node = f"n{i}"
            if simulated:
                self.call(self._node_state(node))
                sim = self.asys.createActor(SimAgent)
                assert self.asys.ask(sim, ("init", self.pd, node, node), 30) == "ok"
                continue
            log = open(os.path.join(workdir, f"{node}.log"), "ab")  # noqa: SIM115
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "cei_actors.eeagent", "--node-id", node, "--pd", f"127.0.0.1:{port}",
                 "--slots", str(slots), "--state-dir", os.path.join(workdir, node), "--heartbeat", "5",
                 "--log-level", "WARNING", *agent_args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
            self.call(self._node_state(node))
        deadline = time.monotonic() + 60
        while len(self.call(self._dump())["resources"]) < agents:
            assert time.monotonic() < deadline, "agents did not report"
            time.sleep(0.1)

    @staticmethod
    def _node_state(node: str) -> Any:
        from cei_actors.epum.messages import NodeState

        return NodeState(node, "pd_domain_e1", "RUNNING", {})

    @staticmethod
    def _dump() -> Any:
        from cei_actors.pd.messages import Dump

        return Dump()

    def call(self, message: Any, timeout: float = 30.0) -> Any:
        from cei_actors.runtime.control import Request, Response
        from cei_actors.runtime.messages import Ok

        rid = uuid.uuid4().hex
        reply = self.asys.ask(self.pd, Request(rid, message), timeout)
        assert isinstance(reply, Response) and isinstance(reply.reply, Ok), reply
        return reply.reply.value

    def run(self, launches: int, batch: int = 1, meter: CpuMeter | None = None) -> tuple[float, float, dict[str, float]]:
        """(launches/s until all started, seconds spent sending the requests, CPU s per role)."""
        from cei_actors.pd.messages import ProcessCounts, ScheduleProcess, ScheduleProcesses
        from cei_actors.runtime.control import Request

        tag = uuid.uuid4().hex[:6]
        before = self.call(ProcessCounts())
        done0 = before.get(ps.RUNNING, 0) + before.get(ps.EXITED, 0)
        reqs = [ScheduleProcess(f"{tag}-{i}", command=["true"], restart_mode="never") for i in range(launches)]
        cpu0 = meter.snap() if meter else {}
        t0 = time.perf_counter()
        for i in range(0, launches, batch):
            chunk = reqs[i : i + batch]
            msg = chunk[0] if batch == 1 else ScheduleProcesses(chunk)
            self.asys.tell(self.pd, Request("", msg))
        sent = time.perf_counter() - t0
        deadline = time.monotonic() + 600
        while True:
            counts = self.call(ProcessCounts())
            started = counts.get(ps.RUNNING, 0) + counts.get(ps.EXITED, 0) - done0
            if started >= launches:
                rate = launches / (time.perf_counter() - t0)
                return rate, sent, (meter.per_role(cpu0, meter.snap()) if meter else {})
            assert time.monotonic() < deadline, f"stuck at {counts}"
            # each poll costs the PD a request: seldom until the end is near, then often
            time.sleep(0.1 if started < 0.9 * launches else 0.01)

    def close(self) -> None:
        from cei_actors.runtime.system import shutdown_system

        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        shutdown_system(self.asys)


def warm_zookeeper(hosts: str, writes: int = 4000, size: int = 16_000) -> float:
    """Commit ``writes`` transactions of ``size`` bytes (a PD batch's shape) to a scratch path,
    50 in flight, then remove them: a fresh server's JVM spends the first thousands of requests
    compiling itself (measured here: ~4 ms CPU per write cold, ~0.5 warm), and a running system's
    ZooKeeper is warm. Returns the seconds it took."""
    from kazoo.client import KazooClient

    client = KazooClient(hosts=hosts)
    client.start(timeout=30)
    t = time.perf_counter()
    try:
        client.ensure_path("/bench-warmup")
        data = b"x" * size
        for i in range(0, writes, 50):
            pending = []
            for j in range(i, min(writes, i + 50)):
                tx = client.transaction()
                tx.create(f"/bench-warmup/n{j}", data)
                pending.append(tx.commit_async())
            for result in pending:
                result.get(timeout=30)
        client.delete("/bench-warmup", recursive=True)
    finally:
        client.stop()
        client.close()
    return time.perf_counter() - t


def bench_e2e(launches: int, agents: int, slots: int, workdir: str | None = None) -> list[dict[str, Any]]:
    from cei_actors.testing.zkserver import ZkServer

    out = []
    work = tempfile.mkdtemp(prefix="pdbench-", dir=workdir)
    small = min(launches, 500)  # the slow runs: long enough to time, short enough to wait for
    naive_pd = {"group_commit_delay": 0.0}
    naive_agent = ("--heartbeat-gap", "0")
    try:
        create_ms = check_disk(work)
        # ZooKeeper stays on the default temp dir's disk whatever --workdir says (its log fsyncs)
        with ZkServer(heap="512m") as zk:  # its own temp dir, removed when it stops
            warm_zookeeper(zk.hosts)
            rates = {}
            # name, group commit, schedules per request, simulated agents, launches, PD config, agent args
            runs = (
                ("batched", True, 50, False, launches, {}, ()),
                ("single", True, 1, False, small, {}, ()),
                ("base", False, 1, False, small, naive_pd, naive_agent),
                ("sim", True, 50, True, max(launches, 1000), {}, ()),
                ("sim-base", False, 1, True, small, naive_pd, ()),
            )
            meter = CpuMeter(zk.pid)
            for name, gc_on, batch, simulated, n, pd_config, agent_args in runs:
                sysdir = os.path.join(work, name)
                os.makedirs(sysdir)
                e2e = E2E(zk.hosts, agents, slots, gc_on, sysdir, simulated, pd_config, agent_args)
                try:
                    # warm up (connections, caches, ZooKeeper's JIT): the figure is the
                    # sustained rate of a running system, not its first seconds
                    e2e.run(max(20, min(500, n // 5)), batch)
                    rates[name] = e2e.run(n, batch, meter if name == "batched" else None)
                finally:
                    e2e.close()
        ceiling = supervisor_ceiling(min(1000, launches), work)
        base = rates["base"][0]
        where = f"{launches} x `true` on {agents} agents x {slots} slots, ZooKeeper log"
        naive = (f"baseline: {small} launches, one request per process, group commit off, a "
                 "heartbeat for every change")
        out.append(_r("end to end: launches reaching RUNNING", rates["batched"][0], "launches/s", base,
                      note=f"{where}; 50 schedules per request (sent in {rates['batched'][1]:.2f} s); {naive}"))
        roles = rates["batched"][2]
        if roles:
            total = sum(roles.values())
            wall = launches / rates["batched"][0]
            shown = ", ".join(f"{k} {v / launches * 1000:.2f}" for k, v in sorted(roles.items(), key=lambda kv: -kv[1]))
            out.append(_r("end to end: CPU per launch", total / launches * 1000, "ms", None,
                          note=f"{shown} (ms each); {total / wall / (os.cpu_count() or 1):.0%} of "
                          f"{os.cpu_count()} CPUs busy; creating a file in {os.path.dirname(work)} "
                          f"cost {create_ms:.3f} ms before the run (a launch creates two)"))
        out.append(_r("end to end: one request per process", rates["single"][0], "launches/s", base,
                      note=f"{small} launches; group commit on; requests sent in {rates['single'][1]:.2f} s"))
        out.append(_r("PD pipeline with simulated agents", rates["sim"][0], "launches/s", rates["sim-base"][0],
                      note=f"{max(launches, 1000)} launches; PD actor + ZooKeeper log + thespian; "
                      "in-system agents whose processes exit at once; baseline: one request per "
                      "process, group commit off"))
        out.append(_r("end to end: bare ProcessSupervisor ceiling", ceiling, "launches/s", None,
                      note=f"{min(1000, launches)} launches by one agent's process machinery alone (supervisor + "
                      "reaper, 50 per launch_many), same host, same run"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pd", description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="matchmaker size (1.0 = 100k on 10k nodes)")
    ap.add_argument("--naive", type=int, default=300, help="processes for the full-rescan baseline")
    ap.add_argument("--launches", type=int, default=3000)
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--slots", type=int, default=64, help="slots per agent (end to end)")
    ap.add_argument("--workdir", default=None,
                    help="where the end-to-end run keeps its state (default: the temp dir)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = bench_matchmaker(args.scale, args.naive)
    if not args.skip_e2e:
        results += bench_e2e(args.launches, args.agents, args.slots, args.workdir)
    if args.json:
        print(json.dumps({"benchmark": "pd", "goal": GOAL, "results": results}, indent=2))
        return 0
    print(f"goal: {GOAL}\n")
    w = max(len(r["metric"]) for r in results)
    print(f"{'metric':<{w}}  {'value':>14}  {'baseline':>12}  {'ratio':>8}")
    for r in results:
        base = "-" if r["baseline"] is None else f"{r['baseline']:,.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:,.2f}x"
        print(f"{r['metric']:<{w}}  {r['value']:>10,.1f} {r['unit'][:12]:<3}  {base:>12}  {ratio:>8}")
        if r["note"]:
            print(f"{'':<{w}}    {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
