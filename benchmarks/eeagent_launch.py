"""How many launches per second can one EEAgent's :class:`ProcessSupervisor` take?

Launches ``--n`` processes running ``true`` as fast as one thread can call ``launch`` and
times until every one has exited (the watcher noticed it and the record is EXITED). Runs each
configuration in the same process, one after another, on a fresh state directory:

- ``old``: the Python wrapper (``runwrap.py``) and the whole table rewritten on every change
  (the supervisor as it was before EA2);
- ``python wrapper + journal`` and ``sh wrapper + full table``: one cause fixed at a time;
- ``new``: the shell wrapper and the append-only journal (the default).

``on_change`` only counts calls (as the EEAgent's own callback, which just marks the heartbeat
dirty); completion is read from the supervisor. Also printed, per launch: the agent process's
CPU time, the wrappers' and commands' CPU time (reaped children), and the CPU-bound ceiling
they imply on this machine (CPUs / total CPU per launch; nothing else running).

    python -m benchmarks.eeagent_launch [--n 500] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cei_actors.eeagent import states  # noqa: E402
from cei_actors.eeagent.supervisor import ProcessSupervisor  # noqa: E402

GOAL = "end to end >= 1,000 launches/s on one host"
CONFIGS = (
    ("old: python wrapper + full table", "python", False),
    ("python wrapper + journal", "python", True),
    ("sh wrapper + full table", "sh", False),
    ("new: sh wrapper + journal", "sh", True),
)


def run_once(n: int, wrapper: str, journal: bool) -> dict[str, float]:
    """Launch ``n`` x ``true``; launches/s until all exited, call rate, agent CPU per launch."""
    d = tempfile.mkdtemp(prefix="eeagent-launch-")
    calls = [0]
    lock = threading.Lock()

    def on_change(snapshot: list[dict]) -> None:
        with lock:
            calls[0] += 1

    sup = ProcessSupervisor(d, n, on_change=on_change, wrapper=wrapper, journal=journal)
    try:
        cpu0 = time.process_time()
        ch0 = os.times()
        t0 = time.perf_counter()
        for i in range(n):
            sup.launch(f"u{i}", 0, ["true"])
        t_calls = time.perf_counter() - t0
        deadline = time.monotonic() + 300
        for i in range(n):
            info = sup.wait(f"u{i}", 0, timeout=max(0.1, deadline - time.monotonic()))
            assert info.state == states.EXITED, info
        total = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        ch1 = os.times()
    finally:
        sup.shutdown(kill=True, grace=1.0)
        shutil.rmtree(d, ignore_errors=True)
    children = ch1.children_user + ch1.children_system - ch0.children_user - ch0.children_system
    per = (cpu + children) / n
    return {
        "launches_per_s": n / total,
        "launch_calls_per_s": n / t_calls,
        "agent_cpu_ms_per_launch": cpu / n * 1000,
        "children_cpu_ms_per_launch": children / n * 1000,
        "cpu_ceiling_per_s": (os.cpu_count() or 1) / per if per else 0.0,
        "on_change_calls": calls[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="launches per configuration")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (best kept)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for name, wrapper, journal in CONFIGS:
        best: dict[str, float] | None = None
        for _ in range(args.repeat):
            r = run_once(args.n, wrapper, journal)
            if best is None or r["launches_per_s"] > best["launches_per_s"]:
                best = r
        assert best is not None
        rows.append({"config": name, **{k: round(v, 2) for k, v in best.items()}})
    base = rows[0]["launches_per_s"]
    for r in rows:
        r["ratio"] = round(r["launches_per_s"] / base, 2)
    if args.json:
        print(json.dumps({"benchmark": "eeagent_launch", "n": args.n, "cpus": os.cpu_count(),
                          "goal": GOAL, "results": rows}, indent=2))
        return 0
    print(f"ProcessSupervisor launches of `true`, n={args.n}, {os.cpu_count()} CPUs ({GOAL})")
    print(f"  {'config':<34} {'launches/s':>10} {'ratio':>6} {'calls/s':>8} "
          f"{'CPU/launch: agent':>18} {'children':>9} {'CPU ceiling':>12}")
    for r in rows:
        print(f"  {r['config']:<34} {r['launches_per_s']:>10.1f} {r['ratio']:>5.2f}x "
              f"{r['launch_calls_per_s']:>8.1f} {r['agent_cpu_ms_per_launch']:>15.2f} ms "
              f"{r['children_cpu_ms_per_launch']:>6.2f} ms {r['cpu_ceiling_per_s']:>10.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
