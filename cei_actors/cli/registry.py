"""``cei dt|site|credentials ...``: the Provisioner's registry (the original DTRS, as in ``ceictl``)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import connected, done, load_mapping
from .output import Output

#: group -> (what it holds, the ProvisionerClient method suffix for one and for the list)
GROUPS = {
    "dt": ("deployable types (images and contextualization per site)", "dt", "dts"),
    "site": ("cloud sites (ec2, openstack, nimbus, sim, local)", "site", "sites"),
    "credentials": ("per-site credentials", "credentials", "credentials"),
}


def register(sub: argparse._SubParsersAction) -> None:
    for group_name, (text, _, _) in GROUPS.items():
        group = sub.add_parser(group_name, help=text)
        cmds = group.add_subparsers(dest=f"{group_name}_cmd", required=True, metavar="COMMAND")
        for op in ("add", "update"):
            p = cmds.add_parser(op, help=f"{op} one from a YAML file")
            p.add_argument("name", help="its name")
            p.add_argument("--definition", dest="file", required=True, metavar="FILE.yml",
                           help="YAML/JSON mapping to store")
            _type_option(p, group_name)
            p.set_defaults(func=_command(group_name, op))
        for op in ("describe", "remove"):
            p = cmds.add_parser(op, help=f"{op} one")
            p.add_argument("name", help="its name")
            _type_option(p, group_name)
            p.set_defaults(func=_command(group_name, op))
        p = cmds.add_parser("list", help="names")
        _type_option(p, group_name)
        p.set_defaults(func=_command(group_name, "list"))


def _type_option(p: argparse.ArgumentParser, group_name: str) -> None:
    if group_name == "credentials":
        p.add_argument("--type", dest="credential_type", choices=("site", "chef"), default="site",
                       help="site (a cloud's keys, the default) or chef")


def _command(group_name: str, op: str) -> Any:
    """The ``cmd`` function for ``cei GROUP OP``."""
    _, one, many = GROUPS[group_name]

    def cmd(args: argparse.Namespace, out: Output) -> int:
        extra = {"credential_type": args.credential_type} if group_name == "credentials" else {}
        with connected(args) as conn:
            method = getattr(conn.provisioner, f"{op}_{one}" if op != "list" else f"list_{many}")
            if op in ("add", "update"):
                definition = load_mapping(args.file, f"{group_name} definition")
                result = method(args.name, definition, **extra)
                if group_name == "credentials":  # echo what was stored, masked; never the file
                    definition = conn.provisioner.describe_credentials(args.name, **extra)
                done(out, result if result is not None else {"name": args.name, group_name: definition},
                     f"{group_name} {args.name} {op}{'d' if op.endswith('e') else 'ed'}")
            elif op == "remove":
                method(args.name, **extra)
                done(out, {"name": args.name, "removed": True}, f"{group_name} {args.name} removed")
            elif op == "describe":
                out.describe(method(args.name, **extra), title=f"{group_name} {args.name}")
            else:
                names = method(**extra)
                if out.json:
                    out.emit(names)
                else:
                    out.table([{"name": n} for n in names], ["name"], title=group_name)
        return 0

    cmd.__name__ = f"cmd_{group_name}_{op}"
    return cmd
