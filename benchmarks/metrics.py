"""What the metrics cost a component (issue 15, docs/decisions.md MT1-MT2).

- the hot path: a runner appending one event per message to a ``memory://`` log, with its
  counting (``Runner.log_stats``: events by type, the append latency histogram) against the
  same runner with the counting replaced by a no-op (baseline, same run);
- a report: the PD leader's ``metrics(state)`` plus the runtime samples, made into a
  ``MetricsReport`` and pickled (what goes to the collector every interval), for a PD holding
  ``100,000 x scale`` processes on ``1,000 x scale`` nodes; shown as a share of the default
  1 s interval;
- a scrape: the collector rendering the newest reports of 50 senders into the exposition text.

    python -m benchmarks.metrics [--scale 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.pd import build_state, pd_component  # noqa: E402
from cei_actors.eventlog import open_log  # noqa: E402
from cei_actors.pd.actor import metrics as pd_metrics  # noqa: E402
from cei_actors.runtime.example import Add, Counters  # noqa: E402
from cei_actors.runtime.metrics import (  # noqa: E402
    DEFAULT_INTERVAL,
    Histogram,
    LogStats,
    Reports,
    ShellStats,
    make_report,
    runtime_samples,
)
from cei_actors.runtime.runner import Runner  # noqa: E402

GOAL = ("counting adds under 2 us to an append (the in-memory log, the cheapest, shows its share); "
        "a report costs under 1% of its interval")


class _NoStats(LogStats):
    def appended(self, pending: Any, seconds: float) -> None:
        pass


def appends_per_second(counting: bool, n: int) -> float:
    runner = Runner(Counters(), open_log(f"memory://metrics-bench-{counting}-{time.time_ns()}"),
                    snapshot_every=10**9)
    if not counting:
        runner.log_stats = _NoStats()
    runner.recover()
    messages = [Add("a", 1)]
    t = time.perf_counter()
    for _ in range(n):
        runner.handle_many(messages)
    return n / (time.perf_counter() - t)


def counting_seconds(rounds: int = 200_000) -> float:
    """What ``Runner._commit`` adds per append: two clock reads and ``LogStats.appended``."""
    from cei_actors.eventlog import PendingEvent

    stats, pending = LogStats(), [PendingEvent("Added", 1, 0.0, {})]
    clock = time.perf_counter
    t = clock()
    for _ in range(rounds):
        started = clock()
        stats.appended(pending, clock() - started)
    return (clock() - t) / rounds


def report_seconds(processes: int, nodes: int, rounds: int = 20) -> tuple[float, int]:
    state = build_state(nodes, processes)
    engines = pd_component().cfg.engines
    status = {"mode": "ready", "leader": True, "epoch": 3, "head": 123456, "held": 0, "work": 0}
    log, shell = LogStats(), ShellStats()
    log.events.update({f"Event{i}": i for i in range(15)})
    shell.messages.update({f"Message{i}": i for i in range(25)})
    size = 0
    t = time.perf_counter()
    for _ in range(rounds):
        samples = runtime_samples(status, log, shell, ("ProcessAssigned",)) + pd_metrics(state, engines)
        report = make_report("pd", "pd", DEFAULT_INTERVAL, samples, [("cei_append_seconds", {}, Histogram())])
        size = len(pickle.dumps(report))
    return (time.perf_counter() - t) / rounds, size


def scrape_seconds(senders: int = 50, rounds: int = 20) -> tuple[float, int]:
    from prometheus_client import CollectorRegistry, generate_latest

    state = build_state(10, 1000)
    engines = pd_component().cfg.engines
    reports = Reports()
    status = {"mode": "ready", "leader": True, "epoch": 3, "head": 1, "held": 0, "work": 0}
    for i in range(senders):
        samples = runtime_samples(status, LogStats(), ShellStats()) + pd_metrics(state, engines)
        reports.add(make_report(f"pd.{i}", "pd", DEFAULT_INTERVAL, samples, [("cei_append_seconds", {}, Histogram())]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(reports)
    size = 0
    t = time.perf_counter()
    for _ in range(rounds):
        size = len(generate_latest(registry))
    return (time.perf_counter() - t) / rounds, size


def _r(metric: str, value: float, unit: str, baseline: float | None, higher_better: bool,
       note: str = "") -> dict[str, Any]:
    ratio = None
    if baseline and value:
        ratio = value / baseline if higher_better else baseline / value
    return {"metric": metric, "value": round(value, 4), "unit": unit,
            "baseline": None if baseline is None else round(baseline, 4),
            "ratio": None if ratio is None else round(ratio, 3), "note": note}


def measure(scale: float) -> list[dict[str, Any]]:
    n = max(1000, int(20_000 * scale))
    # interleave to spread the machine's noise over both
    with_counting, without = [], []
    for _ in range(7):
        without.append(appends_per_second(False, n))
        with_counting.append(appends_per_second(True, n))
    best, base = max(with_counting), max(without)
    added = counting_seconds()
    processes, nodes = max(1, int(100_000 * scale)), max(1, int(1_000 * scale))
    rep_s, rep_bytes = report_seconds(processes, nodes)
    scr_s, scr_bytes = scrape_seconds()
    return [
        _r("appends/s with metrics counting", best, "appends/s", base, True,
           note=f"one event per append, memory:// log, best of 7 x {n:,}; baseline: counting off"),
        _r("counting us per append", added * 1e6, "us", 1e6 / base, False,
           note=f"the code counting adds to an append, timed alone: {added * base * 100:.1f}% of "
                "an append to memory:// (baseline: one append without counting); a SQLite or "
                "ZooKeeper append costs 10-1000x more"),
        _r(f"report ms (PD, {processes:,} processes, {nodes:,} nodes)", rep_s * 1000, "ms", None, False,
           note=f"{rep_s / DEFAULT_INTERVAL * 100:.3f}% of the default {DEFAULT_INTERVAL:g} s interval; "
                f"{rep_bytes:,} bytes pickled"),
        _r("scrape render ms (50 senders)", scr_s * 1000, "ms", None, False,
           note=f"{scr_bytes:,} bytes of exposition text"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="PD processes = 100,000 x scale")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = measure(args.scale)
    if args.json:
        print(json.dumps({"benchmark": "metrics", "goal": GOAL, "results": results}, indent=2))
    else:
        print(f"goal: {GOAL}")
        for r in results:
            base = "" if r["baseline"] is None else f"  (baseline {r['baseline']:,} {r['unit']}, ratio {r['ratio']})"
            print(f"{r['metric']:<52} {r['value']:>12,} {r['unit']}{base}")
            if r["note"]:
                print(f"    {r['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
