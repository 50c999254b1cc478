"""How long taking a snapshot stalls a component: snapshotter process against forked child
against synchronous (issue 13).

A PD state with N queued processes (and a node per 100) is built by folding events, as in
``benchmarks.pd``, and stored as a snapshot at offset 0 of a SQLite log in a temporary
directory (that is the synchronous baseline: ``Runner.take_snapshot``, ``component.snapshot``
+ ``msgpack.packb`` + save on the actor's thread, the stall is its whole duration). Then a tail
of N/10 more scheduled processes is appended and applied, and a snapshot is taken each way:

- snapshotter (what a due snapshot of a big state does, docs/decisions.md FO5):
  ``Runner._snapshot_by_snapshotter`` returns once it handed the job to its history thread,
  which hands it to the runner's ``python -m cei_actors.runtime.snapshotter`` process (spawned
  by the first job: measured apart, then a second job measured); it loads the newest snapshot,
  folds the tail and stores the state;
- forked (the design before, LT3): ``Runner._snapshot_by_fork`` returns after the fork; a child
  serializes the state from copy-on-write memory into a pipe and a background thread saves it.

Meanwhile this thread plays the actor, running small steps (~50 µs of Python each) and recording
the longest gap between two steps, less the time the thread waited on the run queue for a CPU
(its ``/proc/thread-self/schedstat``): the GIL held by a thread of this process shows there, a
busy machine does not (both are shown, and the same for the same steps with nothing in the
background). The stall is the larger of the call and that gap. Also shown: the time until
each snapshot is stored, the CPU seconds and peak RSS of the process that wrote it.

    python -m benchmarks.snapshot [--scale 1.0 | --processes 100000,1000000] [--json]
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
from collections.abc import Callable
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.pd import _spec, build_state, pd_component  # noqa: E402
from cei_actors.eventlog import open_log  # noqa: E402
from cei_actors.pd.events import ProcessScheduled  # noqa: E402
from cei_actors.runtime.runner import Runner, _stop_snapshotter  # noqa: E402

GOAL = "taking a snapshot stalls the actor a few ms at most, at any state size"


def _step() -> None:
    sum(range(1500))  # ~50 µs of Python: one small actor step


def _children() -> tuple[float, float]:
    """CPU seconds of the reaped children so far, and the largest peak RSS among them (MB)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def _snapshotter_usage(runner: Runner) -> tuple[float, float]:
    """CPU seconds and peak RSS (MB) of the runner's snapshotter process so far (it lives on
    between jobs, so it is not among the reaped children)."""
    proc = runner._snapshotter
    if proc is None:
        return 0.0, 0.0
    with open(f"/proc/{proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{proc.pid}/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return cpu, peak


def _background(runner: Runner, start: Callable[[], bool]) -> dict[str, float]:
    """Start a background snapshot; play the actor until it is stored."""
    cpu0, _ = _children()
    spent0, _ = _snapshotter_usage(runner)
    gc.collect()
    t = time.perf_counter()
    assert start()
    call_s = time.perf_counter() - t
    gaps = _Gaps()
    while runner.history_busy():
        _step()
        gaps.step()
    stored_s = time.perf_counter() - t
    gaps.close()
    cpu1, peak = _children()
    spent1, snap_peak = _snapshotter_usage(runner)
    return {"call": call_s, "gap": gaps.worst, "held": gaps.held, "stall": max(call_s, gaps.held),
            "stored": stored_s, "cpu": cpu1 - cpu0 + spent1 - spent0, "peak": max(peak, snap_peak)}


class _Gaps:
    """The longest gap between the actor's steps, and the longest part of a gap that the actor
    thread did not spend waiting for a CPU (its ``schedstat`` run-queue time): what held it
    (the GIL, a lock, a page fault) rather than the machine's other work."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)  # this thread's
        self.worst = self.held = 0.0
        self._last, self._queued = time.perf_counter(), self._runqueue()

    def _runqueue(self) -> float:
        return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9

    def step(self) -> None:
        now, queued = time.perf_counter(), self._runqueue()
        gap = now - self._last
        self.worst = max(self.worst, gap)
        self.held = max(self.held, gap - (queued - self._queued))
        self._last, self._queued = now, queued

    def close(self) -> None:
        os.close(self._fd)


def _append(runner: Runner, events: list[Any]) -> None:
    registry, apply = runner.component.registry, runner.component.apply
    assert runner.fence is not None
    for k in range(0, len(events), 1000):
        chunk = events[k:k + 1000]
        runner.head = runner.log.append(runner.fence, runner.head, [registry.to_pending(e, 1.0) for e in chunk])
        for e in chunk:
            runner.state = apply(runner.state, e)


def measure(processes: int) -> list[dict[str, Any]]:
    t = time.perf_counter()
    state = build_state(max(1, processes // 100), processes)
    build_s = time.perf_counter() - t
    spec = _spec()
    with tempfile.TemporaryDirectory(prefix="cei-snapbench-") as tmp:
        log = open_log(f"sqlite:///{tmp}/log.db")
        runner = Runner(pd_component(), log)
        runner.state, runner.head = state, 0
        runner.fence = log.acquire(runner.stream)
        gc.collect()
        t = time.perf_counter()
        assert runner.take_snapshot()
        sync_s = time.perf_counter() - t
        size = len(log.load_snapshot(runner.stream).data)
        tail = max(1, processes // 10)
        _append(runner, [ProcessScheduled(f"q{i}", 0, spec, 1.0) for i in range(tail)])
        assert runner._snapshotter_fold_class() is not None
        first = _background(runner, runner._snapshot_by_snapshotter)  # spawns the snapshotter
        assert log.snapshots(runner.stream)[0] == runner.head, "the snapshotter stored nothing"
        _append(runner, [ProcessScheduled("r0", 0, spec, 1.0)])
        spawned = _background(runner, runner._snapshot_by_snapshotter)  # the same one again
        assert log.snapshots(runner.stream)[0] == runner.head, "the snapshotter stored nothing"
        _append(runner, [ProcessScheduled("r1", 0, spec, 1.0)])
        forked = _background(runner, runner._snapshot_by_fork)
        assert log.snapshots(runner.stream)[0] == runner.head
        log.close()
    if runner._snapshotter is not None:
        _stop_snapshotter(runner._snapshotter)
    # the noise floor: the same steps for as long (a minute at most) with nothing in the
    # background (a busy machine deschedules this thread now and then: not the snapshot's doing)
    idle, end = _Gaps(), time.perf_counter() + min(60.0, max(spawned["stored"], forked["stored"]))
    while time.perf_counter() < end:
        _step()
        idle.step()
    idle.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    label = f"{processes // 1000}k" if processes < 1_000_000 else f"{processes / 1e6:g}M"
    ms = 1000
    return [
        _r(f"snapshot stall ms (pd, {label} processes)", spawned["stall"] * ms, "ms", forked["stall"] * ms,
           note=f"the call, or the longest gap between actor steps not spent waiting for a CPU; "
                f"snapshotter: call {spawned['call'] * ms:.1f} ms, gap {_gap(spawned)}; baseline, forked "
                f"child: fork {forked['call'] * ms:.1f} ms, gap {_gap(forked)}; with no snapshot running: "
                f"gap {_gap({'gap': idle.worst, 'held': idle.held})}; "
                f"synchronous take_snapshot: {sync_s * ms:,.0f} ms "
                f"(state built in {build_s:.1f} s, actor RSS {rss_mb:,.0f} MB, tail {tail:,} events)"),
        _r(f"snapshot stall ms, first after start (pd, {label} processes)", first["stall"] * ms, "ms",
           forked["stall"] * ms,
           note=f"the first snapshot of a runner also spawns its snapshotter: call {first['call'] * ms:.1f} ms, "
                f"gap {_gap(first)}; baseline: forked child, as above"),
        _r(f"snapshot synchronous stall ms (pd, {label} processes)", sync_s * ms, "ms", None,
           note="the whole take_snapshot on the actor's thread (what a small state still does)"),
        _r(f"snapshot stored s (pd, {label} processes)", first["stored"], "s", forked["stored"],
           note=f"from the call until the snapshot is saved (not a stall), the first snapshotter job: "
                f"its start, load, fold of the {tail:,}-event tail, save (the second job, tail of 1: "
                f"{spawned['stored']:.1f} s); baseline: forked child"),
        _r(f"snapshot writer cpu s (pd, {label} processes)", first["cpu"], "s", forked["cpu"],
           note=f"CPU of the process that wrote it, first snapshotter job as above (second: "
                f"{spawned['cpu']:.1f} s); baseline: forked child, which only serializes"),
        _r(f"snapshotter peak rss MB (pd, {label} processes)", spawned["peak"], "MB", None,
           note=f"a second copy of the state while it runs (the actor's: {rss_mb:,.0f} MB)"),
        _r(f"snapshot size MB (pd, {label} processes)", size / 1e6, "MB", None),
    ]


def _gap(m: dict[str, float]) -> str:
    return f"{m['held'] * 1000:.1f} ms (with the waits for a CPU: {m['gap'] * 1000:.1f} ms)"


def _r(metric: str, value: float, unit: str, baseline: float | None, note: str = "") -> dict[str, Any]:
    ratio = (baseline / value) if baseline and value else None  # lower is better: > 1 is a gain
    return {"metric": metric, "value": round(value, 3), "unit": unit,
            "baseline": None if baseline is None else round(baseline, 3),
            "ratio": None if ratio is None else round(ratio, 2), "note": note}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="processes = 100,000 x scale")
    parser.add_argument("--processes", help="comma-separated sizes, each measured in a fresh process "
                                            "(e.g. 100000,1000000); overrides --scale")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.processes:
        sizes = [int(s) for s in args.processes.split(",") if s.strip()]
        results = [r for n in sizes for r in _in_fresh_process(n)]
    else:
        results = measure(max(1, int(100_000 * args.scale)))
    if args.json:
        print(json.dumps({"benchmark": "snapshot", "goal": GOAL, "results": results}, indent=2))
    else:
        print(f"goal: {GOAL}")
        for r in results:
            base = "" if r["baseline"] is None else f"  (baseline {r['baseline']:,} {r['unit']}, ratio {r['ratio']})"
            print(f"{r['metric']:<52} {r['value']:>10,} {r['unit']}{base}")
            if r["note"]:
                print(f"    {r['note']}")
    return 0


def _in_fresh_process(processes: int) -> list[dict[str, Any]]:
    """``measure(processes)`` in a fresh interpreter (a big heap left by a smaller size would
    inflate the next size's fork)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "benchmarks.snapshot", "--scale", str(processes / 100_000), "--json"],
                         check=True, stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return list(json.loads(out.stdout)["results"])


if __name__ == "__main__":
    raise SystemExit(main())
