"""``cei up`` / ``cei down`` / ``cei status``: start, stop and look at the whole system."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .common import connected, not_up_message
from .output import CliError, Output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the system in the background; return when it is ready")
    p.add_argument("--plan", type=Path, default=None, metavar="FILE", help="launch plan (YAML; default: the built-in plan)")
    p.add_argument("--log", dest="log_url", default=argparse.SUPPRESS, metavar="URL", help="event log URL (sqlite:///..., zk://...)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the system (components, nodes, processes); the log stays")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="leaders, domains, nodes, resources, process counts")
    p.set_defaults(func=cmd_status)


def start(args: argparse.Namespace, out: Output) -> dict[str, Any]:
    """Load the plan and start the system under ``args.home``, showing progress (not in JSON mode)."""
    from ..launch.launcher import LaunchError, up
    from ..launch.plan import PlanError, load_plan

    home = Path(args.home)
    try:
        plan = load_plan(args.plan, home=home, log_url=args.explicit_log_url)
    except PlanError as exc:
        raise CliError(f"invalid plan: {exc}") from None
    try:
        with progress_shown(out, "starting the system") as progress:
            return up(plan, home, progress=progress)
    except LaunchError as exc:
        raise CliError(f"up failed: {exc}") from None


@contextlib.contextmanager
def progress_shown(out: Output, title: str) -> Iterator[Callable[[str], None]]:
    """A progress callback: a spinner with each step logged (silent in JSON mode)."""
    if out.json:
        yield lambda _line: None
        return
    from rich.console import Console

    console = Console(file=out.stream, log_path=False)
    with console.status(f"{title} ...") as spinner:

        def progress(line: str) -> None:
            spinner.update(line)
            console.log(line)

        yield progress


def cmd_up(args: argparse.Namespace, out: Output) -> int:
    info = start(args, out)
    if out.json:
        out.emit(info)
    else:
        out.line(f"system up in {args.home}")
    return 0


def cmd_down(args: argparse.Namespace, out: Output) -> int:
    from ..launch.launcher import NotRunning, down

    home = Path(args.home)
    if not (home / "system.json").exists():
        raise CliError(not_up_message(home))
    try:
        with progress_shown(out, "stopping the system") as progress:
            info = down(home, progress=progress)
    except NotRunning as exc:
        raise CliError(str(exc)) from None
    if out.json:
        out.emit(info)
    else:
        out.line(f"system down ({home}); the log stays")
    return 0


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        status = collect_status(conn)
    if out.json:
        out.emit(status)
    else:
        show_status(status, out)
    return 0


def collect_status(conn: Any) -> dict[str, Any]:
    """The launcher's status with the details behind its counts.

    ``components`` (replicas: leader, ready, epoch, head, pid), ``processes`` (count per
    state), ``domains`` (each: domain_id, engine, instances, need), ``nodes`` (live ones:
    node_id, state, domain_id, site, processes), ``node_counts`` (per state, all nodes),
    ``resources`` (the PD's: slots and what is assigned) and ``needs`` (per PD engine).
    """
    from .domain import summary
    from .node import gather

    status = conn.status()
    status["node_counts"] = status.pop("nodes", {})
    dump = conn.pd.dump()
    need_of = {f"pd_domain_{engine}": v["need"] for engine, v in (dump.get("needs") or {}).items()}
    domains = []
    for domain_id in status.get("domains") or []:
        row = summary(conn.epum.describe_domain(domain_id))
        domains.append({k: row.get(k) for k in ("domain_id", "engine", "instances", "states")}
                       | {"need": need_of.get(domain_id)})
    status["domains"] = domains
    status["nodes"] = [{k: n.get(k) for k in ("node_id", "state", "domain_id", "site", "processes")}
                       for n in gather(conn, include_gone=False)]
    status["resources"] = [{**r, "used": len(r.get("assigned") or [])} for r in dump["resources"]]
    status["needs"] = dump.get("needs") or {}
    return status


def show_status(status: dict[str, Any], out: Output) -> None:
    """The status as tables: components, domains, nodes, resources, process counts."""
    from rich.console import Console

    rows = [{"component": comp, **replica}
            for comp, replicas in sorted((status.get("components") or {}).items()) for replica in replicas]
    out.table(rows, ["component", "name", "mode", "leader", "epoch", "head", "pid"], title="components")
    out.table(status.get("domains") or [], ["domain_id", "engine", "need", "instances", "states"], title="domains")
    out.table(status.get("nodes") or [], ["node_id", "state", "domain_id", "site", "processes"], title="nodes")
    out.table(status.get("resources") or [], ["resource_id", "node_id", "engine", "state", "slots", "used"],
              title="resources")
    counts = status.get("processes") or {}
    text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    Console(file=out.stream).print(f"processes: {text}")
    Console(file=out.stream).print(f"log: {status.get('log_url')}  admin port: {status.get('admin_port')}")
    if status.get("metrics_url"):
        Console(file=out.stream).print(f"metrics: {status['metrics_url']}")
