"""The init of a local "VM": ``python -I -S vminit.py GRACE -- COMMAND...`` (stdlib only).

The local driver starts every node through this small process so that a node is one unit that
dies whole (decision PV1 in docs/decisions.md). It makes itself a child subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``), so every descendant of the command that loses its parent,
even a ``setsid``'d or double-forked one (the EEAgent's reaper and its commands), becomes its
child instead of pid 1's. It starts ``COMMAND`` and reaps whatever ends. The unit ends when:

- the command exits (the EEAgent died or stopped): every remaining descendant gets SIGTERM,
  SIGKILL after ``GRACE`` seconds;
- the init gets SIGTERM, SIGINT or SIGHUP (the driver's destroy): the command gets SIGTERM and
  ``GRACE`` seconds to stop its own processes, then every remaining descendant is killed as
  above.

It exits once it has no descendant left, with the command's exit code (128 + N for a signal
N). If the init itself is SIGKILLed its descendants go to pid 1: the driver then finds them by
the ``CEI_LOCAL_VM`` marker in their environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


if not __package__:  # run as a file (python -I -S): the package is beside this file's parents
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from cei_actors.runtime import procfs  # noqa: E402

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCHED = {signal.SIGCHLD, *STOP_SIGNALS}


def descendants(root: int) -> list[int]:
    """Live (non-zombie) descendants of ``root``, from the parent pids in ``/proc``."""
    children = {
        ppid: [pid for pid, s in kids if not s.dead] for ppid, kids in procfs.children().items()
    }
    out: list[int] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def reap(command: int) -> int | None:
    """Reap every ended child; the command's wait status if it was among them."""
    status = None
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == command:
            status = st


def kill_all(sig: int) -> int:
    """Send ``sig`` to every descendant; how many there were."""
    pids = descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return len(pids)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: vminit.py GRACE -- COMMAND...", file=sys.stderr)
        return 2
    grace, command = float(argv[0]), argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"vminit: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    try:
        pid = os.posix_spawnp(command[0], command, dict(os.environ), setsigmask=())
    except OSError as exc:
        print(f"vminit: cannot start {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    status: int | None = None
    stop_at: float | None = None
    # Run until the command ends or a stop signal's grace is over.
    while status is None:
        status = reap(pid)
        if status is not None:
            break
        wait = 1.0 if stop_at is None else stop_at - time.monotonic()
        if wait <= 0:
            break
        info = signal.sigtimedwait(WATCHED, wait)
        if info is not None and info.si_signo in STOP_SIGNALS and stop_at is None:
            stop_at = time.monotonic() + grace
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    # Everything left of the unit: SIGTERM, then SIGKILL until none is left.
    deadline = time.monotonic() + (grace if stop_at is None else max(0.0, stop_at - time.monotonic()))
    if kill_all(signal.SIGTERM):
        while time.monotonic() < deadline:
            s = reap(pid)
            status = s if s is not None else status
            if not descendants(os.getpid()):
                break
            signal.sigtimedwait(WATCHED, 0.05)
    while True:
        s = reap(pid)
        status = s if s is not None else status
        if not kill_all(signal.SIGKILL):
            break
        signal.sigtimedwait(WATCHED, 0.02)
    s = reap(pid)
    status = s if s is not None else status
    if status is None:
        return 128 + signal.SIGKILL
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
