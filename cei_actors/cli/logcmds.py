"""``cei log ...``: read any component's log, rebuild its state at any point, find what broke."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import msgpack

from ..debug import Replay, diff, entity_diff, human_time, only_entity, trace, why
from ..eventlog import CorruptLog, Snapshot
from ..eventlog.batch import unpack_state
from ..launch.components import UnknownStream, component_for
from ..launch.plan import shown_log_url
from ..plaindata import count
from .common import UsageError
from .output import CliError, Output, plain

__all__ = ["check_snapshot", "diff", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    log = sub.add_parser("log", help="inspect event logs (replay-based debugging; read-only)")
    log.add_argument("--plan", type=Path, default=None, metavar="FILE",
                     help="the plan the log was written under (default: the running system's, "
                          "else the built-in one): the PD's throttle interval comes from it")
    cmds = log.add_subparsers(dest="log_cmd", required=True, metavar="COMMAND")
    p = cmds.add_parser("streams", help="the streams in the log")
    p.set_defaults(func=cmd_streams)
    p = cmds.add_parser("show", help="the events of a stream, one per line")
    p.add_argument("stream", help=STREAM_HELP)
    p.add_argument("--from", dest="start", type=int, default=1, metavar="SEQ", help="first offset (default 1)")
    p.add_argument("--to", dest="stop", type=int, default=None, metavar="SEQ", help="last offset (default: the head)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="then print each new event as it is appended (until Ctrl-C or --to)")
    p.set_defaults(func=cmd_show)
    p = cmds.add_parser("state", help="the state rebuilt by replay up to SEQ or TIME (one entity's part, "
                                      "given one)")
    p.add_argument("stream", help=STREAM_HELP)
    p.add_argument("entity_pos", nargs="?", default=None, metavar="ENTITY", help=ENTITY_HELP)
    p.add_argument("--entity", default=None, metavar="ID", help="the same as ENTITY")
    p.add_argument("--at", default=None, metavar="SEQ|TIME", help=AT_HELP)
    p.set_defaults(func=cmd_state)
    p = cmds.add_parser("diff", help="what changed between two points, entity by entity")
    p.add_argument("stream", help=STREAM_HELP)
    p.add_argument("seq_a", metavar="A", help="an offset or a time")
    p.add_argument("seq_b", metavar="B", help="an offset or a time")
    p.add_argument("entity_pos", nargs="?", default=None, metavar="ENTITY", help=ENTITY_HELP)
    p.add_argument("--entity", default=None, metavar="ID", help="the same as ENTITY")
    p.set_defaults(func=cmd_diff)
    p = cmds.add_parser("check", help="replay every prefix against the invariants; the snapshot must "
                                      "restore to the state replayed up to its offset")
    p.add_argument("stream", help=STREAM_HELP)
    p.set_defaults(func=cmd_check)
    p = cmds.add_parser("why", help="a process, node, domain or HA group: its history and why it "
                                    "stands as it does at a point")
    p.add_argument("entity", metavar="ENTITY", help="a upid, node id, domain id or HA group name")
    p.add_argument("--at", default=None, metavar="SEQ|TIME", help=AT_HELP)
    p.add_argument("--stream", default=None, help="the stream an --at offset counts in (default pd)")
    p.set_defaults(func=cmd_why)
    p = cmds.add_parser("trace", help="one timeline across all streams for a process, node or need")
    p.add_argument("entity", metavar="ID", help="a upid, node id or need")
    p.set_defaults(func=cmd_trace)
    p = cmds.add_parser("verify", help="re-fold every stream with the current code and re-run each recorded "
                                       "decision: the first one decided differently is reported")
    p.add_argument("log", nargs="?", default=None, metavar="LOG",
                   help="a log URL or an SQLite file (default: --log, else the home's)")
    p.add_argument("--stream", default=None, help="only this stream (default: every stream)")
    p.set_defaults(func=cmd_verify)


AT_HELP = ("an offset, HEAD, a time as shown (2026-12-03 06:10:12Z; ISO-8601, UTC unless zoned) or a time "
           "before now such as -10m")
STREAM_HELP = "a stream of the log (`cei log streams`): pd, epum, provisioner, ha"
ENTITY_HELP = "only what is about this process, node, domain or group"


def _open(args: argparse.Namespace) -> Replay:
    """The log, read-only: no ``cei log`` command writes to it (decision DBG1)."""
    return Replay(args.log_url, configs=_configs(args))


def _configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The PD's config from the plan (``--plan``, else the running system's, else the
    built-in one), so a replay throttles as the system did (decision DBG2)."""
    from ..launch.launcher import read_info
    from ..launch.plan import DEFAULT_SOURCE, PlanError, load_plan

    path = getattr(args, "plan", None)
    if path is None:
        source = (read_info(args.home) or {}).get("plan")
        path = Path(source) if source and source != DEFAULT_SOURCE else None
    try:
        plan = load_plan(path, home=args.home)
    except PlanError:
        if getattr(args, "plan", None) is not None:
            raise
        return {}  # the running system's plan file is gone: the replay configuration
    # the components whose decisions depend on their config (``log verify`` re-runs them)
    return {name: {"config": plan.start_config(name)} for name in ("pd", "epum", "ha") if name in plan.components}


def _checked(r: Replay, stream: str, **offsets: int | None) -> int:
    """The head of ``stream``; :class:`CliError` if the log has no such stream or an offset
    (``name=value``, None: not given) lies outside ``0..head``."""
    streams = r.streams()
    if stream not in streams:
        known = ", ".join(sorted(streams)) or "none"
        raise CliError(f"no stream {stream!r} in the log {shown_log_url(r.log.url)} (streams: {known})")
    head = r.head(stream)
    for name, value in offsets.items():
        if value is not None and not 0 <= value <= head:
            raise CliError(f"{name} {value}: stream {stream!r} has offsets 0 to {head}")
    return head


def cmd_streams(args: argparse.Namespace, out: Output) -> int:
    with _open(args) as r:
        rows = [{"stream": s, "head": r.head(s), "epoch": r.log.epoch(s)} for s in r.streams()]
    if not rows and not out.json:
        out.line(f"no streams in the log {shown_log_url(args.log_url)}")
        return 0
    out.table(rows, ["stream", "head", "epoch"], title="streams")
    return 0


def _redactor(stream: str, hook: str) -> Any:
    """The stream's component's ``redact_event`` / ``redact_snapshot`` (what never to show,
    e.g. credentials), or the identity for components and streams without one."""
    try:
        found = getattr(component_for(stream), hook, None)
    except UnknownStream:
        found = None
    return found if found is not None else (lambda *args: args[-1])  # the data, unchanged


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    redact = _redactor(args.stream, "redact_event")
    with _open(args) as r:
        _checked(r, args.stream, **{"--from": args.start, "--to": args.stop})
        if args.stop is not None and args.start > args.stop:
            raise CliError(f"--from {args.start} is after --to {args.stop} in stream {args.stream!r}")
        records = r.records(args.stream, args.start, args.stop)
        if args.follow:
            return _follow(args, out, r, records, redact)
        if out.json:
            out.emit([_record(x, redact(x.type, x.body)) for x in records])
        else:
            for x in records:
                _show_line(out, x, redact(x.type, x.body))
    return 0


def _show_line(out: Output, x: Any, body: Any) -> None:
    out.line(f"{x.offset:>8} e{x.epoch} {human_time(x.timestamp)} {x.type} {plain(body)}")


def _follow(args: argparse.Namespace, out: Output, r: Replay, records: Any, redact: Any) -> int:
    """``log show --follow``: the events so far, then each new one as it is appended, one per
    line (one JSON document per line with ``--json``); ends at ``--to`` or on Ctrl-C."""
    last = args.start - 1
    try:
        while True:
            for x in records:
                if args.stop is not None and x.offset > args.stop:
                    return 0
                if out.json:
                    out.emit(_record(x, redact(x.type, x.body)))
                else:
                    _show_line(out, x, redact(x.type, x.body))
                last = x.offset
            out.stream.flush()
            if args.stop is not None and last >= args.stop:
                return 0
            records = r.log.tail(args.stream, last, timeout=1.0)
    except KeyboardInterrupt:  # the way a follow ends
        return 0


def _record(r: Any, body: Any) -> dict[str, Any]:
    return {
        "offset": r.offset, "epoch": r.epoch, "timestamp": r.timestamp, "when": human_time(r.timestamp),
        "type": r.type, "version": r.version, "body": plain(body, as_text=False),
    }


def _entity(args: argparse.Namespace) -> str | None:
    if args.entity is not None and args.entity_pos is not None and args.entity != args.entity_pos:
        raise UsageError(f"two entities given: {args.entity_pos!r} and --entity {args.entity!r}")
    return args.entity if args.entity is not None else args.entity_pos


def _data_at(r: Replay, stream: str, offset: int) -> Any:
    component = r.component(stream)
    redact = _redactor(stream, "redact_snapshot")
    return plain(redact(component.snapshot(r.state(stream, offset))), as_text=False)


def cmd_state(args: argparse.Namespace, out: Output) -> int:
    entity = _entity(args)
    with _open(args) as r:
        _checked(r, args.stream)
        r.component(args.stream)  # a stream no component owns cannot be folded
        data = _data_at(r, args.stream, r.resolve(args.stream, args.at))
    if entity is not None:
        data = only_entity(data, entity)
        if not data:
            raise CliError(f"stream {args.stream!r} holds nothing about {entity!r} at that point")
    out.emit(data)
    return 0


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    entity = _entity(args)
    with _open(args) as r:
        _checked(r, args.stream)
        r.component(args.stream)
        lo, hi = sorted((r.resolve(args.stream, args.seq_a, "SEQ_A"), r.resolve(args.stream, args.seq_b, "SEQ_B")))
        before, after = _data_at(r, args.stream, lo), _data_at(r, args.stream, hi)
    if entity is not None and not only_entity(before, entity) and not only_entity(after, entity):
        raise CliError(f"stream {args.stream!r} holds nothing about {entity!r} at {lo} or at {hi}")
    changes = entity_diff(before, after, entity)
    if out.json:
        out.emit(changes)
    else:
        for c in changes:
            out.line(f"{c['change']:>8} {c['path']}: {plain(c.get('before'))} -> {plain(c.get('after'))}")
        if not changes:
            out.line(f"no change between {lo} and {hi}" + (f" for {entity}" if entity else ""))
    return 0


def cmd_why(args: argparse.Namespace, out: Output) -> int:
    with _open(args) as r:
        answer = why(r, args.entity, args.at, args.stream)
    if out.json:
        out.emit(answer)
        return 0
    at = answer["at"]
    where = ", ".join(f"{s} {o}" for s, o in at["offsets"].items())
    out.line(f"{answer['kind']} {answer['entity']} at {at['when']} ({where})")
    state = answer.get("state")
    if isinstance(state, str):
        line = f"  state {state}"
        if answer.get("node_id"):
            line += f" on node {answer['node_id']} ({answer['resource_id']})"
        if answer.get("msg"):
            line += f": {answer['msg']}"
        out.line(line + (f" since {answer['since']}" if answer.get("since") else ""))
    elif state:
        out.line(f"  state: {plain(state)}")
    if answer.get("need"):
        out.line(f"  need: {plain(answer['need'])}")
    for b in answer.get("blockers", []):
        out.line(f"  why: {b.get('text', b['reason'])}")
    for v in answer.get("nodes", []):
        out.line(f"  node {v['node_id']}: {v['text']}")
    for d in answer.get("destroyed", []):
        out.line(f"  offset {d['offset']} at {d['when']}: {d['text']}")
    out.line("history:")
    for h in answer["history"]:
        out.line(f"  {h['when']} {h['stream']:>11} {h['offset']:>8} {h['type']} {plain(h['body'])}")
    return 0


def cmd_trace(args: argparse.Namespace, out: Output) -> int:
    with _open(args) as r:
        rows = trace(r, args.entity)
    if out.json:
        out.emit(rows)
    else:
        for h in rows:
            out.line(f"{h['when']} {h['stream']:>11} {h['offset']:>8} {h['type']} {plain(h['body'])}")
    return 0


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Replay against the current code (``debug.verify``); exit 1 on the first difference."""
    from ..debug.verify import verify
    from ..launch.plan import absolute_log_url

    if args.log is not None:
        args.log_url = absolute_log_url(args.log if "://" in args.log else f"sqlite:///{Path(args.log).resolve()}")
    with _open(args) as r:
        if args.stream is not None:
            _checked(r, args.stream)
        streams = [args.stream] if args.stream is not None else r.streams()
        for stream in streams:
            component_for(stream)  # an unknown stream is a one-line error before any work
        reports = verify(r, streams)
    if out.json:
        out.emit({"ok": all(x.ok for x in reports), "streams": [x.as_dict() for x in reports]})
    else:
        for x in reports:
            out.line(x.summary())
            if x.difference is not None:
                out.line(x.difference.text())
            if x.broken is not None:
                out.line(f"{x.stream}: offset {x.broken['offset']} ({x.broken['type']}) breaks: "
                         + "; ".join(x.broken["broken"]))
            for offset, problem in sorted(x.snapshots.items()):
                out.line(f"{x.stream}: snapshot at offset {offset}: "
                         + (problem or "restores to the state re-folded up to it"))
    bad = [x for x in reports if not x.ok]
    if bad:
        first = bad[0]
        where = (f"decided differently at offset {first.difference.offset}" if first.difference is not None
                 else f"invariant broken at offset {first.broken['offset']}" if first.broken is not None
                 else "bad snapshot")
        raise CliError(f"stream {first.stream!r}: {where}", quiet=True)
    return 0


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    checked = 0
    with _open(args) as replay:
        _checked(replay, args.stream)
        component = component_for(args.stream)
        state = component.initial_state()
        log = replay.log
        # every kept snapshot: recovery falls back from the newest to the older ones
        snaps: list[Snapshot] = []
        problems: dict[int, str] = {}
        for offset in log.snapshots(args.stream):
            try:
                snap = log.load_snapshot(args.stream, offset)
            except CorruptLog as exc:  # recovery skips it just the same
                problems[offset] = f"snapshot does not decode: {exc}"
                continue
            if snap is not None:
                snaps.append(snap)
        # the state replayed up to each snapshot, as data (states may change in place)
        wanted = {s.offset for s in snaps}
        at: dict[int, Any] = {0: _normal(component.snapshot(state))} if 0 in wanted else {}
        for record in replay.records(args.stream):
            state = component.apply(state, component.registry.from_record(record))
            checked = record.offset
            if record.offset in wanted:
                at[record.offset] = _normal(component.snapshot(state))
            broken = component.invariants(state)
            if broken:
                result = {"ok": False, "offset": record.offset, "type": record.type, "broken": broken}
                if out.json:
                    out.emit(result)
                else:
                    out.line(f"offset {record.offset} ({record.type}) breaks: " + "; ".join(broken))
                raise CliError(f"stream {args.stream!r}: invariant broken at offset {record.offset}", quiet=True)
    for snap in snaps:
        problem = check_snapshot(component, snap, at.get(snap.offset), checked)
        if problem is not None:
            problems[snap.offset] = problem
    reports = [{"offset": o, "ok": o not in problems, "problem": problems.get(o)}
               for o in sorted({*problems, *wanted}, reverse=True)]
    snapshot = reports[0] if reports else None
    ok = not problems
    if out.json:
        out.emit({"ok": ok, "checked": checked, "snapshot": snapshot, "snapshots": reports})
    else:
        out.line(f"{args.stream}: {count(checked, 'event')} replayed, every invariant held")
        for report in reports:
            out.line(f"snapshot at offset {report['offset']}: "
                     + (report["problem"] or "restores to the state replayed up to it"))
    if not ok:
        bad = next(r for r in reports if not r["ok"])
        raise CliError(f"stream {args.stream!r}: bad snapshot at offset {bad['offset']}: {bad['problem']}",
                       quiet=True)
    return 0


def check_snapshot(component: Any, snap: Snapshot, want: Any, head: int) -> str | None:
    """What is wrong with ``snap`` (None: nothing): it must lie within the log, restore as the
    component restores it on recovery, and give the state replayed up to its offset (``want``:
    that state's ``component.snapshot``, through :func:`_normal`)."""
    if snap.offset > head:
        return f"at offset {snap.offset}, past the stream's head {head}"
    if snap.version != component.snapshot_version:
        return None  # recovery ignores it and replays the whole log, which was checked above
    try:
        restored = component.restore(unpack_state(snap.data))
        have = _normal(component.snapshot(restored))
    except Exception as exc:  # noqa: BLE001 - whatever the component raises is the finding
        return f"cannot be restored: {type(exc).__name__}: {exc}"
    if have != want:
        changes = diff(plain(want, as_text=False), plain(have, as_text=False))
        paths = ", ".join(c["path"] for c in changes[:5]) + (" ..." if len(changes) > 5 else "")
        return f"restores to a state other than the replay up to offset {snap.offset} (differs at {paths})"
    return None


def _normal(data: Any) -> Any:
    """``data`` as msgpack gives it back (tuples as lists), so two snapshots compare by value."""
    return msgpack.unpackb(msgpack.packb(data, use_bin_type=True), raw=False, strict_map_key=False)
