"""What recording inputs costs, and how fast ``cei log verify`` re-runs them (decision DBG6).

A PD runner on a SQLite log in a temporary directory takes ``N`` ``ScheduleProcess`` requests
(one per ``handle``, as a client's requests arrive) on 10 static nodes, every 5th one
followed by an ``AgentHeartbeat`` that changes nothing (a decision without events, which a
recording runner holds for the next stored event):

- messages/s with ``record_inputs`` against the same runner without (baseline, same run,
  interleaved, best of 5);
- log bytes per message, with and without;
- ``verify`` of the recorded log: recorded decisions re-run per second, against folding the
  same stream without re-running anything (``cei log check``'s work, the baseline).

    python -m benchmarks.verify [--n N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cei_actors.debug import Replay  # noqa: E402
from cei_actors.debug.verify import verify  # noqa: E402
from cei_actors.eeagent.messages import AgentHeartbeat  # noqa: E402
from cei_actors.epum.messages import NodeState  # noqa: E402
from cei_actors.eventlog import open_log  # noqa: E402
from cei_actors.pd.logic import ProcessDispatcher  # noqa: E402
from cei_actors.pd.messages import ScheduleProcess  # noqa: E402
from cei_actors.runtime.runner import Runner  # noqa: E402

GOAL = "recording inputs costs under 20% of a PD's request rate on SQLite; verify re-runs a decision in " \
       "under 3x the time folding its events takes"
T0 = 1_790_000_000.0
CONFIG = {"engines": {"default": {"slots": 1000}}, "static_resources": True,
          "restart_throttling_config": {"minimum_time_between_starts": 0}}
NODES = 10


def _messages(n: int) -> list[Any]:
    out: list[Any] = []
    for i in range(NODES):
        out.append(NodeState(f"n{i}", "pd_domain_default", "RUNNING", {}))
        out.append(AgentHeartbeat(f"a{i}", f"n{i}", T0, []))
    for i in range(n):
        out.append(ScheduleProcess(f"p{i}", command=["sleep", "3600"], env={"K": "v" * 20},
                                   configuration={"job": {"kind": "batch"}}))
        if i % 5 == 4:
            out.append(AgentHeartbeat(f"a{i % NODES}", f"n{i % NODES}", T0, []))
    return out


def record(path: str, n: int, record_inputs: bool) -> tuple[float, int, int]:
    """(messages/s, bytes of the log file, messages) for one run."""
    url = f"sqlite:///{path}"
    log = open_log(url)
    runner = Runner(ProcessDispatcher(dict(CONFIG)), log, stream="pd", snapshot_every=10**9,
                    record_inputs=record_inputs, clock=lambda: T0)
    runner.recover()
    messages = _messages(n)
    t = time.perf_counter()
    for m in messages:
        runner.handle(m)
    rate = len(messages) / (time.perf_counter() - t)
    log.close()
    return rate, os.path.getsize(path), len(messages)


def measure(n: int) -> list[dict[str, Any]]:
    rates: dict[bool, list[float]] = {False: [], True: []}
    size: dict[bool, int] = {}
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(5):
            for rec in (False, True):
                path = os.path.join(tmp, f"{rec}-{k}.sqlite")
                rate, size[rec], count = record(path, n, rec)
                rates[rec].append(rate)
        recorded = os.path.join(tmp, "True-4.sqlite")
        with Replay(f"sqlite:///{recorded}", configs={"pd": {"config": dict(CONFIG)}}) as r:
            t = time.perf_counter()
            r.state("pd", r.head("pd"), snapshots=False)
            fold_s = time.perf_counter() - t
            events = r.head("pd")
            t = time.perf_counter()
            [report] = verify(r, ["pd"])
            verify_s = time.perf_counter() - t
    if not report.ok or report.decisions == 0:
        raise SystemExit(f"the recorded log does not verify: {report.as_dict()}")
    on, off = max(rates[True]), max(rates[False])
    per_on, per_off = size[True] / count, size[False] / count
    return [
        _r("PD messages/s with recorded inputs", on, "messages/s", off, True,
           f"SQLite, {count:,} messages ({n:,} ScheduleProcess, a no-op heartbeat every 5th), best of 5; "
           "baseline: record_inputs off"),
        _r("log bytes per message with recorded inputs", per_on, "bytes", per_off, False,
           "the whole SQLite file over the messages; baseline: record_inputs off"),
        _r("verify decisions/s", report.decisions / verify_s, "decisions/s", events / fold_s, True,
           f"{report.decisions:,} decisions ({events:,} events) re-run and compared; baseline: folding "
           "the same events (events/s)"),
    ]


def _r(metric: str, value: float, unit: str, baseline: float | None, higher_better: bool,
       note: str = "") -> dict[str, Any]:
    ratio = None
    if baseline and value:
        ratio = value / baseline if higher_better else baseline / value
    return {"metric": metric, "value": round(value, 2), "unit": unit,
            "baseline": None if baseline is None else round(baseline, 2),
            "ratio": None if ratio is None else round(ratio, 3), "note": note}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="ScheduleProcess requests per run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = measure(args.n)
    if args.json:
        print(json.dumps({"benchmark": "verify", "goal": GOAL, "results": results}, indent=2))
    else:
        print(f"goal: {GOAL}")
        for r in results:
            print(f"{r['metric']:<44} {r['value']:>12,} {r['unit']}  (baseline {r['baseline']:,}, "
                  f"ratio {r['ratio']})")
            print(f"    {r['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
