"""Soak: many processes through the PD on a ZooKeeper log, a failover of each component along the way.

A ZooKeeper server (its own, 512 MB heap), a thespian TCP system with two replicas each of the
PD, EPUM and the Provisioner on one ZooKeeper log (leadership session ``--session`` s), and
``--agents`` in-system simulated agents (``--slots`` each) whose processes exit at once (the PD
pipeline of ``benchmarks.pd``; real processes would not fit two cores). ``--processes`` upids
are scheduled (50 per request, at most ``--window`` in flight). Every ``--failover-every``
processes the load pauses until nothing is in flight, and each component's leader is killed
(kill -9) in turn; the figures at that failover:

- recovery: seconds from the kill to the first request served by the standby (a request sent
  to it right after the kill, held until it leads);
- the PD leader's RSS before the kill (the process that served since the last failover) and
  the new leader's after it took over;
- the PD's snapshot size; ZooKeeper's ``zk_znode_count`` and ``zk_approximate_data_size``
  (``mntr``).

The killed replica is started again (a standby) before the next failover. Retention and log
truncation are not set by default: pass the PD's keys with ``--pd-set KEY=VALUE`` and the log
URL's options with ``--log-option KEY=VALUE`` (both repeatable; unknown keys are refused by
the PD and the log, as in a plan).

    python -m benchmarks.soak [--processes 1000000] [--failover-every 100000] [--json]

Goal (issue 13): the last recovery within 1.5x the first; znodes and the PD's RSS flat
(last/first <= 1.5). ``baseline`` of each ratio is the first failover's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from typing import Any
from urllib.parse import quote

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from benchmarks.pd import SimAgent, warm_zookeeper  # noqa: E402

GOAL = ("last recovery <= 1.5x the first; ZooKeeper znodes and PD RSS flat (last/first <= 1.5) "
        "over 1,000,000 processes, a failover of each component every 100,000")
COMPONENTS = {
    "pd": "cei_actors.pd.actor.ProcessDispatcherActor",
    "epum": "cei_actors.epum.actor.EPUMActor",
    "provisioner": "cei_actors.provisioner.actor.ProvisionerActor",
}
BATCH = 50


class SoakAgent(SimAgent):
    """A simulated agent that follows the PD leader: a new leader's ``Hello`` re-points it."""

    def receiveMessage(self, msg: Any, sender: Any) -> None:  # noqa: N802
        from cei_actors.runtime.control import Hello

        if isinstance(msg, Hello):
            self.pd = sender
            return
        super().receiveMessage(msg, sender)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mntr(zk: Any) -> dict[str, str]:
    from cei_actors.testing.zkserver import four_letter_word

    reply = four_letter_word(zk.nodes[0].client_port, "mntr")
    return dict(line.split("\t", 1) for line in reply.splitlines() if "\t" in line)


def _value(text: str) -> Any:
    return yaml.safe_load(text)


class Soak:
    def __init__(self, zk: Any, args: argparse.Namespace) -> None:
        from cei_actors.epum.messages import NodeState
        from cei_actors.runtime.system import start_system

        self.args = args
        self.zk = zk
        query = {"timeout": args.session, **dict(kv.split("=", 1) for kv in args.log_option)}
        self.log_url = (f"zk://{zk.hosts}/soak-{uuid.uuid4().hex[:8]}?"
                        + "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in query.items()))
        self.asys = start_system()
        self.agents = {f"n{i}": self.asys.createActor(SoakAgent) for i in range(args.agents)}
        pd_conf = {"engines": {"e1": {"slots": args.slots, "heartbeat_period": 5.0}},
                   "static_resources": True, "dispatch_retry_seconds": 30.0,
                   **{k: _value(v) for k, v in (kv.split("=", 1) for kv in args.pd_set)}}
        self.configs = {"pd": pd_conf, "epum": {}, "provisioner": {}}
        self.names = {c: [c, f"{c}.1"] for c in COMPONENTS}
        self.next_replica = dict.fromkeys(COMPONENTS, 2)
        for comp in COMPONENTS:
            for i, name in enumerate(self.names[comp]):
                self._start(comp, name, wait=i == 0)
        pd = self.leader("pd")[0]
        for node, agent in self.agents.items():
            self.call(pd, NodeState(node, "pd_domain_e1", "RUNNING", {}))
            assert self.asys.ask(agent, ("init", pd, node, node), 30) == "ok"
        self.started = 0

    # ---- actors -----------------------------------------------------------------------------

    def _start(self, comp: str, name: str, wait: bool) -> None:
        from cei_actors.runtime.control import Start
        from cei_actors.runtime.system import start_actor

        peers = {f"eeagent:{n}": a for n, a in self.agents.items()} if comp == "pd" else {}
        start_actor(self.asys, COMPONENTS[comp], Start(self.log_url, config=self.configs[comp], peers=peers),
                    global_name=name, wait=wait, timeout=120)

    def call(self, address: Any, message: Any, timeout: float = 60.0) -> Any:
        from cei_actors.runtime.control import Request, Response
        from cei_actors.runtime.messages import Ok

        reply = self.asys.ask(address, Request(uuid.uuid4().hex, message), timeout)
        assert isinstance(reply, Response) and isinstance(reply.reply, Ok), reply
        return reply.reply.value

    def status(self, name: str) -> tuple[Any, dict] | None:
        from cei_actors.runtime.control import Status
        from cei_actors.runtime.system import lookup

        address = lookup(self.asys, name)
        if address is None:
            return None
        try:
            return address, self.call(address, Status(), timeout=5)
        except AssertionError:
            return None

    def leader(self, comp: str) -> tuple[Any, dict]:
        for name in self.names[comp]:
            found = self.status(name)
            if found and found[1]["ready"]:
                return found
        raise RuntimeError(f"{comp}: no ready leader")

    # ---- load -------------------------------------------------------------------------------

    def in_flight(self) -> int:
        from cei_actors.pd import states as ps
        from cei_actors.pd.messages import ProcessCounts

        counts = self.call(self.leader("pd")[0], ProcessCounts())
        done = sum(counts.get(s, 0) for s in (ps.EXITED, ps.FAILED, ps.TERMINATED, ps.REJECTED))
        return sum(counts.values()) - done

    def drive(self, n: int) -> float:
        """Schedule ``n`` more processes; returns launches/s once none is in flight."""
        from cei_actors.pd.messages import ScheduleProcess, ScheduleProcesses
        from cei_actors.runtime.control import Request

        pd = self.leader("pd")[0]
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            while self.in_flight() > self.args.window:
                time.sleep(0.05)
            for _ in range(min(self.args.window // BATCH, (n - sent + BATCH - 1) // BATCH)):
                chunk = [ScheduleProcess(f"p{self.started + sent + i}", command=["true"], restart_mode="never")
                         for i in range(min(BATCH, n - sent))]
                self.asys.tell(pd, Request("", ScheduleProcesses(chunk)))
                sent += len(chunk)
        deadline = time.monotonic() + 600
        while self.in_flight() > 0:
            assert time.monotonic() < deadline, "processes stuck in flight"
            time.sleep(0.05)
        self.started += n
        return n / (time.perf_counter() - t0)

    # ---- failover ---------------------------------------------------------------------------

    def probe(self, comp: str) -> Any:
        from cei_actors.epum.messages import ListDomains
        from cei_actors.pd.messages import ProcessCounts
        from cei_actors.provisioner.messages import DescribeProvisioner

        return {"pd": ProcessCounts(), "epum": ListDomains(None),
                "provisioner": DescribeProvisioner()}[comp]

    def failover(self, comp: str) -> dict[str, Any]:
        """kill -9 of ``comp``'s leader; the seconds until the standby served a request."""
        from cei_actors.runtime.control import Request, Response
        from cei_actors.runtime.system import lookup

        address, status = self.leader(comp)
        name = next(n for n in self.names[comp] if lookup(self.asys, n) == address)
        standby_name = next(n for n in self.names[comp] if n != name)
        standby = lookup(self.asys, standby_name)
        out: dict[str, Any] = {"component": comp, "epoch": status["epoch"], "head": status["head"]}
        if comp == "pd":
            out["rss_before_mb"] = rss_mb(status["pid"])
        with self.asys.private() as ctx:
            os.kill(status["pid"], signal.SIGKILL)
            t0 = time.perf_counter()
            ctx.tell(standby, Request("probe", self.probe(comp)))
            reply = ctx.listen(120)
            out["recovery_s"] = time.perf_counter() - t0
        assert isinstance(reply, Response), f"{comp}: the standby did not answer: {reply!r}"
        new = self.status(standby_name)
        assert new and new[1]["ready"], new
        out["new_epoch"] = new[1]["epoch"]
        if comp == "pd":
            out["rss_after_mb"] = rss_mb(new[1]["pid"])
        # a new standby (a fresh global name: the dead one's may linger a moment)
        deadline = time.monotonic() + 30
        while lookup(self.asys, name) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        replacement = f"{comp}.{self.next_replica[comp]}"
        self.next_replica[comp] += 1
        self.names[comp] = [standby_name, replacement]
        self._start(comp, replacement, wait=False)
        return out

    def measure(self) -> dict[str, Any]:
        from cei_actors.eventlog import open_log

        with open_log(self.log_url) as log:
            snap = log.load_snapshot("pd")
        m = mntr(self.zk)
        return {"processes": self.started, "snapshot_mb": (len(snap.data) / 2**20) if snap else 0.0,
                "snapshot_offset": snap.offset if snap else 0,
                "zk_znode_count": int(m.get("zk_znode_count", 0)),
                "zk_approximate_data_size_mb": int(m.get("zk_approximate_data_size", 0)) / 2**20}

    def close(self) -> None:
        from cei_actors.runtime.system import shutdown_system

        shutdown_system(self.asys)


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from cei_actors.testing.zkserver import ZkServer

    rows: list[dict[str, Any]] = []
    with ZkServer(heap="512m") as zk:
        warm_zookeeper(zk.hosts)
        soak = Soak(zk, args)
        try:
            while soak.started < args.processes:
                n = min(args.failover_every, args.processes - soak.started)
                rate = soak.drive(n)
                row = {**soak.measure(), "launches_per_s": rate}
                for comp in COMPONENTS:
                    fo = soak.failover(comp)
                    row[f"{comp}_recovery_s"] = fo["recovery_s"]
                    if comp == "pd":
                        row["pd_rss_before_mb"] = fo["rss_before_mb"]
                        row["pd_rss_after_mb"] = fo["rss_after_mb"]
                        row["pd_head"] = fo["head"]
                rows.append(row)
                if not args.json:
                    print(_row_text(row), flush=True)
        finally:
            soak.close()
    first, last = rows[0], rows[-1]

    def r(metric: str, value: float, unit: str, base: float | None, note: str) -> dict[str, Any]:
        return {"metric": metric, "value": round(value, 3), "unit": unit,
                "baseline": None if base is None else round(base, 3),
                "ratio": None if not base else round(value / base, 3), "note": note}

    where = (f"{args.processes} processes, failover every {args.failover_every}, session "
             f"{args.session} s, {args.agents} simulated agents x {args.slots} slots")
    results = [
        r("soak recovery s (last)", last["pd_recovery_s"], "s", first["pd_recovery_s"],
          f"PD: kill -9 of the leader to the first request served by the standby; {where}"),
        r("soak recovery s (first)", first["pd_recovery_s"], "s", None, where),
        r("soak zk znodes (last/first)", last["zk_znode_count"] / first["zk_znode_count"], "ratio", None,
          f"{first['zk_znode_count']} -> {last['zk_znode_count']} znodes"),
        r("soak pd rss MB (last/first)", last["pd_rss_before_mb"] / first["pd_rss_before_mb"], "ratio", None,
          f"the PD leader before its kill: {first['pd_rss_before_mb']:.0f} -> {last['pd_rss_before_mb']:.0f} MB"),
    ]
    return results, rows


def _row_text(row: dict[str, Any]) -> str:
    return (f"{row['processes']:>9} processes  {row['launches_per_s']:7.0f}/s  recovery pd "
            f"{row['pd_recovery_s']:5.2f}s epum {row['epum_recovery_s']:5.2f}s provisioner "
            f"{row['provisioner_recovery_s']:5.2f}s  pd rss {row['pd_rss_before_mb']:6.1f} MB (new leader "
            f"{row['pd_rss_after_mb']:6.1f})  snapshot {row['snapshot_mb']:6.2f} MB  znodes "
            f"{row['zk_znode_count']:>7}  zk data {row['zk_approximate_data_size_mb']:7.2f} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=1_000_000)
    ap.add_argument("--failover-every", type=int, default=100_000)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--window", type=int, default=2000, help="most processes in flight")
    ap.add_argument("--session", type=float, default=3.0, help="ZooKeeper leadership session timeout (s)")
    ap.add_argument("--pd-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a PD config key (e.g. retention), YAML value; repeatable; none by default")
    ap.add_argument("--log-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a ZooKeeper log URL option (e.g. archive); repeatable; none by default")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.processes < 1 or args.failover_every < 1:
        ap.error("--processes and --failover-every must be positive")
    results, rows = run(args)
    if args.json:
        print(json.dumps({"benchmark": "soak", "goal": GOAL, "results": results, "failovers": rows}))
    else:
        for res in results:
            ratio = f" (x{res['ratio']} of {res['baseline']})" if res["ratio"] is not None else ""
            print(f"{res['metric']:<32} {res['value']:>10} {res['unit']}{ratio}  {res['note']}")
        print(f"goal: {GOAL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
