"""Host loss: every process of a whole host killed -> every component led again elsewhere.

The deployment of ``cei_actors.testing.hostloss`` (root only: three network-namespace hosts,
a 3-server ZooKeeper ensemble, PD/EPUM/Provisioner replicas on hosts 0 and 1, a PD replica
and the EEAgents on host 2). Each run kills every process of the host (0 or 1) that leads the
most components, and measures

- ``hostloss_failover_s``: from the kill until PD, EPUM and the Provisioner each have a
  serving leader on another host (polled every 0.1 s);
- ``hostloss_work_s``: from the kill until a process, scheduled as soon as the failover is
  seen, is RUNNING on host 2;
- the baseline, measured in the same run: ``hostloss_session_expiry_s``, from the kill until
  ZooKeeper removes an ephemeral znode that a client on the killed host held with the same
  session timeout: the failure detector's own delay, which no failover can beat.

The host is then brought back (its ZooKeeper server, ``cei up``), and the next run begins.
After the last run: every process ran once and live state = replay. Figures: min / median /
max over ``--runs`` (>= 5).

    python -m benchmarks.hostloss [--json] [--runs 5] [--session-timeout 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import textwrap
import time

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kazoo.client import KazooClient  # noqa: E402

from cei_actors.testing.hostloss import AGENT_HOST, HostLoss  # noqa: E402
from cei_actors.testing.netns import unavailable_reason  # noqa: E402

GOAL = ("whole-host loss -> every component led on another host within the ZooKeeper session "
        "timeout + 2 s (ratio to the measured session expiry <= ~1.5)")
HOLDER = textwrap.dedent("""
    import sys, time
    from kazoo.client import KazooClient
    c = KazooClient(hosts=sys.argv[1], timeout=float(sys.argv[3]))
    c.start(timeout=15)
    c.create(sys.argv[2], ephemeral=True, makepath=True)
    print("held", flush=True)
    while True:
        time.sleep(60)
""")


def _stats(name: str, values: list[float], baseline: float | None) -> list[dict]:
    out = []
    for kind, value in (("min", min(values)), ("median", statistics.median(values)), ("max", max(values))):
        out.append({"metric": f"{name}_{kind}", "value": round(value, 3), "unit": "s",
                    "baseline": None if baseline is None else round(baseline, 3),
                    "ratio": None if not baseline else round(value / baseline, 3)})
    return out


def run(runs: int, session_timeout: float, say) -> tuple[list[dict], dict]:
    failovers: list[float] = []
    works: list[float] = []
    expiries: list[float] = []
    victims: list[int] = []
    with tempfile.TemporaryDirectory(prefix="hostloss-") as tmp, \
            HostLoss(os.path.join(tmp, "w"), say=say, session_timeout=session_timeout) as sc:
        holder = os.path.join(tmp, "holder.py")
        with open(holder, "w") as f:
            f.write(HOLDER)
        assert sc.zk is not None and sc.hosts is not None
        # on the server of the host never killed: a lost connection fires no watch of ours
        zk = KazooClient(hosts=sc.zk.nodes[AGENT_HOST].address, timeout=10.0)
        zk.start(timeout=15)
        upids: list[str] = sc.schedule("before", 2, 3600)
        sc.wait_states(upids, {"RUNNING"}, 60)
        try:
            for k in range(runs):
                where = sc.leaders()
                counts = {h: list(where.values()).count(h) for h in (0, 1)}
                victim = max(counts, key=lambda h: (counts[h], -h))
                path = f"/hostloss-bench/holder-{k}"
                proc = sc.hosts[victim].popen([sys.executable, holder, sc.zk.hosts, path, str(session_timeout)],
                                              stdout=-1, text=True)
                assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
                gone: list[float] = []

                def deleted(event, at=gone, path=path) -> None:
                    if event.type == "DELETED":
                        at.append(time.monotonic())
                    else:  # any other event: watch again
                        zk.exists_async(path, watch=deleted)

                if zk.exists(path, watch=deleted) is None:
                    raise RuntimeError(f"the holder's znode {path} is missing")
                say(f"run {k + 1}/{runs}: leaders on hosts {where}; killing every process of host {victim}")
                t0 = time.monotonic()
                sc.kill_host(victim)
                proc.wait()
                failover = sc.wait_failover(victim, timeout=120, since=t0)
                new = sc.schedule(f"run{k}", 1, 3600)
                upids += new
                sc.wait_states(new, {"RUNNING"}, 120)
                work = time.monotonic() - t0
                deadline = t0 + 120
                while not gone and time.monotonic() < deadline:
                    time.sleep(0.05)
                expiry = gone[0] - t0  # the watch fired when ZooKeeper deleted it
                failovers.append(failover)
                works.append(work)
                expiries.append(expiry)
                victims.append(victim)
                say(f"  led again after {failover:.2f} s, new work RUNNING after {work:.2f} s, "
                    f"session expired after {expiry:.2f} s; bringing host {victim} back")
                sc.restart_host(victim)
            sc.wait_states(upids, {"RUNNING"}, 60)
            sc.check_ran_once(upids)
            sc.check_replay()
            say("every process ran once; live state = replay")
        finally:
            zk.stop()
            zk.close()
    base = statistics.median(expiries)
    results = (_stats("hostloss_failover_s", failovers, base) + _stats("hostloss_work_s", works, base)
               + _stats("hostloss_session_expiry_s", expiries, None))
    config = {"runs": runs, "session_timeout": session_timeout, "victims": victims,
              "agent_host": AGENT_HOST, "failover_s": failovers, "work_s": works, "session_expiry_s": expiries}
    return results, config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--runs", type=int, default=5, help="host losses (default 5, at least 5)")
    ap.add_argument("--session-timeout", type=float, default=4.0,
                    help="ZooKeeper session timeout of the components, seconds (1 to 10)")
    args = ap.parse_args(argv)
    if args.runs < 5:
        ap.error("--runs: at least 5")
    reason = unavailable_reason()
    if reason:
        print(f"hostloss: cannot run here: {reason}", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    logging.getLogger("kazoo").setLevel(logging.ERROR)  # reconnects after a kill are expected
    results, config = run(args.runs, args.session_timeout, say)
    if args.json:
        print(json.dumps({"results": results, "goal": GOAL, "config": config}))
        return 0
    print(f"\ngoal: {GOAL}\n")
    header = ("metric", "value", "unit", "baseline (session expiry)", "ratio")
    rows = [(x["metric"], f"{x['value']:.3f}", x["unit"],
             "" if x["baseline"] is None else f"{x['baseline']:.3f}",
             "" if x["ratio"] is None else f"{x['ratio']:.3f}") for x in results]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for k, line in enumerate([header, *rows]):
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
