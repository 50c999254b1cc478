"""``cei process ...``: schedule, list, describe, terminate, restart, wait for and dump processes."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..eeagent.messages import MAX_TAIL_LINES, ReadOutput
from ..eeagent.output import read_chunk
from ..eeagent.output import tail_offset as tail_offset  # re-exported (tests, callers)
from ..pd import states as ps
from ..plaindata import count
from ..runtime.client import NotFound, OutcomeUnknown, ServiceClient, Unavailable
from ..runtime.control import PeerAddress
from . import ids
from .common import UsageError, assignments, check_with, connected, done, seconds, upper_choice
from .output import CliError, Output, age, progress
from .watch import watch, watch_option

#: The columns of a process table (``-o wide`` adds :data:`WIDE`).
COLUMNS = ["upid", "status", "round", "node_id", "age", "restart_mode", "command", "why"]
WIDE = ["name", "state", "restarts", "next_start", "queueing_mode", "engine", "constraints", "starts",
        "last_node_id", "state_time", "msg"]


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("process", help="processes of the Process Dispatcher")
    cmds = group.add_subparsers(dest="process_cmd", required=True, metavar="COMMAND")

    p = cmds.add_parser("schedule", help="schedule a process (COMMAND after --, or --definition); "
                                         "at most once per upid: a retry with the same --upid "
                                         "never runs it again (`process restart` does)")
    p.add_argument("--upid", default=None,
                   help="the process id (default: a new one, printed on stderr before it is sent)")
    p.add_argument("--restart-mode", type=upper_choice(ps.RESTART_MODES), default=None,
                   metavar="{never,always,abnormal}",
                   help="run it again after it ends: never, always, or only after a failure "
                        "(default: the PD's, never)")
    p.add_argument("--queueing-mode", type=upper_choice(ps.QUEUEING_MODES), default=None,
                   metavar="{never,always,start_only,restart_only}",
                   help="whether it may wait in the queue when no slot is free, on its first start "
                        "or its restarts (default: always)")
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
    p.add_argument("--state", type=upper_choice(ps.ORDER, lower=False), default=None, metavar="STATE",
                   help="only processes in this state (e.g. RUNNING, WAITING, FAILED)")
    watch_option(p)
    p.set_defaults(func=cmd_list)
    for name, func, text in (
        ("describe", "cmd_describe", "one process in full"),
        ("terminate", "cmd_terminate", "terminate a process"),
        ("restart", "cmd_restart", "run a process again in its next round (in place if it runs, else "
                                   "requeued); not retry-safe: each call is a new round"),
    ):
        p = cmds.add_parser(name, help=text)
        p.add_argument("upid", help="the process id (or a unique prefix of it)")
        p.set_defaults(func=globals()[func])
    p = cmds.add_parser("wait", help="wait until a process is in STATE (exit 1 on timeout or when it "
                                     "ends in another state)")
    p.add_argument("upid", help="the process id (or a unique prefix of it)")
    p.add_argument("--state", required=True, action="append", type=upper_choice(ps.ORDER, lower=False),
                   metavar="STATE", help="the state to wait for (repeat for any of several)")
    p.add_argument("--timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="give up after this long (default 60)")
    p.set_defaults(func=cmd_wait)
    p = cmds.add_parser("logs", help="a process's output (stdout, or --stderr) in any round, from its "
                                     "node's files on this host or else from the node's agent; "
                                     "--follow streams it until the round ends")
    p.add_argument("upid", help="the process id (or a unique prefix of it)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what it writes until the round ends")
    p.add_argument("--stderr", action="store_true", help="its standard error instead of its output")
    p.add_argument("--round", type=int, default=None, metavar="N", help="that round (default: the latest)")
    p.add_argument("--tail", type=int, default=None, metavar="LINES", help="only the last LINES lines (then follow)")
    p.add_argument("--from-agent", action="store_true",
                   help="ask the node's agent even if this host sees the output files (a remote "
                        "node's output is always asked of its agent)")
    p.set_defaults(func=cmd_logs)
    p = cmds.add_parser("dump", help="the PD's whole view: processes, nodes, resources, queue, needs")
    p.set_defaults(func=cmd_dump)
    p = cmds.add_parser("nodestate", help="tell the PD a node's state by hand, as EPUM would (RUNNING adds "
                                          "the node, a later state evacuates it)")
    p.add_argument("node_id", metavar="NODE", help="the node's id")
    p.add_argument("domain_id", metavar="DOMAIN", help="pd_domain_<engine>")
    p.add_argument("state", type=str.upper, metavar="STATE", help="the node's state (RUNNING, TERMINATED, ...)")
    p.set_defaults(func=cmd_nodestate)


def show(process: dict[str, Any], out: Output) -> None:
    """One process: the whole record in a machine format, ``key: value`` lines otherwise (a
    waiting process's ``why``, what keeps it from a slot, right after its state)."""
    if not out.json and "why" in process:
        items = [(k, v) for k, v in process.items() if k != "why"]
        if process["why"] and "state" in process:
            at = [k for k, _ in items].index("state") + 1
            items.insert(at, ("why", process["why"]))
        process = dict(items)
    out.describe(process, title=f"process {process.get('upid')}")


def brief(process: dict[str, Any], out: Output) -> None:
    """A process as it stands after a call: the record (JSON) or one line."""
    if out.json:
        out.emit(process)
    else:
        node = f" on {process['node_id']}" if process.get("node_id") else ""
        out.line(f"{process['upid']} {process['state']} (round {process['round']}){node}")


def show_list(processes: list[dict[str, Any]], out: Output) -> None:
    """Processes as a list (JSON) or a table (``status``: the state, or ``CrashLoopBackOff`` while
    a crash loop waits for its next start; ``age``: time in its state; ``node_id``: for an ended
    process, the node it last ran on)."""
    if out.json:
        out.emit(processes)
        return
    now = time.time()
    rows = [{**p, "command": " ".join(p.get("command") or []) or p.get("definition_id"),
             "status": p.get("status") or p.get("state"),
             # an ended process: the node it ran on (as kubectl shows a completed pod's)
             "node_id": p.get("node_id") or (p.get("last_node_id") if p.get("state") in ps.TERMINAL else None),
             "age": age(now - p["state_time"]) if p.get("state_time") else None,
             "constraints": ",".join(f"{k}={v}" for k, v in sorted((p.get("constraints") or {}).items()))}
            for p in processes]
    out.table(rows, COLUMNS, title=count(len(rows), "process"), wide=WIDE)


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
        return watch(args, out, lambda: conn.pd.describe_processes(state=args.state),
                     lambda processes: show_list(processes, out))


def cmd_describe(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        show(conn.pd.describe_process(ids.process_id(conn, args.upid)), out)
    return 0


def cmd_terminate(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        upid = ids.process_id(conn, args.upid)
        with check_with(f"cei process describe {upid}"):
            process = conn.pd.terminate_process(upid)
    brief(process, out)
    return 0


def cmd_restart(args: argparse.Namespace, out: Output) -> int:
    with connected(args) as conn:
        upid = ids.process_id(conn, args.upid)
        with check_with(f"cei process describe {upid} (its round)"):
            process = conn.pd.restart_process(upid)
    brief(process, out)
    return 0


def cmd_wait(args: argparse.Namespace, out: Output) -> int:
    want = {*args.state, *ps.TERMINAL}
    deadline = time.monotonic() + args.timeout
    with connected(args) as conn, progress(out, f"waiting for {args.upid}") as say:
        args.upid = ids.process_id(conn, args.upid)
        seen = None
        while True:  # in steps of a second, so a terminal shows where it is
            try:
                process = conn.pd.wait_process(args.upid, want, every=0.2,
                                               timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                break
            except TimeoutError as exc:
                if time.monotonic() >= deadline:
                    raise CliError(f"timed out after {args.timeout:g}s: {exc}") from None
                if str(exc) != seen:
                    seen = str(exc)
                    say(seen)
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


def output_file(node_dirs: list[Path], upid: str, round_: int, suffix: str) -> Path | None:
    """The EEAgent output file of ``(upid, round_)`` (``suffix`` ``.out`` or ``.err``) on a node
    of this host: under a local site's ``nodes/<id>/eeagent/proc/`` or a static node's
    ``<id>/proc/`` (decision EA7 names the files); the newest if several."""
    from ..eeagent.supervisor import _file_stem  # the agent's own naming of output files

    name = _file_stem(upid, round_) + suffix
    found = [f for base in node_dirs for pattern in (f"nodes/*/eeagent/proc/{name}", f"*/proc/{name}")
             for f in base.glob(pattern)]
    return max(found, key=lambda f: f.stat().st_mtime, default=None)


class LocalOutput:
    """The output file of ``(upid, round)`` on a node directory of this host."""

    missing: str | None = None

    def __init__(self, node_dirs: list[Path], upid: str, round_: int, suffix: str,
                 path: Path | None = None) -> None:
        self.node_dirs, self.upid, self.round, self.suffix = node_dirs, upid, round_, suffix
        self.stream = "stderr" if suffix == ".err" else "stdout"
        self.path = path
        self.where = {"path": str(path) if path else None}

    def read(self, offset: int, tail: int | None = None) -> tuple[int, bytes] | None:
        """``(start, data)`` from ``offset`` (or the last ``tail`` lines); None: no file (yet)."""
        if self.path is None:
            self.path = output_file(self.node_dirs, self.upid, self.round, self.suffix)
            if self.path is None:
                return None
            self.where = {"path": str(self.path)}
        try:
            start, data, _ = read_chunk(self.path, offset, 1 << 20, tail)
        except FileNotFoundError:  # removed after the retention
            return None
        return start, data

    def close(self) -> None:
        pass


class AgentOutput:
    """The output of ``(upid, round)`` asked of the EEAgent of ``node`` (decision UX4): its
    address comes from the PD leader, which knows every agent as peer ``eeagent:<id>``; a
    reply holds at most :data:`~cei_actors.eeagent.messages.MAX_OUTPUT_CHUNK` bytes."""

    def __init__(self, conn: Any, upid: str, round_: int, stream: str, node: str,
                 agent_ids: list[str]) -> None:
        self.conn, self.upid, self.round, self.stream, self.node = conn, upid, round_, stream, node
        self.agent_ids = list(dict.fromkeys(agent_ids))
        self.where = {"node": node}
        self.missing: str | None = None  # why the last read found nothing
        self._client: ServiceClient | None = None

    def _agent(self) -> ServiceClient:
        if self._client is None:
            for agent_id in self.agent_ids:
                try:
                    address = self.conn.service("pd").call(PeerAddress(f"eeagent:{agent_id}"))
                except NotFound:
                    continue
                self._client = ServiceClient(self.conn.asys, address, timeout=self.conn.timeout)
                break
            else:
                raise CliError(f"no output of process {self.upid} round {self.round}: the PD knows "
                               f"no agent of node {self.node} (the node is gone?)")
        return self._client

    def read(self, offset: int, tail: int | None = None) -> tuple[int, bytes] | None:
        """``(start, data)`` from ``offset`` (or the last ``tail`` lines); None: the agent has
        no such output (:attr:`missing` says why)."""
        try:
            got = self._agent().call(ReadOutput(self.upid, self.round, self.stream, offset,
                                                tail=tail))
        except NotFound:
            self.missing = (f"no output of process {self.upid} round {self.round} on node {self.node}: "
                            "it did not run there, or its files were removed after the agent's "
                            "output retention")
            return None
        except (Unavailable, OutcomeUnknown):
            raise CliError(f"no output of process {self.upid} round {self.round}: the agent of node "
                           f"{self.node} does not answer (the node is gone?)") from None
        return got["offset"], got["data"]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def cmd_logs(args: argparse.Namespace, out: Output) -> int:
    suffix = ".err" if args.stderr else ".out"
    if args.tail is not None and args.tail < 0:
        raise CliError(f"--tail: expected a number of lines >= 0, got {args.tail}")
    if args.tail is not None and args.tail > MAX_TAIL_LINES:
        raise CliError(f"--tail: at most {MAX_TAIL_LINES} lines, got {args.tail}")
    with connected(args) as conn:
        upid = ids.process_id(conn, args.upid)
        process = conn.pd.describe_process(upid)
        round_ = process["round"] if args.round is None else args.round
        if not 0 <= round_ <= process["round"]:
            raise CliError(f"process {upid} has rounds 0 to {process['round']}, not {round_}")
        node_dirs = [Path(d) for d in conn.info.get("node_dirs") or []]
        path = None if args.from_agent else output_file(node_dirs, upid, round_, suffix)
        source: LocalOutput | AgentOutput
        if path is not None:
            source = LocalOutput(node_dirs, upid, round_, suffix, path)
        else:
            source = _agent_source(conn, process, round_, "stderr" if args.stderr else "stdout",
                                   args.follow, [] if args.from_agent else node_dirs, suffix)
        try:
            return _print_output(conn, out, source, args.follow, args.tail)
        except KeyboardInterrupt:  # the usual way to stop --follow
            return 0
        finally:
            source.close()


def _agent_source(conn: Any, process: dict[str, Any], round_: int, stream: str, wait: bool,
                  node_dirs: list[Path], suffix: str) -> LocalOutput | AgentOutput:
    """The agent of the node ``process`` runs (or last ran) on; with ``wait`` (``--follow``)
    a process not placed yet is waited for (its output may then be on this host after all:
    under ``node_dirs``)."""
    upid = process["upid"]
    while True:
        node = process.get("node_id") or process.get("last_node_id")
        if node:
            return AgentOutput(conn, upid, round_, stream, node, [process.get("assigned") or node, node])
        if not wait or process["round"] != round_ or process["state"] in ps.TERMINAL:
            raise CliError(f"no output of process {upid} round {round_}: it has not run on a node "
                           f"(it is {process['state']})")
        time.sleep(0.5)  # a poll interval: the PD places it when a node has a slot
        if output_file(node_dirs, upid, round_, suffix) is not None:
            return LocalOutput(node_dirs, upid, round_, suffix)
        process = conn.pd.describe_process(upid)


def _print_output(conn: Any, out: Output, source: LocalOutput | AgentOutput, follow: bool,
                  tail: int | None = None) -> int:
    """Print the output from the start (or its last ``tail`` lines); with ``follow``, keep
    printing until the round is over (the process left it, or ended) and every byte is out."""
    upid, round_ = source.upid, source.round
    offset, found = 0, False
    last_check, over = 0.0, False
    while True:
        got = source.read(offset, tail if not found else None)
        chunk = b""
        if got is not None:
            found = True
            offset, chunk = got
            offset += len(chunk)
        if chunk:
            if out.json:
                out.emit({"upid": upid, "round": round_, "stream": source.stream, **source.where,
                          "text": chunk.decode(errors="replace")})
            else:
                out.stream.flush()
                raw = getattr(out.stream, "buffer", None)
                if raw is None:
                    out.stream.write(chunk.decode(errors="replace"))
                else:
                    raw.write(chunk)
                    raw.flush()
            continue  # more may be there already
        if not follow or over:
            if not found:
                raise CliError(source.missing or
                               f"no output of process {upid} round {round_} on this host: not started "
                               "yet, or its files went after the agent's output retention")
            return 0
        if time.monotonic() - last_check > 0.5:
            p = conn.pd.describe_process(upid)
            last_check = time.monotonic()
            over = p["round"] != round_ or p["state"] in ps.TERMINAL  # one more read, then stop
            continue
        time.sleep(0.1 if isinstance(source, LocalOutput) else 0.2)  # a poll: another process writes it
