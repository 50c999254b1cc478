"""``cei demo``: the main job end to end, narrated as it happens.

Boots the default system in a fresh home (a temporary directory unless ``--dir``), schedules
``--processes`` processes of a few seconds' real work each, and watches (every 0.5 s) the PD's
need rise, EPUM ask the Provisioner for nodes, the nodes boot and the processes run. Once two
nodes run processes, the busier one is killed out of band (SIGKILL of its EEAgent and of every
process on it) and its processes are restarted elsewhere. When the work is done the domain
shrinks to zero and the system is shut down. Exit status 0 only if every process exited
successfully.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..plaindata import count
from .common import seconds
from .node import crash_node
from .output import CliError, Output

#: Process states after which nothing more happens (unless rescheduled).
FINAL = ("EXITED", "FAILED", "REJECTED", "TERMINATED")
#: Node states of a node that is gone.
GONE = ("TERMINATED", "FAILED", "REJECTED")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job, end to end, narrated (boot, scale up, lose a node, finish, shut down)")
    p.add_argument("--dir", default=None, metavar="DIR",
                   help="home of the demo system (default: a new temporary directory, removed after a success)")
    p.add_argument("--processes", type=int, default=20, metavar="N", help="how many processes (default 20)")
    p.add_argument("--work", type=seconds, default=4.0, metavar="SECONDS", help="seconds of work per process (default 4)")
    p.add_argument("--no-kill", action="store_true", help="do not kill a node")
    p.add_argument("--timeout", type=seconds, default=100.0, metavar="SECONDS",
                   help="give up when the work is not done by then (default 100)")
    p.set_defaults(func=cmd_demo)


def short(node_id: str | None) -> str:
    """A node id short enough to read (``i-6499fd17``)."""
    return "-" if node_id is None else node_id[:10]


@dataclass
class Watch:
    """What the demo has seen so far; :meth:`observe` narrates what changed since."""

    say: Any
    need: dict[str, int] = field(default_factory=dict)
    instances: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    pd_nodes: set[str] = field(default_factory=set)
    resources: set[str] = field(default_factory=set)
    processes: dict[str, tuple[int, str, str | None]] = field(default_factory=dict)
    counts: str = ""
    used_nodes: set[str] = field(default_factory=set)
    victims: dict[str, int] = field(default_factory=dict)  # upid -> round it lost
    restarted: set[str] = field(default_factory=set)

    def observe(self, conn: Any) -> dict[str, Any]:
        """Poll PD, EPUM and Provisioner once; print every change; return the PD's dump."""
        dump = conn.pd.dump()
        for engine, v in sorted((dump.get("needs") or {}).items()):
            if self.need.get(engine) != v["need"]:
                self.say(f"PD: engine {engine!r} needs {count(v['need'], 'node')} (has {v['nodes']})")
                self.need[engine] = v["need"]
        for domain_id in conn.epum.list_domains():
            for inst in conn.epum.describe_domain(domain_id).get("instances") or []:
                node_id, state = inst["node_id"], inst["state"]
                if node_id not in self.instances:
                    self.say(f"EPUM: domain {domain_id} asks the Provisioner for node {short(node_id)}")
                self.instances[node_id] = state
        for rec in conn.provisioner.describe_nodes():
            node_id, state = rec["node_id"], rec["state"]
            if self.nodes.get(node_id) != state and not (node_id not in self.nodes and state in GONE):
                where = f" ({rec['iaas_id']})" if rec.get("iaas_id") and state == "RUNNING" else ""
                self.say(f"Provisioner: node {short(node_id)} {state}{where}")
            self.nodes[node_id] = state
        resources = {r["resource_id"]: r for r in dump["resources"]}
        for rid in sorted(set(resources) - self.resources):
            r = resources[rid]
            self.say(f"PD: the EEAgent of node {short(r['node_id'])} reports in: {count(r['slots'], 'slot')}")
        self.resources |= set(resources)
        pd_nodes = {n["node_id"] for n in dump["nodes"]}
        for node_id in sorted(self.pd_nodes - pd_nodes):
            self.say(f"PD: node {short(node_id)} is gone")
        self.pd_nodes = pd_nodes
        self._processes(dump["processes"])
        return dump

    def _processes(self, processes: list[dict[str, Any]]) -> None:
        counts: dict[str, int] = {}
        for p in processes:
            upid, rnd, state, node = p["upid"], p["round"], p["state"], p.get("node_id")
            counts[state] = counts.get(state, 0) + 1
            if state == "RUNNING" and node:
                self.used_nodes.add(node)
            old = self.processes.get(upid)
            if old is not None and old[0] != rnd and upid in self.victims:
                self.say(f"PD: {upid} requeued as round {rnd} ({p.get('msg') or 'its node was lost'})")
            if (upid in self.victims and upid not in self.restarted and state == "RUNNING"
                    and rnd > self.victims[upid]):
                self.restarted.add(upid)
                self.say(f"PD: {upid} restarted on node {short(node)} (round {rnd})")
            if old is not None and old[1] != state and state in ("EXITED", "FAILED"):
                text = "finished" if state == "EXITED" else f"FAILED ({p.get('msg')})"
                self.say(f"{upid} {text} on node {short(node or old[2])}")
            self.processes[upid] = (rnd, state, node)
        text = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
        if text != self.counts:
            self.say(f"processes: {text}")
            self.counts = text


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    from ..launch.launcher import LaunchError, connect, down, up
    from ..launch.plan import load_plan

    if args.processes < 1 or args.work < 0:
        raise CliError("demo: --processes must be at least 1 and --work not negative")
    start = time.monotonic()

    def say(text: str) -> None:
        out.line(f"[{time.monotonic() - start:6.1f}s] {text}")
        out.stream.flush()

    home = Path(args.dir).absolute() if args.dir else Path(tempfile.mkdtemp(prefix="cei-demo-"))
    say(f"booting the default system in {home}")
    try:
        up(load_plan(None, home=home), home, progress=say)
    except LaunchError as exc:
        raise CliError(f"demo: up failed: {exc}") from None
    summary: dict[str, Any] = {"home": str(home)}
    try:
        with connect(home) as conn:
            summary.update(run(conn, args, say))
    finally:
        say("shutting down")
        down(home, progress=say)
    summary["elapsed"] = round(time.monotonic() - start, 1)
    ok = summary["exited"] == args.processes
    summary["ok"] = ok
    if ok and not args.dir:
        shutil.rmtree(home, ignore_errors=True)
    if out.json:
        out.emit(summary)
    else:
        say(f"summary: {summary['exited']}/{args.processes} processes finished successfully, "
            f"{summary['failed']} failed, {summary['restarts']} restarted after the node loss, "
            f"{count(summary['nodes_used'], 'node')} used, {summary['elapsed']}s elapsed")
        if not ok:
            say(f"NOT OK: processes left: {summary['unfinished']}; the system's files are in {home}")
    return 0 if ok else 1


def run(conn: Any, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """Schedule the work, watch it, kill a node, wait for the end and the domain to shrink."""
    watch = Watch(say)
    command = ["sh", "-c", f"sleep {args.work:g}; echo done"]
    say(f"scheduling {count(args.processes, 'process')}: {' '.join(command)}")
    upids = [f"p{i:02d}" for i in range(1, args.processes + 1)]
    for upid in upids:
        conn.pd.schedule_process(upid, command=command, restart_mode="ABNORMAL")
    deadline = time.monotonic() + args.timeout
    killed: dict[str, Any] | None = None
    while True:
        dump = watch.observe(conn)
        mine = [p for p in dump["processes"] if p["upid"] in upids]
        if all(p["state"] in FINAL for p in mine):
            say("all the work is done")
            break
        if time.monotonic() > deadline:
            say(f"giving up after {args.timeout:g}s")
            break
        if killed is None and not args.no_kill:
            killed = maybe_kill(conn, mine, watch, say)
        time.sleep(0.5)
    say("waiting for the domain to shrink to zero")
    shrink_by = time.monotonic() + 60.0
    while time.monotonic() < shrink_by:
        watch.observe(conn)
        live = [n for n, s in watch.nodes.items() if s not in GONE]
        if not live and watch.need and not any(watch.need.values()):
            say("no node left")
            break
        time.sleep(0.5)
    final = {p["upid"]: p for p in conn.pd.describe_processes(upids)}
    return {
        "processes": len(upids),
        "exited": sum(1 for p in final.values() if p["state"] == "EXITED"),
        "failed": sum(1 for p in final.values() if p["state"] == "FAILED"),
        "unfinished": sorted(u for u, p in final.items() if p["state"] != "EXITED"),
        "restarts": len(watch.restarted),
        "rounds": sum(p["round"] for p in final.values()),
        "killed_node": killed,
        "nodes_used": len(watch.used_nodes),
        "nodes_launched": len(watch.nodes),
    }


def maybe_kill(conn: Any, processes: list[dict[str, Any]], watch: Watch, say: Any) -> dict[str, Any] | None:
    """Once two nodes run processes, crash the one running the most; None if not yet."""
    by_node: dict[str, list[str]] = {}
    for p in processes:
        if p["state"] == "RUNNING" and p.get("node_id"):
            by_node.setdefault(p["node_id"], []).append(p["upid"])
    if len(by_node) < 2:
        return None
    node_id, running = max(by_node.items(), key=lambda kv: len(kv[1]))
    if len(running) < 2:
        return None
    result = crash_node(conn, node_id)
    rounds = {p["upid"]: p["round"] for p in processes}
    watch.victims.update({u: rounds[u] for u in running})
    say(f"KILL -9 node {short(node_id)} ({result['iaas_id']}): its EEAgent (group {result['pgid']}) "
        f"and its {count(len(running), 'running process', 'running processes')} {', '.join(sorted(running))}")
    return {**result, "processes": sorted(running)}
