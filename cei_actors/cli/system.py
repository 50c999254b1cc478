"""``cei up`` / ``cei down`` / ``cei status``: start, stop and look at the whole system."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .common import connected, done, not_up_message
from .output import CliError, Output, progress
from .watch import watch, watch_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the system in the background; return when it is ready")
    p.add_argument("--plan", type=Path, default=None, metavar="FILE", help="launch plan (YAML; default: the built-in plan)")
    p.add_argument("--log", dest="log_url", default=argparse.SUPPRESS, metavar="URL", help="event log URL (sqlite:///..., zk://...)")
    net = p.add_argument_group("network (override the plan's network keys; docs/multi-host.md)")
    net.add_argument("--listen", default=None, metavar="ADDR", help="address every socket binds (default 127.0.0.1)")
    net.add_argument("--advertise", default=None, metavar="ADDR", help="address peers connect to (default: --listen)")
    net.add_argument("--allow", action="append", default=None, metavar="CIDR",
                     help="peer network allowed to connect (repeat; required off loopback)")
    net.add_argument("--allow-wildcard", action="store_true", help="permit --listen 0.0.0.0 (with --advertise)")
    net.add_argument("--admin-port", type=int, default=None, metavar="PORT", help="the admin's port (default: a free one)")
    net.add_argument("--join", default=None, metavar="HOST:PORT", help="join the convention of that admin")
    net.add_argument("--peer", action="append", default=None, metavar="HOST:PORT",
                     help="another host's admin whose components this system finds (repeat)")
    net.add_argument("--secret-file", default=None, metavar="FILE", help="the system's secret (0600, same on every host)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the system (components, nodes, processes); the log stays")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="leaders, domains, nodes, resources, process counts")
    watch_option(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("replica", help="a replica of this system's components")
    cmds = p.add_subparsers(dest="replica_cmd", required=True, metavar="COMMAND")
    p = cmds.add_parser("start", help="start again a replica that does not run (e.g. after a kill -9): a "
                                      "standby while another leads; every replica of the other "
                                      "components, on the systems joined to this one too, learns it")
    p.add_argument("name", metavar="NAME", help="the replica as `cei status` names it (pd, pd.1, epum, ...)")
    p.set_defaults(func=cmd_replica_start)


def start(args: argparse.Namespace, out: Output, asked: list[float] | None = None) -> dict[str, Any]:
    """Load the plan and start the system under ``args.home``, showing progress (not in JSON
    mode). ``asked`` (from :func:`interrupt_between_steps`): once it holds a Ctrl-C, the start
    stops at its next step and undoes itself (:class:`Interrupted`)."""
    from ..launch.launcher import LaunchError, read_info, remembered_log_url, up
    from ..launch.plan import PlanError, load_plan, shown_log_url
    from ..runtime.network import Network, NetworkError
    from ..runtime.secure import SecretError

    home = Path(args.home)
    log_url = args.explicit_log_url
    if log_url is None and args.plan is None:  # the log this home's last system wrote
        log_url = remembered_log_url(home)
        # said only when no system.json is left: else up refuses (one up), or cleans up after a
        # crashed system, and its last line names the log
        if log_url is not None and not out.json and read_info(home) is None:
            out.line(f"using the log of this home's last system: {shown_log_url(log_url)} (--log to change)")
    try:
        plan = load_plan(args.plan, home=home, log_url=log_url)
    except PlanError as exc:
        raise CliError(f"invalid plan: {exc}") from None
    network = None
    given = [getattr(args, k, None) for k in ("listen", "advertise", "allow")]
    if any(v is not None for v in given) or getattr(args, "allow_wildcard", False):
        base = plan.network
        try:
            network = Network.build(args.listen or base.listen, args.advertise,
                                    base.allow if args.allow is None else args.allow,
                                    allow_wildcard=args.allow_wildcard)
        except NetworkError as exc:
            raise CliError(f"bad network settings: {exc}") from None
    try:
        with progress_shown(out, "starting the system") as progress:
            def step(line: str) -> None:
                progress(line)
                if asked:  # Ctrl-C: stop here; up stops what it started
                    raise KeyboardInterrupt

            try:
                return up(plan, home, progress=step, network=network,
                          admin_port=getattr(args, "admin_port", None), join=getattr(args, "join", None),
                          peers=getattr(args, "peer", None), secret_file=getattr(args, "secret_file", None))
            except KeyboardInterrupt:
                if read_info(home) is not None:  # past the last step that undoes the start
                    raise Interrupted(f"interrupted after the system was up: it runs in {home} "
                                      "(`cei down` stops it)") from None
                raise Interrupted(f"interrupted: up stopped what it had started; nothing runs in {home}") from None
    except (LaunchError, SecretError, NetworkError) as exc:
        raise CliError(f"up failed: {exc}") from None


class Interrupted(CliError):
    """Ctrl-C: the command stopped; the message says what it left (exit status 130)."""

    exit_status = 130


@contextlib.contextmanager
def interrupt_between_steps(then_ignore: bool = False) -> Iterator[list[float]]:
    """While inside, a first Ctrl-C (SIGINT) is only noted (the list it yields gets its time)
    for the caller to act on at its next step, so a start is finished or undone, never left
    half made; a second one interrupts at once. Processes started meanwhile (the actor
    system) inherit the handler, so a Ctrl-C in the terminal does not kill them either.
    ``then_ignore`` (the process ends after this command): on leaving, SIGINT is ignored
    instead of given back to Python's handler, so a Ctrl-C between the last step and the
    exit cannot turn a finished start into a bare "interrupted" (decision OP8)."""
    asked: list[float] = []
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def note(signum: int, frame: Any) -> None:
        if asked and os.getpid() == pid:
            raise KeyboardInterrupt
        if os.getpid() == pid:
            asked.append(time.time())
            print("cei: interrupt: stopping at the next step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    pid = os.getpid()
    previous = signal.signal(signal.SIGINT, note)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN if then_ignore else previous)


@contextlib.contextmanager
def progress_shown(out: Output, title: str) -> Iterator[Callable[[str], None]]:
    """A progress callback (:func:`.output.progress`; piped, the steps as plain lines)."""
    with progress(out, title, steps=True) as say:
        yield say


def cmd_up(args: argparse.Namespace, out: Output) -> int:
    from ..launch.launcher import read_info

    with interrupt_between_steps(then_ignore=getattr(args, "exiting", False)) as asked:
        try:
            info = start(args, out, asked)
        except KeyboardInterrupt:  # before the start, or a second Ctrl-C
            if read_info(Path(args.home)) is None:
                raise Interrupted(f"interrupted: nothing runs in {args.home}") from None
            raise Interrupted(f"interrupted: a system may run in {args.home} (check with `cei status`)") from None
        if out.json:
            out.emit(info)
        else:
            out.line(f"system up in {args.home}")
    if asked:  # noted up to the end of the block; past it a console `cei` ignores Ctrl-C
        raise Interrupted(f"interrupted after the system was up: it runs in {args.home} (`cei down` stops it)")
    return 0


def cmd_replica_start(args: argparse.Namespace, out: Output) -> int:
    from ..launch.launcher import LaunchError, start_replica
    from ..launch.plan import COMPONENTS

    component, dot, index = args.name.partition(".")
    if component not in COMPONENTS or (dot and not (index.isdigit() and int(index) > 0)):
        raise CliError(f"replica start: {args.name!r} is not a replica name ({', '.join(COMPONENTS)}, "
                       "or one of them and .N)")
    with connected(args) as conn:
        try:
            start_replica(conn, component, int(index or 0))
        except LaunchError as exc:
            raise CliError(f"replica start: {exc}") from None
        status = next((m.status for m in conn.members(component) if m.name == args.name), None) or {}
    role = "leads" if status.get("leader") else "standby"
    done(out, {"name": args.name, **status}, f"replica {args.name} started (pid {status.get('pid')}, {role})")
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
    def show(status: dict[str, Any]) -> None:
        if out.json:
            out.emit(status)
        else:
            show_status(status, out)

    with connected(args) as conn:
        if getattr(args, "watch", False):
            return watch(args, out, lambda: collect_status(conn), show)
        status = collect_status(conn)
    show(status)
    problems = status["problems"]
    if problems:
        raise CliError("not healthy: " + "; ".join(f"{p['component']} {p['error']}" for p in problems),
                       quiet=True)
    return 0


def collect_status(conn: Any) -> dict[str, Any]:
    """The launcher's status with the details behind its counts.

    ``components`` (replicas: leader, ready, epoch, head, pid, since, last_error),
    ``processes`` (count per state), ``domains`` (each: domain_id, engine, instances, need,
    status, reason), ``nodes`` (live ones: node_id, state, domain_id, site, processes),
    ``node_counts`` (per state, all nodes), ``resources`` (the PD's: slots and what is
    assigned), ``needs`` (per PD engine), ``healthy`` and ``problems`` (each: component,
    since, error): what does not serve or answer. A part that cannot be had is left empty and
    named in ``problems``; the rest is still shown.
    """
    from ..launch.launcher import NotRunning
    from ..runtime.client import OutcomeUnknown, RequestFailed
    from .domain import summary
    from .node import gather

    status = conn.status()
    problems = component_problems(status.get("components") or {})
    down = {p["component"] for p in problems}

    def part(component: str, what: str, get: Callable[[], Any], empty: Any) -> Any:
        try:
            return get()
        except (RequestFailed, OutcomeUnknown, NotRunning) as exc:
            if component not in down:
                down.add(component)
                problems.append({"component": component, "since": None,
                                 "error": f"{what} failed: {getattr(exc, 'message', None) or exc}"})
            return empty

    status["node_counts"] = status.pop("nodes", {})
    dump = part("pd", "dump", conn.pd.dump, {}) if "pd" not in down else {}
    need_of = {f"pd_domain_{engine}": v["need"] for engine, v in (dump.get("needs") or {}).items()}
    domains = []
    for domain_id in status.get("domains") or []:
        if "epum" in down:
            break
        described = part("epum", "describe_domain", lambda d=domain_id: conn.epum.describe_domain(d), None)
        if described is None:
            continue
        row = summary(described)
        domains.append({k: row.get(k) for k in ("domain_id", "engine", "instances", "states", "status", "reason")}
                       | {"need": need_of.get(domain_id)})
    status["domains"] = domains
    nodes = [] if down & {"pd", "epum", "provisioner"} else part(
        "provisioner", "describe_nodes", lambda: gather(conn, include_gone=False), [])
    status["nodes"] = [{k: n.get(k) for k in ("node_id", "state", "domain_id", "site", "processes")}
                       for n in nodes]
    status["resources"] = [{**r, "used": len(r.get("assigned") or [])} for r in dump.get("resources") or []]
    status["needs"] = dump.get("needs") or {}
    status["problems"] = problems
    status["healthy"] = not problems
    return status


#: What a replica's mode means, for people (``cei status``'s NOT HEALTHY table).
MODES = {
    "suspended": "its leadership is in doubt (its log session is lost); requests wait until the log is back",
    "recovering": "replaying its log",
    "standby": "a standby: no leader serves",
    "idle": "not started",
}


def component_problems(components: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per component no replica of which serves: since when and the last error its
    replicas give (``log unavailable``, a failed recovery, a step-down), or that none answers."""
    out = []
    for comp, replicas in sorted(components.items()):
        if any(r.get("ready") for r in replicas):
            continue
        answering = [r for r in replicas if r.get("running")]
        if not answering:
            out.append({"component": comp, "since": None, "error": "no replica answers"})
            continue
        r = max(answering, key=lambda r: (r.get("last_error") is not None, r.get("since") or 0))
        err = r.get("last_error") or {}
        text = f"not serving ({r.get('mode')}{': ' + MODES[r.get('mode')] if r.get('mode') in MODES else ''})"
        if err:
            text += f": {err.get('type')}: {err.get('message')}"
        out.append({"component": comp, "since": r.get("since"), "error": text})
    return out


def show_status(status: dict[str, Any], out: Output) -> None:
    """The status as tables: components, domains, nodes, resources, process counts."""
    rows = [{"component": comp, **replica}
            for comp, replicas in sorted((status.get("components") or {}).items()) for replica in replicas]
    out.table(rows, ["component", "name", "mode", "leader", "epoch", "head", "pid"], title="components")
    out.table(status.get("domains") or [], ["domain_id", "engine", "need", "instances", "states", "status", "reason"],
              title="domains")
    out.table(status.get("nodes") or [], ["node_id", "state", "domain_id", "site", "processes"], title="nodes")
    out.table(status.get("resources") or [], ["resource_id", "node_id", "engine", "state", "slots", "used"],
              title="resources")
    counts = status.get("processes") or {}
    text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    out.line(f"processes: {text}")
    problems = status.get("problems") or []
    if problems:
        out.table(problems, ["component", "since", "error"], title="NOT HEALTHY")
    from ..launch.plan import shown_log_url

    log = shown_log_url(status["log_url"]) if status.get("log_url") else None
    out.line(f"log: {log}  admin port: {status.get('admin_port')}")
    if status.get("metrics_url"):
        out.line(f"metrics: {status['metrics_url']}")
