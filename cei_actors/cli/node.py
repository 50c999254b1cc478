"""``cei node ...``: the nodes ("VMs") of the system, as the Provisioner, EPUM and PD see them."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from typing import Any

from ..plaindata import count
from ..runtime import procfs
from ..runtime.client import NotFound
from . import ids
from .common import check_with, connected, done
from .output import CliError, Output
from .watch import watch, watch_option

#: The columns of a node table (``-o wide`` adds :data:`WIDE`).
COLUMNS = ["node_id", "state", "domain_id", "site", "iaas_id", "processes"]
ID_HELP = "a node id, or a unique prefix of one"
WIDE = ["public_ip", "deployable_type", "launch_id", "state_desc", "requested_at", "changed_at"]


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("node", help="nodes (VMs) and what runs on them")
    cmds = group.add_subparsers(dest="node_cmd", required=True, metavar="COMMAND")
    p = cmds.add_parser("list", help="every node")
    p.add_argument("--all", action="store_true", help="include TERMINATED and FAILED nodes")
    watch_option(p)
    p.set_defaults(func=cmd_list)
    p = cmds.add_parser("describe", help="one node: Provisioner record, EPUM instance, PD resources, processes")
    p.add_argument("node_id", metavar="ID", help=ID_HELP)
    p.set_defaults(func=cmd_describe)
    p = cmds.add_parser("terminate", help="terminate a node through the Provisioner")
    p.add_argument("node_id", metavar="ID", help=ID_HELP)
    p.set_defaults(func=cmd_terminate)
    p = cmds.add_parser("kill", help="crash a local node out of band: SIGKILL its EEAgent and every "
                                     "process it runs (the system must notice by itself)")
    p.add_argument("node_id", metavar="ID", help=ID_HELP)
    p.set_defaults(func=cmd_kill)


_GONE = ("TERMINATED", "FAILED", "REJECTED")


def gather(conn: Any, include_gone: bool = True) -> list[dict[str, Any]]:
    """Every node: the Provisioner's record joined with its EPUM domain and PD process count.

    Nodes only the PD knows (static nodes, announced by hand) are included with state RUNNING.
    A component the system does not run (a PD with static nodes only) is not asked.
    """
    info = conn.info
    runs = set(info["components"]) | set((info.get("remote") or {}).get("components", []))
    domain_of: dict[str, str] = {}
    for domain_id in conn.epum.list_domains() if "epum" in runs else []:
        for inst in conn.epum.describe_domain(domain_id).get("instances") or []:
            domain_of[inst["node_id"]] = domain_id
    dump = conn.pd.dump()
    running: dict[str, int] = {}
    for p in dump["processes"]:
        if p.get("node_id") and p["state"] in ("ASSIGNED", "PENDING", "RUNNING", "TERMINATING"):
            running[p["node_id"]] = running.get(p["node_id"], 0) + 1
    pd_nodes = {n["node_id"]: n for n in dump["nodes"]}
    nodes = []
    for rec in conn.provisioner.describe_nodes() if "provisioner" in runs else []:
        node_id = rec["node_id"]
        pd_node = pd_nodes.pop(node_id, None)
        nodes.append({
            **rec,
            "domain_id": domain_of.get(node_id) or (pd_node or {}).get("domain_id"),
            "processes": running.get(node_id, 0),
        })
    for node_id, pd_node in pd_nodes.items():
        nodes.append({
            "node_id": node_id, "state": "RUNNING", "domain_id": pd_node["domain_id"], "site": None,
            "iaas_id": None, "processes": running.get(node_id, 0), "static": True,
        })
    if not include_gone:
        nodes = [n for n in nodes if n["state"] not in _GONE]
    return sorted(nodes, key=lambda n: n["node_id"])


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        return watch(args, out, lambda: gather(conn, include_gone=args.all),
                     lambda nodes: out.table(nodes, COLUMNS, title=count(len(nodes), "node"), wide=WIDE))


def cmd_describe(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        nodes = gather(conn)
        args.node_id = ids.node_id(nodes, args.node_id)
        node = next((n for n in nodes if n["node_id"] == args.node_id), None)
        if node is None:
            raise CliError(f"unknown node {args.node_id!r}")
        try:
            node["provisioner"] = conn.provisioner.describe_node(args.node_id)
        except (NotFound, KeyError, IndexError):
            node["provisioner"] = None
        if node.get("domain_id"):
            try:
                instances = conn.epum.describe_domain(node["domain_id"]).get("instances") or []
                node["instance"] = next((i for i in instances if i["node_id"] == args.node_id), None)
            except NotFound:
                node["instance"] = None
        dump = conn.pd.dump()
        node["resources"] = [r for r in dump["resources"] if r["node_id"] == args.node_id]
        node["process_list"] = [
            {"upid": p["upid"], "state": p["state"], "round": p["round"]}
            for p in dump["processes"] if p.get("node_id") == args.node_id
        ]
    out.describe(node, title=f"node {args.node_id}")
    return 0


def cmd_terminate(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        args.node_id = ids.node_id(conn.provisioner.describe_nodes(), args.node_id)
        _known(conn, args.node_id)  # the Provisioner records a terminate of an id it never had
        with check_with(f"cei node describe {args.node_id}"):
            result = conn.provisioner.terminate_nodes([args.node_id])
    node = result[0] if isinstance(result, list) and result else result
    state = node.get("state") if isinstance(node, dict) else None
    done(out, node, f"node {args.node_id} {state or 'terminating'}")
    return 0


def _known(conn: Any, node_id: str) -> dict[str, Any]:
    """The Provisioner's record of ``node_id``; :class:`CliError` for an id it was never asked to
    launch (unknown, or only a stub left by a terminate or a state dump of that id)."""
    try:
        rec = conn.provisioner.describe_node(node_id)
    except (NotFound, KeyError, IndexError):
        rec = None
    if not rec or rec.get("site") is None:
        raise CliError(f"unknown node {node_id!r}")
    return rec


def crash_node(conn: Any, node_id: str) -> dict[str, Any]:
    """Kill a node of a ``local`` site like a crashing VM, behind the system's back.

    SIGKILLs the node's process group (its EEAgent) and the process group of every
    descendant (each process the agent runs leads its own session). Returns ``{node_id,
    iaas_id, pgid, process_groups}``; :class:`CliError` if the node is not a live local node.
    """
    from ..provisioner.drivers.local import LocalProcessDriver

    rec = _known(conn, node_id)
    site = conn.provisioner.describe_site(rec["site"])
    if site.get("type") != "local" or not rec.get("iaas_id"):
        raise CliError(f"node {node_id}: only nodes of a local site can be killed (site {rec['site']!r})")
    listed = LocalProcessDriver(site["state_dir"]).list_nodes([rec["iaas_id"]])
    if not listed or listed[0].extra.get("status") != "running":
        raise CliError(f"node {node_id} ({rec['iaas_id']}) is not running")
    pgid = listed[0].extra["pgid"]
    groups = sorted({g for _, g in _descendants(listed[0].extra["pid"])} - {pgid})
    for group in (pgid, *groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    return {"node_id": node_id, "iaas_id": rec["iaas_id"], "pgid": pgid, "process_groups": groups}


def _descendants(root: int) -> list[tuple[int, int]]:
    """``(pid, pgid)`` of every live descendant of ``root`` (from /proc)."""
    children = procfs.children()
    out, todo = [], [root]
    while todo:
        for pid, s in children.get(todo.pop(), []):
            out.append((pid, s.pgrp))
            todo.append(pid)
    return out


def cmd_kill(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        args.node_id = ids.node_id(conn.provisioner.describe_nodes(), args.node_id)
        result = crash_node(conn, args.node_id)
    done(out, result, f"node {args.node_id} killed (EEAgent group {result['pgid']}, "
                      f"{count(len(result['process_groups']), 'process group')})")
    return 0
