"""Simulation scenarios for ``cei sim run``: one Python module each, ``run(seed, report_dir,
options, **params) -> dict``.

Every scenario builds a :class:`cei_actors.sim.system.CEISystem` with :func:`system`, drives it
with a workload and faults drawn from the seed, checks the invariants as it goes, and returns
:func:`finish`'s summary (deterministic for a seed except ``wall_time_s``, ``cpu_time_s`` and
``steps_per_s``). :class:`RunOptions` carry what the caller wants besides the summary: a
report directory (markdown, JSON, PNG plots), a directory for the components' logs (SQLite)
and a progress callback.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cei_actors.debug.reader import paused_gc
from cei_actors.sim.system import CEISystem, SystemConfig

#: Scenario name -> one-line description.
SCENARIOS: dict[str, str] = {
    "steady": "two virtual hours of mixed work on an elastic pool, no faults; converges",
    "chaos": "random operations and every fault (VM kills, crashes, drops, quotas, lost replies)",
    "scale": "10,000 processes on 2,000 VMs, with VM kills and a PD failover",
    "ha": "HA groups over two PDs while copies, VMs and the HA leader are killed; converges",
    "iteration": "the iteration's test: 1,850 VMs requested at once across two sites "
                 "(boot-time spread and failure rate as parameters), then released",
    "big": "10,000 VMs and 100,000 processes through their whole lifecycle, with node failures",
    "storm": "a failure storm: a third of the VMs, the PD and EPUM die at once, creates fail",
    "overflow": "a site runs out of capacity; its domain overflows to a second site",
}


@dataclass
class RunOptions:
    """What a caller of a scenario wants besides its summary."""

    report_dir: Path | None = None  # markdown, JSON and PNG plots
    save_log: Path | None = None  # every component's log as DIR/<component>.sqlite
    progress: Callable[[CEISystem], None] | None = None  # called every few thousand steps


class Clock:
    """Wall and CPU time since the scenario started; CPU includes the children the run
    waited for (the final check's forked fold, decision SIM16)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), _cpu()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


Run = Callable[..., dict[str, Any]]


def scenario(run: Run) -> Run:
    """A scenario's ``run``, with the cyclic collector off for the whole run (decision
    SIM11): a simulated system makes next to no cyclic garbage, and with the collector on its
    full collections scanned the whole growing state again and again, in the run loop (SIM9)
    and outside it (the workload's calls, a recovery, the checks, the digest). The collector
    is as it was afterwards (``paused_gc``: on again if it was, the survivors counted as old)."""

    @functools.wraps(run)
    def wrapped(*args: Any, **kwargs: Any) -> dict[str, Any]:
        with paused_gc():
            return run(*args, **kwargs)

    return wrapped


def system(seed: int, config: SystemConfig, options: RunOptions | None = None) -> CEISystem:
    """The scenario's system, quiet, with the caller's progress callback attached."""
    logging.getLogger("cei_actors").setLevel(logging.ERROR)
    made = CEISystem(seed, config)
    if options is not None and options.progress is not None:
        made.progress = options.progress
    return made


def finish(name: str, system: CEISystem, started: Clock | float, report_dir: Path | None = None,
           options: RunOptions | None = None, **extra: Any) -> dict[str, Any]:
    """The scenario's summary (plus ``extra``); writes the report and saves the logs that
    ``report_dir`` / ``options`` ask for."""
    if isinstance(started, Clock):
        wall, cpu = started.elapsed()
    else:
        wall, cpu = time.perf_counter() - started, None
    summary: dict[str, Any] = {"scenario": name, **system.summary(), **extra}
    summary["wall_time_s"] = round(wall, 3)
    if cpu is not None:
        summary["cpu_time_s"] = round(cpu, 3)
    summary["steps_per_s"] = round(summary["steps"] / wall) if wall > 0 else None
    opts = options or RunOptions()
    report_dir = report_dir if report_dir is not None else opts.report_dir
    if opts.save_log is not None:
        from cei_actors.sim.savelog import save_logs

        summary["saved_logs"] = save_logs(system, Path(opts.save_log))
    if report_dir is not None:
        write_report(Path(report_dir), summary, system)
    return summary


def write_report(report_dir: Path, summary: dict[str, Any], system: CEISystem | None = None) -> None:
    """``<scenario>-<seed>.json``, ``.md`` and (with ``system``) PNG plots in ``report_dir``."""
    from cei_actors.sim.report import write_report as write

    write(report_dir, summary, system, SCENARIOS.get(summary["scenario"], ""))
