"""Replay a recorded log against the current code, as Temporal's replayer does.

``verify`` re-folds every stream from offset 1 with the current code (invariants after every
event, stored snapshots against the fold) and, where the log holds the inputs its decisions
came from (a runner with ``record_inputs``, docs/decisions.md DBG6), re-runs each decision,
``decide(state before, message, recorded time and seed)``, and compares its events with the
recorded ones as plain data. The first decision the current code makes differently is
reported with its offset, input, expected and got events; that stream stops there (its state
has diverged)::

    with Replay("sqlite:///home/log.sqlite", configs=...) as r:
        reports = verify(r)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..eventlog import CorruptLog, Record, Snapshot
from ..plaindata import plain
from ..runtime.core import Component, Context, Decision
from ..runtime.runner import decide_one, decode_input
from .reader import Replay


@dataclass
class Difference:
    """The first decision the current code makes differently from the recorded one."""

    stream: str
    offset: int  #: the first event of the recorded decision (or the record it came before)
    input: Any  #: the message as plain data (``{"type": ..., "fields": ...}``), or "recovered"
    expected: list[dict[str, Any]]  #: the recorded events: type, version, body
    got: list[dict[str, Any]]  #: the current code's events
    reply: Any = None  #: the current code's reply when it differs by refusing or failing

    def text(self) -> str:
        what = self.input if isinstance(self.input, str) else self.input.get("type")
        lines = [f"{self.stream}: offset {self.offset}: the current code decides {what} differently"]
        lines.append(f"  input:    {plain(self.input)}")
        lines.append(f"  expected: {plain(self.expected)}")
        lines.append(f"  got:      {plain(self.got)}")
        if self.reply is not None:
            lines.append(f"  reply:    {plain(self.reply)}")
        return "\n".join(lines)


@dataclass
class StreamReport:
    """What verifying one stream found."""

    stream: str
    events: int = 0  #: events re-folded
    decisions: int = 0  #: recorded decisions re-run and found equal
    unchecked: int = 0  #: events folded without a decision check (no input, or after a gap)
    recorded: bool = False  #: the stream holds recorded inputs at all
    difference: Difference | None = None
    broken: dict[str, Any] | None = None  #: first invariant broken: offset, type, broken
    snapshots: dict[int, str | None] = field(default_factory=dict)  #: offset -> problem (None: sound)

    @property
    def ok(self) -> bool:
        return (self.difference is None and self.broken is None
                and all(p is None for p in self.snapshots.values()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream, "ok": self.ok, "events": self.events, "decisions": self.decisions,
            "unchecked": self.unchecked, "recorded": self.recorded,
            "difference": None if self.difference is None else plain(self.difference.__dict__, as_text=False),
            "broken": self.broken,
            "snapshots": [{"offset": o, "ok": p is None, "problem": p} for o, p in sorted(self.snapshots.items())],
        }

    def summary(self) -> str:
        head = f"{self.stream}: {self.events} events re-folded"
        if not self.events:
            return f"{self.stream}: no events"
        if not self.recorded:
            return head + "; decisions cannot be checked: the log holds no recorded inputs (record_inputs off)"
        text = f"{head}, {self.decisions} recorded decisions re-run"
        if self.unchecked:
            text += f", {self.unchecked} events without a checkable input"
        return text + (" and every one decided the same" if self.difference is None else "")


def verify(replay: Replay, streams: list[str] | None = None,
           components: dict[str, Component[Any]] | None = None) -> list[StreamReport]:
    """Verify each of ``streams`` (default: every stream of the log) against the current code;
    ``components`` (stream -> component) replace the ones built from ``replay``'s configs."""
    chosen = streams if streams is not None else replay.streams()
    return [verify_stream(replay, s, (components or {}).get(s)) for s in chosen]


def _normal(data: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(data, use_bin_type=True), raw=False, strict_map_key=False)


class _Verifier:
    def __init__(self, replay: Replay, stream: str, component: Component[Any] | None = None) -> None:
        self.replay, self.stream = replay, stream
        self.component: Component[Any] = component if component is not None else replay.component(stream)
        self.report = StreamReport(stream)
        self.state = self.component.initial_state()
        self.snaps: dict[int, Snapshot] = {}
        self.folded: dict[int, Any] = {}  # snapshot offset -> the fold's snapshot data there
        self.checking = False  # inside a recorded leadership (after its ``recovered``), no gap since

    def load_snapshots(self) -> None:
        log = self.replay.log
        for offset in log.snapshots(self.stream):
            try:
                snap = log.load_snapshot(self.stream, offset)
            except CorruptLog as exc:
                self.report.snapshots[offset] = f"snapshot does not decode: {exc}"
                continue
            if snap is not None:
                self.snaps[offset] = snap
        if 0 in self.snaps:
            self.folded[0] = _normal(self.component.snapshot(self.state))

    def after(self, record: Record) -> bool:
        """Checks after ``record`` is applied; False once an invariant is broken."""
        self.report.events += 1
        if record.offset in self.snaps:
            self.folded[record.offset] = _normal(self.component.snapshot(self.state))
        broken = self.component.invariants(self.state)
        if broken:
            self.report.broken = {"offset": record.offset, "type": record.type, "broken": broken}
            return False
        return True

    def fold(self, record: Record) -> bool:
        try:
            self.state = self.component.apply(self.state, self.component.registry.from_record(record))
        except CorruptLog:
            raise
        except Exception as exc:  # noqa: BLE001 - a body the current fold cannot take
            raise CorruptLog(self.stream, record.offset,
                             f"{record.type} does not apply: {type(exc).__name__}: {exc}") from None
        return self.after(record)

    def fresh(self) -> None:
        """The state a new leader recovers: its leader-local scratch state starts empty."""
        data = self.component.snapshot(self.state)
        if data is not None:
            self.state = self.component.restore(_normal(data))

    def event_plain(self, event: Any, now: float) -> dict[str, Any]:
        p = self.component.registry.to_pending(event, now)
        return {"type": p.type, "version": p.version, "body": _normal(p.body)}

    def recorded_plain(self, record: Record) -> dict[str, Any]:
        return self.event_plain(self.component.registry.from_record(record), record.timestamp)

    def run(self) -> StreamReport:
        self.load_snapshots()
        it = self.replay.records(self.stream)
        for record in it:
            if record.input is None:
                if self.report.recorded:
                    self.report.unchecked += 1
                if not self.fold(record):
                    break
                continue
            self.report.recorded = True
            if not self.inputs(record, it):
                break
        self.check_snapshots()
        return self.report

    def inputs(self, record: Record, it: Iterator[Record]) -> bool:
        """Re-run the inputs ``record`` carries; False once a difference or a break is found."""
        entries = self.unpack(record)
        for k, entry in enumerate(entries):
            last = k == len(entries) - 1
            n = entry.get("n", 0) if "gap" not in entry else 0
            if last != (n > 0):
                raise CorruptLog(self.stream, record.offset, "recorded inputs do not match the events")
            group = [record] if last else []
            for _ in range(n - 1):
                nxt = next(it, None)
                if nxt is None:
                    raise CorruptLog(self.stream, record.offset, f"recorded input names {n} events; the stream ends")
                group.append(nxt)
            if "gap" in entry:
                self.checking = False
                continue
            if "skip" in entry:  # a message holding secrets: only its events are stored
                self.report.unchecked += len(group)
                if not all(self.fold(r) for r in group):
                    return False
                continue
            if entry.get("m") is None:
                self.fresh()
                self.checking = True
            if not self.checking:
                self.report.unchecked += len(group)
                if not all(self.fold(r) for r in group):
                    return False
                continue
            if not self.decide(entry, record, group):
                return False
        return True

    def unpack(self, record: Record) -> list[dict[str, Any]]:
        try:
            entries = [msgpack.unpackb(b, raw=False, strict_map_key=False) for b in record.input]
        except Exception as exc:  # noqa: BLE001 - msgpack raises several types
            raise CorruptLog(self.stream, record.offset, f"recorded inputs undecodable: {exc}") from None
        if not entries or not all(isinstance(e, dict) for e in entries):
            raise CorruptLog(self.stream, record.offset, "recorded inputs have the wrong shape")
        return entries

    def decide(self, entry: dict[str, Any], record: Record, group: list[Record]) -> bool:
        ctx = Context(float(entry["t"]), seed=entry.get("s"))
        shown: Any = "recovered"
        decision: Decision | None = None
        reply: Any = None
        if entry["m"] is None:
            try:
                decision = self.component.recovered(self.state, ctx)
            except Exception as exc:  # noqa: BLE001 - the finding
                reply = f"recovered failed: {type(exc).__name__}: {exc}"
        else:
            raw = entry["m"]
            shown = {"type": str(raw[1]).rpartition(":")[2] if isinstance(raw, list) and len(raw) > 2 else "?",
                     "fields": raw[2] if isinstance(raw, list) and len(raw) > 2 else raw}
            try:
                message = decode_input(raw)
            except ValueError as exc:
                reply = str(exc)
            else:
                decision = decide_one(self.component, self.state, message, ctx, self.stream, log_failures=False)
        expected = [self.recorded_plain(r) for r in group]
        got: list[dict[str, Any]] = []
        if decision is not None:
            try:
                got = [self.event_plain(e, ctx.now) for e in decision.events]
            except Exception as exc:  # noqa: BLE001 - an event the current code cannot store
                reply = f"unstorable event: {type(exc).__name__}: {exc}"
            if decision.reply is not None and getattr(decision.reply, "code", None) is not None:
                reply = plain(decision.reply.__dict__, as_text=False)
        if got != expected or (reply is not None and decision is None):
            offset = group[0].offset if group else record.offset
            self.report.difference = Difference(self.stream, offset, shown, expected, got, reply)
            return False
        assert decision is not None
        self.report.decisions += 1
        for r, event in zip(group, decision.events, strict=True):
            self.state = self.component.apply(self.state, event)
            if not self.after(r):
                return False
        return True

    def check_snapshots(self) -> None:
        from ..cli.logcmds import check_snapshot

        head = self.replay.head(self.stream)
        for offset, snap in self.snaps.items():
            if offset in self.folded:
                self.report.snapshots[offset] = check_snapshot(self.component, snap, self.folded[offset], head)


def verify_stream(replay: Replay, stream: str, component: Component[Any] | None = None) -> StreamReport:
    """Verify one stream (see the module docstring) with ``component`` (default: the one
    ``replay`` builds for it); damage raises :class:`CorruptLog`."""
    return _Verifier(replay, stream, component).run()


__all__ = ["Difference", "StreamReport", "verify", "verify_stream"]
