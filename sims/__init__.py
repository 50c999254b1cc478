"""Simulation scenarios for ``cei sim run``: each module has ``run(seed, report_dir) -> dict``.

Every scenario builds a :class:`cei_actors.sim.system.CEISystem`, drives it with a workload
and faults drawn from the seed, checks the invariants as it goes, and returns a summary
(deterministic for a seed except ``wall_time_s`` and ``steps_per_s``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cei_actors.sim.system import CEISystem

#: Scenario name -> one-line description.
SCENARIOS: dict[str, str] = {
    "steady": "two virtual hours of mixed work on an elastic pool, no faults; converges",
    "chaos": "random operations and every fault (VM kills, crashes, drops, quotas, lost replies)",
    "scale": "10,000 processes on 2,000 VMs, with VM kills and a PD failover",
    "ha": "HA groups over two PDs while copies, VMs and the HA leader are killed; converges",
}


def finish(name: str, system: CEISystem, wall_start: float, report_dir: Path | None,
           **extra: Any) -> dict[str, Any]:
    """The scenario's summary (plus ``extra``), written to ``report_dir`` if given."""
    wall = time.perf_counter() - wall_start
    summary: dict[str, Any] = {"scenario": name, **system.summary(), **extra}
    summary["wall_time_s"] = round(wall, 3)
    summary["steps_per_s"] = round(summary["steps"] / wall) if wall > 0 else None
    if report_dir is not None:
        write_report(Path(report_dir), summary)
    return summary


def write_report(report_dir: Path, summary: dict[str, Any]) -> None:
    """``<scenario>-<seed>.json`` and a short ``.md`` in ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{summary['scenario']}-{summary['seed']}"
    (report_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    lines = [f"# Simulation `{summary['scenario']}`, seed {summary['seed']}", ""]
    lines.append(f"{SCENARIOS.get(summary['scenario'], '')}")
    lines.append("")
    lines.append("| figure | value |")
    lines.append("|---|---|")
    for key in ("virtual_time", "steps", "wall_time_s", "steps_per_s", "messages_delivered",
                "messages_dropped", "processes_scheduled", "processes_finished", "vms_started",
                "agents_died", "invariant_checks", "converged"):
        if key in summary:
            lines.append(f"| {key} | {summary[key]} |")
    lines.append(f"| faults_injected | {summary.get('faults_injected')} |")
    lines.append("")
    for title, key in (("Invariant violations", "violations"),
                       ("Not converged", "convergence_problems")):
        items = summary.get(key) or []
        lines.append(f"## {title}: {len(items)}")
        lines += [f"- {item}" for item in items[:50]]
        lines.append("")
    (report_dir / f"{stem}.md").write_text("\n".join(lines))
