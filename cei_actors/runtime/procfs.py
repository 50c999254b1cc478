"""The one reader of ``/proc/<pid>/stat`` (Linux), stdlib only.

``stat(pid)`` reads the line with one ``read(2)`` (the kernel builds it whole) and parses the
fields after the command name, which is in parentheses and may hold anything, spaces and
``)`` included. A process's identity is its pid plus ``start_ticks`` (start time in clock ticks
since boot): a reused pid has another start time.

The reaper and the local VM's init run as files (``python -I -S``) without the package on
their path; they append the directory that holds the package to ``sys.path`` and import this
module (the package's ``__init__`` files import nothing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["DEAD_STATES", "Stat", "alive", "children", "pids", "start_ticks", "stat"]

#: States of a process that has ended (a zombie not yet reaped, or dead).
DEAD_STATES = frozenset(("Z", "X"))


class Stat(NamedTuple):
    """Fields of ``/proc/<pid>/stat``: state letter, parent, group, session, start time."""

    state: str
    ppid: int
    pgrp: int
    session: int
    start_ticks: int

    @property
    def dead(self) -> bool:
        """True for a zombie (ended, not reaped) or a dead process."""
        return self.state in DEAD_STATES


def stat(pid: int | str) -> Stat | None:
    """The stat fields of ``pid``, or None if there is no such process (or it cannot be read)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
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
        return Stat(rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]))
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (with the pid, its identity), or None."""
    s = stat(pid)
    return None if s is None else s.start_ticks


def alive(pid: int, ticks: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, given ``ticks``, started at that time."""
    s = stat(pid)
    return s is not None and not s.dead and (ticks is None or s.start_ticks == ticks)


def pids() -> Iterator[int]:
    """The pids listed in ``/proc`` now."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def children() -> dict[int, list[tuple[int, Stat]]]:
    """``{ppid: [(pid, stat), ...]}`` of every process in ``/proc`` now (one scan)."""
    out: dict[int, list[tuple[int, Stat]]] = {}
    for pid in pids():
        s = stat(pid)
        if s is not None:
            out.setdefault(s.ppid, []).append((pid, s))
    return out
