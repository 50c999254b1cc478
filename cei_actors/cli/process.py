"""``cei process ...``: schedule, list, describe, terminate, restart, wait for and dump processes."""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from ..pd import states as ps
from .common import UsageError, assignments, check_with, connected, done, upper_choice
from .output import CliError, Output

#: The columns of a process table.
COLUMNS = ["upid", "state", "round", "node_id", "restart_mode", "queueing_mode", "command"]


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("process", help="processes of the Process Dispatcher")
    cmds = group.add_subparsers(dest="process_cmd", required=True, metavar="COMMAND")

    p = cmds.add_parser("schedule", help="schedule a process (COMMAND after --, or --definition); "
                                         "at most once per upid: a retry with the same --upid "
                                         "never runs it again (`process restart` does)")
    p.add_argument("--upid", default=None,
                   help="the process id (default: a new one, printed on stderr before it is sent)")
    p.add_argument("--restart-mode", type=upper_choice(ps.RESTART_MODES), default=None,
                   metavar="{never,always,abnormal}")
    p.add_argument("--queueing-mode", type=upper_choice(ps.QUEUEING_MODES), default=None,
                   metavar="{never,always,start_only,restart_only}")
    p.add_argument("--constraint", action="append", default=[], metavar="KEY=VALUE",
                   help="match only resources whose property KEY is VALUE (repeatable)")
    p.add_argument("--engine", default=None, metavar="ID", help="execution engine (default: the PD's default)")
    p.add_argument("--definition", default=None, metavar="ID", help="process definition to run")
    p.add_argument("--node-exclusive", default=None, metavar="TAG",
                   help="at most one process with this tag per node")
    p.add_argument("--name", default=None, help="a human name for the process")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment (repeatable)")
    p.add_argument("--cwd", default=None, metavar="DIR", help="working directory on the node")
    p.add_argument("cmdline", nargs="*", metavar="COMMAND", help="after --: the command and its arguments")
    p.set_defaults(func=cmd_schedule)

    p = cmds.add_parser("list", help="processes (all, or in one state)")
    p.add_argument("--state", type=upper_choice(ps.ORDER, lower=False), default=None, metavar="STATE")
    p.set_defaults(func=cmd_list)
    for name, func, text in (
        ("describe", "cmd_describe", "one process in full"),
        ("terminate", "cmd_terminate", "terminate a process"),
        ("restart", "cmd_restart", "run a process again in its next round (in place if it runs, else "
                                   "requeued); not retry-safe: each call is a new round"),
    ):
        p = cmds.add_parser(name, help=text)
        p.add_argument("upid")
        p.set_defaults(func=globals()[func])
    p = cmds.add_parser("wait", help="wait until a process is in STATE (exit 1 on timeout or when it "
                                     "ends in another state)")
    p.add_argument("upid")
    p.add_argument("--state", required=True, action="append", type=upper_choice(ps.ORDER, lower=False),
                   metavar="STATE", help="the state to wait for (repeat for any of several)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    p.set_defaults(func=cmd_wait)
    p = cmds.add_parser("dump", help="the PD's whole view: processes, nodes, resources, queue, needs")
    p.set_defaults(func=cmd_dump)
    p = cmds.add_parser("nodestate", help="tell the PD a node's state by hand, as EPUM would (RUNNING adds "
                                          "the node, a later state evacuates it)")
    p.add_argument("node_id", metavar="NODE")
    p.add_argument("domain_id", metavar="DOMAIN", help="pd_domain_<engine>")
    p.add_argument("state", type=str.upper, metavar="STATE")
    p.set_defaults(func=cmd_nodestate)


def show(process: dict[str, Any], out: Output) -> None:
    """One process: the whole record in JSON mode, a key/value table otherwise."""
    if out.json:
        out.emit(process)
        return
    rows = [{"field": k, "value": v} for k, v in process.items()]
    out.table(rows, ["field", "value"], title=f"process {process.get('upid')}")


def brief(process: dict[str, Any], out: Output) -> None:
    """A process as it stands after a call: the record (JSON) or one line."""
    if out.json:
        out.emit(process)
    else:
        node = f" on {process['node_id']}" if process.get("node_id") else ""
        out.line(f"{process['upid']} {process['state']} (round {process['round']}){node}")


def show_list(processes: list[dict[str, Any]], out: Output) -> None:
    """Processes as a list (JSON) or a table."""
    if out.json:
        out.emit(processes)
        return
    rows = [{**p, "command": " ".join(p.get("command") or []) or p.get("definition_id")} for p in processes]
    out.table(rows, COLUMNS, title=f"{len(rows)} processes")


def cmd_schedule(args: argparse.Namespace, out: Output) -> int:
    if not args.cmdline and not args.definition:
        raise UsageError("process schedule: give a COMMAND after -- or --definition ID")
    constraints = assignments(args.constraint, "--constraint", parse=False)
    env = assignments(args.env, "--env", parse=False)
    upid = args.upid
    if upid is None:  # named before it is sent, so a retry after exit 3 can use it
        upid = f"p-{uuid.uuid4().hex[:10]}"
        print(f"cei: scheduling process {upid} (to retry: --upid {upid})", file=sys.stderr, flush=True)
    with connected(args) as conn, check_with(f"cei process describe {upid}"):
        process = conn.pd.schedule_process(
            upid,
            args.definition,
            command=list(args.cmdline) or None,
            env=env or None,
            cwd=args.cwd,
            constraints=constraints or None,
            queueing_mode=args.queueing_mode,
            restart_mode=args.restart_mode,
            execution_engine_id=args.engine,
            node_exclusive=args.node_exclusive,
            name=args.name,
            once=True,
        )
    brief(process, out)
    return 0


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        processes = conn.pd.describe_processes(state=args.state)
    show_list(processes, out)
    return 0


def cmd_describe(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        show(conn.pd.describe_process(args.upid), out)
    return 0


def cmd_terminate(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn, check_with(f"cei process describe {args.upid}"):
        process = conn.pd.terminate_process(args.upid)
    brief(process, out)
    return 0


def cmd_restart(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn, check_with(f"cei process describe {args.upid} (its round)"):
        process = conn.pd.restart_process(args.upid)
    brief(process, out)
    return 0


def cmd_wait(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        try:
            process = conn.pd.wait_process(args.upid, {*args.state, *ps.TERMINAL}, timeout=args.timeout, every=0.2)
        except TimeoutError as exc:
            raise CliError(f"timed out after {args.timeout:g}s: {exc}") from None
    if process["state"] not in args.state:
        raise CliError(f"process {args.upid} ended {process['state']} (round {process['round']}), "
                       f"not {' or '.join(args.state)}")
    brief(process, out)
    return 0


def cmd_dump(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        out.emit(conn.pd.dump())
    return 0


def cmd_nodestate(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        result = conn.pd.node_state(args.node_id, args.domain_id, args.state)
    done(out, result, f"PD told: node {args.node_id} of {args.domain_id} is {args.state}")
    return 0
