"""Runs real unix processes for the EEAgent and notices their exits at once.

:class:`ProcessSupervisor` is the node-side machinery without any actor around it. Processes
are keyed by ``(upid, round)``. Every command is started by one long-lived **reaper** process
per state directory (:mod:`cei_actors.eeagent.reaper`, a fork server in its own session, as
supervisord was for the original EEAgent): the reaper ``posix_spawn``\\ s the command itself (no
shell, no wrapper) as the leader of a new session and process group, is its parent, reaps it
the moment it exits (SIGCHLD), records the exit in ``<state_dir>/reaper.exits`` and then
reports it over a unix socket. The supervisor keeps the records, the slots, the rounds and the
timers; the reaper only spawns, signals on request, and reaps. The rules of the records (slots,
rounds, supersede, exit messages) are the pure core in :mod:`.state` and :mod:`.logic`, shared
with the simulator; this module is its shell: the reaper's wire client, the journal, recovery,
/proc identity, output retention and the watcher thread (docs/decisions.md EA9). An exit reaches ``on_change``
within about a millisecond, and an exit that happens while no agent runs is kept by the
reaper until a supervisor acknowledges it (see docs/decisions.md EA2).

Decisions (also in the docstrings below):

- **Environment**: the command gets a minimal safe base (``PATH``, ``HOME``, ``USER``,
  ``LOGNAME``, ``LANG``, ``LC_ALL``, ``LC_CTYPE``, ``TZ``, ``TMPDIR`` copied from the agent,
  ``PATH`` defaulting to ``os.defpath``; or ``base_env`` when given) with the launch's ``env``
  merged over it, then ``CEI_UPID``, ``CEI_ROUND`` and ``CEI_EEAGENT_DIR`` (the state dir; as
  supervisord sets ``SUPERVISOR_PROCESS_NAME``). Nothing else of the agent's environment
  (credentials!) leaks into commands. The markers are how the processes a reaper started are
  found when it dies before answering: adopted if a start is unanswered, killed if no record
  tracks them.
- **cwd** ``None`` means the agent's current directory (at launch time).
- **States**: a started command is RUNNING at once (the executable and cwd are checked before
  the start; if the reaper still cannot change into the cwd or exec the command, the launch is
  FAILED with the reason). PENDING is used only for a new round waiting for its older round to
  die. Exit code 0 → EXITED; non-zero, or a signal not sent by :meth:`terminate` → FAILED;
  anything ending after :meth:`terminate` → TERMINATED. ``exit_code`` is the exact status the
  reaper got from ``waitpid``: ``-N`` for death by signal ``N`` (no shell in between, so a
  command exiting with ``128+N`` is reported as that code).
- **The process group is the unit**: when a command ends, the reaper kills what it left running
  in its group before reaping it (as systemd's ``KillMode=control-group`` does), so a terminal
  record never leaves processes behind. ``terminate`` sends SIGTERM to the group, SIGKILL after
  the grace period; the reaper signals a group only while its leader is an unreaped child, so a
  reused pid is never signalled. A descendant that starts its own session or group (a daemon)
  escapes this, as it would escape supervisord; only cgroups could hold it.
- **Unknown keys**: :meth:`terminate` raises :class:`UnknownProcessError` (a ``KeyError``);
  :meth:`cleanup` of an unknown key is a no-op returning ``False`` (cleanups are repeated).
- **Output** goes to ``<state_dir>/proc/<name>.r<round>.out`` / ``.err`` (appended); cleanup
  keeps those files.
- **Agent restarts**: :meth:`close` (or an agent crash) leaves the reaper and the processes
  running; a new supervisor on the same state dir connects to the reaper, takes its live
  children and the exits it holds (true exit codes, ``DOWN_MSG`` in the message) and
  reconciles its records. If the reaper itself died, a new one is started; records whose
  processes still run (same pid, start time and boot) are watched as orphans with a pidfd and
  reported FAILED "exit status unknown" when they end; the commands' environment
  (``CEI_EEAGENT_DIR``) finds what the dead reaper started that no record tracks: a journaled
  start whose reply was lost adopts its process, anything else is killed. A reaper with no
  children and no supervisor exits after a few seconds; :meth:`shutdown` with ``kill`` stops
  it at once.
- **Lease** (decision EA8): after :meth:`set_lease` the reaper itself stops every command
  when the deadline passes unextended and refuses starts until a new one: the backstop of the
  agent's own fence when the agent is frozen. The lease is sent again to a new reaper. An exit
  the reaper caused that way settles a RUNNING record as TERMINATED ("the lease ran out"). The reaper's pid and start time are in the table (``read_table(dir)["reaper"]``)
  for sweepers.
- **On disk** (mode 0600, it holds the launch environments): ``<state_dir>/processes.json``,
  the whole table, replaced atomically with rename, plus ``processes.journal``, one JSON line
  per changed record appended (one ``write(2)``) after every change. The journal is folded into
  a new table every :data:`COMPACT_LINES` lines, at start and at :meth:`close`; each table names
  its journal generation, so a crash while compacting never applies a stale journal.
  :func:`read_table` reads both. No fsync: the table only matters across an agent restart on
  the same boot, and the page cache survives a process crash; after a reboot (a different
  ``boot_id``) every recorded process is known to be gone. ``journal=False`` rewrites the
  whole table on every change instead (the old way, for comparison). An exit is acknowledged
  to the reaper only after it is in the journal.
- **on_change** is called with the full :meth:`dump` after every state change (launch, exit,
  terminate), from the calling thread or from the watcher thread, with no supervisor lock
  held; not for :meth:`cleanup` (no state changes, the next heartbeat shows it gone). One
  thread delivers at a time, in order: a thread that finds a delivery running returns at once
  and the running delivery then hands over the newest snapshot, so an intermediate snapshot
  may be skipped (heartbeats are level-based, the newest one is what counts). A blocking
  callback delays other notices (and the watcher) but cannot deadlock :meth:`launch`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cei_actors.eeagent import logic
from cei_actors.eeagent import reaper as _reaper
from cei_actors.eeagent import states as st
from cei_actors.eeagent.logic import DOWN_MSG as DOWN_MSG  # re-exported
from cei_actors.eeagent.logic import FENCED_MSG as FENCED_MSG  # re-exported
from cei_actors.eeagent.output import read_chunk
from cei_actors.eeagent.retention import (
    DEFAULT_OUTPUT_RETENTION,
    OUTPUT_SUFFIXES,
    OutputRetention,
    output_stem,
)
from cei_actors.eeagent.state import Key, ProcessTable, Record
from cei_actors.runtime import procfs

log = logging.getLogger(__name__)

#: The reaper program, run as a file (``python -I -S reaper.py STATE_DIR IDLE``).
REAPER = os.path.abspath(_reaper.__file__)
TABLE_FILE = "processes.json"
JOURNAL_FILE = "processes.journal"
TABLE_VERSION = 1
#: The journal is folded into the table once it has this many lines (and 4 per record).
COMPACT_LINES = 2048
#: Variables copied from the agent's environment into the base environment of every command.
SAFE_ENV_KEYS: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    # the local driver's "VM" marker: the node ends every process that carries it (PV1)
    "CEI_LOCAL_VM",
)
#: Seconds a reaper with no children and no supervisor waits before it exits by itself.
REAPER_IDLE = 5.0
#: Seconds to wait for the reaper to start or to answer a request.
REAPER_TIMEOUT = 10.0

_RESTORE_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, name)
)
_POLL_INTERVAL = 0.2  # only for orphans when pidfd_open is unavailable
_RETRY_REAPER = 1.0  # least seconds between attempts to start a lost reaper
_REMOVE_BATCH = 64  # old output files removed per watcher pass (each pair ~0.1 ms)

#: Set in every command's environment: its upid, its round and the state dir of the agent
#: that started it (how processes a dead reaper started are found again).
UPID_ENV, ROUND_ENV, OWNER_ENV = "CEI_UPID", "CEI_ROUND", "CEI_EEAGENT_DIR"
OnChange = Callable[[list[dict[str, Any]]], None]

#: Reapers this process started, reaped (``waitpid``) once they exit.
_started_reapers: set[int] = set()
_started_lock = threading.Lock()


class SupervisorError(Exception):
    """Base class of the supervisor's errors."""


class UnknownProcessError(SupervisorError, KeyError):
    """No process with this (upid, round) is known."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class ProcessLiveError(SupervisorError, RuntimeError):
    """The operation needs a terminal process, and this one is still live."""


class StateDirLockedError(SupervisorError, RuntimeError):
    """Another supervisor holds the state directory."""


class SupervisorClosedError(SupervisorError, RuntimeError):
    """The supervisor was closed."""


class _ReaperLost(Exception):
    """The connection to the reaper broke (the reaper died or closed it)."""


class LaunchRequest(NamedTuple):
    """One item of :meth:`ProcessSupervisor.launch_many` (a tuple, a mapping with these keys,
    or any object with these attributes, such as a ``LaunchProcess`` message, also do)."""

    upid: str
    round: int
    command: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """One process as the supervisor sees it. ``pid`` is the command's pid = its process group id."""

    upid: str
    round: int
    state: str
    msg: str
    exit_code: int | None
    pid: int | None
    command: tuple[str, ...] = ()
    cwd: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    stdout_path: str | None = None
    stderr_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The dump entry: ``{upid, round, state, msg, exit_code, pid}``."""
        return {
            "upid": self.upid,
            "round": self.round,
            "state": self.state,
            "msg": self.msg,
            "exit_code": self.exit_code,
            "pid": self.pid,
        }


@dataclass(eq=False)
class _Record(Record):
    """A record of the table plus what only this shell knows of it."""

    exe: str | None = None
    orphan: bool = False  # not a child of the running reaper: watched by pidfd or poll
    pidfd: int | None = None
    poll_mode: bool = False
    watched: bool = False
    base: str = ""  # the output files' path without their suffix

    def info(self) -> ProcessInfo:
        return ProcessInfo(
            upid=self.upid,
            round=self.round,
            state=self.state,
            msg=self.msg,
            exit_code=self.exit_code,
            pid=self.pid,
            command=self.command,
            cwd=self.cwd,
            started_at=self.started_at,
            ended_at=self.ended_at,
            stdout_path=self.base + ".out" if self.pid is not None else None,
            stderr_path=self.base + ".err" if self.pid is not None else None,
        )


# ---------------------------------------------------------------------------------------------
# small OS helpers


def _marked_processes(state_dir: str) -> dict[int, Key]:
    """Live processes started for the supervisor of ``state_dir`` (by their environment's
    :data:`OWNER_ENV`), with their ``(upid, round)``: a scan of ``/proc``. Only session leaders
    count: every command leads its own session, its descendants inherit the environment."""
    owner = f"{OWNER_ENV}={state_dir}".encode()
    found: dict[int, Key] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            continue
        if owner not in entries:
            continue
        env = dict(e.decode(errors="replace").partition("=")[::2] for e in entries if b"=" in e)
        stat = procfs.stat(int(name))
        if stat is None or stat.dead or not env.get(ROUND_ENV, "").isdigit():
            continue
        if stat.session != int(name):
            continue
        found[int(name)] = (env.get(UPID_ENV, ""), int(env[ROUND_ENV]))
    return found


def _group_has_members(pgid: int) -> bool:
    """True if some process other than ``pgid`` itself is in process group ``pgid``."""
    for pid in procfs.pids():
        if pid != pgid:
            s = procfs.stat(pid)
            if s is not None and s.pgrp == pgid:
                return True
    return False


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_describe = logic.describe


def _file_stem(upid: str, round_: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", upid)[:60]
    digest = hashlib.sha256(upid.encode()).hexdigest()[:10]
    return f"{safe}-{digest}.r{round_}"


def _key_of(value: object) -> Key | None:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        return (value[0], value[1])
    return None


def _reap_started_reapers() -> None:
    """``waitpid`` the reapers this process started that have exited (no zombies left)."""
    with _started_lock:
        for pid in list(_started_reapers):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                _started_reapers.discard(pid)


def default_base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The minimal safe base environment taken from ``environ`` (default ``os.environ``)."""
    src = os.environ if environ is None else environ
    env = {k: src[k] for k in SAFE_ENV_KEYS if k in src}
    env.setdefault("PATH", os.defpath)
    return env


# ---------------------------------------------------------------------------------------------


class ProcessSupervisor:
    """Launches, watches, terminates and forgets real processes on this node.

    ``state_dir`` holds the process table, the output files and the reaper's socket and exits
    file; only one supervisor may use it at a time (an ``flock`` guards it:
    :class:`StateDirLockedError`). ``slots`` bounds the upids with a live
    (PENDING/RUNNING/TERMINATING) record (a new round and the older one it waits for share one). ``clock`` stamps ``started_at``/``ended_at`` (an exit that happened while no
    agent ran keeps the reaper's wall-clock time); grace timers use the monotonic clock.
    ``grace`` is the default SIGTERM→SIGKILL delay. ``python`` runs the reaper (default: this
    interpreter).

    Creating a supervisor connects to the state dir's reaper (starting one if none runs),
    re-adopts the processes still running and settles those that ended meanwhile.
    ``on_change`` is not called for that; send a heartbeat after creating. A reaper that cannot
    be started raises :class:`SupervisorError`. All methods are thread-safe.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        slots: int,
        *,
        clock: Callable[[], float] = time.time,
        on_change: OnChange | None = None,
        grace: float = 10.0,
        base_env: Mapping[str, str] | None = None,
        python: str | None = None,
        journal: bool = True,
        output_retention: float | None = DEFAULT_OUTPUT_RETENTION,
        _use_pidfd: bool | None = None,
    ) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ValueError(f"slots must be an int >= 0, got {slots!r}")
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self.state_dir = os.path.abspath(os.fspath(state_dir))
        self.slots = slots
        self.grace = float(grace)
        self._clock = clock
        self._on_change = on_change
        self._base_env = dict(base_env) if base_env is not None else default_base_env()
        self._python = python or sys.executable or shutil.which("python3") or "python3"
        self._journal = journal
        self._retention = OutputRetention(output_retention)
        self._use_pidfd = hasattr(os, "pidfd_open") if _use_pidfd is None else _use_pidfd
        self._proc_dir = os.path.join(self.state_dir, "proc")
        os.makedirs(self._proc_dir, exist_ok=True)

        self._lock_file = open(os.path.join(self.state_dir, "lock"), "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StateDirLockedError(f"{self.state_dir} is in use by another supervisor") from None

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # The pure process table (eeagent/state.py); its rules are in eeagent/logic.py.
        self._table = ProcessTable(make=self._make_record)
        self._records: dict[Key, _Record] = self._table.records  # type: ignore[assignment]
        self._timed: set[Key] = set()  # may have a SIGKILL deadline or be polled
        self._version = 0
        self._delivered = 0
        self._closed = False
        self._stopping = False
        self._boot_id = _reaper.boot_id()
        self._sweeps: list[int] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._dirty: set[Key] = self._table.dirty  # the changes the journal has not got
        self._jfd: int | None = None
        self._jgen = 0
        self._jlines = 0
        self._delivering = False
        # the reaper connection
        self._dirfd: int | None = None
        if _reaper.needs_dirfd(self.state_dir):
            self._dirfd = os.open(self.state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._conn: socket.socket | None = None
        self._poller: select.poll | None = None
        self._rbuf = b""
        self._next_id = 1
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: deque[dict[str, Any]] = deque()
        self._acks: list[int] = []
        self._spawn_q: list[_Record] = []
        self._reaper: dict[str, Any] | None = None
        self._reaper_stopping = False
        self._reaper_error = ""
        self._reaper_retry_at = 0.0
        self._lost = ""  # why the connection broke, until handled
        #: starts whose reply was lost with the reaper: PENDING until the reaper's file tells
        self._lost_starts: list[Key] = []
        self._attaching = False
        #: (deadline on time.monotonic, SIGTERM to SIGKILL grace) given to the reaper
        self._lease: tuple[float, float] | None = None

        try:
            with self._lock:
                self._load_locked()
                self._compact_locked()
                self._send_acks_locked()
                self._adopt_outputs_locked()
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._run, name="eeagent-watcher", daemon=True)
        self._thread.start()
        self._run_pending_sweeps()

    # -- public API ----------------------------------------------------------------------

    def launch(
        self,
        upid: str,
        round: int,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> ProcessInfo:
        """Start ``command`` as process ``(upid, round)``; return its record.

        The same key again is a duplicate: the current record is returned, nothing starts. A
        request with a lower round than the upid's newest record is stale and returns that
        newest record. A higher round replaces the upid's older round: a terminal older record
        is forgotten; a live one is terminated (SIGTERM, SIGKILL after ``grace``) and forgotten
        once it ended, and the new round waits PENDING until then (in the same slot; also for
        an older round still ending whose successor failed, EA10). With
        no free slot the record is REJECTED; a bad cwd or executable gives FAILED with a
        message. Neither raises; a malformed ``upid``/``round`` raises ``ValueError``.
        """
        return self.launch_many([LaunchRequest(upid, round, command, env, cwd)])[0]

    def launch_many(self, requests: Iterable[Any]) -> list[ProcessInfo]:
        """:meth:`launch` each request in order; one round trip to the reaper for all of them.

        Items are :class:`LaunchRequest`\\ s, ``(upid, round, command[, env[, cwd]])`` tuples,
        mappings with those keys, or objects with those attributes. The result, item by item,
        is what :meth:`launch` would have returned had the items been launched one after the
        other. A malformed ``upid``/``round`` in any item raises ``ValueError`` before anything
        starts.
        """
        items = [_as_request(r) for r in requests]
        for upid, round_, *_ in items:
            if not isinstance(upid, str) or not upid:
                raise ValueError(f"upid must be a non-empty string, got {upid!r}")
            if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
                raise ValueError(f"round must be an int >= 0, got {round_!r}")
        wake = False
        with self._lock:
            self._check_open()
            answer: list[_Record] = []
            for upid, round_, command, env, cwd in items:
                rec, superseding = self._launch_one_locked(upid, round_, command, env, cwd)
                answer.append(rec)
                wake = wake or superseding
            self._flush_spawns_locked()
            infos = [r.info() for r in answer]  # as started: exits read meanwhile come next
            self._pump_locked()
            self._changed_locked()
            self._commit_locked()
        if wake:
            self._wake()  # a superseded round has a new SIGKILL deadline
        self._deliver()
        return infos

    def terminate(self, upid: str, round: int, grace: float | None = None) -> ProcessInfo:
        """SIGTERM the process group, SIGKILL it after ``grace`` (default: the supervisor's).

        The record goes TERMINATING and, once the process is gone, TERMINATED whatever its exit
        code. A terminal or already TERMINATING process is left alone (no-op). A PENDING one
        (waiting for its older round) becomes TERMINATED without starting. An unknown key raises
        :class:`UnknownProcessError`. Exits the reaper already sent are settled first (a
        process frozen meanwhile, e.g. by SIGSTOP, finds its records as they are).
        """
        g = self.grace if grace is None else float(grace)
        if g < 0:
            raise ValueError("grace must be >= 0")
        with self._lock:
            self._check_open()
            self._settle_reported_locked()
            rec, changed, actions = logic.terminate(
                self._table, (upid, round), g, now=time.monotonic(), stamp=self._clock()
            )
            self._apply_locked(actions)
            if changed:
                self._changed_locked()
                self._commit_locked()
            info = rec.info() if rec is not None else None
        if changed:
            self._wake()
        self._deliver()
        if info is None:
            raise UnknownProcessError(f"no process {upid!r} round {round}")
        return info

    def cleanup(self, upid: str, round: int) -> bool:
        """Forget a terminal process; ``False`` if unknown. A live one raises ProcessLiveError."""
        (result,) = self.cleanup_many([(upid, round)])
        if isinstance(result, ProcessLiveError):
            raise result
        return result

    def cleanup_many(self, keys: Iterable[tuple[str, int]]) -> list[bool | ProcessLiveError]:
        """:meth:`cleanup` each ``(upid, round)`` with one journal append for all: per key
        True, False if unknown, or (returned, not raised) the ProcessLiveError of a live one."""
        out: list[bool | ProcessLiveError] = []
        with self._lock:
            self._check_open()
            for upid, round_ in keys:
                result, actions = logic.cleanup(self._table, (upid, round_))
                self._apply_locked(actions)
                out.append(ProcessLiveError(result) if isinstance(result, str) else result)
            self._save_locked()
        return out

    def get(self, upid: str, round: int) -> ProcessInfo | None:
        """The record of ``(upid, round)``, or None."""
        with self._lock:
            rec = self._records.get((upid, round))
            return rec.info() if rec else None

    def read_output(self, upid: str, round: int, stream: str = "stdout", offset: int = 0,
                    limit: int = 1 << 18, tail: int | None = None) -> dict[str, Any]:
        """Up to ``limit`` bytes of the output file of ``(upid, round)`` (``stream`` stdout or
        stderr) from ``offset``, or from its last ``tail`` lines: ``{upid, round, stream,
        offset, next_offset, size, data, state}``, ``state`` None once the record is cleaned
        up (the file stays until the output retention removes it). Raises
        :class:`UnknownProcessError` if neither the record nor the file is here. Read without
        the lock: the process appends meanwhile, and a file removed after the read began
        reads as gone."""
        suffix = {"stdout": ".out", "stderr": ".err"}.get(stream)
        if suffix is None:
            raise ValueError(f"stream: expected stdout or stderr, got {stream!r}")
        info = self.get(upid, round)
        path = os.path.join(self._proc_dir, _file_stem(upid, round) + suffix)
        try:
            start, data, size = read_chunk(path, offset, limit, tail)
        except FileNotFoundError:
            if info is None:
                raise UnknownProcessError(
                    f"no output of ({upid}, {round}) here: it never ran on this node, or its "
                    "files were removed after the output retention") from None
            start, data, size = 0, b"", 0  # not started yet (or it failed to start)
        return {"upid": upid, "round": round, "stream": stream, "offset": start,
                "next_offset": start + len(data), "size": size, "data": data,
                "state": info.state if info is not None else None}

    def processes(self) -> list[ProcessInfo]:
        """All records, sorted by (upid, round)."""
        with self._lock:
            return [self._records[k].info() for k in sorted(self._records)]

    def dump(self) -> list[dict[str, Any]]:
        """All records as ``{upid, round, state, msg, exit_code, pid}``, sorted by (upid, round)."""
        with self._lock:
            return self._dump_locked()

    def _dump_locked(self) -> list[dict[str, Any]]:
        return self._table.dump()

    def wait(
        self,
        upid: str,
        round: int,
        states: Iterable[str] | None = None,
        timeout: float | None = None,
    ) -> ProcessInfo:
        """Block until ``(upid, round)`` is in one of ``states`` (default: any terminal state).

        Raises ``TimeoutError`` after ``timeout`` seconds, :class:`UnknownProcessError` if the
        record is (or becomes) unknown, :class:`SupervisorClosedError` once closed.
        """
        want = frozenset(states) if states is not None else st.TERMINAL_STATES
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                rec = self._records.get((upid, round))
                if rec is None:
                    raise UnknownProcessError(f"no process {upid!r} round {round}")
                if rec.state in want:
                    return rec.info()
                self._check_open()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{upid!r} round {round} still {rec.state}")
                self._cond.wait(left)

    def close(self) -> None:
        """Stop watching; the reaper and the processes keep running for a new supervisor."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._wake(force=True)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            for rec in self._records.values():
                self._unwatch_locked(rec)
            self._compact_locked()
            self._release()
            self._cond.notify_all()

    def shutdown(self, kill: bool = True, grace: float | None = None) -> None:
        """Terminate every live process and stop the reaper (when ``kill``), then :meth:`close`.

        Each process gets SIGTERM, SIGKILL after ``grace`` (default: the supervisor's grace);
        their ends carry the cause :data:`~.states.CAUSE_NODE` (the node is going away, not
        their own end). Without ``kill`` this is :meth:`close`.
        """
        if kill:
            g = self.grace if grace is None else float(grace)
            with self._lock:
                if self._closed:
                    return
                self._apply_locked(logic.terminate_all(
                    self._table, g, now=time.monotonic(), stamp=self._clock(), cause=st.CAUSE_NODE
                ))
                self._changed_locked()
                self._commit_locked()
            self._wake()
            self._deliver()
            deadline = time.monotonic() + g + 5.0
            with self._cond:
                while any(st.is_live(r.state) for r in self._records.values()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("shutdown: processes still live after grace")
                        break
                    self._cond.wait(left)
            self._stop_reaper()
            self._deliver()
        self.close()

    def __enter__(self) -> ProcessSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uses_pidfd(self) -> bool:
        """True when orphans (processes whose reaper died) are watched with pidfds (Linux >= 5.3)."""
        return self._use_pidfd

    def reaper_stats(self) -> dict[str, Any] | None:
        """CPU seconds of the reaper ``{self: [user, sys], children: [user, sys], live}``
        (``children``: the commands it reaped), or None without a reaper."""
        with self._lock:
            replies, _ = self._exchange_locked([{"op": "stats"}])
            self._settle_io_locked()
        self._deliver()
        reply = replies[0]
        return reply if reply is not None and reply.get("ok") else None

    def set_lease(self, until: float, grace: float) -> None:
        """Let the processes run only until ``until`` (``time.monotonic()``): the reaper then
        SIGTERMs every group (SIGKILL ``grace`` seconds later) and refuses starts until a
        later lease. Each call replaces the previous lease; without any, nothing is enforced.
        A reaper started later gets the lease too."""
        until, grace = float(until), float(grace)
        if not (math.isfinite(until) and math.isfinite(grace) and grace >= 0):
            raise ValueError("until and grace must be finite, grace >= 0")
        with self._lock:
            self._check_open()
            self._lease = (until, grace)
            self._post_locked([_lease_request(self._lease)])

    @property
    def reaper_pid(self) -> int | None:
        """The pid of the reaper this supervisor is connected to, or None."""
        with self._lock:
            return self._reaper["pid"] if self._reaper and self._conn is not None else None

    # -- internals: records ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SupervisorClosedError("the supervisor is closed")

    def _make_record(self, **fields: Any) -> _Record:
        """A new record of the table, with its output files' path (no longer due for removal)."""
        rec = _Record(**fields)
        rec.base = os.path.join(self._proc_dir, _file_stem(rec.upid, rec.round))
        self._retention.cancel(os.path.basename(rec.base))
        return rec

    def _launch_one_locked(
        self, upid: str, round_: int, command: Any, env: Any, cwd: Any
    ) -> tuple[_Record, bool]:
        """One :meth:`launch` under the lock: (the record to answer with, superseding?)."""
        if (upid, round_) not in self._records:
            newest = self._table.newest(upid)
            if newest is not None and newest.round < round_ and newest.starting:
                self._flush_spawns_locked()  # as if launched one by one: it starts, then is replaced
        rec, _, actions = logic.launch(
            self._table, upid, round_, command, env, cwd,
            slots=self.slots, grace=self.grace, now=time.monotonic(), stamp=self._clock(),
        )
        return rec, self._apply_locked(actions)  # type: ignore[return-value]

    def _apply_locked(self, actions: Iterable[logic.Action]) -> bool:
        """Carry out the core's actions; True if a SIGTERM went out (a new SIGKILL deadline)."""
        term = False
        for action in actions:
            rec: _Record = action.record  # type: ignore[assignment]
            if isinstance(action, logic.Start):
                self._start_locked(rec)
            elif isinstance(action, logic.Signal):
                if action.sig == signal.SIGTERM and rec.kill_at is not None:
                    term = True
                    self._timed.add(rec.key)
                    rec.kill_at_wall = time.time() + (rec.grace or 0.0)
                self._signal_locked(rec, action.sig)
            else:  # Forgotten: nothing watches it; its output files go after the retention
                self._unwatch_locked(rec)
                if rec.base:
                    idle = self._retention.next_deadline() is None
                    self._retention.schedule(os.path.basename(rec.base), self._clock())
                    if idle and self._retention.next_deadline() is not None:
                        self._wake()  # the watcher waits with no removal deadline yet
        return term

    def _changed_locked(self) -> None:
        self._version += 1
        self._table.ended = False
        self._cond.notify_all()

    def _touch_locked(self, rec: _Record) -> None:
        """``rec`` changed: the next :meth:`_save_locked` journals it."""
        self._table.touch(rec)

    def _insert_locked(self, rec: _Record) -> None:
        self._table.insert(rec)
        if rec.base:
            self._retention.cancel(os.path.basename(rec.base))

    def _end_locked(self, rec: _Record, state: str, msg: str) -> None:
        logic.end(self._table, rec, state, msg, self._clock())

    def _signal_locked(self, rec: _Record, sig: int) -> None:
        """Signal ``rec``'s process group: through the reaper, or directly for an orphan."""
        if rec.pid is None:
            return
        if rec.orphan:
            stat = procfs.stat(rec.pid)
            if stat is not None and stat.start_ticks == rec.start_ticks:
                _killpg(rec.pid, sig)  # alive or a zombie: the group id is still its own
            elif stat is None and _group_has_members(rec.pid):
                _killpg(rec.pid, sig)  # only what it left behind can hold the group id
            return
        self._post_locked([{"op": "signal", "key": [rec.upid, rec.round], "pid": rec.pid,
                            "sig": int(sig)}])

    def _start_locked(self, rec: _Record) -> None:
        """The core's Start: check ``rec``'s command and queue it for the reaper
        (:meth:`_flush_spawns_locked`)."""
        env = dict(self._base_env)
        env.update(rec.env or {})
        problem, exe = _precheck(rec.command, env, rec.cwd)
        if problem:
            logic.start_failed(self._table, rec, problem, self._clock())
            return
        rec.exe = exe
        rec.starting = True
        self._spawn_q.append(rec)

    def _settle_locked(
        self,
        rec: _Record,
        code: int | None,
        *,
        ended_at: float | None = None,
        while_down: bool = False,
        fenced: bool = False,
        node: bool = False,
    ) -> None:
        """``rec``'s process has ended with ``code`` (None: unknown): settle the record.
        ``fenced``: the reaper stopped it because the lease ran out; ``node``: because the
        reaper got SIGTERM (the node is going away)."""
        self._unwatch_locked(rec)
        rec.orphan = False
        self._apply_locked(logic.settle(
            self._table, rec, code, stamp=self._clock(), ended_at=ended_at,
            while_down=while_down, fenced=fenced, node=node,
        ))

    # -- internals: the reaper -------------------------------------------------------------

    def _pump_locked(self) -> None:
        """Start what is queued and settle the exits read, until neither is left."""
        while self._spawn_q or self._events or (self._lost and not self._attaching):
            if self._lost and not self._attaching:
                self._reaper_lost_locked(self._lost)
            if self._spawn_q:
                self._flush_spawns_locked()
            if self._events:
                self._process_events_locked()

    def _flush_spawns_locked(self) -> None:
        """Send every queued start to the reaper in one write and apply the replies."""
        while self._spawn_q:
            batch = [r for r in self._spawn_q if r.starting and self._records.get(r.key) is r]
            self._spawn_q = []
            if not batch:
                return
            if self._conn is None and not self._ensure_reaper_locked():
                why = self._reaper_error or "it could not be started lately"
                for rec in batch:
                    self._end_locked(rec, st.FAILED, f"no reaper to start the process: {why}")
                continue
            msgs = []
            cwd_now: str | None = None
            for rec in batch:
                env = dict(self._base_env)
                env.update(rec.env or {})
                env.update({UPID_ENV: rec.upid, ROUND_ENV: str(rec.round), OWNER_ENV: self.state_dir})
                if rec.cwd is not None:
                    cwd = os.path.abspath(rec.cwd)
                else:
                    if cwd_now is None:
                        with contextlib.suppress(OSError):
                            cwd_now = os.getcwd()
                    cwd = cwd_now
                msgs.append(
                    {
                        "op": "spawn",
                        "key": [rec.upid, rec.round],
                        "argv": list(rec.command),
                        "exe": rec.exe,
                        "env": env,
                        "cwd": cwd,
                        "out": rec.base + ".out",
                        "err": rec.base + ".err",
                    }
                )
            replies, error = self._exchange_locked(msgs)
            for rec, reply in zip(batch, replies, strict=True):
                if not rec.starting or self._records.get(rec.key) is not rec:
                    continue
                rec.starting = False
                if reply is None and self._lost:
                    self._lost_starts.append(rec.key)  # maybe started: settled once reconnected
                elif reply is None:
                    self._end_locked(rec, st.FAILED, f"the reaper did not start it: {error}")
                elif not reply.get("ok"):
                    self._end_locked(rec, st.FAILED, str(reply.get("error") or "launch refused"))
                else:
                    logic.started(
                        self._table, rec, int(reply["pid"]), reply.get("start_ticks"), self._clock()
                    )
                    rec.orphan = False

    def _process_events_locked(self) -> None:
        """Settle the records whose exits the reaper reported."""
        while self._events:
            ev = self._events.popleft()
            rec = self._exit_record_locked(ev)
            if rec is None or rec.orphan:
                continue
            code = ev.get("code")
            self._settle_locked(
                rec, code if isinstance(code, int) else None, fenced=ev.get("fenced") is True,
                node=ev.get("stopped") is True,
            )

    def _exit_record_locked(self, ev: Mapping[str, Any]) -> _Record | None:
        """Queue the acknowledgement of the reaper's exit event ``ev``; the live record it
        settles (same key and pid), or None."""
        seq = ev.get("seq")
        if isinstance(seq, int):
            self._acks.append(seq)
        return logic.exit_record(self._table, _key_of(ev.get("key")), ev.get("pid"))  # type: ignore[return-value]

    def _commit_locked(self) -> None:
        """Journal the changes, then acknowledge the exits they hold to the reaper."""
        self._save_locked()
        self._send_acks_locked()

    def _send_acks_locked(self) -> None:
        if self._acks and self._conn is not None:
            acks, self._acks = self._acks, []
            self._post_locked([{"op": "ack", "seqs": acks}])

    def _post_locked(self, msgs: list[dict[str, Any]]) -> None:
        """Send requests that need no reply (a broken connection is noticed by the watcher)."""
        if self._conn is None:
            return
        data = "".join(json.dumps(m, separators=(",", ":")) + "\n" for m in msgs).encode()
        try:
            self._conn.sendall(data)
        except OSError as exc:
            log.warning("eeagent supervisor: cannot write to the reaper: %s", exc)
            self._wake()

    def _exchange_locked(
        self, msgs: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any] | None], str]:
        """Send requests and wait for their replies: (replies, None where missing; error)."""
        if self._conn is None:
            return [None] * len(msgs), "no reaper"
        first = self._next_id
        lines = []
        too_big: set[int] = set()
        last = 0  # replies come in order: the last one sent answers for all
        for m in msgs:
            m["id"] = self._next_id
            self._next_id += 1
            line = json.dumps(m, separators=(",", ":"))
            if len(line) > _reaper.MAX_LINE:
                too_big.add(m["id"])
                continue
            lines.append(line)
            last = m["id"]
        self._replies = {k: v for k, v in self._replies.items() if k >= first}
        for rid in too_big:
            self._replies[rid] = {"re": rid, "ok": False, "error": "launch request too large"}
        error = ""
        # The watcher need not wake for what this thread reads itself.
        fd = self._conn.fileno()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)
        try:
            if lines:
                self._conn.sendall(("\n".join(lines) + "\n").encode())
            deadline = time.monotonic() + REAPER_TIMEOUT
            while last and last not in self._replies:
                if not self._read_locked(deadline):
                    error = f"no answer from the reaper within {REAPER_TIMEOUT:g} s"
                    break
        except (_ReaperLost, OSError) as exc:
            error = f"lost the reaper: {exc}"
            self._drop_conn_locked()
            self._lost = str(exc)  # handled by _pump_locked, once the replies are applied
        if self._conn is not None:  # exits read here are settled by the caller
            self._selector.register(fd, selectors.EVENT_READ, "reaper")
        return [self._replies.pop(i, None) for i in range(first, self._next_id)], error

    def _read_locked(self, deadline: float | None = None) -> bool:
        """Read and parse what the reaper has sent. Without ``deadline``, only what is there;
        with one, wait until something arrives (False if the deadline passed first).
        Raises :class:`_ReaperLost` at EOF or on an error."""
        conn = self._conn
        if conn is None:
            raise _ReaperLost("not connected")
        got = False
        while True:
            try:
                data = conn.recv(_reaper.READ_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if got or deadline is None:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                assert self._poller is not None
                self._poller.poll(left * 1000)
                continue
            except OSError as exc:
                raise _ReaperLost(str(exc)) from None
            if not data:
                raise _ReaperLost("the reaper closed the connection")
            got = True
            lines, self._rbuf = _reaper.split_lines(self._rbuf, data)
            for line in lines:
                try:
                    doc = json.loads(line)
                except ValueError:
                    log.warning("eeagent supervisor: bad line from the reaper: %.200r", line)
                    continue
                if not isinstance(doc, dict):
                    continue
                if doc.get("ev") == "exit":
                    self._events.append(doc)
                elif isinstance(doc.get("re"), int):
                    self._replies[doc["re"]] = doc
                elif not doc.get("ok", True):
                    log.warning("eeagent supervisor: the reaper says: %s", doc.get("error"))

    def _connect_locked(self) -> socket.socket | None:
        """A connection to a running reaper of this state dir, or None if none listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(_reaper.socket_address(self.state_dir, self._dirfd))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            _, uid, _ = struct.unpack("3i", creds)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except OSError:
            sock.close()
            raise
        if uid != os.getuid():
            sock.close()
            raise SupervisorError(f"the reaper of {self.state_dir} runs as uid {uid}, not ours")
        timeout = struct.pack("ll", int(REAPER_TIMEOUT), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        return sock

    def _start_reaper_locked(self) -> socket.socket:
        """Start a reaper for this state dir and connect to it."""
        log_path = os.path.join(self.state_dir, _reaper.LOG_NAME)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        ]
        argv = [self._python, "-I", "-S", REAPER, self.state_dir, f"{REAPER_IDLE:g}"]
        try:
            pid = os.posix_spawn(
                self._python,
                argv,
                {"PATH": os.defpath},
                file_actions=actions,
                setsid=True,  # a kill of the agent's process group does not reach it
                setsigmask=(),
                setsigdef=_RESTORE_SIGNALS,
            )
        except OSError as exc:
            raise SupervisorError(f"cannot start the reaper {self._python!r}: {exc}") from None
        with _started_lock:
            _started_reapers.add(pid)
        deadline = time.monotonic() + REAPER_TIMEOUT
        exited: int | None = None
        while True:
            sock = self._connect_locked()
            if sock is not None:
                return sock
            if exited is None:
                with contextlib.suppress(ChildProcessError):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done == pid:
                        exited = os.waitstatus_to_exitcode(status)
                        with _started_lock:
                            _started_reapers.discard(pid)
                if exited is not None and exited != _reaper.EX_LOCKED:
                    raise SupervisorError(
                        f"the reaper exited at once ({_describe(exited)}); see {log_path}"
                    )
            if time.monotonic() > deadline:
                raise SupervisorError(f"the reaper did not come up; see {log_path}")
            time.sleep(0.002)

    def _set_conn_locked(self, sock: socket.socket) -> None:
        self._conn = sock
        self._rbuf = b""
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self._selector.register(sock.fileno(), selectors.EVENT_READ, "reaper")

    def _drop_conn_locked(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(self._conn.fileno())
        with contextlib.suppress(OSError):
            self._conn.close()
        self._conn = None
        self._poller = None
        self._rbuf = b""
        _reap_started_reapers()

    def _attach_reaper_locked(self, initial: bool) -> bool:
        """Connect to the state dir's reaper (started if none runs) and reconcile the records;
        True if no reaper ran and a new one was started.

        Raises :class:`SupervisorError` if no reaper can be reached.
        """
        self._attaching = True
        started = False
        try:
            for attempt in range(3):
                sock = self._connect_locked()
                if sock is None:
                    sock = self._start_reaper_locked()
                    started = True
                self._set_conn_locked(sock)
                replies, error = self._exchange_locked([{"op": "hello"}])
                hello = replies[0]
                if hello is not None and hello.get("ok"):
                    break
                self._drop_conn_locked()  # e.g. it was just exiting for idleness: start another
                if attempt == 2:
                    raise SupervisorError(f"cannot talk to the reaper: {error or hello}")
        finally:
            self._attaching = False
            self._lost = ""
        assert hello is not None
        self._reaper = {"pid": hello.get("pid"), "start_ticks": hello.get("start_ticks")}
        if self._lease is not None:  # before any start on this connection
            self._post_locked([_lease_request(self._lease)])
        self._reconcile_locked(hello, initial)
        return started

    def _reconcile_locked(self, hello: dict[str, Any] | None, initial: bool) -> None:
        """Match the records with the reaper's live children and held exits; what neither
        knows is an orphan (or gone). ``initial``: the agent was down meanwhile."""
        covered: set[Key] = set()
        kills = []
        for child in (hello or {}).get("children") or []:
            key = _key_of(child.get("key"))
            rec = self._records.get(key) if key else None
            pid = child.get("pid")
            if rec is not None and st.is_live(rec.state) and not rec.starting and (
                rec.pid == pid or (rec.state == st.PENDING and rec.pid is None)
            ):
                self._touch_locked(rec)
                self._unwatch_locked(rec)
                rec.orphan = False
                rec.pid = pid
                rec.start_ticks = child.get("start_ticks")
                if rec.state == st.PENDING:  # started just before a crash, never journaled
                    rec.state = st.RUNNING
                    rec.waiting_for = None
                    rec.started_at = self._clock()
                self._restore_kill_at(rec)
                covered.add(rec.key)
            else:
                kills.append({"op": "signal", "key": child.get("key"), "pid": pid, "sig": 9})
        if kills:  # started for a launch no record remembers: nobody would ever stop it
            log.warning("eeagent supervisor: killing %d unknown processes of the reaper", len(kills))
            self._post_locked(kills)
        for ev in (hello or {}).get("exits") or []:
            rec = self._exit_record_locked(ev)
            if rec is not None and rec.key not in covered:
                code = ev.get("code")
                self._settle_locked(
                    rec,
                    code if isinstance(code, int) else None,
                    ended_at=ev.get("ended_at"),
                    while_down=initial,
                    fenced=ev.get("fenced") is True,
                    node=ev.get("stopped") is True,
                )
                covered.add(rec.key)
        for rec in list(self._records.values()):
            if rec.key in covered or rec.state not in (st.RUNNING, st.TERMINATING):
                continue
            if rec.orphan and rec.watched:
                continue  # already watched as an orphan
            if rec.pid is None:
                self._end_locked(rec, st.FAILED, "launch interrupted by an agent restart")
                continue
            self._adopt_orphan_locked(rec, while_down=initial)

    def _restore_kill_at(self, rec: _Record) -> None:
        if rec.state == st.TERMINATING and rec.kill_at is None and rec.kill_at_wall is not None:
            rec.kill_at = time.monotonic() + max(0.0, rec.kill_at_wall - time.time())
            self._timed.add(rec.key)

    def _adopt_orphan_locked(self, rec: _Record, *, while_down: bool) -> None:
        """Watch ``rec``'s process, which is not the reaper's child, if it still runs."""
        assert rec.pid is not None
        fd: int | None = None
        if self._use_pidfd:
            try:
                fd = os.pidfd_open(rec.pid)
            except OSError:
                fd = None
        stat = procfs.stat(rec.pid)
        same = stat is not None and stat.start_ticks == rec.start_ticks
        rec.orphan = True
        if same and stat is not None and not stat.dead:
            self._touch_locked(rec)
            self._restore_kill_at(rec)
            rec.watched = True
            if fd is not None:
                rec.pidfd = fd
                self._selector.register(fd, selectors.EVENT_READ, rec.key)
            else:
                rec.poll_mode = True
                self._timed.add(rec.key)
            return
        if fd is not None:
            os.close(fd)
        if same:
            _killpg(rec.pid, signal.SIGKILL)  # a zombie still holds the group id
        elif stat is None:
            self._sweeps.append(rec.pid)
        # a reused pid (another start time) is left alone
        self._settle_locked(rec, None, while_down=while_down)

    def _orphan_ended_locked(self, rec: _Record) -> None:
        assert rec.pid is not None
        stat = procfs.stat(rec.pid)
        if stat is not None and stat.start_ticks == rec.start_ticks:
            _killpg(rec.pid, signal.SIGKILL)
        elif stat is None:
            self._sweeps.append(rec.pid)
        self._settle_locked(rec, None)

    def _reaper_lost_locked(self, why: str) -> None:
        """The reaper went away: adopt its children as orphans and start a new reaper."""
        self._drop_conn_locked()
        self._lost = ""
        if self._closed or self._reaper_stopping:
            return
        log.error("eeagent supervisor: lost the reaper (%s); starting a new one", why)
        self._reaper = None
        self._reaper_retry_at = time.monotonic() + _RETRY_REAPER
        try:
            self._attach_reaper_locked(initial=False)
        except SupervisorError as exc:
            self._reaper_error = str(exc)
            log.error("eeagent supervisor: %s", exc)
            self._reconcile_locked(None, initial=False)
        self._settle_lost_starts_locked(_marked_processes(self.state_dir))
        for rec in self._records.values():  # a SIGTERM may have been lost with the reaper
            if rec.orphan and rec.state == st.TERMINATING and not rec.killed:
                self._signal_locked(rec, signal.SIGTERM)
        self._compact_locked()  # the table names the new reaper

    def _settle_lost_starts_locked(self, marked: dict[int, Key]) -> None:
        """After the reaper died: ``marked`` are the processes started for this agent (their
        environment says so) that still run. A start whose reply was lost adopts its process,
        or is FAILED if there is none; a marked process no record tracks (its reaper died
        inside the spawn) is killed: nobody would ever stop it."""
        lost, self._lost_starts = self._lost_starts, []
        tracked = {rec.pid for rec in self._records.values() if rec.pid is not None}
        found: dict[Key, int] = {}
        for pid, key in marked.items():
            if pid not in tracked:
                found.setdefault(key, pid)
        for key in lost:
            rec = self._records.get(key)
            if rec is None or rec.state != st.PENDING or rec.pid is not None or rec.starting:
                continue
            pid = found.pop(key, None)
            stat = procfs.stat(pid) if pid is not None else None
            if pid is None or stat is None:
                self._end_locked(rec, st.FAILED, "the reaper died while starting it (not started)")
                continue
            self._touch_locked(rec)
            rec.pid, rec.start_ticks = pid, stat.start_ticks
            rec.state, rec.msg, rec.started_at = st.RUNNING, "", self._clock()
            self._adopt_orphan_locked(rec, while_down=False)
            tracked.add(pid)
        stray = [pid for pid in marked if pid not in tracked]
        if stray:
            log.warning("eeagent supervisor: killing %d processes no record tracks", len(stray))
            for pid in stray:
                _killpg(pid, signal.SIGKILL)  # each leads its own session and group
        if lost:
            self._changed_locked()

    def _ensure_reaper_locked(self) -> bool:
        if self._conn is not None:
            return True
        if self._closed or self._reaper_stopping:
            self._reaper_error = "the supervisor is stopping"
            return False
        if time.monotonic() < self._reaper_retry_at:
            return False
        self._reaper_retry_at = time.monotonic() + _RETRY_REAPER
        try:
            self._attach_reaper_locked(initial=False)
        except SupervisorError as exc:
            self._reaper_error = str(exc)
            return False
        self._compact_locked()
        return True

    def _stop_reaper(self) -> None:
        """Ask the reaper to kill what is left and exit; wait until it is gone."""
        with self._lock:
            if self._conn is None or self._closed:
                return
            self._reaper_stopping = True
            pid = (self._reaper or {}).get("pid")
            ticks = (self._reaper or {}).get("start_ticks")
            self._exchange_locked([{"op": "stop", "kill": True}])
            deadline = time.monotonic() + 3.0
            try:
                while self._conn is not None and time.monotonic() < deadline:
                    self._read_locked(deadline)
                    self._pump_locked()
            except _ReaperLost:
                pass
            self._drop_conn_locked()
            self._pump_locked()
            self._reaper = None
            if self._dirty:
                self._changed_locked()
            self._commit_locked()
        while isinstance(pid, int) and time.monotonic() < deadline:
            _reap_started_reapers()
            stat = procfs.stat(pid)
            if stat is None or stat.start_ticks != ticks or stat.dead:
                break
            time.sleep(0.005)
        _reap_started_reapers()

    # -- internals: watching ---------------------------------------------------------------

    def _unwatch_locked(self, rec: _Record) -> None:
        if rec.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(rec.pidfd)
            with contextlib.suppress(OSError):
                os.close(rec.pidfd)
            rec.pidfd = None
        rec.poll_mode = False
        rec.watched = False

    def _wake(self, *, force: bool = False) -> None:
        """Make the watcher recompute its timeout. Under the lock, so the pipe is still open."""
        with self._lock:
            if self._closed and not force:
                return
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"x")

    def _timed_locked(self) -> list[_Record]:
        """The records with a SIGKILL deadline or polled for their end (the rest wait for
        events): the watcher looks only at these, not at the whole table, on every wake-up."""
        out = []
        for key in list(self._timed):
            rec = self._records.get(key)
            if rec is None or not (
                (rec.kill_at is not None and rec.state == st.TERMINATING) or rec.poll_mode
            ):
                self._timed.discard(key)
            else:
                out.append(rec)
        return out

    def _next_timeout_locked(self) -> float | None:
        now = time.monotonic()
        t: float | None = None
        for rec in self._timed_locked():
            if rec.kill_at is not None and rec.state == st.TERMINATING:
                left = max(0.0, rec.kill_at - now)
                t = left if t is None else min(t, left)
            if rec.poll_mode:
                t = _POLL_INTERVAL if t is None else min(t, _POLL_INTERVAL)
        if self._conn is None and not self._reaper_stopping:
            t = _RETRY_REAPER if t is None else min(t, _RETRY_REAPER)
        due = self._retention.next_deadline()
        if due is not None:
            left = max(0.0, due - self._clock())
            t = left if t is None else min(t, left)
        return t

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                timeout = self._next_timeout_locked()
            try:
                events = self._selector.select(timeout)
            except (OSError, ValueError):
                if self._stopping:
                    return
                time.sleep(0.01)  # a fd closed under us; the next round sees the new set
                continue
            ended: list[Key] = []
            readable = False
            for key, _ in events:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                elif key.data == "reaper":
                    readable = True
                else:
                    ended.append(key.data)
            try:
                self._handle(ended, readable)
            except Exception:  # pragma: no cover - keep the watcher alive
                log.exception("eeagent watcher: error handling events")
            self._deliver()
            self._run_pending_sweeps()
            self._remove_old_outputs()

    def _handle(self, ended: list[Key], readable: bool) -> None:
        with self._lock:
            if self._stopping:
                return
            if readable and self._conn is not None:
                try:
                    self._read_locked()
                except _ReaperLost as exc:
                    self._drop_conn_locked()
                    self._lost = str(exc)
            elif self._conn is None and not self._reaper_stopping:
                self._ensure_reaper_locked()
            now = time.monotonic()
            for rec in self._timed_locked():
                self._apply_locked(logic.kill_due(self._table, (rec,), now))
                if rec.poll_mode and rec.pid is not None and not _alive(rec):
                    ended.append(rec.key)
            for key in ended:
                rec = self._records.get(key)
                if rec is None or not rec.watched or not rec.orphan:
                    continue
                try:
                    self._orphan_ended_locked(rec)
                except Exception as exc:  # pragma: no cover - never leave a fired pidfd armed
                    log.exception("eeagent watcher: settling %s failed", key)
                    self._unwatch_locked(rec)
                    self._end_locked(rec, st.FAILED, f"supervisor error: {exc}")
            self._settle_io_locked()

    def _settle_reported_locked(self) -> None:
        """Read and settle what the reaper has sent and the watcher has not read yet."""
        if self._conn is None:
            return
        try:
            self._read_locked()
        except _ReaperLost as exc:
            self._drop_conn_locked()
            self._lost = str(exc)
        self._settle_io_locked()

    def _settle_io_locked(self) -> None:
        """After reading from the reaper: settle, start, journal, acknowledge, notify."""
        self._pump_locked()
        if self._table.ended:
            self._changed_locked()
        if self._dirty or self._acks:
            self._commit_locked()

    def _remove_old_outputs(self) -> None:
        """Delete the output files whose retention ran out, a batch per pass (under the lock,
        so a launch of the same key cannot create them meanwhile)."""
        with self._lock:
            if self._stopping:
                return
            for stem in self._retention.take_due(self._clock(), _REMOVE_BATCH):
                for suffix in OUTPUT_SUFFIXES:
                    try:
                        os.unlink(os.path.join(self._proc_dir, stem + suffix))
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        log.warning("eeagent supervisor: cannot remove old output: %s", exc)

    def _adopt_outputs_locked(self) -> None:
        """Schedule the output files in the proc dir that no record owns, by their age."""
        if self._retention.retention is None:
            return  # kept for ever: no need to list them
        owned = {os.path.basename(rec.base) for rec in self._records.values() if rec.base}
        found: dict[str, float] = {}
        try:
            entries = list(os.scandir(self._proc_dir))
        except OSError as exc:
            log.warning("eeagent supervisor: cannot list %s: %s", self._proc_dir, exc)
            return
        for entry in entries:
            stem = output_stem(entry.name)
            if stem is None or stem in owned:
                continue
            with contextlib.suppress(OSError):
                mtime = entry.stat(follow_symlinks=False).st_mtime
                found[stem] = max(found.get(stem, mtime), mtime)
        self._retention.adopt(found.items())

    def _run_pending_sweeps(self) -> None:
        with self._lock:
            sweeps, self._sweeps = self._sweeps, []
        for pgid in sweeps:
            # Not a child: the pid may already be reaped. Kill the group only while some
            # member still holds the group id (so it cannot belong to anyone else).
            if _group_has_members(pgid):
                _killpg(pgid, signal.SIGKILL)

    def _deliver(self) -> None:
        """Hand the newest snapshot to ``on_change``; no lock is held during the call.

        One thread delivers at a time, in version order; a thread that finds another one
        delivering returns at once and that one delivers the newer version after its call.
        """
        if self._on_change is None:
            return
        while True:
            with self._lock:
                if self._delivering or self._version <= self._delivered:
                    return
                self._delivering = True
                self._delivered = self._version
                snapshot = self._dump_locked()
            try:
                self._on_change(snapshot)
            except Exception:
                log.exception("eeagent supervisor: on_change callback failed")
            finally:
                with self._lock:
                    self._delivering = False

    def _release(self) -> None:
        """Close every fd (the reaper keeps running) and release the state dir."""
        self._drop_conn_locked()
        if self._jfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._jfd)
            self._jfd = None
        with contextlib.suppress(Exception):
            self._selector.close()
        for fd in (self._wake_r, self._wake_w, self._dirfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dirfd = None
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
        _reap_started_reapers()

    # -- internals: persistence ------------------------------------------------------------

    def _save_locked(self) -> None:
        """Persist the records changed since the last save: one journal append (no fsync).

        Without ``journal`` (the old way, kept for benchmarks) the whole table is rewritten.
        """
        if not self._journal:
            self._dirty.clear()
            self._write_table_locked()
            return
        if not self._dirty:
            return
        if self._jfd is None:
            self._compact_locked()  # writes every record; clears the dirty set if it worked
            return
        lines = []
        for key in sorted(self._dirty):
            rec = self._records.get(key)
            entry = {"put": rec.to_json()} if rec is not None else {"del": list(key)}
            lines.append(json.dumps(entry, separators=(",", ":")))
        try:
            os.write(self._jfd, ("\n".join(lines) + "\n").encode())
        except OSError as exc:
            log.error("eeagent supervisor: cannot append to the journal: %s", exc)
            self._compact_locked()
            return
        self._dirty.clear()
        self._jlines += len(lines)
        if self._jlines >= max(COMPACT_LINES, 4 * len(self._records)):
            self._compact_locked()

    def _write_table_locked(self, gen: int | None = None) -> bool:
        path = os.path.join(self.state_dir, TABLE_FILE)
        doc = {
            "version": TABLE_VERSION,
            "boot_id": self._boot_id,
            "journal": self._jgen if gen is None else gen,
            "reaper": self._reaper,
            "processes": [self._records[k].to_json() for k in sorted(self._records)],
        }
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(doc, separators=(",", ":")))
            os.replace(tmp, path)
            return True
        except OSError as exc:
            # Keep supervising; only a later restart would lose track of recent changes.
            log.error("eeagent supervisor: cannot write %s: %s", path, exc)
            return False

    def _compact_locked(self) -> None:
        """Write the whole table under a new journal generation, then start that journal.

        A crash in between leaves a table whose generation the old journal does not carry:
        the loader ignores that journal, whose changes the table already holds.
        """
        gen = self._jgen + 1
        if not self._write_table_locked(gen):
            return  # the changes stay dirty: the next save appends them to the old journal
        self._dirty.clear()
        self._jgen = gen
        if self._jfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._jfd)
            self._jfd = None
        if not self._journal or self._closed:
            return
        path = os.path.join(self.state_dir, JOURNAL_FILE)
        try:
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            header = {"journal": gen, "boot_id": self._boot_id}
            os.write(fd, (json.dumps(header) + "\n").encode())
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.error("eeagent supervisor: cannot start the journal %s: %s", path, exc)
            return
        self._jfd = fd
        self._jlines = 0

    def _load_locked(self) -> None:
        doc = read_table(self.state_dir, quarantine=True)
        same_boot = False
        if doc is not None:
            self._jgen = int(doc.get("journal") or 0)
            same_boot = doc.get("boot_id") is not None and doc.get("boot_id") == self._boot_id
            for entry in doc.get("processes", []):
                rec = _Record.from_json(entry)
                rec.base = os.path.join(self._proc_dir, _file_stem(rec.upid, rec.round))
                self._insert_locked(rec)
        if not same_boot:
            # the pids mean nothing after a reboot
            for rec in list(self._records.values()):
                if rec.state in (st.RUNNING, st.TERMINATING):
                    if rec.pid is None:
                        self._end_locked(rec, st.FAILED, "launch interrupted by an agent restart")
                    else:
                        self._settle_locked(rec, None, while_down=True)
        if self._attach_reaper_locked(initial=True) and same_boot:
            # The old reaper died too: what it started is found by the commands' environment.
            # A start never journaled adopts its process; a process no record tracks is killed.
            self._lost_starts = [
                rec.key
                for rec in self._records.values()
                if rec.state == st.PENDING and rec.waiting_for is None and rec.pid is None
            ]
            self._settle_lost_starts_locked(_marked_processes(self.state_dir))
        for rec in list(self._records.values()):
            if rec.state != st.PENDING:
                continue
            pred = self._records.get(rec.waiting_for) if rec.waiting_for else None
            if pred is not None and st.is_live(pred.state):
                continue
            if rec.waiting_for is None:
                self._end_locked(rec, st.FAILED, "launch interrupted by an agent restart")
            else:
                rec.waiting_for = None
                self._apply_locked([logic.start(rec)])
        self._pump_locked()


# ---------------------------------------------------------------------------------------------


def _lease_request(lease: tuple[float, float]) -> dict[str, Any]:
    return {"op": "lease", "until": lease[0], "grace": lease[1]}


def _alive(rec: _Record) -> bool:
    assert rec.pid is not None
    stat = procfs.stat(rec.pid)
    return stat is not None and stat.start_ticks == rec.start_ticks and not stat.dead


def _as_request(item: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(upid, round, command, env, cwd) of one :meth:`ProcessSupervisor.launch_many` item."""
    if isinstance(item, Mapping):
        return (item.get("upid"), item.get("round"), item.get("command"), item.get("env"),
                item.get("cwd"))
    if isinstance(item, tuple):
        if not 3 <= len(item) <= 5:
            raise ValueError(f"a launch request needs 3 to 5 items, got {len(item)}")
        padded = (*item, None, None)
        return padded[0], padded[1], padded[2], padded[3], padded[4]
    try:
        return item.upid, item.round, item.command, getattr(item, "env", None), getattr(
            item, "cwd", None
        )
    except AttributeError:
        raise ValueError(f"not a launch request: {item!r:.80}") from None


def read_table(
    state_dir: str | os.PathLike[str], *, quarantine: bool = False
) -> dict[str, Any] | None:
    """The process table of ``state_dir`` as saved: the table file with its journal applied.

    Returns ``{version, boot_id, journal, reaper, processes: [record dicts]}`` (``reaper``:
    ``{pid, start_ticks}`` of the reaper last used, or None) or None if there is
    none or the table is unreadable (with ``quarantine``, as the supervisor loads it, it is
    then renamed ``*.corrupt``). A torn journal line (a crash while appending) is ignored.
    Safe to call while a supervisor runs: the table is only ever replaced by rename.
    """
    state_dir = os.fspath(state_dir)
    path = os.path.join(state_dir, TABLE_FILE)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        doc = None
    except (OSError, ValueError) as exc:
        if quarantine:
            log.error("eeagent supervisor: unreadable process table %s: %s", path, exc)
            with contextlib.suppress(OSError):
                os.replace(path, path + ".corrupt")
        return None
    if doc is not None and doc.get("version") != TABLE_VERSION:
        raise SupervisorError(f"{path}: unsupported table version {doc.get('version')!r}")
    try:
        with open(os.path.join(state_dir, JOURNAL_FILE), "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    if doc is None:
        if not lines:
            return None
        doc = {"version": TABLE_VERSION, "boot_id": None, "journal": None, "processes": []}
    doc.setdefault("reaper", None)
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        header = {}
    if doc.get("boot_id") is None and isinstance(header, dict):
        doc["boot_id"] = header.get("boot_id")
    if lines and (doc.get("journal") is None or header.get("journal") == doc.get("journal")):
        doc["journal"] = header.get("journal")
        recs = {(p["upid"], int(p["round"])): p for p in doc.get("processes", [])}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("eeagent supervisor: torn journal line ignored")
                continue
            if "put" in entry:
                p = entry["put"]
                recs[(p["upid"], int(p["round"]))] = p
            elif "del" in entry:
                recs.pop((str(entry["del"][0]), int(entry["del"][1])), None)
        doc["processes"] = [recs[k] for k in sorted(recs)]
    return doc


def _precheck(
    command: Sequence[str], env: Mapping[str, str], cwd: str | None
) -> tuple[str | None, str | None]:
    """(why ``command`` cannot start in ``cwd`` with ``env``, or None; the executable's path)."""
    if cwd is not None:
        if not os.path.isdir(cwd):
            return f"working directory {cwd!r} does not exist or is not a directory", None
        if not os.access(cwd, os.X_OK):
            return f"working directory {cwd!r} is not accessible", None
    exe = command[0]
    if "/" in exe:
        path = exe if os.path.isabs(exe) else os.path.join(cwd or os.getcwd(), exe)
        if not os.path.isfile(path):
            return f"executable {exe!r} not found", None
        if not os.access(path, os.X_OK):
            return f"{exe!r} is not executable", None
        return None, path
    search = env.get("PATH", os.defpath)
    now = time.monotonic()
    hit = _which_cache.get((exe, search))
    if hit is not None and hit[0] > now:
        return None, hit[1]
    found = shutil.which(exe, path=search)
    if found is None:
        return f"executable {exe!r} not found on PATH", None
    found = os.path.abspath(found)
    if len(_which_cache) > 256:
        _which_cache.clear()
    _which_cache[(exe, search)] = (now + _WHICH_TTL, found)
    return None, found


#: Commands found on a PATH lately: ``(name, PATH) -> (monotonic time until which it is
#: trusted, path)``.
_which_cache: dict[tuple[str, str], tuple[float, str]] = {}
_WHICH_TTL = 2.0
