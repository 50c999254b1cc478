"""How many launches per second can one EEAgent's :class:`ProcessSupervisor` take?

Launches ``--n`` processes running ``true`` and times until every one has exited (the reaper
reaped it and the record is EXITED), against a baseline measured in the same run: a bare
``os.posix_spawn`` of ``true`` followed by ``waitpid``, in a loop (the cost of the process
itself, with no supervision at all). Configurations, each on a fresh state directory with
its own reaper (under one work dir, ``--workdir``, removed at the end: deletions between the
configurations would make the next one's file creates slow, see ``benchmarks/disk.py``):

- ``baseline``: ``posix_spawn`` + ``waitpid`` of ``true``, one after another;
- ``reaper, launch()``: one :meth:`~ProcessSupervisor.launch` call per process;
- ``reaper, launch_many(B)``: :meth:`~ProcessSupervisor.launch_many` with ``--batch`` items.

``on_change`` only counts calls (as the EEAgent's own callback, which just marks the heartbeat
dirty). CPU time, in ms per launch, from ``getrusage`` (the machine may be shared, so CPU time
is the figure to trust): ``agent`` is this process (every thread), ``reaper`` the reaper's own
time and ``children`` the commands' (for the baseline: the reaped ``true``\\ s). ``ratio`` is
launches/s over the baseline's; ``ceiling`` is the CPU-bound rate on this machine's CPUs
(CPUs / total CPU per launch).

    python -m benchmarks.eeagent_launch [--n 1000] [--batch 50] [--repeat 1] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.disk import check_disk  # noqa: E402
from cei_actors.eeagent import states  # noqa: E402
from cei_actors.eeagent.supervisor import LaunchRequest, ProcessSupervisor  # noqa: E402

GOAL = "end to end >= 1,000 launches/s on one host"


def _cpu(which: int) -> float:
    r = resource.getrusage(which)
    return r.ru_utime + r.ru_stime


def run_baseline(n: int) -> dict[str, float]:
    """``posix_spawn`` + ``waitpid`` of ``true``, ``n`` times."""
    exe = shutil.which("true") or "/bin/true"
    env = {"PATH": os.defpath}
    self0, ch0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn(exe, [exe], env)
        os.waitpid(pid, 0)
    total = time.perf_counter() - t0
    return _row(n, total, _cpu(resource.RUSAGE_SELF) - self0, 0.0,
                _cpu(resource.RUSAGE_CHILDREN) - ch0)


def run_reaper(n: int, batch: int, work: str) -> dict[str, float]:
    """``n`` x ``true`` through a supervisor; ``batch`` 0 means one ``launch`` call each."""
    d = tempfile.mkdtemp(prefix="agent-", dir=work)
    calls = [0]
    lock = threading.Lock()

    def on_change(snapshot: list[dict]) -> None:
        with lock:
            calls[0] += 1

    sup = ProcessSupervisor(d, n, on_change=on_change)
    try:
        r0 = sup.reaper_stats()
        assert r0 is not None
        self0 = _cpu(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        if batch:
            for lo in range(0, n, batch):
                reqs = [LaunchRequest(f"u{i}", 0, ["true"]) for i in range(lo, min(n, lo + batch))]
                sup.launch_many(reqs)
        else:
            for i in range(n):
                sup.launch(f"u{i}", 0, ["true"])
        deadline = time.monotonic() + 300
        for i in range(n):
            info = sup.wait(f"u{i}", 0, timeout=max(0.1, deadline - time.monotonic()))
            assert info.state == states.EXITED, info
        total = time.perf_counter() - t0
        agent = _cpu(resource.RUSAGE_SELF) - self0
        r1 = sup.reaper_stats()
        assert r1 is not None
    finally:
        sup.shutdown(kill=True, grace=1.0)
    reaper = sum(r1["self"]) - sum(r0["self"])
    children = sum(r1["children"]) - sum(r0["children"])
    row = _row(n, total, agent, reaper, children)
    row["on_change_calls"] = calls[0]
    return row


def _row(n: int, total: float, agent: float, reaper: float, children: float) -> dict[str, float]:
    per = (agent + reaper + children) / n
    return {
        "launches_per_s": n / total,
        "agent_cpu_ms_per_launch": agent / n * 1000,
        "reaper_cpu_ms_per_launch": reaper / n * 1000,
        "children_cpu_ms_per_launch": children / n * 1000,
        "total_cpu_ms_per_launch": per * 1000,
        "cpu_ceiling_per_s": (os.cpu_count() or 1) / per if per else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="launches per configuration")
    ap.add_argument("--batch", type=int, default=50, help="items per launch_many call")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (best kept)")
    ap.add_argument("--workdir", default=None, help="where the state dirs go (default: the temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="eeagent-launch-", dir=args.workdir)
    configs = [
        ("baseline: posix_spawn + waitpid", lambda: run_baseline(args.n)),
        ("reaper, launch()", lambda: run_reaper(args.n, 0, work)),
        (f"reaper, launch_many({args.batch})", lambda: run_reaper(args.n, args.batch, work)),
    ]
    rows = []
    try:
        create_ms = check_disk(work)
        for name, run in configs:
            best: dict[str, float] | None = None
            for _ in range(args.repeat):
                r = run()
                if best is None or r["total_cpu_ms_per_launch"] < best["total_cpu_ms_per_launch"]:
                    best = r
            assert best is not None
            rows.append({"config": name, **{k: round(v, 3) for k, v in best.items()}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["launches_per_s"]
    for r in rows:
        r["ratio"] = round(r["launches_per_s"] / base, 3)
    if args.json:
        print(json.dumps({"benchmark": "eeagent_launch", "n": args.n, "cpus": os.cpu_count(),
                          "goal": GOAL, "file_create_ms": round(create_ms, 3), "results": rows},
                         indent=2))
        return 0
    print(f"launches of `true`, n={args.n}, {os.cpu_count()} CPUs ({GOAL}); "
          f"CPU in ms per launch; creating a file in the work dir cost {create_ms:.3f} ms")
    print(f"  {'config':<32} {'launches/s':>10} {'ratio':>6} {'agent':>7} {'reaper':>7} "
          f"{'children':>8} {'total':>7} {'ceiling':>9}")
    for r in rows:
        print(f"  {r['config']:<32} {r['launches_per_s']:>10.1f} {r['ratio']:>5.2f}x "
              f"{r['agent_cpu_ms_per_launch']:>7.3f} {r['reaper_cpu_ms_per_launch']:>7.3f} "
              f"{r['children_cpu_ms_per_launch']:>8.3f} {r['total_cpu_ms_per_launch']:>7.3f} "
              f"{r['cpu_ceiling_per_s']:>7.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
