"""``cei definition ...``: the Process Dispatcher's process definitions."""

from __future__ import annotations

import argparse
from typing import Any

from .common import UsageError, check_with, connected, done, load_mapping
from .output import Output


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("definition", help="process definitions (what a process runs)")
    cmds = group.add_subparsers(dest="definition_cmd", required=True, metavar="COMMAND")
    for name, func, text in (
        ("create", cmd_create, "create a definition (from --file, or COMMAND after --)"),
        ("update", cmd_update, "replace a definition"),
    ):
        p = cmds.add_parser(name, help=text)
        p.add_argument("definition_id", metavar="ID", help="the definition's id")
        p.add_argument("--file", default=None, metavar="FILE.yml",
                       help="YAML with executable {exec, argv, working_directory, env}, "
                            "and optionally definition_type, name, description")
        p.add_argument("--type", dest="definition_type", default=None, help="definition type (default supd)")
        p.add_argument("--name", default=None, help="a human name")
        p.add_argument("--description", default=None, help="a description")
        p.add_argument("--cwd", default=None, metavar="DIR", help="working directory")
        p.add_argument("cmdline", nargs="*", metavar="COMMAND", help="after --: the command and its arguments")
        p.set_defaults(func=func)
    p = cmds.add_parser("describe", help="one definition")
    p.add_argument("definition_id", metavar="ID", help="the definition's id")
    p.set_defaults(func=cmd_describe)
    p = cmds.add_parser("list", help="definition ids")
    p.set_defaults(func=cmd_list)
    p = cmds.add_parser("remove", help="remove a definition")
    p.add_argument("definition_id", metavar="ID", help="the definition's id")
    p.set_defaults(func=cmd_remove)


def _definition(args: argparse.Namespace) -> dict[str, Any]:
    """The definition's fields from ``--file`` and/or the command line (the command line wins)."""
    spec: dict[str, Any] = load_mapping(args.file, "definition file") if args.file else {}
    executable = dict(spec.get("executable") or {})
    if args.cmdline:
        executable["exec"], executable["argv"] = args.cmdline[0], list(args.cmdline[1:])
    if args.cwd:
        executable["working_directory"] = args.cwd
    if not executable:
        raise UsageError(f"definition {args.definition_id}: give --file or a COMMAND after --")
    return {
        "executable": executable,
        "definition_type": args.definition_type or spec.get("definition_type") or "supd",
        "name": args.name or spec.get("name"),
        "description": args.description or spec.get("description"),
    }


def cmd_create(args: argparse.Namespace, out: Output) -> int:
    fields = _definition(args)
    with connected(args) as conn, check_with(f"cei definition describe {args.definition_id}"):
        result = conn.pd.create_definition(args.definition_id, **fields)
    done(out, result, f"definition {args.definition_id} created")
    return 0


def cmd_update(args: argparse.Namespace, out: Output) -> int:
    fields = _definition(args)
    with connected(args) as conn, check_with(f"cei definition describe {args.definition_id}"):
        result = conn.pd.update_definition(args.definition_id, **fields)
    done(out, result, f"definition {args.definition_id} updated")
    return 0


def cmd_describe(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        out.describe(conn.pd.describe_definition(args.definition_id), title=f"definition {args.definition_id}")
    return 0


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        ids = conn.pd.list_definitions()
    if out.json:
        out.emit(ids)
    else:
        out.table([{"definition_id": i} for i in ids], ["definition_id"], title="definitions")
    return 0


def cmd_remove(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn, check_with(f"cei definition describe {args.definition_id}"):
        conn.pd.remove_definition(args.definition_id)
    done(out, {"definition_id": args.definition_id, "removed": True}, f"definition {args.definition_id} removed")
    return 0
