"""``cei sim ...``: deterministic whole-system simulations (scenarios in the ``sims`` package)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from .output import CliError, Output, progress


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("sim", help="deterministic simulations of the whole system")
    cmds = sim.add_subparsers(dest="sim_cmd", required=True, metavar="COMMAND")
    p = cmds.add_parser("list", help="the scenarios")
    p.set_defaults(func=cmd_list)
    p = cmds.add_parser("run", help="run a scenario: same seed, same run")
    p.add_argument("scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write <scenario>-<seed>.json and .md here")
    p.set_defaults(func=cmd_run)


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


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    scenarios = _sims().SCENARIOS
    if args.scenario not in scenarios:
        raise CliError(f"no scenario {args.scenario!r} (known: {', '.join(scenarios)})")
    module = importlib.import_module(f"sims.{args.scenario}")
    with progress(out, f"simulating {args.scenario} (seed {args.seed})"):
        summary = module.run(args.seed, args.report)
    if out.json:
        out.emit(summary)
        return 0 if not summary.get("violations") else 1
    out.line(f"scenario {args.scenario}, seed {args.seed}: "
             f"{summary['virtual_time']:.0f} virtual s in {summary['wall_time_s']:.1f} s "
             f"({summary['steps']} steps, {summary['steps_per_s']} steps/s)")
    out.line(f"processes: {summary['processes_scheduled']} scheduled, "
             f"{summary['processes_finished']} finished; VMs: {summary['vms_started']} started, "
             f"peak {summary.get('vms_peak')}")
    out.line(f"faults: {summary['faults_injected'] or 'none'}")
    violations = summary.get("violations") or []
    out.line(f"invariant checks: {summary['invariant_checks']}, violations: {len(violations)}")
    for v in violations[:20]:
        out.line(f"  ! {v}")
    problems = summary.get("convergence_problems") or []
    out.line("converged" if summary.get("converged") else f"not converged ({len(problems)}):")
    for p in problems[:20]:
        out.line(f"  - {p}")
    if args.report is not None:
        out.line(f"report: {args.report}/{args.scenario}-{args.seed}.{{json,md}}")
    return 0 if not violations else 1
