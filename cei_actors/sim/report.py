"""Reports of a simulation run: figures read back from the components' logs, plots, a summary.

:func:`timeline` folds the EPUM and PD logs into series over virtual time (VMs by state,
queue length, placements per second, time from a VM's request to its RUNNING node) plus the
events each component wrote; :func:`write_report` writes ``<scenario>-<seed>.json``, a
markdown page and PNG plots (matplotlib, Agg backend); :func:`screen` is the one-screen
summary ``cei sim run`` prints at the end.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..pd import states as ps

__all__ = ["distribution", "fold", "screen", "timeline", "write_report"]

#: EPUM instance states shown in the VM plot, in lifecycle order.
VM_STATES = ("REQUESTING", "REQUESTED", "PENDING", "STARTED", "RUNNING", "TERMINATING",
             "TERMINATED", "FAILED")


def _bins(t0: float, t1: float, n: int = 200) -> tuple[float, int]:
    width = max((t1 - t0) / n, 1.0)
    return width, int((t1 - t0) // width) + 1


def timeline(system: Any, points: int = 200) -> dict[str, Any]:
    """Series over virtual time (seconds from the run's start) from the EPUM and PD logs."""
    sim = system.sim
    epum, pd = sim.nodes["epum"], sim.nodes["pd"]
    tl = fold(epum.log.read(epum.component.stream), pd.log.read(pd.component.stream),
              system.start, sim.clock.now(), points)
    tl["events_by_component"] = {name: node.log.head(node.component.stream)
                                 for name, node in sorted(sim.nodes.items())}
    return tl


#: EPUM instance states after which an instance holds no VM.
ENDED_VM_STATES = frozenset({"TERMINATED", "FAILED", "REJECTED"})


def fold(epum_records: Iterable[Any], pd_records: Iterable[Any], t0: float, t1: float,
         points: int = 200) -> dict[str, Any]:
    """Fold EPUM and PD records (``.type`` and ``.body``) written between ``t0`` and ``t1``
    into series binned over ``t1 - t0`` (VMs by state, queue length, running processes,
    placements per second) and the run's figures: VM-seconds, busy-node seconds (a node
    with a process placed on it), each process's first queue wait, request -> RUNNING
    times, launches, instances destroyed, processes by final state, rounds after the first."""
    width, n = _bins(t0, t1, points)
    times = [round(i * width, 3) for i in range(n)]

    def at(t: float) -> int:
        return min(max(int((t - t0) // width), 0), n - 1)

    # VMs by state (EPUM instances), and request -> RUNNING
    vm_delta: dict[str, list[int]] = collections.defaultdict(lambda: [0] * n)
    inst_state: dict[str, str] = {}
    requested: dict[str, float] = {}
    to_running: list[float] = []
    live_since: dict[str, float] = {}
    vm_seconds = 0.0
    destroyed: set[str] = set()
    launches = 0
    for r in epum_records:
        b = r.body
        if r.type == "InstanceLaunchRequested":
            iid, new, when = b["instance_id"], "REQUESTING", b["at"]
            requested[iid] = when
            launches += 1
        elif r.type == "InstanceUpdated":
            iid, new, when = b["instance_id"], b["state"], b["at"]
            if new == "RUNNING" and iid in requested:
                to_running.append(when - requested.pop(iid))
        elif r.type == "InstanceDestroyRequested":
            destroyed.update(b["instance_ids"])
            continue
        else:
            continue
        old = inst_state.get(iid)
        if old == new:
            continue
        if old is not None:
            vm_delta[old][at(when)] -= 1
        vm_delta[new][at(when)] += 1
        inst_state[iid] = new
        if new not in ENDED_VM_STATES:
            live_since.setdefault(iid, when)
        elif iid in live_since:
            vm_seconds += _overlap(live_since.pop(iid), when, t0, t1)
    vm_seconds += sum(_overlap(since, t1, t0, t1) for since in live_since.values())
    vms = {s: _cumulative(vm_delta[s]) for s in VM_STATES if s in vm_delta}
    vms.update({s: _cumulative(d) for s, d in vm_delta.items() if s not in vms})

    # queue length, running processes and placements; node occupancy
    queue_d, running_d, placed = [0] * n, [0] * n, [0] * n
    proc_state: dict[str, str] = {}
    scheduled_at: dict[str, float] = {}
    waits: dict[str, float] = {}
    on: dict[str, str] = {}  # upid -> the resource it is placed on
    load: collections.Counter[str] = collections.Counter()  # resource -> processes placed
    busy_since: dict[str, float] = {}
    busy_seconds = 0.0
    rounds: dict[str, int] = {}  # upid -> its newest round
    for r in pd_records:
        b = r.body
        if r.type == "ProcessScheduled":
            new = ps.REQUESTED
            scheduled_at.setdefault(b["upid"], b["at"])
        elif r.type == "ProcessMoved":
            new = b["state"]
        elif r.type == "ProcessAssigned":
            new = ps.ASSIGNED
            placed[at(b["at"])] += 1
        else:
            continue
        upid, when = b["upid"], b["at"]
        rounds[upid] = max(rounds.get(upid, 0), b["round"])
        i = at(when)
        old = proc_state.get(upid)
        if old is not None:
            queue_d[i] -= old in ps.QUEUED
            running_d[i] -= old == ps.RUNNING
        queue_d[i] += new in ps.QUEUED
        running_d[i] += new == ps.RUNNING
        proc_state[upid] = new
        if new == ps.RUNNING and upid not in waits and upid in scheduled_at:
            waits[upid] = when - scheduled_at[upid]
        rid = b.get("resource_id") if new == ps.ASSIGNED else on.get(upid) if new in ps.PLACED else None
        if on.get(upid) != rid:
            for res, step in ((on.get(upid), -1), (rid, 1)):
                if res is None:
                    continue
                load[res] += step
                if load[res] == 1 and step == 1:
                    busy_since[res] = when
                elif load[res] == 0 and res in busy_since:
                    busy_seconds += _overlap(busy_since.pop(res), when, t0, t1)
            if rid is None:
                on.pop(upid, None)
            else:
                on[upid] = rid
    busy_seconds += sum(_overlap(since, t1, t0, t1) for since in busy_since.values())
    return {
        "bin_s": width,
        "t": times,
        "vms": vms,
        "live_vms": [sum(vms[s][k] for s in vms if s not in ENDED_VM_STATES) for k in range(n)],
        "queue": _cumulative(queue_d),
        "running": _cumulative(running_d),
        "placements_per_s": [round(c / width, 4) for c in placed],
        "request_to_running_s": sorted(round(x, 3) for x in to_running),
        "vm_seconds": round(vm_seconds, 3),
        "busy_node_seconds": round(busy_seconds, 3),
        "queue_wait_s": sorted(round(x, 3) for x in waits.values()),
        "launches": launches,
        "destroyed": len(destroyed),
        "process_states": dict(sorted(collections.Counter(proc_state.values()).items())),
        "restarts": sum(rounds.values()),
    }


def _overlap(a: float, b: float, t0: float, t1: float) -> float:
    """How much of ``[a, b]`` lies within ``[t0, t1]``."""
    return max(0.0, min(b, t1) - max(a, t0))


def _cumulative(deltas: list[int]) -> list[int]:
    out, level = [], 0
    for d in deltas:
        level += d
        out.append(level)
    return out


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def distribution(values: list[float]) -> dict[str, Any]:
    """Count, min, p50, p90, p99 and max of sorted ``values``."""
    return {"count": len(values), "min": _percentile(values, 0.0), "p50": _percentile(values, 0.5),
            "p90": _percentile(values, 0.9), "p99": _percentile(values, 0.99),
            "max": _percentile(values, 1.0)}


def _plots(report_dir: Path, stem: str, tl: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    made: list[tuple[str, str]] = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(report_dir / f"{stem}-{name}.png", dpi=90)
        plt.close(fig)
        made.append((title, f"{stem}-{name}.png"))

    t = tl["t"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for state, series in tl["vms"].items():
        if any(series) and state not in ("TERMINATED", "FAILED"):
            ax.plot(t, series, label=state)
    ax.set(xlabel="virtual s", ylabel="VMs", title="VMs by state")
    ax.legend(fontsize="small")
    save(fig, "vms", "VMs by state over time")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, tl["queue"], label="queued")
    ax.plot(t, tl["running"], label="running")
    ax.set(xlabel="virtual s", ylabel="processes", title="Queue length and running processes")
    ax.legend(fontsize="small")
    save(fig, "queue", "Queue length")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, tl["placements_per_s"])
    ax.set(xlabel="virtual s", ylabel="placements / s", title=f"Placements per second ({tl['bin_s']:.0f} s bins)")
    save(fig, "placements", "Placements per second")
    fig, ax = plt.subplots(figsize=(8, 4))
    if tl["request_to_running_s"]:
        ax.hist(tl["request_to_running_s"], bins=50)
    ax.set(xlabel="seconds", ylabel="VMs", title="Time from a VM's request to its RUNNING node")
    save(fig, "need-to-running", "Time from need to running node")
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(tl["events_by_component"])
    ax.bar(names, [tl["events_by_component"][k] for k in names])
    ax.set(ylabel="events", title="Events written per component")
    save(fig, "events", "Events written per component")
    return made


def write_report(report_dir: Path, summary: dict[str, Any], system: Any | None = None,
                 description: str = "") -> list[Path]:
    """``<scenario>-<seed>.json`` and ``.md`` (with PNG plots when ``system`` is given)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{summary['scenario']}-{summary['seed']}"
    plots: list[tuple[str, str]] = []
    out = summary  # the caller sees the figures too
    if system is not None:
        tl = timeline(system)
        out["request_to_running_s"] = distribution(tl["request_to_running_s"])
        out["events_by_component"] = tl["events_by_component"]
        (report_dir / f"{stem}-timeline.json").write_text(json.dumps(tl, sort_keys=True) + "\n")
        plots = _plots(report_dir, stem, tl)
    (report_dir / f"{stem}.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    lines = [f"# Simulation `{summary['scenario']}`, seed {summary['seed']}", "", description, "",
             "```", *screen(out), "```", "", "| figure | value |", "|---|---|"]
    for key in ("virtual_time", "steps", "wall_time_s", "cpu_time_s", "steps_per_s",
                "messages_delivered", "messages_dropped", "processes_scheduled",
                "processes_finished", "vms_started", "vms_peak", "agents_died",
                "invariant_checks", "converged", "request_to_running_s", "events_by_component"):
        if key in out:
            lines.append(f"| {key} | {out[key]} |")
    lines.append(f"| faults_injected | {out.get('faults_injected')} |")
    lines.append("")
    for title, file in plots:
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    for title, key in (("Invariant violations", "violations"), ("Not converged", "convergence_problems")):
        items = out.get(key) or []
        lines.append(f"## {title}: {len(items)}")
        lines += [f"- {item}" for item in items[:50]]
        lines.append("")
    (report_dir / f"{stem}.md").write_text("\n".join(lines))
    return [report_dir / f"{stem}.json", report_dir / f"{stem}.md",
            *(report_dir / f for _, f in plots)]


def screen(summary: dict[str, Any]) -> list[str]:
    """The end-of-run summary, one screen at most."""
    s = summary
    violations = s.get("violations") or []
    problems = s.get("convergence_problems") or []
    lines = [
        f"scenario {s['scenario']}, seed {s['seed']}: {s['virtual_time']:.0f} virtual s in "
        f"{s.get('wall_time_s', 0):.1f} s wall, {s.get('cpu_time_s', 0):.1f} s CPU "
        f"({s['steps']} steps, {s.get('steps_per_s')} steps/s)",
        f"processes: {s['processes_scheduled']} scheduled, {s['processes_finished']} finished, "
        f"{s['agent_launches']} launches; VMs: {s['vms_started']} started, peak {s.get('vms_peak')}, "
        f"{s['vms_live']} live at the end",
        f"messages: {s['messages_delivered']} delivered, {s['messages_dropped']} dropped",
        f"faults: {s['faults_injected'] or 'none'}",
    ]
    dist = s.get("request_to_running_s")
    if dist and dist.get("count"):
        lines.append(f"VM request -> RUNNING node: p50 {dist['p50']:.1f} s, p90 {dist['p90']:.1f} s, "
                     f"max {dist['max']:.1f} s ({dist['count']} VMs)")
    if s.get("events_by_component"):
        lines.append("events written: " + ", ".join(f"{k} {v}" for k, v in s["events_by_component"].items()))
    lines.append(f"invariant checks: {s['invariant_checks']}, violations: {len(violations)}")
    lines += [f"  ! {v}" for v in violations[:8]]
    lines.append("converged" if s.get("converged") else f"NOT converged ({len(problems)}):")
    lines += [f"  - {p}" for p in problems[:8]]
    return lines
