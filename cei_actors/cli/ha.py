"""``cei ha ...``: HA groups, sets of process copies the HA service keeps alive across PDs."""

from __future__ import annotations

import argparse
from typing import Any

from ..ha.logic import STATUSES
from ..pd import states as ps
from . import ids
from .common import UsageError, assignments, connected, done, load_mapping, seconds, upper_choice
from .output import CliError, Output, progress
from .watch import watch, watch_option

#: The columns of a group table.
COLUMNS = ["name", "policy", "status", "target", "copies", "removing"]
#: More columns with ``-o wide``.
WIDE = ["why", "wants", "pds", "created_at"]
NAME_HELP = "a group's name, or a unique prefix of one"


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("ha", help="HA groups: N copies of a process kept alive across PDs")
    cmds = group.add_subparsers(dest="ha_cmd", required=True, metavar="COMMAND")

    p = cmds.add_parser("create", help="create a group (COMMAND after --, or --definition)")
    p.add_argument("name", metavar="NAME", help="the new group's name")
    p.add_argument("--policy", choices=("npreserving", "sensor"), default="npreserving",
                   help="npreserving: keep N copies (default); sensor: scale on a metric")
    p.add_argument("--preserve-n", type=int, default=None, metavar="N",
                   help="npreserving: the number of copies")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy parameter (e.g. minimum_processes=1; repeatable)")
    p.add_argument("--policy-file", default=None, metavar="FILE.yml",
                   help="policy parameters from a YAML/JSON mapping (--set overrides)")
    p.add_argument("--definition", default=None, metavar="ID", help="process definition to run")
    p.add_argument("--restart-mode", type=upper_choice(ps.RESTART_MODES), default=None,
                   metavar="{never,always,abnormal}", help="when the PD restarts a copy that ended")
    p.add_argument("--queueing-mode", type=upper_choice(ps.QUEUEING_MODES), default=None,
                   metavar="{never,always,start_only,restart_only}",
                   help="when a copy may wait in the queue for a slot")
    p.add_argument("--constraint", action="append", default=[], metavar="KEY=VALUE",
                   help="match only resources whose property KEY is VALUE (repeatable)")
    p.add_argument("--engine", default=None, metavar="ID", help="execution engine")
    p.add_argument("--node-exclusive", default=None, metavar="TAG",
                   help="at most one process with this tag per node")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment (repeatable)")
    p.add_argument("--pd", dest="pds", action="append", default=None, metavar="PEER",
                   help="a PD the group may use (repeatable; default: every PD of the HA service)")
    p.add_argument("cmdline", nargs="*", metavar="COMMAND", help="after --: the command and its arguments")
    p.set_defaults(func=cmd_create)

    p = cmds.add_parser("list", help="groups with their status")
    watch_option(p)
    p.set_defaults(func=cmd_list)
    p = cmds.add_parser("describe", help="one group: its copies (where, in which state) and what "
                                         "the policy wants next")
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.set_defaults(func=cmd_describe)
    p = cmds.add_parser("status", help="the status of one group, or of every group")
    p.add_argument("name", nargs="?", metavar="NAME", help=NAME_HELP + " (default: every group)")
    p.set_defaults(func=cmd_status)
    p = cmds.add_parser("reconfigure", help="change a group's policy or its parameters live")
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.add_argument("--policy", choices=("npreserving", "sensor"), default=None,
                   help="switch policy (its parameters are then exactly those given)")
    p.add_argument("--preserve-n", type=int, default=None, metavar="N", help="npreserving: the number of copies")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy parameter (repeatable)")
    p.add_argument("--policy-file", default=None, metavar="FILE.yml",
                   help="policy parameters from a YAML/JSON mapping (--set overrides)")
    p.set_defaults(func=cmd_reconfigure)
    p = cmds.add_parser("remove", help="terminate a group's copies, then forget it")
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.set_defaults(func=cmd_remove)
    p = cmds.add_parser("wait", help="wait until a group is in STATUS (exit 1 on timeout or FAILED)")
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.add_argument("--status", action="append", default=None, type=upper_choice(STATUSES, lower=False),
                   metavar="STATUS", help="the status to wait for (default STEADY; repeatable)")
    p.add_argument("--timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="how long to wait (default 60)")
    p.set_defaults(func=cmd_wait)


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = load_mapping(args.policy_file, "policy file") if args.policy_file else {}
    params.update(assignments(args.settings, "--set"))
    if args.preserve_n is not None:
        params["preserve_n"] = args.preserve_n
    return params


def cmd_create(args: argparse.Namespace, out: Output) -> int:
    if not args.cmdline and not args.definition:
        raise UsageError("ha create: give a COMMAND after -- or --definition ID")
    process: dict[str, Any] = {}
    for key, value in (("definition_id", args.definition), ("restart_mode", args.restart_mode),
                       ("queueing_mode", args.queueing_mode), ("execution_engine_id", args.engine),
                       ("node_exclusive", args.node_exclusive)):
        if value is not None:
            process[key] = value
    if args.cmdline:
        process["command"] = list(args.cmdline)
    if args.constraint:
        process["constraints"] = assignments(args.constraint, "--constraint")
    if args.env:
        process["env"] = assignments(args.env, "--env", parse=False)
    with connected(args) as conn:
        group = conn.ha.create_group(args.name, args.policy, _parameters(args), process, args.pds)
    done(out, group, f"HA group {args.name} created ({args.policy}, target {group['target']})")
    return 0


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    def groups(conn: Any) -> list[dict[str, Any]]:
        found = conn.ha.list_groups()
        if not out.wide:
            return found
        return [{**g, **{k: v for k, v in conn.ha.describe_group(g["name"]).items() if k in WIDE}} for g in found]

    with connected(args) as conn:
        return watch(args, out, lambda: groups(conn),
                     lambda found: out.table(found, COLUMNS, title="HA groups", wide=WIDE))


def cmd_describe(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        name = ids.group_name(conn, args.name)
        out.describe(conn.ha.describe_group(name), title=f"HA group {name}")
    return 0


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        if args.name is None:
            rows = [{"name": g["name"], "status": g["status"]} for g in conn.ha.list_groups()]
            out.table(rows, ["name", "status"], title="HA status")
            return 0
        group = conn.ha.describe_group(ids.group_name(conn, args.name))
    row = {"name": group["name"], "status": group["status"], "why": group["why"], "wants": group["wants"]}
    done(out, row, f"{group['status']}: {group['why']}")
    return 0


def cmd_reconfigure(args: argparse.Namespace, out: Output) -> int:
    params = _parameters(args)
    with connected(args) as conn:
        args.name = ids.group_name(conn, args.name)
        group = conn.ha.reconfigure_group(args.name, args.policy, params)
    done(out, group, f"HA group {args.name} reconfigured: {group['policy']} {group['parameters']}, "
                     f"target {group['target']}")
    return 0


def cmd_remove(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        args.name = ids.group_name(conn, args.name)
        result = conn.ha.remove_group(args.name)
    done(out, result, f"HA group {args.name} removing (its copies are being terminated)")
    return 0


def cmd_wait(args: argparse.Namespace, out: Output) -> int:
    want = set(args.status or ["STEADY"])
    with connected(args) as conn, progress(out, f"waiting for HA group {args.name}"):
        args.name = ids.group_name(conn, args.name)
        try:
            group = conn.ha.wait_group(args.name, want | {"FAILED"}, timeout=args.timeout, every=0.2)
        except TimeoutError as exc:
            raise CliError(f"timed out after {args.timeout:g}s: {exc}") from None
    if group["status"] not in want:
        raise CliError(f"HA group {args.name} is {group['status']}: {group['why']}")
    row = {"name": group["name"], "status": group["status"], "why": group["why"]}
    done(out, row, f"{group['status']}: {group['why']}")
    return 0
