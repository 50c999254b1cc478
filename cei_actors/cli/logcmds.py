"""``cei log ...``: read any component's log, rebuild its state at any point, find what broke."""

from __future__ import annotations

import argparse
import time
from typing import Any

import msgpack

from ..eventlog import CorruptLog, Snapshot, open_log
from ..launch.components import UnknownStream, component_for
from ..launch.plan import shown_log_url
from ..runtime.runner import fold
from .output import CliError, Output, plain


def register(sub: argparse._SubParsersAction) -> None:
    log = sub.add_parser("log", help="inspect event logs (replay-based debugging)")
    cmds = log.add_subparsers(dest="log_cmd", required=True, metavar="COMMAND")
    p = cmds.add_parser("streams", help="the streams in the log")
    p.set_defaults(func=cmd_streams)
    p = cmds.add_parser("show", help="the events of a stream, one per line")
    p.add_argument("stream")
    p.add_argument("--from", dest="start", type=int, default=1, metavar="SEQ")
    p.add_argument("--to", dest="stop", type=int, default=None, metavar="SEQ")
    p.add_argument("-f", "--follow", action="store_true",
                   help="then print each new event as it is appended (until Ctrl-C or --to)")
    p.set_defaults(func=cmd_show)
    p = cmds.add_parser("state", help="the state rebuilt by replay up to SEQ")
    p.add_argument("stream")
    p.add_argument("--at", type=int, default=None, metavar="SEQ")
    p.set_defaults(func=cmd_state)
    p = cmds.add_parser("diff", help="what changed in the state between two offsets")
    p.add_argument("stream")
    p.add_argument("seq_a", type=int)
    p.add_argument("seq_b", type=int)
    p.set_defaults(func=cmd_diff)
    p = cmds.add_parser("check", help="replay every prefix against the invariants; the snapshot must "
                                      "restore to the state replayed up to its offset")
    p.add_argument("stream")
    p.set_defaults(func=cmd_check)


def _open(args: argparse.Namespace):
    return open_log(args.log_url)


def _checked(log: Any, stream: str, **offsets: int | None) -> int:
    """The head of ``stream``; :class:`CliError` if the log has no such stream or an offset
    (``name=value``, None: not given) lies outside ``0..head``."""
    if stream not in log.streams():
        known = ", ".join(sorted(log.streams())) or "none"
        raise CliError(f"no stream {stream!r} in the log {shown_log_url(log.url)} (streams: {known})")
    head = log.head(stream)
    for name, value in offsets.items():
        if value is not None and not 0 <= value <= head:
            raise CliError(f"{name} {value}: stream {stream!r} has offsets 0 to {head}")
    return head


def cmd_streams(args: argparse.Namespace, out: Output) -> int:
    with _open(args) as log:
        rows = [{"stream": s, "head": log.head(s), "epoch": log.epoch(s)} for s in log.streams()]
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
    with _open(args) as log:
        _checked(log, args.stream, **{"--from": args.start, "--to": args.stop})
        records = log.read(args.stream, args.start, args.stop)
        if args.follow:
            return _follow(args, out, log, records, redact)
        if out.json:
            out.emit([_record(r, redact(r.type, r.body)) for r in records])
        else:
            for r in records:
                _show_line(out, r, redact(r.type, r.body))
    return 0


def _show_line(out: Output, r: Any, body: Any) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.timestamp)) + f".{int(r.timestamp * 1000) % 1000:03d}"
    out.line(f"{r.offset:>8} e{r.epoch} {stamp} {r.type} {plain(body)}")


def _follow(args: argparse.Namespace, out: Output, log: Any, records: Any, redact: Any) -> int:
    """``log show --follow``: the events so far, then each new one as it is appended, one per
    line (one JSON document per line with ``--json``); ends at ``--to`` or on Ctrl-C."""
    last = args.start - 1
    try:
        while True:
            for r in records:
                if args.stop is not None and r.offset > args.stop:
                    return 0
                if out.json:
                    out.emit(_record(r, redact(r.type, r.body)))
                else:
                    _show_line(out, r, redact(r.type, r.body))
                last = r.offset
            out.stream.flush()
            if args.stop is not None and last >= args.stop:
                return 0
            records = log.tail(args.stream, last, timeout=1.0)
    except KeyboardInterrupt:  # the way a follow ends
        return 0


def _record(r: Any, body: Any) -> dict[str, Any]:
    return {
        "offset": r.offset, "epoch": r.epoch, "timestamp": r.timestamp,
        "type": r.type, "version": r.version, "body": plain(body, as_text=False),
    }


def _state_at(args: argparse.Namespace, upto: int | None) -> tuple[Any, Any]:
    component = component_for(args.stream)
    with _open(args) as log:
        _checked(log, args.stream, **{"--at": upto})
        state = fold(component, log.read(args.stream, 1, upto))
    return component, state


def cmd_state(args: argparse.Namespace, out: Output) -> int:
    component, state = _state_at(args, args.at)
    redact = _redactor(args.stream, "redact_snapshot")
    out.emit(plain(redact(component.snapshot(state)), as_text=False))
    return 0


def diff(a: Any, b: Any, path: str = "") -> list[dict[str, Any]]:
    """Paths whose values differ between two plain-data trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        changes: list[dict[str, Any]] = []
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a:
                changes.append({"path": sub, "change": "added", "after": b[key]})
            elif key not in b:
                changes.append({"path": sub, "change": "removed", "before": a[key]})
            else:
                changes += diff(a[key], b[key], sub)
        return changes
    if a != b:
        return [{"path": path or "(root)", "change": "changed", "before": a, "after": b}]
    return []


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    lo, hi = sorted((args.seq_a, args.seq_b))
    component = component_for(args.stream)
    with _open(args) as log:
        _checked(log, args.stream, **{"SEQ_A": args.seq_a, "SEQ_B": args.seq_b})
        redact = _redactor(args.stream, "redact_snapshot")
        before = fold(component, log.read(args.stream, 1, lo))
        before_data = plain(redact(component.snapshot(before)), as_text=False)
        after = fold(component, log.read(args.stream, lo + 1, hi), before)
        after_data = plain(redact(component.snapshot(after)), as_text=False)
    changes = diff(before_data, after_data)
    if out.json:
        out.emit(changes)
    else:
        for c in changes:
            out.line(f"{c['change']:>8} {c['path']}: {plain(c.get('before'))} -> {plain(c.get('after'))}")
        if not changes:
            out.line(f"no change between {lo} and {hi}")
    return 0


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    component = component_for(args.stream)
    state = component.initial_state()
    checked = 0
    with _open(args) as log:
        _checked(log, args.stream)
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
        for record in log.read(args.stream):
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
        out.line(f"{args.stream}: {checked} events replayed, every invariant held")
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
        restored = component.restore(msgpack.unpackb(snap.data, raw=False, strict_map_key=False))
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
