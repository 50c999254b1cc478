"""How long taking a snapshot stalls a component, synchronous against forked (issue 13).

A PD state with ``100,000 x scale`` queued processes (and a node per 100) is built by folding
events, as in ``benchmarks.pd``. The runner holding it takes one snapshot each way, into a
SQLite log in a temporary directory:

- baseline, synchronous: ``Runner.take_snapshot`` (``component.snapshot`` + ``msgpack.packb``
  + save, all in the actor's thread): the stall is its whole duration;
- forked (what a due snapshot of a big state does, docs/decisions.md LT3):
  ``Runner._snapshot_in_child`` returns after the fork; a child serializes the state from
  copy-on-write memory into a pipe and a background thread saves it. Meanwhile this thread
  plays the actor, running small steps (~50 µs of Python each) and recording the longest gap
  between two steps: the GIL held by the saving thread shows there, and so does the machine's
  scheduling noise (shown: the longest gap of the same steps with nothing in the background).
  The stall is the larger of the fork and that gap.

Also shown: the time until the forked snapshot is stored, and its size.

    python -m benchmarks.snapshot [--scale 1.0] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.pd import build_state, pd_component  # noqa: E402
from cei_actors.eventlog import open_log  # noqa: E402
from cei_actors.runtime.runner import Runner  # noqa: E402

GOAL = "taking a snapshot stalls the actor a few ms at most, at any state size"


def _step() -> None:
    sum(range(1500))  # ~50 µs of Python: one small actor step


def measure(processes: int) -> list[dict[str, Any]]:
    t = time.perf_counter()
    state = build_state(max(1, processes // 100), processes)
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="cei-snapbench-") as tmp:
        log = open_log(f"sqlite:///{tmp}/log.db")
        runner = Runner(pd_component(), log)
        runner.state, runner.head = state, 0
        gc.collect()

        t = time.perf_counter()
        assert runner.take_snapshot()
        sync_s = time.perf_counter() - t
        size = len(log.load_snapshot(runner.stream).data)

        gc.collect()
        t = time.perf_counter()
        assert runner._snapshot_in_child()
        fork_s = time.perf_counter() - t
        job = runner._history_job
        assert job is not None
        worst, last, steps = 0.0, time.perf_counter(), 0
        while job.is_alive():
            _step()
            now = time.perf_counter()
            worst, last, steps = max(worst, now - last), now, steps + 1
        stored_s = time.perf_counter() - t
        assert log.snapshots(runner.stream) == [0]
        log.close()
    # the noise floor: the same steps for as long with nothing in the background (a busy
    # machine deschedules this thread now and then; that is not the snapshot's doing)
    idle, last, end = 0.0, time.perf_counter(), time.perf_counter() + stored_s
    while last < end:
        _step()
        now = time.perf_counter()
        idle, last = max(idle, now - last), now
    stall_s = max(fork_s, worst)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    label = f"{processes // 1000}k" if processes < 1_000_000 else f"{processes / 1e6:g}M"
    return [
        _r(f"snapshot stall ms (PD, {label} processes)", stall_s * 1000, "ms", sync_s * 1000,
           note=f"forked: fork {fork_s * 1000:.1f} ms, longest gap between actor steps "
                f"{worst * 1000:.1f} ms over {steps:,} steps (with no snapshot running: {idle * 1000:.1f} ms); "
                f"baseline: synchronous take_snapshot "
                f"(state built in {build_s:.1f} s, RSS {rss_mb:,.0f} MB)"),
        _r(f"forked snapshot stored s (PD, {label} processes)", stored_s, "s", sync_s,
           note="from the fork until the snapshot is saved (not a stall); baseline: synchronous"),
        _r(f"snapshot size MB (PD, {label} processes)", size / 1e6, "MB", None),
    ]


def _r(metric: str, value: float, unit: str, baseline: float | None, note: str = "") -> dict[str, Any]:
    ratio = (baseline / value) if baseline and value else None  # lower is better: > 1 is a gain
    return {"metric": metric, "value": round(value, 3), "unit": unit,
            "baseline": None if baseline is None else round(baseline, 3),
            "ratio": None if ratio is None else round(ratio, 2), "note": note}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="processes = 100,000 x scale")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = measure(max(1, int(100_000 * args.scale)))
    if args.json:
        print(json.dumps({"benchmark": "snapshot", "goal": GOAL, "results": results}, indent=2))
    else:
        print(f"goal: {GOAL}")
        for r in results:
            base = "" if r["baseline"] is None else f"  (baseline {r['baseline']:,} {r['unit']}, ratio {r['ratio']})"
            print(f"{r['metric']:<48} {r['value']:>10,} {r['unit']}{base}")
            if r["note"]:
                print(f"    {r['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
