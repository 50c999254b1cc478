"""Simulator speed: the whole system (real Provisioner, EPUM and PD cores, simulated agents
and cloud) on virtual time, at growing sizes.

For each size N (VMs; 10 processes per VM) the ``big`` scenario runs its whole lifecycle:
arrivals, boots, placements, runs, node failures, a PD failover, drain. Per size: wall and CPU
seconds (CPU includes the final check's forked child, SIM16), simulated seconds per wall
second, steps and events (appended to the components' logs) per wall second. ``growth`` =
wall time per VM at the largest size / at the smallest (1: linear); ``peak rss`` = the
run's peak resident memory. Every run (each size, the baseline and the iteration's test:
1,850 VMs at once across two sites, once) is a fresh interpreter, as ``cei sim run`` is.

Baseline, measured in the same run at the smallest size (if at most 2,000 VMs): the same scenario with the timings
the simulator used before (the ``scale`` scenario's: heartbeats every 30 s, the PD's monitor
every second, its need refresh every 30 s, the cloud queried every 10 s, VMs polled every
5 s). ``ratio`` = value / baseline (below 1 is better for times).

    python -m benchmarks.sim [--json] [--scale]     (default sizes 100, 200; --scale: 1k, 2k, 5k, 10k)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any

try:
    import cei_actors  # noqa: F401
except ImportError:  # run as a file from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cei_actors.sim.system import SystemConfig  # noqa: E402

GOAL = ("10,000 VMs and 100,000 processes through their whole lifecycle in <= 60 s wall; "
        "the 1,850-VM iteration scenario in <= 10 s wall")


def _import_sims() -> Any:
    try:
        import sims
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import sims
    return sims


def baseline_config(per_vm: int = 10, processes: int = 0) -> SystemConfig:
    """The timings of the ``scale`` scenario before this benchmark existed."""
    from sims.big import tombstones

    return SystemConfig(extra=tombstones(processes), slots=per_vm, heartbeat_period=30.0, heartbeat_warning=90.0,
                        heartbeat_missing=180.0, agent_poll=5.0, create_concurrency=100,
                        terminator_concurrency=50, dispatch_retry_seconds=60.0,
                        decider_interval=10.0, leak_grace=600.0, boot_delay=(30.0, 120.0))


def measure(summary: dict[str, Any]) -> dict[str, float]:
    """The benchmark's figures of one scenario run (in this process)."""
    wall, cpu = summary["wall_time_s"], summary["cpu_time_s"]
    events = sum(summary["log_heads"].values())
    return {"wall": wall, "cpu": cpu, "sim_per_wall": summary["virtual_time"] / wall,
            "steps_per_s": summary["steps"] / wall, "events_per_s": events / wall,
            "steps": summary["steps"], "ok": not summary["violations"] and summary["converged"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_one(what: str, seed: int) -> dict[str, float]:
    """Run ``big:N``, ``baseline:N`` (``big`` with the old timings) or ``iteration`` here."""
    _import_sims()
    from sims import big, iteration

    kind, _, n = what.partition(":")
    if kind == "iteration":
        return measure(iteration.run(seed))
    vms = int(n)
    config = baseline_config(10, vms * 10) if kind == "baseline" else None
    return measure(big.run(seed, vms=vms, system_config=config))


def fresh(what: str, seed: int) -> dict[str, float]:
    """:func:`measure_one` in a new interpreter: each size is measured as a user's ``cei sim
    run`` would run it, not on the heap (and the peak memory) the sizes before it left."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "benchmarks.sim", "--measure", what, "--seed", str(seed)],
                         cwd=root, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--scale", action="store_true", help="1k, 2k, 5k and 10k VMs")
    p.add_argument("--sizes", default=None, help="comma-separated VM counts (overrides)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one run: see fresh()
    a = p.parse_args(argv)
    if a.measure is not None:
        print(json.dumps(measure_one(a.measure, a.seed)))
        return 0

    sizes = (sorted(int(x) for x in a.sizes.split(",")) if a.sizes else
             [1000, 2000, 5000, 10000] if a.scale else [100, 200])
    rows: dict[int, dict[str, float]] = {}
    for n in sizes:
        rows[n] = fresh(f"big:{n}", a.seed)
        if not a.json:
            r = rows[n]
            print(f"{n:6d} VMs, {n * 10:7d} processes: {r['wall']:7.1f} s wall, {r['cpu']:7.1f} s CPU, "
                  f"{r['sim_per_wall']:7.0f} sim s/s, {r['steps_per_s']:6.0f} steps/s, "
                  f"{r['events_per_s']:6.0f} events/s, {r['steps']} steps, ok={r['ok']}", flush=True)
    # the old timings at the smallest size (skipped above 2,000 VMs: it takes too long)
    base = fresh(f"baseline:{sizes[0]}", a.seed) if sizes[0] <= 2000 else {}
    it = fresh("iteration", a.seed)
    results: list[dict[str, Any]] = []

    def add(metric: str, value: float, unit: str, baseline: float | None = None) -> None:
        results.append({"metric": metric, "value": round(value, 3), "unit": unit,
                        "baseline": None if baseline is None else round(baseline, 3),
                        "ratio": None if not baseline else round(value / baseline, 3)})

    for n, r in rows.items():
        b = base if n == sizes[0] else {}
        add(f"sim wall s ({n} vms, {n * 10} processes)", r["wall"], "s", b.get("wall"))
        add(f"sim cpu s ({n} vms, {n * 10} processes)", r["cpu"], "s", b.get("cpu"))
        add(f"sim simulated s per wall s ({n} vms)", r["sim_per_wall"], "s/s", b.get("sim_per_wall"))
        add(f"sim steps per s ({n} vms)", r["steps_per_s"], "1/s", b.get("steps_per_s"))
        add(f"sim steps ({n} vms)", r["steps"], "steps", b.get("steps"))
        add(f"sim events per s ({n} vms)", r["events_per_s"], "1/s", b.get("events_per_s"))
        add(f"sim peak rss MB ({n} vms)", r["peak_rss_mb"], "MB")
    lo, hi = sizes[0], sizes[-1]
    if hi > lo:
        add(f"sim growth (wall per VM, {hi} vs {lo} vms)",
            (rows[hi]["wall"] / hi) / (rows[lo]["wall"] / lo), "x")
        add(f"sim growth (cpu per VM, {hi} vs {lo} vms)",
            (rows[hi]["cpu"] / hi) / (rows[lo]["cpu"] / lo), "x")
    add("sim wall s (1850 vms)", it["wall"], "s")
    add("sim cpu s (1850 vms)", it["cpu"], "s")
    if a.json:
        print(json.dumps({"benchmark": "sim", "goal": GOAL, "sizes": sizes, "results": results}, indent=1))
    else:
        if base:
            print(f"baseline ({lo} VMs, old timings): {base['wall']:.1f} s wall, {base['cpu']:.1f} s CPU, "
                  f"{base['steps']} steps")
        print(f"iteration (1,850 VMs): {it['wall']:.1f} s wall, {it['cpu']:.1f} s CPU, ok={it['ok']}")
        for r in results:
            ratio = f" (x{r['ratio']} of baseline {r['baseline']})" if r["ratio"] is not None else ""
            print(f"  {r['metric']}: {r['value']} {r['unit']}{ratio}")
        print(f"goal: {GOAL}")
    ok = all(r["ok"] for r in rows.values()) and it["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
