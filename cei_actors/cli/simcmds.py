"""``cei sim ...``: deterministic whole-system simulations (scenarios in the ``sims`` package)
and property-based checks of the whole system (``cei sim check``)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from .output import CliError, Output


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("sim", help="deterministic simulations of the whole system")
    cmds = sim.add_subparsers(dest="sim_cmd", required=True, metavar="COMMAND")
    p = cmds.add_parser("list", help="the scenarios")
    p.set_defaults(func=cmd_list)
    p = cmds.add_parser("run", help="run a scenario: same seed, same run")
    p.add_argument("scenario", help="a scenario name (`cei sim list`)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same run (default 0)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write <scenario>-<seed>.json, .md and PNG plots here")
    p.add_argument("--save-log", type=Path, default=None, metavar="DIR",
                   help="save every component's log as DIR/<component>.sqlite (cei log opens it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(func=cmd_run)
    p = cmds.add_parser("check", help="property-based runs: random operations and faults, "
                                      "invariants after every step, convergence at the end")
    p.add_argument("--examples", type=int, default=20, metavar="N", help="runs to try (20)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same runs (0)")
    p.add_argument("--steps", type=int, default=30, metavar="N", help="steps per run at most (30)")
    p.add_argument("--faults", default="vm,crash,network,cloud", metavar="KINDS",
                   help="comma-separated fault kinds: vm, crash, network, cloud ('none': no faults)")
    p.add_argument("--healing", action="store_true",
                   help="only the faults the system heals (Provisioner crashes, drops on agent links)")
    p.add_argument("--save-log", type=Path, default=Path("sim-check-logs"), metavar="DIR",
                   help="where a failing run's logs go (sim-check-logs)")
    p.set_defaults(func=cmd_check)
    p = cmds.add_parser("replay", help="what-if: re-simulate a recorded log's workload under its own "
                                       "policy and another engine or parameters, side by side")
    p.add_argument("log", metavar="LOG", help="a directory of saved logs (cei sim run --save-log), "
                                              "an SQLite log file or a log URL")
    p.add_argument("--engine", default=None, metavar="NAME",
                   help="the PD domain's engine in the what-if run (needy, preserve_n, ...)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="the PD domain's engine_conf KEY in the what-if run (as cei domain add "
                        "--set; dotted keys reach other sections)")
    p.add_argument("--seed", type=int, default=0, help="the simulations' seed (0)")
    p.add_argument("--extend", type=float, default=0.0, metavar="SECONDS",
                   help="compare the runs this long past the log's end (0)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write whatif.json, whatif.md and PNG plots here")
    p.set_defaults(func=cmd_replay)


def _sims() -> ModuleType:
    """The scenarios package: importable as ``sims``, or found next to this source tree."""
    try:
        return importlib.import_module("sims")
    except ImportError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "sims" / "__init__.py").is_file():
            raise CliError("the simulation scenarios (package 'sims') are not installed") from None
        sys.path.insert(0, str(root))
        return importlib.import_module("sims")


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    rows = [{"scenario": k, "description": v} for k, v in _sims().SCENARIOS.items()]
    out.table(rows, ["scenario", "description"], title="scenarios")
    return 0


class _Progress:
    """A rich progress line: virtual time, steps/s, live VMs and processes (terminal only)."""

    def __init__(self) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                            transient=True, refresh_per_second=4)
        self.task = self.bar.add_task("starting", total=None)
        self.shown = 0.0
        self.steps = 0
        self.at = time.perf_counter()

    def __call__(self, system: Any) -> None:
        now = time.perf_counter()
        if now - self.shown < 0.25:
            return
        rate = (system.sim.steps - self.steps) / max(now - self.at, 1e-9)
        self.shown = self.at = now
        self.steps = system.sim.steps
        vms = sum(c._live for c in system.clouds.values())
        procs = sum(len(a.live_keys()) for a in system.agents.values())
        self.bar.update(self.task, description=(
            f"virtual {system.sim.clock.now() - system.start:8.0f} s | {rate:7.0f} steps/s | "
            f"{vms:6d} VMs | {procs:7d} processes"))


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    sims = _sims()
    scenarios = sims.SCENARIOS
    if args.scenario not in scenarios:
        raise CliError(f"no scenario {args.scenario!r} (known: {', '.join(scenarios)})")
    module = importlib.import_module(f"sims.{args.scenario}")
    show = not out.json and not args.no_progress and sys.stderr.isatty()
    progress = _Progress() if show else None
    options = sims.RunOptions(report_dir=args.report, save_log=args.save_log, progress=progress)
    if progress is not None:
        with progress.bar:
            summary = module.run(args.seed, options=options)
    else:
        summary = module.run(args.seed, options=options)
    violations = summary.get("violations") or []
    if out.json:
        out.emit(summary)
        return 0 if not violations else 1
    from ..sim.report import screen

    for line in screen(summary):
        out.line(line)
    if args.report is not None:
        out.line(f"report: {args.report}/{args.scenario}-{args.seed}.md (plots beside it)")
    for name, url in (summary.get("saved_logs") or {}).items():
        out.line(f"log of {name}: cei --log {url} log streams")
    return 0 if not violations else 1


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    from ..sim.check import machine, run_check

    kinds = [] if args.faults.strip() == "none" else [k.strip() for k in args.faults.split(",") if k.strip()]
    if args.examples < 1 or args.steps < 1:
        raise CliError("--examples and --steps must be at least 1")
    try:
        klass = machine(kinds, chaos=not args.healing)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    result = run_check(klass, examples=args.examples, seed=args.seed, steps=args.steps,
                       save_dir=args.save_log)
    if out.json:
        out.emit(result.as_dict())
        return 0 if result.passed else 1
    if result.passed:
        out.line(f"passed: {result.examples} runs from seed {result.seed}, faults "
                 f"{', '.join(result.faults) or 'none'}: invariants held after every step and "
                 "every run converged")
        return 0
    out.line(f"FAILED (seed {result.seed}, faults {', '.join(result.faults) or 'none'}); "
             "the smallest failing run:")
    for line in result.error.splitlines()[:60]:
        out.line(f"  {line}")
    if result.saved:
        out.line(f"its logs: {args.save_log}/ ; open them with:")
        for command in result.commands:
            out.line(f"  {command}")
    return 1


def cmd_replay(args: argparse.Namespace, out: Output) -> int:
    """``cei sim replay``: the recorded run and its re-simulations, figure by figure."""
    from ..sim.whatif import compare, open_logs, table, write_report
    from .common import assignments

    settings = assignments(args.settings, "--set")
    logs = open_logs(args.log)
    try:
        result = compare(logs, args.engine, settings, args.seed, args.extend)
    finally:
        for r in set(logs.values()):
            r.close()
    written = write_report(args.report, result, args.log) if args.report is not None else []
    if out.json:
        out.emit({k: v for k, v in result.items() if k != "series"}
                 | ({"report": [str(p) for p in written]} if written else {}))
        return 0
    rows, columns = table(result)
    policies = result["policies"]
    out.table(rows, columns, title=f"{args.log}: {result['span_s']:.0f} s recorded"
                                   + (f" + {args.extend:g} s" if args.extend else "") + ", "
                                   + "; ".join(f"{k}: {v['engine']}" for k, v in policies.items()))
    what_if = policies.get("what-if")
    if what_if is not None and what_if["settings"]:
        out.line("what-if settings: " + ", ".join(f"{k}={v}" for k, v in sorted(what_if["settings"].items())))
    out.line("inputs: " + ", ".join(f"{k} {v}" for k, v in result["inputs"].items()))
    for note in result["assumptions"]:
        out.line(f"assumed: {note}")
    if written:
        out.line(f"report: {written[1]} (plots beside it)")
    return 0
