"""PD state size under a steady churn of short processes: retention vs ``forever``.

The PD's pure core (``decide`` + fold, no log, no actors) runs ``--processes`` short processes
on one static node: each batch of 50 is scheduled (``ScheduleProcesses``), and one agent
heartbeat reports them EXITED; virtual time advances so that ``--rate`` processes start per
second, and the PD's own timer message (``ForgetProcesses``) comes every ``retention / 4``
seconds. Measured at the end, for ``retention: 60`` (default tombstone bounds: 20,000, 7
days) and for ``retention: forever`` (the baseline, the PD before issue 13): the records held
(live processes + tombstones) and the snapshot's size (msgpack of ``snapshot()``, what the
runtime stores). ``ratio`` = retention / forever; the goal is a state bounded by the live work
plus the retention and the tombstone bound, whatever the number of processes run.

    python -m benchmarks.pd_retention [--processes 100000] [--rate 100] [--retention 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import msgpack

from cei_actors.eeagent.messages import AgentHeartbeat
from cei_actors.epum.messages import NodeState
from cei_actors.pd.logic import ProcessDispatcher
from cei_actors.pd.messages import ForgetProcesses, ScheduleProcess, ScheduleProcesses
from cei_actors.runtime.core import Context

BATCH = 50


def churn(processes: int, rate: float, retention: float | str) -> dict[str, Any]:
    """Run the churn; the PD's state size at the end."""
    pd = ProcessDispatcher({
        "engines": {"e": {"slots": 64}},
        "static_resources": True,
        "retention": retention,
        "restart_throttling_config": {"minimum_time_between_starts": 0.0},
    })
    state = pd.initial_state()
    rng = random.Random(0)
    now = 1_000_000.0

    def handle(message: Any) -> Any:
        decision = pd.decide(state, message, Context(now, rng))
        for event in decision.events:
            pd.apply(state, event)
        return decision.reply

    pd.recovered(state, Context(now, rng))  # as a leader starts: its timers, nothing else
    handle(NodeState("n1", "pd_domain_e", "RUNNING", {}))
    handle(AgentHeartbeat("a1", "n1", now, []))
    every = pd.cfg.forget_every()
    next_forget = now + every if every is not None else float("inf")
    started = time.perf_counter()
    peak = 0
    for first in range(0, processes, BATCH):
        ids = [f"p{i}" for i in range(first, min(first + BATCH, processes))]
        handle(ScheduleProcesses([ScheduleProcess(u, command=["true"], restart_mode="never")
                                  for u in ids]))
        report = [{"upid": u, "round": 0, "state": "EXITED", "msg": ""} for u in ids]
        handle(AgentHeartbeat("a1", "n1", now, report))
        now += len(ids) / rate
        if now >= next_forget:
            handle(ForgetProcesses())
            next_forget = now + every
        peak = max(peak, len(state.processes) + len(state.tombstones))
    elapsed = time.perf_counter() - started
    snap = msgpack.packb(pd.snapshot(state), use_bin_type=True)
    return {
        "records": len(state.processes),
        "tombstones": len(state.tombstones),
        "peak records": peak,
        "snapshot bytes": len(snap),
        "seconds": elapsed,
        "virtual seconds": processes / rate,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pd_retention",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=100.0, help="processes per virtual second")
    ap.add_argument("--retention", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    kept = churn(args.processes, args.rate, args.retention)
    base = churn(args.processes, args.rate, "forever")
    results = []
    for key, unit in (("snapshot bytes", "bytes"), ("records", "records"),
                      ("tombstones", "tombstones"), ("peak records", "records")):
        value, baseline = kept[key], base[key]
        results.append({
            "metric": f"pd {key} (retention)", "value": value, "unit": unit,
            "baseline": baseline, "ratio": round(value / baseline, 4) if baseline else None,
        })
    goal = (f"state bounded by live work + {args.retention:g} s of retention + the tombstone "
            f"bound, after {args.processes} processes at {args.rate:g}/s (baseline: forever)")
    if args.json:
        print(json.dumps({"benchmark": "pd_retention", "goal": goal, "results": results}))
        return 0
    print(f"PD state after {args.processes:,} short processes at {args.rate:g}/s "
          f"({args.processes / args.rate:,.0f} s of virtual time)")
    print(f"{'metric':32} {'retention ' + format(args.retention, 'g') + ' s':>16} "
          f"{'forever':>14} {'ratio':>8}")
    for r in results:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"{r['metric']:32} {r['value']:>16,} {r['baseline']:>14,} {ratio:>8}")
    print(f"(run time: {kept['seconds']:.1f} s with retention, {base['seconds']:.1f} s forever)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
