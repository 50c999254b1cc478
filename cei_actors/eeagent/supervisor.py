"""Runs real unix processes for the EEAgent and notices their exits at once.

:class:`ProcessSupervisor` is the node-side machinery without any actor around it. Processes
are keyed by ``(upid, round)``. Every command runs under a small wrapper that is the leader of
a new session and process group; the wrapper starts the command in that group, waits for it
and writes the command's exit status to a file before it exits itself. The default wrapper is
``/bin/sh`` running :data:`SH_WRAPPER` (about 1.5 ms of CPU per launch); ``wrapper="python"``
selects the older :mod:`cei_actors.eeagent.runwrap` (about 15 ms). The supervisor watches
each wrapper with a pidfd in one watcher thread, so an exit is seen within a millisecond, and
the exit code is read from the status file, which also works for processes that ended while
no agent was running.

Decisions (also in the docstrings below):

- **Environment**: the command gets a minimal safe base (``PATH``, ``HOME``, ``USER``,
  ``LOGNAME``, ``LANG``, ``LC_ALL``, ``LC_CTYPE``, ``TZ``, ``TMPDIR`` copied from the agent,
  ``PATH`` defaulting to ``os.defpath``; or ``base_env`` when given) with the launch's ``env``
  merged over it. Nothing else of the agent's environment (credentials!) leaks into commands.
- **cwd** ``None`` means the agent's current directory.
- **States**: a started command is RUNNING at once (the executable and cwd are checked before
  the start; a cwd that vanished before the wrapper got there turns it FAILED; an executable
  that vanished gives exit code 127, as from a shell). PENDING is used only for a new round
  waiting for its older round to die. Exit code 0 → EXITED; non-zero, or a signal not sent by
  :meth:`terminate` → FAILED; anything ending after :meth:`terminate` → TERMINATED.
  ``exit_code`` is ``-N`` for death by signal ``N``. The shell wrapper sees what a shell sees:
  a command exiting with ``128+N`` (``N`` a signal number) is reported as killed by ``N``.
- **The process group is the unit**: when a command ends, anything it left running in its group
  is killed (as systemd's ``KillMode=control-group`` does), so a terminal record never leaves
  processes behind. ``terminate`` sends SIGTERM to the group, SIGKILL after the grace period;
  a SIGTERM within 50 ms of the start is sent once more at 50 ms (it may have reached only the
  shell wrapper, just before the command's exec). A descendant that starts its own session or
  group (a daemon) escapes this, as it would escape supervisord; only cgroups could hold it.
- **Unknown keys**: :meth:`terminate` raises :class:`UnknownProcessError` (a ``KeyError``);
  :meth:`cleanup` of an unknown key is a no-op returning ``False`` (cleanups are repeated).
- **Output** goes to ``<state_dir>/proc/<name>.r<round>.out`` / ``.err`` (appended); cleanup
  keeps those files and removes only the status file.
- **On disk** (mode 0600, it holds the launch environments): ``<state_dir>/processes.json``,
  the whole table, replaced atomically with rename, plus ``processes.journal``, one JSON line
  per changed record appended (one ``write(2)``) after every change. The journal is folded into
  a new table every :data:`COMPACT_LINES` lines, at start and at :meth:`close`; each table names
  its journal generation, so a crash while compacting never applies a stale journal.
  :func:`read_table` reads both. No fsync: the table only matters across an agent restart on
  the same boot, and the page cache survives a process crash; after a reboot (a different
  ``boot_id``) every recorded process is known to be gone. ``journal=False`` rewrites the
  whole table on every change instead (the old way, for comparison).
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
import os
import re
import selectors
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cei_actors.eeagent import states as st

log = logging.getLogger(__name__)

#: The Python wrapper (``wrapper="python"``); run as a file (``python -I -S``).
RUNWRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runwrap.py")
#: The shell wrapper (``wrapper="sh"``, the default), run as ``/bin/sh -c SH_WRAPPER runwrap
#: STATUS CWD COMMAND...``. TERM/INT/HUP are caught (not ignored), so the subshell that execs
#: the command gets default dispositions while the wrapper outlives a group-wide signal and, as
#: a POSIX shell runs traps only after its foreground command ends, records the exit status. A
#: signal caught before the command starts means "do not start it". ``exec`` never runs a
#: builtin or function. The status is one short ``write(2)``: a reader sees all of it or none.
SH_WRAPPER = (
    "t=; trap t=143 TERM; trap t=130 INT; trap t=129 HUP\n"
    "s=$1\n"
    'if [ -n "$2" ]; then cd -- "$2" 2>/dev/null || {\n'
    '  printf "error cannot change to directory %s\\n" "$2" >"$s"; exit 127; }; fi\n'
    "shift 2\n"
    'if [ -n "$t" ]; then printf "%d\\n" "$t" >"$s"; exit 1; fi\n'
    '(exec "$@")\n'
    'printf "%d\\n" $? >"$s"\n'
)
SHELL = "/bin/sh"
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
)
DOWN_MSG = "exited while agent was down"

_RESTORE_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, name)
)
_SIGMAX = int(getattr(signal, "SIGRTMAX", 64))
_POLL_INTERVAL = 0.2  # only for re-adopted processes when pidfd_open is unavailable
#: A SIGTERM sent this soon after the start may reach the shell wrapper between its last check
#: and the command's exec (a fork's time); it is sent once more when this age is reached.
_YOUNG = 0.05

Key = tuple[str, int]
OnChange = Callable[[list[dict[str, Any]]], None]


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


@dataclass(frozen=True)
class ProcessInfo:
    """One process as the supervisor sees it. ``pid`` is the wrapper's pid = the process group id."""

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


@dataclass
class _Record:
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
    # runtime only
    kill_at: float | None = None
    started_mono: float | None = None
    resend_at: float | None = None
    pidfd: int | None = None
    is_child: bool = False
    poll_mode: bool = False
    watched: bool = False
    base: str = ""

    @property
    def key(self) -> Key:
        return (self.upid, self.round)

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

    def to_json(self) -> dict[str, Any]:
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
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> _Record:
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
        )


# ---------------------------------------------------------------------------------------------
# small OS helpers


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid``, or None if gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _group_has_members(pgid: int) -> bool:
    """True if some process other than ``pgid`` itself is in process group ``pgid``."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return False
    for name in names:
        if not name.isdigit() or int(name) == pgid:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) > 2 and rest[2] == str(pgid).encode():
            return True
    return False


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _describe(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"killed by signal {name}"


def _file_stem(upid: str, round_: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", upid)[:60]
    digest = hashlib.sha256(upid.encode()).hexdigest()[:10]
    return f"{safe}-{digest}.r{round_}"


def default_base_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The minimal safe base environment taken from ``environ`` (default ``os.environ``)."""
    src = os.environ if environ is None else environ
    env = {k: src[k] for k in SAFE_ENV_KEYS if k in src}
    env.setdefault("PATH", os.defpath)
    return env


# ---------------------------------------------------------------------------------------------


class ProcessSupervisor:
    """Launches, watches, terminates and forgets real processes on this node.

    ``state_dir`` holds the process table, output and status files; only one supervisor may use
    it at a time (an ``flock`` guards it: :class:`StateDirLockedError`). ``slots`` bounds the
    live (PENDING/RUNNING/TERMINATING) processes. ``clock`` stamps ``started_at``/``ended_at``;
    grace timers use the monotonic clock. ``grace`` is the default SIGTERM→SIGKILL delay.

    Creating a supervisor on a ``state_dir`` that has a table re-adopts the processes still
    running (same pid, same start time, same boot) and settles those that ended meanwhile, from
    their status files. ``on_change`` is not called for that; send a heartbeat after creating.
    All methods are thread-safe.
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
        wrapper: str = "sh",
        journal: bool = True,
        _use_pidfd: bool | None = None,
    ) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ValueError(f"slots must be an int >= 0, got {slots!r}")
        if grace < 0:
            raise ValueError("grace must be >= 0")
        if wrapper not in ("sh", "python"):
            raise ValueError(f"wrapper must be 'sh' or 'python', got {wrapper!r}")
        self.state_dir = os.path.abspath(os.fspath(state_dir))
        self.slots = slots
        self.grace = float(grace)
        self._clock = clock
        self._on_change = on_change
        self._base_env = dict(base_env) if base_env is not None else default_base_env()
        self._python = python or sys.executable or shutil.which("python3") or "python3"
        self._wrapper = wrapper
        self._journal = journal
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
        self._records: dict[Key, _Record] = {}
        self._version = 0
        self._delivered = 0
        self._closed = False
        self._stopping = False
        self._boot_id = _boot_id()
        self._fallback_q: deque[Key] = deque()
        self._sweeps: list[int] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._dirty: set[Key] = set()
        self._jfd: int | None = None
        self._jgen = 0
        self._jlines = 0
        self._delivering = False

        with self._lock:
            self._load_locked()
            self._compact_locked()
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
        once it ended, and the new round waits PENDING until then (it holds the slot). With
        no free slot the record is REJECTED; a bad cwd or executable gives FAILED with a
        message. Neither raises; a malformed ``upid``/``round`` raises ``ValueError``.
        """
        if not isinstance(upid, str) or not upid:
            raise ValueError(f"upid must be a non-empty string, got {upid!r}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        with self._lock:
            self._check_open()
            cur = self._records.get((upid, round))
            if cur is not None:
                return cur.info()
            newest = self._newest_locked(upid)
            if newest is not None and newest.round > round:
                return newest.info()
            rec = _Record(
                upid=upid,
                round=round,
                state=st.PENDING,
                command=tuple(command) if _is_str_seq(command) else (),
                env=dict(env) if isinstance(env, Mapping) else None,
                cwd=cwd,
                base=os.path.join(self._proc_dir, _file_stem(upid, round)),
            )
            problem = _validate_request(command, env, cwd)
            live = sum(
                1 for r in self._records.values() if r.state in st.LIVE_STATES and not r.superseded
            )
            if newest is not None and st.is_live(newest.state):
                live -= 1  # the old round's slot passes to the new round
            if problem:
                self._end_locked(rec, st.FAILED, problem)
            elif live >= self.slots:
                self._end_locked(
                    rec, st.REJECTED, f"no free slot: {live} of {self.slots} slots in use"
                )
            superseding = newest is not None and newest.state == st.RUNNING
            if newest is not None:
                # A newer round makes the older one stale, whatever becomes of the new one.
                wait_for: Key | None = None
                if newest.state == st.PENDING:
                    wait_for = newest.waiting_for  # it never started; take over its wait
                    self._forget_locked(newest)
                elif st.is_live(newest.state):
                    newest.superseded = True
                    self._touch_locked(newest)
                    if newest.state == st.RUNNING:
                        self._signal_term_locked(newest, self.grace)
                    wait_for = newest.key
                else:
                    self._forget_locked(newest)
                if rec.state == st.PENDING and wait_for in self._records:
                    rec.waiting_for = wait_for
            self._records[rec.key] = rec
            self._touch_locked(rec)
            if rec.state == st.PENDING and rec.waiting_for is None:
                self._start_locked(rec)
            self._changed_locked()
            self._save_locked()
            info = rec.info()
        if superseding:
            self._wake()  # a superseded round has a new SIGKILL deadline
        self._deliver()
        return info

    def terminate(self, upid: str, round: int, grace: float | None = None) -> ProcessInfo:
        """SIGTERM the process group, SIGKILL it after ``grace`` (default: the supervisor's).

        The record goes TERMINATING and, once the process is gone, TERMINATED whatever its exit
        code. A terminal or already TERMINATING process is left alone (no-op). A PENDING one
        (waiting for its older round) becomes TERMINATED without starting. An unknown key raises
        :class:`UnknownProcessError`.
        """
        g = self.grace if grace is None else float(grace)
        if g < 0:
            raise ValueError("grace must be >= 0")
        with self._lock:
            self._check_open()
            rec = self._records.get((upid, round))
            if rec is None:
                raise UnknownProcessError(f"no process {upid!r} round {round}")
            if rec.state == st.PENDING:
                self._end_locked(rec, st.TERMINATED, "terminated before it started")
            elif rec.state == st.RUNNING:
                self._signal_term_locked(rec, g)
            else:
                return rec.info()
            self._changed_locked()
            self._save_locked()
            info = rec.info()
        self._wake()
        self._deliver()
        return info

    def cleanup(self, upid: str, round: int) -> bool:
        """Forget a terminal process; ``False`` if unknown. A live one raises ProcessLiveError."""
        with self._lock:
            self._check_open()
            rec = self._records.get((upid, round))
            if rec is None:
                return False
            if not st.is_terminal(rec.state):
                raise ProcessLiveError(
                    f"process {upid!r} round {round} is {rec.state}; terminate it first"
                )
            self._forget_locked(rec)
            self._save_locked()
            return True

    def get(self, upid: str, round: int) -> ProcessInfo | None:
        """The record of ``(upid, round)``, or None."""
        with self._lock:
            rec = self._records.get((upid, round))
            return rec.info() if rec else None

    def processes(self) -> list[ProcessInfo]:
        """All records, sorted by (upid, round)."""
        with self._lock:
            return [self._records[k].info() for k in sorted(self._records)]

    def dump(self) -> list[dict[str, Any]]:
        """All records as ``{upid, round, state, msg, exit_code, pid}``, sorted by (upid, round)."""
        with self._lock:
            return self._dump_locked()

    def _dump_locked(self) -> list[dict[str, Any]]:
        recs = self._records
        return [
            {
                "upid": r.upid,
                "round": r.round,
                "state": r.state,
                "msg": r.msg,
                "exit_code": r.exit_code,
                "pid": r.pid,
            }
            for r in (recs[k] for k in sorted(recs))
        ]

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
        """Stop watching; the processes keep running and a new supervisor can re-adopt them."""
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
            if self._jfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._jfd)
                self._jfd = None
            with contextlib.suppress(Exception):
                self._selector.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._cond.notify_all()

    def shutdown(self, kill: bool = True, grace: float | None = None) -> None:
        """Terminate every live process (when ``kill``), wait for them, then :meth:`close`.

        Each gets SIGTERM, SIGKILL after ``grace`` (default: the supervisor's grace).
        """
        if kill:
            g = self.grace if grace is None else float(grace)
            with self._lock:
                if self._closed:
                    return
                for rec in list(self._records.values()):
                    if rec.state == st.PENDING:
                        self._end_locked(rec, st.TERMINATED, "terminated before it started")
                    elif rec.state == st.RUNNING:
                        self._signal_term_locked(rec, g)
                    elif rec.state == st.TERMINATING and rec.kill_at is not None:
                        rec.kill_at = min(rec.kill_at, time.monotonic() + g)
                self._changed_locked()
                self._save_locked()
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
        self.close()

    def __enter__(self) -> ProcessSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uses_pidfd(self) -> bool:
        """True when exits are watched with pidfds (Linux >= 5.3)."""
        return self._use_pidfd

    # -- internals: records ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SupervisorClosedError("the supervisor is closed")

    def _newest_locked(self, upid: str) -> _Record | None:
        mine = [r for r in self._records.values() if r.upid == upid and not r.superseded]
        return max(mine, key=lambda r: r.round) if mine else None

    def _changed_locked(self) -> None:
        self._version += 1
        self._cond.notify_all()

    def _touch_locked(self, rec: _Record) -> None:
        """``rec`` changed: the next :meth:`_save_locked` journals it."""
        self._dirty.add(rec.key)

    def _end_locked(self, rec: _Record, state: str, msg: str) -> None:
        self._touch_locked(rec)
        rec.state = state
        rec.msg = msg
        rec.kill_at = None
        rec.kill_at_wall = None
        rec.resend_at = None
        if rec.ended_at is None:
            rec.ended_at = self._clock()

    def _forget_locked(self, rec: _Record) -> None:
        self._unwatch_locked(rec)
        self._records.pop(rec.key, None)
        self._dirty.add(rec.key)
        for suffix in (".status", ".status.tmp"):
            with contextlib.suppress(OSError):
                os.unlink(rec.base + suffix)

    def _signal_term_locked(self, rec: _Record, grace: float) -> None:
        self._touch_locked(rec)
        rec.state = st.TERMINATING
        rec.grace = grace
        rec.kill_at = time.monotonic() + grace
        rec.kill_at_wall = time.time() + grace
        if rec.pid is not None:
            _killpg(rec.pid, signal.SIGTERM)
            if rec.started_mono is not None and self._wrapper == "sh":
                young_until = rec.started_mono + _YOUNG
                if young_until > time.monotonic() and young_until < rec.kill_at:
                    rec.resend_at = young_until

    def _start_locked(self, rec: _Record) -> None:
        env = dict(self._base_env)
        env.update(rec.env or {})
        problem = _precheck(rec.command, env, rec.cwd)
        if problem:
            self._end_locked(rec, st.FAILED, problem)
            return
        status = rec.base + ".status"
        for suffix in (".status", ".status.tmp"):
            with contextlib.suppress(OSError):
                os.unlink(rec.base + suffix)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, rec.base + ".out", flags, 0o644),
            (os.POSIX_SPAWN_OPEN, 2, rec.base + ".err", flags, 0o644),
        ]
        if self._wrapper == "sh":
            exe = SHELL
            argv = [SHELL, "-c", SH_WRAPPER, "runwrap", status, rec.cwd or "", *rec.command]
        else:
            exe = self._python
            argv = [exe, "-I", "-S", RUNWRAP, status, rec.cwd or "", "--", *rec.command]
        try:
            pid = os.posix_spawn(
                exe,
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigmask=(),
                setsigdef=_RESTORE_SIGNALS,
            )
        except (OSError, TypeError, ValueError) as exc:
            self._end_locked(rec, st.FAILED, f"cannot start the process wrapper: {exc}")
            return
        self._touch_locked(rec)
        rec.pid = pid
        rec.is_child = True
        stat = _proc_stat(pid)
        rec.start_ticks = stat[1] if stat else None
        rec.state = st.RUNNING
        rec.msg = ""
        rec.started_at = self._clock()
        rec.started_mono = time.monotonic()
        self._watch_locked(rec)

    # -- internals: watching ---------------------------------------------------------------

    def _watch_locked(self, rec: _Record) -> None:
        """Arrange for ``_finish_locked(rec)`` when the wrapper ``rec.pid`` exits."""
        assert rec.pid is not None
        rec.watched = True
        if self._use_pidfd:
            try:
                fd = os.pidfd_open(rec.pid)
            except ProcessLookupError:
                # gone (and reaped by someone else) before we could watch it
                self._fallback_q.append(rec.key)
                self._wake()
                return
            rec.pidfd = fd
            self._selector.register(fd, selectors.EVENT_READ, rec.key)
            return
        if rec.is_child:
            pid, key = rec.pid, rec.key

            def wait_child() -> None:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                with self._lock:
                    if not self._closed:
                        self._fallback_q.append(key)
                        self._wake()

            threading.Thread(target=wait_child, name=f"eeagent-wait-{pid}", daemon=True).start()
        else:
            rec.poll_mode = True
            self._wake()

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

    def _next_timeout_locked(self) -> float | None:
        now = time.monotonic()
        t: float | None = None
        for rec in self._records.values():
            if rec.kill_at is not None and rec.state == st.TERMINATING:
                left = max(0.0, min(rec.kill_at, rec.resend_at or rec.kill_at) - now)
                t = left if t is None else min(t, left)
            if rec.poll_mode:
                t = _POLL_INTERVAL if t is None else min(t, _POLL_INTERVAL)
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
                raise
            ended: list[Key] = []
            for key, _ in events:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                else:
                    ended.append(key.data)
            while self._fallback_q:
                ended.append(self._fallback_q.popleft())
            try:
                changed = self._handle(ended)
            except Exception:  # pragma: no cover - keep the watcher alive
                log.exception("eeagent watcher: error handling events")
                changed = False
            if changed:
                with self._lock:
                    if not self._closed:
                        self._save_locked()
                self._deliver()
            self._run_pending_sweeps()

    def _handle(self, ended: list[Key]) -> bool:
        changed = False
        with self._lock:
            if self._stopping:
                return False
            now = time.monotonic()
            for rec in list(self._records.values()):
                if (
                    rec.resend_at is not None
                    and rec.resend_at <= now
                    and rec.state == st.TERMINATING
                    and rec.pid is not None
                    and not rec.killed
                ):
                    rec.resend_at = None
                    _killpg(rec.pid, signal.SIGTERM)
                if (
                    rec.state == st.TERMINATING
                    and rec.kill_at is not None
                    and rec.kill_at <= now
                    and rec.pid is not None
                ):
                    rec.kill_at = None
                    rec.kill_at_wall = None
                    rec.killed = True
                    self._touch_locked(rec)
                    _killpg(rec.pid, signal.SIGKILL)
                if rec.poll_mode and rec.pid is not None and not _alive(rec):
                    ended.append(rec.key)
            for key in ended:
                rec = self._records.get(key)
                if rec is None or not rec.watched:
                    continue
                try:
                    self._finish_locked(rec)
                except Exception as exc:  # pragma: no cover - never leave a fired pidfd armed
                    log.exception("eeagent watcher: settling %s failed", key)
                    self._unwatch_locked(rec)
                    self._end_locked(rec, st.FAILED, f"supervisor error: {exc}")
                changed = True
            if changed:
                self._changed_locked()
        return changed

    def _finish_locked(
        self, rec: _Record, *, while_down: bool = False, pid_valid: bool = True
    ) -> None:
        """The wrapper ``rec.pid`` has exited (or is gone): settle the record.

        ``pid_valid`` False means the pid may belong to someone else now: never signal it.
        """
        status = read_status(rec.base + ".status")
        wcode: int | None = None
        if rec.pid is not None and pid_valid:
            # Sweep what the command left in its group. killpg is safe while the wrapper (a
            # zombie now) still holds its pid; if the pid is free, only our leftovers can hold
            # the group id (checked later, off the hot path); if it was reused, leave it alone.
            stat = _proc_stat(rec.pid)
            if stat is not None and stat[1] == rec.start_ticks:
                _killpg(rec.pid, signal.SIGKILL)
            elif stat is None:
                self._sweeps.append(rec.pid)
            if rec.is_child:
                try:
                    pid, wstatus = os.waitpid(rec.pid, os.WNOHANG)
                    if pid == rec.pid:
                        wcode = os.waitstatus_to_exitcode(wstatus)
                except ChildProcessError:
                    pass
        self._unwatch_locked(rec)
        if status is not None and status.get("ended_at") and while_down:
            rec.ended_at = float(status["ended_at"])
        code = status.get("exit_code") if status is not None else wcode
        rec.exit_code = code
        down = f" ({DOWN_MSG})" if while_down else ""
        if rec.state == st.TERMINATING:
            how = f"SIGKILL after {rec.grace:g} s grace" if rec.killed else _describe(code)
            self._end_locked(rec, st.TERMINATED, f"terminated: {how}{down}")
        elif status is not None and status.get("error"):
            self._end_locked(rec, st.FAILED, f"{status['error']}{down}")
        elif status is None:
            if while_down:
                self._end_locked(rec, st.FAILED, f"{DOWN_MSG}; exit status unknown")
            else:
                self._end_locked(
                    rec,
                    st.FAILED,
                    f"process wrapper ended without an exit status ({_describe(wcode)})",
                )
        elif code == 0:
            self._end_locked(rec, st.EXITED, f"{_describe(code)}{down}")
        else:
            self._end_locked(rec, st.FAILED, f"{_describe(code)}{down}")
        if rec.superseded:
            self._forget_locked(rec)
            for succ in self._records.values():
                if succ.waiting_for == rec.key and succ.state == st.PENDING:
                    succ.waiting_for = None
                    self._start_locked(succ)

    def _run_pending_sweeps(self) -> None:
        with self._lock:
            sweeps, self._sweeps = self._sweeps, []
        for pgid in sweeps:
            # Not our child: the pid may already be reaped. Kill the group only while some
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
        if not self._journal:
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
        if doc is None:
            return
        self._jgen = int(doc.get("journal") or 0)
        same_boot = doc.get("boot_id") is not None and doc.get("boot_id") == self._boot_id
        for entry in doc.get("processes", []):
            rec = _Record.from_json(entry)
            rec.base = os.path.join(self._proc_dir, _file_stem(rec.upid, rec.round))
            self._records[rec.key] = rec
        for rec in list(self._records.values()):
            if rec.state in (st.RUNNING, st.TERMINATING):
                self._adopt_locked(rec, same_boot)
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
                self._start_locked(rec)

    def _adopt_locked(self, rec: _Record, same_boot: bool) -> None:
        if rec.pid is None:
            self._end_locked(rec, st.FAILED, "launch interrupted by an agent restart")
            return
        if not same_boot:
            # the pid means nothing after a reboot
            self._finish_locked(rec, while_down=True, pid_valid=False)
            return
        fd: int | None = None
        if self._use_pidfd:
            try:
                fd = os.pidfd_open(rec.pid)
            except ProcessLookupError:
                fd = None
        stat = _proc_stat(rec.pid)
        same = stat is not None and stat[1] == rec.start_ticks
        rec.is_child = same and _is_my_child(rec.pid)
        alive = same and stat is not None and stat[0] not in ("Z", "X")
        if alive:
            if rec.state == st.TERMINATING and rec.kill_at_wall is not None:
                rec.kill_at = time.monotonic() + max(0.0, rec.kill_at_wall - time.time())
            if fd is not None:
                rec.pidfd = fd
                rec.watched = True
                self._selector.register(fd, selectors.EVENT_READ, rec.key)
            else:
                self._watch_locked(rec)
            return
        if fd is not None:
            os.close(fd)
        # Ended (a zombie, or the pid is free or reused: _finish_locked tells them apart).
        self._finish_locked(rec, while_down=True)


# ---------------------------------------------------------------------------------------------


def _alive(rec: _Record) -> bool:
    assert rec.pid is not None
    stat = _proc_stat(rec.pid)
    return stat is not None and stat[1] == rec.start_ticks and stat[0] not in ("Z", "X")


def _is_my_child(pid: int) -> bool:
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


def read_status(path: str) -> dict[str, Any] | None:
    """The wrapper's status file as ``{exit_code, ended_at}`` or ``{error}``; None if absent.

    The shell wrapper writes ``CODE`` (``128+N`` for death by signal ``N``, as the shell
    reports it) or ``error MESSAGE``; its mtime is the end time (the kernel's coarse clock:
    a few ms early at most). The Python wrapper writes JSON.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
            mtime = os.fstat(f.fileno()).st_mtime_ns / 1e9
    except OSError:
        return None
    text = data.decode(errors="replace").strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None
    if text.startswith("error "):
        return {"exit_code": None, "error": text[6:], "ended_at": mtime}
    try:
        code = int(text)
    except ValueError:
        return None  # empty: the wrapper was killed while writing
    if 128 < code <= 128 + _SIGMAX:
        code = -(code - 128)
    return {"exit_code": code, "ended_at": mtime}


def read_table(
    state_dir: str | os.PathLike[str], *, quarantine: bool = False
) -> dict[str, Any] | None:
    """The process table of ``state_dir`` as saved: the table file with its journal applied.

    Returns ``{version, boot_id, journal, processes: [record dicts]}`` or None if there is
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


def _is_str_seq(value: object) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and all(isinstance(a, str) for a in value)
    )


def _validate_request(command: object, env: object, cwd: object) -> str | None:
    """A message for a malformed request, or None."""
    if not _is_str_seq(command) or not command:
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


def _precheck(command: Sequence[str], env: Mapping[str, str], cwd: str | None) -> str | None:
    """Why ``command`` cannot start in ``cwd`` with ``env``, or None if it looks runnable."""
    if cwd is not None:
        if not os.path.isdir(cwd):
            return f"working directory {cwd!r} does not exist or is not a directory"
        if not os.access(cwd, os.X_OK):
            return f"working directory {cwd!r} is not accessible"
    exe = command[0]
    if "/" in exe:
        path = exe if os.path.isabs(exe) else os.path.join(cwd or os.getcwd(), exe)
        if not os.path.isfile(path):
            return f"executable {exe!r} not found"
        if not os.access(path, os.X_OK):
            return f"{exe!r} is not executable"
    else:
        search = env.get("PATH", os.defpath)
        now = time.monotonic()
        if _which_cache.get((exe, search), 0.0) > now:
            return None
        if shutil.which(exe, path=search) is None:
            return f"executable {exe!r} not found on PATH"
        if len(_which_cache) > 256:
            _which_cache.clear()
        _which_cache[(exe, search)] = now + _WHICH_TTL
    return None


#: Commands found on a PATH lately: ``(name, PATH) -> monotonic time until which it is trusted``.
_which_cache: dict[tuple[str, str], float] = {}
_WHICH_TTL = 2.0
