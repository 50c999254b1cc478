"""The EEAgent's process table: records keyed by ``(upid, round)`` and their indices.

:class:`ProcessTable` holds the records and keeps in step, on every change, what the agent
asks of it often: the records of each upid, the live records that hold a slot, the dump
(sorted rows ``{upid, round, state, msg, exit_code, pid}`` and ``cause`` if set, rebuilt only where a record
changed) and the keys changed since the journal was last written (:attr:`ProcessTable.dirty`).
It does no I/O and reads no clock; the rules that change it are in :mod:`.logic`. The real
agent (:class:`~cei_actors.eeagent.supervisor.ProcessSupervisor`) and the simulated one
(:class:`~cei_actors.sim.system.SimAgent`) both keep one.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import states as st

Key = tuple[str, int]


@dataclass(eq=False)
class Record:
    """One process of the table. ``pid`` is the command's pid (= its process group id);
    ``kill_at`` is when an unanswered SIGTERM becomes a SIGKILL (the caller's timer clock);
    ``starting``: a start was asked for and not yet answered."""

    upid: str
    round: int
    state: str
    msg: str = ""
    exit_code: int | None = None
    pid: int | None = None
    command: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    start_ticks: int | None = None
    kill_at_wall: float | None = None
    grace: float | None = None
    killed: bool = False
    superseded: bool = False
    waiting_for: Key | None = None
    #: why it ended if not on its own (:data:`~.states.CAUSE_NODE`), else None
    cause: str | None = None
    # not persisted
    kill_at: float | None = None
    starting: bool = False

    @property
    def key(self) -> Key:
        return (self.upid, self.round)

    def row(self) -> dict[str, Any]:
        """The dump entry: ``{upid, round, state, msg, exit_code, pid}``, and ``cause``
        when it is set."""
        row = {
            "upid": self.upid,
            "round": self.round,
            "state": self.state,
            "msg": self.msg,
            "exit_code": self.exit_code,
            "pid": self.pid,
        }
        if self.cause is not None:
            row["cause"] = self.cause
        return row

    def to_json(self) -> dict[str, Any]:
        """The persisted fields (the journal's and the table file's format)."""
        return {
            "upid": self.upid,
            "round": self.round,
            "state": self.state,
            "msg": self.msg,
            "exit_code": self.exit_code,
            "pid": self.pid,
            "command": list(self.command),
            "env": self.env,
            "cwd": self.cwd,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "start_ticks": self.start_ticks,
            "kill_at_wall": self.kill_at_wall,
            "grace": self.grace,
            "killed": self.killed,
            "superseded": self.superseded,
            "waiting_for": list(self.waiting_for) if self.waiting_for else None,
            "cause": self.cause,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Any:
        """A record (of this class) from :meth:`to_json`'s output."""
        wf = d.get("waiting_for")
        return cls(
            upid=d["upid"],
            round=int(d["round"]),
            state=st.normalize(d["state"]),
            msg=d.get("msg") or "",
            exit_code=d.get("exit_code"),
            pid=d.get("pid"),
            command=tuple(d.get("command") or ()),
            env=d.get("env"),
            cwd=d.get("cwd"),
            started_at=d.get("started_at"),
            ended_at=d.get("ended_at"),
            start_ticks=d.get("start_ticks"),
            kill_at_wall=d.get("kill_at_wall"),
            grace=d.get("grace"),
            killed=bool(d.get("killed")),
            superseded=bool(d.get("superseded")),
            waiting_for=(str(wf[0]), int(wf[1])) if wf else None,
            cause=d.get("cause") if isinstance(d.get("cause"), str) else None,
        )


class ProcessTable:
    """The records and their indices. ``make`` builds the new records :mod:`.logic` adds
    (``make(upid=, round=, state=, command=, env=, cwd=)``; default :class:`Record`): the
    real agent's records carry more (its watch state, its output files)."""

    def __init__(self, make: Callable[..., Record] = Record) -> None:
        self.make = make
        self.records: dict[Key, Record] = {}
        self.by_upid: dict[str, dict[int, Record]] = {}  # upid -> round -> record
        #: keys changed (or removed) since the journal was last written; the caller clears it
        self.dirty: set[Key] = set()
        #: some record reached a terminal state since the caller last cleared this
        self.ended = False
        self._order: list[Key] = []  # sorted keys
        self._rows: list[dict[str, Any] | None] = []  # their dump rows, in the same order
        self._stale: set[Key] = set()  # keys whose rows must be built again
        self._live: set[Key] = set()  # live records, as of the last count
        self._live_upids: dict[str, int] = {}  # upid -> its live records, as of the last count
        self._recount: set[Key] = set()  # keys touched since the last count

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records.values())

    def get(self, key: Key) -> Record | None:
        return self.records.get(key)

    def insert(self, rec: Record) -> None:
        """Add ``rec`` (its key must be new)."""
        key = rec.key
        self.records[key] = rec
        self.by_upid.setdefault(rec.upid, {})[rec.round] = rec
        i = bisect.bisect_left(self._order, key)
        self._order.insert(i, key)
        self._rows.insert(i, None)
        self._stale.add(key)
        self._recount.add(key)

    def touch(self, rec: Record) -> None:
        """``rec`` changed: its row, its slot and the journal follow."""
        key = rec.key
        self.dirty.add(key)
        self._stale.add(key)
        self._recount.add(key)

    def remove(self, rec: Record) -> bool:
        """Drop ``rec``; False if it was not the table's record for its key."""
        key = rec.key
        if self.records.get(key) is not rec:
            return False
        del self.records[key]
        i = bisect.bisect_left(self._order, key)
        if i < len(self._order) and self._order[i] == key:
            del self._order[i]
            del self._rows[i]
        mine = self.by_upid.get(rec.upid)
        if mine is not None and mine.get(rec.round) is rec:
            del mine[rec.round]
            if not mine:
                del self.by_upid[rec.upid]
        self.dirty.add(key)
        self._stale.discard(key)
        self._recount.add(key)
        return True

    def newest(self, upid: str) -> Record | None:
        """The upid's record with the highest round among those not superseded."""
        mine = [r for r in self.by_upid.get(upid, {}).values() if not r.superseded]
        return max(mine, key=lambda r: r.round) if mine else None

    def live_count(self) -> int:
        """Slots in use: the upids with a live record. A new round and the older round it
        waits for share one slot; so does an older round still ending after the round that
        superseded it failed (its process still runs)."""
        live, upids = self._live, self._live_upids
        for key in self._recount:
            rec = self.records.get(key)
            if rec is not None and rec.state in st.LIVE_STATES:
                if key not in live:
                    live.add(key)
                    upids[key[0]] = upids.get(key[0], 0) + 1
            elif key in live:
                live.discard(key)
                if upids[key[0]] == 1:
                    del upids[key[0]]
                else:
                    upids[key[0]] -= 1
        self._recount.clear()
        return len(upids)

    def holds_slot(self, upid: str) -> bool:
        """True if ``upid`` has a live record (as of the last :meth:`live_count`)."""
        return upid in self._live_upids

    def dump(self) -> list[dict[str, Any]]:
        """Every record's row, sorted by (upid, round) (fresh dicts)."""
        return list(map(dict.copy, self.rows()))

    def rows(self) -> list[dict[str, Any]]:
        """Every record's row, sorted by (upid, round): a new list of the table's own row
        dicts, which it never changes (a changed record gets a new row) and nobody may. For a
        reader in this process that only reads them (the simulator's heartbeat, SIM8);
        :meth:`dump` copies them."""
        order, rows = self._order, self._rows
        for key in self._stale:
            r = self.records.get(key)
            i = bisect.bisect_left(order, key)
            if r is not None and i < len(order) and order[i] == key:
                rows[i] = r.row()
        self._stale.clear()
        return list(rows)  # type: ignore[arg-type]

    def sorted(self) -> list[Record]:
        """Every record, sorted by (upid, round)."""
        return [self.records[k] for k in self._order]
