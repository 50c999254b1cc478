"""``cei domain ...`` and ``cei domain-definition ...``: EPUM's elastic domains of nodes."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..epum.client import dotted_config
from ..plaindata import count
from ..runtime.client import NotFound
from . import ids
from .common import UsageError, assignments, check_with, connected, done, load_mapping
from .output import CliError, Output
from .watch import watch, watch_option

#: The columns of a domain table (``-o wide`` adds :data:`WIDE`).
COLUMNS = ["domain_id", "engine", "definition_id", "instances", "states", "config_version", "status", "reason"]
ID_HELP = "a domain id, or a unique prefix of one"
WIDE = ["owner", "subscribers", "engine_conf", "engine_error", "removing"]


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("domain", help="EPUM domains: sets of nodes a decision engine sizes")
    cmds = group.add_subparsers(dest="domain_cmd", required=True, metavar="COMMAND")
    p = cmds.add_parser("add", help="add a domain")
    p.add_argument("domain_id", metavar="ID", help="the new domain's id")
    p.add_argument("--engine", default=None, metavar="ENGINE",
                   help="decision engine: preserve_n, needy, sensor, overflow or a dotted class path")
    p.add_argument("--definition", default=None, metavar="DEF",
                   help="domain definition to start from (default: one named after the engine)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="engine_conf KEY (dotted keys reach other sections: health.monitor_health=true)")
    p.add_argument("--subscriber", default=None, metavar="NAME", help="peer told of node state changes (e.g. pd)")
    p.set_defaults(func=cmd_add)
    p = cmds.add_parser("reconfigure", help="change a domain's configuration")
    p.add_argument("domain_id", metavar="ID", help=ID_HELP)
    p.add_argument("--set", dest="settings", action="append", required=True, metavar="KEY=VALUE",
                   help="engine_conf KEY to change (repeatable; dotted keys reach other sections)")
    p.set_defaults(func=cmd_reconfigure)
    p = cmds.add_parser("list", help="domains")
    watch_option(p)
    p.set_defaults(func=cmd_list)
    p = cmds.add_parser("describe", help="one domain with its instances")
    p.add_argument("domain_id", metavar="ID", help=ID_HELP)
    p.set_defaults(func=cmd_describe)
    p = cmds.add_parser("remove", help="remove a domain (its nodes are terminated)")
    p.add_argument("domain_id", metavar="ID", help=ID_HELP)
    p.set_defaults(func=cmd_remove)

    group = sub.add_parser("domain-definition", help="EPUM domain definitions (templates of domains)")
    cmds = group.add_subparsers(dest="domain_definition_cmd", required=True, metavar="COMMAND")
    for name, func in (("add", cmd_def_add), ("update", cmd_def_update)):
        p = cmds.add_parser(name, help=f"{name} a definition from a YAML file (general, engine_conf, health)")
        p.add_argument("definition_id", metavar="ID", help="the definition's id")
        p.add_argument("--definition", dest="file", required=True, metavar="FILE.yml",
                       help="YAML/JSON mapping with general, engine_conf and health sections")
        p.set_defaults(func=func)
    for name, func in (("describe", cmd_def_describe), ("remove", cmd_def_remove)):
        p = cmds.add_parser(name, help=f"{name} a definition")
        p.add_argument("definition_id", metavar="ID", help="the definition's id")
        p.set_defaults(func=func)
    p = cmds.add_parser("list", help="definition ids")
    p.set_defaults(func=cmd_def_list)


def summary(domain: dict[str, Any]) -> dict[str, Any]:
    """A domain as a table row: ``instances`` counts its live nodes (as the metric
    ``cei_epum_domain_have``: rejected and terminated launches stay in its record, which once
    showed 12 for a domain of one), ``states`` every record by state; with its status and the
    reason (see :func:`health`)."""
    from ..epum.engines.base import VALID_STATES

    instances = domain.get("instances") or []
    states: dict[str, int] = {}
    for inst in instances:
        states[inst["state"]] = states.get(inst["state"], 0) + 1
    return {
        **domain,
        "engine_conf": ",".join(f"{k}={v}" for k, v in sorted(((domain.get("config") or {}).get("engine_conf")
                                                              or {}).items())),
        **health(domain),
        "instances": sum(1 for inst in instances if inst["state"] in VALID_STATES),
        "states": ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
    }


def health(domain: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """``status`` (``ok``, ``removing``, ``engine-error``, ``backoff``) and ``reason`` (None when
    ok): why its nodes do not come, e.g. launches failing at a site and when the next goes."""
    now = time.time() if now is None else now
    if domain.get("removing"):
        return {"status": "removing", "reason": None}
    if domain.get("engine_error"):
        return {"status": "engine-error", "reason": domain["engine_error"]}
    held = domain.get("launch_backoff") or []
    if held:
        parts = []
        for b in held:
            wait = max(0.0, (b.get("retry_at") or now) - now)
            parts.append(f"{count(b['failures'], 'failed launch round')} at {b['site']}, next in {wait:.0f}s: "
                         f"{b.get('last_error')}")
        return {"status": "backoff", "reason": "; ".join(parts)}
    return {"status": "ok", "reason": None}


def cmd_add(args: argparse.Namespace, out: Output) -> int:
    if not args.engine and not args.definition:
        raise UsageError("domain add: give --engine ENGINE (or --definition DEF)")
    config = dotted_config(assignments(args.settings, "--set"))
    with connected(args) as conn, check_with(f"cei domain describe {args.domain_id}"):
        definition_id = args.definition
        if definition_id is None:
            definition_id = args.engine
            try:
                conn.epum.describe_domain_definition(definition_id)
            except NotFound:
                conn.epum.add_domain_definition(definition_id, {"general": {"engine_class": args.engine}})
        if args.engine:
            config.setdefault("general", {})["engine_class"] = args.engine
        base = (conn.epum.describe_domain_definition(definition_id).get("definition") or {})
        check_registry_names(conn, {**(base.get("engine_conf") or {}), **(config.get("engine_conf") or {})})
        conn.epum.add_domain(args.domain_id, definition_id, config, subscriber=args.subscriber)
        domain = conn.epum.describe_domain(args.domain_id)
    done(out, domain, f"domain {args.domain_id} added (engine {domain['engine']})")
    return 0


_SITE_KEYS = ("site", "force_site", "iaas_site")
_DT_KEYS = ("deployable_type", "epuworker_type")


def check_registry_names(conn: Any, engine_conf: dict[str, Any]) -> None:
    """:class:`CliError` if ``engine_conf`` names a site or deployable type the Provisioner's
    registry does not have (its launches would fail forever), e.g. an overflow cloud."""
    clouds = engine_conf.get("clouds")
    entries = [engine_conf, *(c for c in clouds if isinstance(c, dict))] if isinstance(clouds, list) else [engine_conf]
    sites = {e.get(k) for e in entries for k in (*_SITE_KEYS, "site_name")} - {None}
    dts = {e.get(k) for e in entries for k in _DT_KEYS} - {None}
    for kind, wanted, listing in (("site", sites, conn.provisioner.list_sites),
                                  ("deployable type", dts, conn.provisioner.list_dts)):
        if not wanted:
            continue
        known = set(listing())
        known |= {f"common::{k}" for k in known}
        unknown = sorted(str(w) for w in wanted if w not in known)
        if unknown:
            raise CliError(f"unknown {kind} {unknown[0]!r} (the registry has: "
                           f"{', '.join(sorted(k for k in known if not k.startswith('common::'))) or 'none'}); "
                           "nothing changed")


def cmd_reconfigure(args: argparse.Namespace, out: Output) -> int:
    config = dotted_config(assignments(args.settings, "--set"))
    with connected(args) as conn, check_with(f"cei domain describe {args.domain_id}"):
        args.domain_id = ids.domain_id(conn, args.domain_id)
        check_registry_names(conn, config.get("engine_conf") or {})
        conn.epum.reconfigure_domain(args.domain_id, config)
        domain = conn.epum.describe_domain(args.domain_id)
    done(out, domain, f"domain {args.domain_id} reconfigured: engine_conf {domain['config'].get('engine_conf')}")
    return 0


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    def show(domains: list[dict[str, Any]]) -> None:
        if out.json:
            out.emit(domains)
        else:
            out.table([summary(d) for d in domains], COLUMNS, title="domains", wide=WIDE)

    with connected(args) as conn:
        return watch(args, out, lambda: [conn.epum.describe_domain(d) for d in conn.epum.list_domains()], show)


def cmd_describe(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        domain_id = ids.domain_id(conn, args.domain_id)
        domain = conn.epum.describe_domain(domain_id)
        out.describe({**domain, **health(domain)}, title=f"domain {domain_id}")
    return 0


def cmd_remove(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn, check_with(f"cei domain describe {args.domain_id}"):
        args.domain_id = ids.domain_id(conn, args.domain_id)
        result = conn.epum.remove_domain(args.domain_id)
    done(out, result, f"domain {args.domain_id} removing (its nodes are being terminated)")
    return 0


def cmd_def_add(args: argparse.Namespace, out: Output) -> int:
    definition = load_mapping(args.file, "domain definition")
    with connected(args) as conn:
        conn.epum.add_domain_definition(args.definition_id, definition)
    done(out, {"definition_id": args.definition_id, "definition": definition}, f"domain definition {args.definition_id} added")
    return 0


def cmd_def_update(args: argparse.Namespace, out: Output) -> int:
    definition = load_mapping(args.file, "domain definition")
    with connected(args) as conn:
        conn.epum.update_domain_definition(args.definition_id, definition)
    done(out, {"definition_id": args.definition_id, "definition": definition}, f"domain definition {args.definition_id} updated")
    return 0


def cmd_def_describe(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        out.describe(conn.epum.describe_domain_definition(args.definition_id),
                     title=f"domain definition {args.definition_id}")
    return 0


def cmd_def_remove(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        conn.epum.remove_domain_definition(args.definition_id)
    done(out, {"definition_id": args.definition_id, "removed": True}, f"domain definition {args.definition_id} removed")
    return 0


def cmd_def_list(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        ids = conn.epum.list_domain_definitions()
    if out.json:
        out.emit(ids)
    else:
        out.table([{"definition_id": i} for i in ids], ["definition_id"], title="domain definitions")
    return 0
