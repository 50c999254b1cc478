"""``cei provisioner ...``: the Provisioner's own operations (as ``ceictl provisioner``)."""

from __future__ import annotations

import argparse
import sys
import uuid

from ..plaindata import count
from .common import check_with, connected, done, load_mapping, seconds
from .output import CliError, Output, progress


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("provisioner", help="the Provisioner: describe, provision, terminate-all, enable")
    cmds = group.add_subparsers(dest="provisioner_cmd", required=True, metavar="COMMAND")
    p = cmds.add_parser("describe", help="node records (all, or the NODE ids given)")
    p.add_argument("node_ids", nargs="*", metavar="NODE", help="node ids (default: every node)")
    p.set_defaults(func=cmd_describe)
    p = cmds.add_parser("status", help="node counts per state, in-flight cloud calls, disabled flag")
    p.set_defaults(func=cmd_status)
    p = cmds.add_parser("provision", help="launch one node of a deployable type on a site, by hand")
    p.add_argument("deployable_type", metavar="DT", help="a deployable type (`cei dt list`)")
    p.add_argument("site", help="a site (`cei site list`)")
    p.add_argument("--allocation", default=None, help="the instance size (default: the site's)")
    p.add_argument("--vars", default=None, metavar="FILE", help="YAML/JSON mapping of template vars")
    p.add_argument("--node-id", default=None,
                   help="the new node's id (default: a new one, printed on stderr before it is sent; "
                        "a retry with the same --node-id launches nothing more)")
    p.set_defaults(func=cmd_provision)
    p = cmds.add_parser("terminate-all", help="disable provisioning and terminate every node")
    p.add_argument("--timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="how long to wait for all nodes to go (default 60)")
    p.add_argument("--no-wait", action="store_true", help="ask once, do not wait")
    p.set_defaults(func=cmd_terminate_all)
    p = cmds.add_parser("enable", help="allow provisioning again (after terminate-all)")
    p.set_defaults(func=cmd_enable)
    p = cmds.add_parser("dump-state", help="resend the records of NODEs to the subscribers (EPUM)")
    p.add_argument("node_ids", nargs="+", metavar="NODE", help="node ids")
    p.set_defaults(func=cmd_dump_state)


def cmd_describe(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        nodes = conn.provisioner.describe_nodes(args.node_ids or None)
    if out.json:
        out.emit(nodes)
    else:
        out.table(nodes, ["node_id", "state", "site", "deployable_type", "iaas_id", "state_desc"], title="nodes")
    return 0


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        out.describe(conn.provisioner.status(), title="provisioner")
    return 0


def cmd_provision(args: argparse.Namespace, out: Output) -> int:
    variables = load_mapping(args.vars, "vars file") if args.vars else {}
    node_id = args.node_id
    if node_id is None:  # named before it is sent, so a retry after exit 3 can use it
        node_id = f"node-{uuid.uuid4().hex[:10]}"
        print(f"cei: provisioning node {node_id} (to retry: --node-id {node_id})", file=sys.stderr, flush=True)
    # the launch id follows from the node id: a retry is the same call, which changes nothing
    with connected(args) as conn, check_with(f"cei provisioner describe {node_id}"):
        result = conn.provisioner.provision(f"launch-{node_id}", args.deployable_type,
                                            args.site, [node_id], variables, args.allocation)
    done(out, result, f"node {node_id} requested (launch {result.get('launch_id')})")
    return 0


def cmd_terminate_all(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn, progress(out, "terminating every node"):
        finished = conn.provisioner.terminate_all(wait=not args.no_wait, timeout=args.timeout)
    if not finished and not args.no_wait:
        raise CliError(f"terminate-all: nodes still running after {args.timeout:g}s")
    done(out, {"terminated": finished}, "all nodes terminated" if finished else "terminating (provisioning disabled)")
    return 0


def cmd_enable(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        conn.provisioner.enable()
    done(out, {"enabled": True}, "provisioning enabled")
    return 0


def cmd_dump_state(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        sent = conn.provisioner.dump_state(args.node_ids)
    done(out, {"sent": sent}, f"resent {count(sent, 'node record')} to the subscribers")
    return 0
