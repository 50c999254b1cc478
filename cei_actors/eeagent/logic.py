"""The EEAgent's rules: what a launch, a termination, an exit or a cleanup does to the table.

Pure: each function takes the :class:`~.state.ProcessTable`, its input and the time
(``now``: the timer clock SIGKILL deadlines use; ``stamp``: the clock of ``started_at`` /
``ended_at``), changes the table and returns the actions the caller must carry out:

- :class:`Start` — start the record's command; answer with :func:`started` or
  :func:`start_failed` (a caller that checks the command first may fail it there);
- :class:`Signal` — signal the record's process group (SIGTERM: a termination whose SIGKILL
  is due at ``record.kill_at``, see :func:`kill_due`; SIGKILL);
- :class:`Forgotten` — the record left the table (its output files may go, nothing watches
  it any more).

Writing the journal is the table's :attr:`~.state.ProcessTable.dirty` set; a heartbeat is due
whenever a call reports a change. The rules (the same for real and simulated agents):

- **Keys** are ``(upid, round)``. The same key again is a duplicate (nothing happens); a
  round below the upid's newest is stale (answered with the newest record).
- **Slots**: each upid with a live record holds one slot; a launch is REJECTED when the
  other upids fill ``slots``.
- **Supersede**: a higher round replaces the upid's older round. A terminal or PENDING older
  round is forgotten; a running one is marked superseded, terminated, and forgotten once it
  has ended. The new round waits PENDING for the older round still ending (whether the
  newest one or one an earlier, failed, round superseded), in its slot, and starts at that
  moment: never two processes of one upid at once, never more processes than slots. A
  superseded round never runs again.
- **Exits**: an exit settles only the live record of that key *and pid*; any other (an
  unknown key, an old pid, a record already ended) is ignored. Code 0 → EXITED, anything else
  FAILED, anything after a termination TERMINATED.
- **Cleanup** forgets a terminal record; a live one is refused, an unknown key is no-op.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import states as st
from .state import Key, ProcessTable, Record

DOWN_MSG = "exited while agent was down"
#: The message of a process the reaper stopped because the lease ran out.
FENCED_MSG = "the lease ran out: stopped by the reaper"
NOT_STARTED_MSG = "terminated before it started"
#: Added to the message of a process stopped because its node is going away.
NODE_MSG = "stopped with its node"


@dataclass(frozen=True, slots=True)
class Start:
    """Start ``record``'s command."""

    record: Record


@dataclass(frozen=True, slots=True)
class Signal:
    """Send ``sig`` to ``record``'s process group."""

    record: Record
    sig: int


@dataclass(frozen=True, slots=True)
class Forgotten:
    """``record`` left the table."""

    record: Record


Action = Start | Signal | Forgotten


class Launched(NamedTuple):
    """What :func:`launch` did: the record to answer with, whether it is new, the actions."""

    record: Record
    new: bool
    actions: list[Action]


def describe(code: int | None) -> str:
    """``exit code N``, ``killed by signal NAME`` or ``exit status unknown``."""
    if code is None:
        return "exit status unknown"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"killed by signal {name}"


def is_str_seq(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and all(isinstance(a, str) for a in value)
    )


def validate_request(command: object, env: object, cwd: object) -> str | None:
    """A message for a malformed launch request, or None."""
    if not is_str_seq(command) or not command:
        return "command must be a non-empty list of strings"
    if any("\0" in a for a in command):  # type: ignore[union-attr]
        return "command contains a NUL character"
    if env is not None:
        if not isinstance(env, Mapping):
            return "env must be a mapping of strings"
        for k, v in env.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k or "=" in k:
                return f"bad environment entry {k!r}"
            if "\0" in k or "\0" in v:
                return f"environment entry {k!r} contains a NUL character"
    if cwd is not None and not isinstance(cwd, str):
        return "cwd must be a string"
    return None


# ---------------------------------------------------------------------------------------------


def launch(
    table: ProcessTable,
    upid: str,
    round_: int,
    command: Any,
    env: Any = None,
    cwd: Any = None,
    *,
    slots: int,
    grace: float,
    now: float,
    stamp: float,
) -> Launched:
    """Launch ``(upid, round_)`` (see the module doc for the rules); ``grace``: SIGTERM to
    SIGKILL of an older round this one supersedes. A malformed request is FAILED, a launch
    with no free slot REJECTED: both are new terminal records."""
    cur = table.records.get((upid, round_))
    if cur is not None:
        return Launched(cur, False, [])
    newest = table.newest(upid)
    if newest is not None and newest.round > round_:
        return Launched(newest, False, [])
    out: list[Action] = []
    rec = table.make(
        upid=upid,
        round=round_,
        state=st.PENDING,
        command=tuple(command) if is_str_seq(command) else (),
        env=dict(env) if isinstance(env, Mapping) else None,
        cwd=cwd if isinstance(cwd, str) else None,
    )
    problem = validate_request(command, env, cwd)
    live = table.live_count()
    if table.holds_slot(upid):
        live -= 1  # the older round's slot passes to the new round
    if problem:
        end(table, rec, st.FAILED, problem, stamp)
    elif live >= slots:
        end(table, rec, st.REJECTED, f"no free slot: {live} of {slots} slots in use", stamp)
    if newest is not None:
        # A newer round makes the older one stale, whatever becomes of the new one.
        if newest.state == st.PENDING or not st.is_live(newest.state):
            out += forget(table, newest)  # never started, or over
        else:
            newest.superseded = True
            table.touch(newest)
            if newest.state == st.RUNNING:
                out += _terminate(table, newest, grace, now)
    if rec.state == st.PENDING:
        # wait for the older round still ending (at most one: each new round waits for it)
        for old in table.by_upid.get(upid, {}).values():
            if old.superseded and st.is_live(old.state):
                rec.waiting_for = old.key
    table.insert(rec)
    table.touch(rec)
    if rec.state == st.PENDING and rec.waiting_for is None:
        out.append(start(rec))
    return Launched(rec, True, out)


def terminate(
    table: ProcessTable, key: Key, grace: float, *, now: float, stamp: float
) -> tuple[Record | None, bool, list[Action]]:
    """Terminate ``key``: (its record or None if unknown, changed?, actions). RUNNING goes
    TERMINATING (SIGTERM, SIGKILL ``grace`` later); PENDING ends TERMINATED without starting;
    TERMINATING or terminal is left alone."""
    rec = table.records.get(key)
    if rec is None:
        return None, False, []
    if rec.state == st.PENDING:
        end(table, rec, st.TERMINATED, NOT_STARTED_MSG, stamp)
        return rec, True, []
    if rec.state == st.RUNNING:
        return rec, True, _terminate(table, rec, grace, now)
    return rec, False, []


def terminate_all(
    table: ProcessTable, grace: float, *, now: float, stamp: float, cause: str | None = None
) -> list[Action]:
    """Terminate every live record; a SIGKILL already due later comes within ``grace``.
    ``cause`` (:data:`~.states.CAUSE_NODE`: the node is going away) marks the records this
    stops, so their end is reported as not their own; one already TERMINATING (asked for by
    the PD) stays unmarked."""
    out: list[Action] = []
    for rec in list(table.records.values()):
        if rec.state == st.PENDING:
            rec.cause = cause
            end(table, rec, st.TERMINATED, _with_cause(NOT_STARTED_MSG, rec), stamp)
        elif rec.state == st.RUNNING:
            rec.cause = cause
            out += _terminate(table, rec, grace, now)
        elif rec.state == st.TERMINATING and rec.kill_at is not None:
            rec.kill_at = min(rec.kill_at, now + grace)
    return out


def cleanup(table: ProcessTable, key: Key) -> tuple[bool | str, list[Action]]:
    """Forget a terminal record: (True; False if unknown; or why not, for a live one)."""
    rec = table.records.get(key)
    if rec is None:
        return False, []
    if not st.is_terminal(rec.state):
        return f"process {key[0]!r} round {key[1]} is {rec.state}; terminate it first", []
    return True, forget(table, rec)


def start(rec: Record) -> Start:
    """Ask for ``rec``'s start."""
    rec.starting = True
    return Start(rec)


def started(
    table: ProcessTable, rec: Record, pid: int, start_ticks: int | None, stamp: float
) -> None:
    """``rec``'s command runs as ``pid``."""
    table.touch(rec)
    rec.pid = pid
    rec.start_ticks = start_ticks
    rec.state = st.RUNNING
    rec.msg = ""
    rec.starting = False
    rec.started_at = stamp


def start_failed(table: ProcessTable, rec: Record, msg: str, stamp: float) -> None:
    """``rec``'s command could not start."""
    end(table, rec, st.FAILED, msg, stamp)


def exit_record(table: ProcessTable, key: Key | None, pid: object) -> Record | None:
    """The live record an exit of ``pid`` as ``key`` settles, or None (then it is ignored)."""
    rec = table.records.get(key) if key is not None else None
    if rec is None or rec.pid != pid or not st.is_live(rec.state):
        return None
    return rec


def exited(
    table: ProcessTable, key: Key, pid: object, code: int | None, stamp: float
) -> tuple[Record | None, list[Action]]:
    """The process ``pid`` of ``key`` ended with ``code``: (the record settled or None, actions)."""
    rec = exit_record(table, key, pid)
    if rec is None:
        return None, []
    return rec, settle(table, rec, code, stamp=stamp)


def settle(
    table: ProcessTable,
    rec: Record,
    code: int | None,
    *,
    stamp: float,
    ended_at: float | None = None,
    while_down: bool = False,
    fenced: bool = False,
    node: bool = False,
) -> list[Action]:
    """``rec``'s process has ended with ``code`` (None: unknown). ``while_down``: while no
    agent ran (``ended_at``: when); ``fenced``: stopped because the lease ran out; ``node``:
    stopped because its node is going away (the reaper's SIGTERM), which marks a record not
    already TERMINATING with :data:`~.states.CAUSE_NODE`. A superseded record is forgotten
    and the round waiting for it starts."""
    if while_down and ended_at is not None:
        rec.ended_at = float(ended_at)
    rec.exit_code = code
    if node and rec.cause is None and rec.state != st.TERMINATING:
        rec.cause = st.CAUSE_NODE
    down = f" ({DOWN_MSG})" if while_down else ""
    if rec.cause == st.CAUSE_NODE:
        down += f" ({NODE_MSG})"
    if rec.state == st.TERMINATING:
        how = f"SIGKILL after {rec.grace:g} s grace" if rec.killed else describe(code)
        end(table, rec, st.TERMINATED, f"terminated: {how}{down}", stamp)
    elif fenced:
        end(table, rec, st.TERMINATED, f"{FENCED_MSG} ({describe(code)}){down}", stamp)
    elif code is None:
        if while_down:
            end(table, rec, st.FAILED, f"{DOWN_MSG}; exit status unknown", stamp)
        else:
            end(table, rec, st.FAILED, "exit status unknown (its reaper had died)", stamp)
    elif code == 0:
        end(table, rec, st.EXITED, f"{describe(code)}{down}", stamp)
    else:
        end(table, rec, st.FAILED, f"{describe(code)}{down}", stamp)
    if not rec.superseded:
        return []
    out = forget(table, rec)
    for succ in list(table.by_upid.get(rec.upid, {}).values()):
        if succ.waiting_for == rec.key and succ.state == st.PENDING:
            succ.waiting_for = None
            table.touch(succ)
            out.append(start(succ))
    return out


def kill_due(table: ProcessTable, records: Iterable[Record], now: float) -> list[Action]:
    """SIGKILL those of ``records`` still TERMINATING whose grace is over at ``now``."""
    out: list[Action] = []
    for rec in records:
        if (
            rec.state == st.TERMINATING
            and rec.kill_at is not None
            and rec.kill_at <= now
            and rec.pid is not None
        ):
            rec.kill_at = None
            rec.kill_at_wall = None
            rec.killed = True
            table.touch(rec)
            out.append(Signal(rec, signal.SIGKILL))
    return out


def end(table: ProcessTable, rec: Record, state: str, msg: str, stamp: float) -> None:
    """``rec`` is over: ``state`` (terminal) with ``msg``."""
    table.touch(rec)
    rec.state = state
    rec.msg = msg
    rec.kill_at = None
    rec.kill_at_wall = None
    rec.starting = False
    rec.waiting_for = None
    table.ended = True
    if rec.ended_at is None:
        rec.ended_at = stamp


def _with_cause(msg: str, rec: Record) -> str:
    return f"{msg} ({NODE_MSG})" if rec.cause == st.CAUSE_NODE else msg


def forget(table: ProcessTable, rec: Record) -> list[Action]:
    """Drop ``rec`` from the table."""
    rec.starting = False
    return [Forgotten(rec)] if table.remove(rec) else []


def _terminate(table: ProcessTable, rec: Record, grace: float, now: float) -> list[Action]:
    table.touch(rec)
    rec.state = st.TERMINATING
    rec.grace = grace
    rec.kill_at = now + grace
    return [Signal(rec, signal.SIGTERM)]
