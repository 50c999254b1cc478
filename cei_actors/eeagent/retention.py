"""How long the output files of a cleaned-up process stay on disk.

Pure bookkeeping; the supervisor removes the files. Cleaning up a record schedules its files
(by the record's file stem) for ``retention`` seconds later; launching the same ``(upid,
round)`` again takes them off the schedule. A supervisor that starts schedules the files no
record owns (left by an earlier agent, or by one that kept everything) by their age. Times are
wall-clock seconds, as file modification times are. ``retention=None`` keeps every file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

#: The default retention: output stays a day after its process was cleaned up.
DEFAULT_OUTPUT_RETENTION = 86_400.0
#: The suffixes of a process's output files (``<stem>.out`` and ``<stem>.err``).
OUTPUT_SUFFIXES = (".out", ".err")


class OutputRetention:
    """File stems due for removal, oldest deadline first."""

    def __init__(self, retention: float | None) -> None:
        if retention is not None and not retention >= 0:
            raise ValueError(f"output retention must be >= 0 seconds or None, got {retention!r}")
        self.retention = retention
        self._due: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._due)

    def schedule(self, stem: str, now: float) -> None:
        """The process with these files was cleaned up at ``now``."""
        if self.retention is None:
            return
        self._due.pop(stem, None)
        self._due[stem] = now + self.retention

    def cancel(self, stem: str) -> None:
        """These files belong to a record again: keep them."""
        self._due.pop(stem, None)

    def adopt(self, found: Iterable[tuple[str, float]]) -> None:
        """Schedule leftover files found on disk: ``(stem, modification time)`` pairs. Call
        before any :meth:`schedule` (the schedule stays in deadline order)."""
        if self.retention is None:
            return
        for stem, mtime in sorted(found, key=lambda sm: sm[1]):
            if stem not in self._due:
                self._due[stem] = mtime + self.retention

    def next_deadline(self) -> float | None:
        """When the first scheduled files are due (None: nothing scheduled)."""
        for deadline in self._due.values():
            return deadline
        return None

    def take_due(self, now: float, limit: int) -> list[str]:
        """Up to ``limit`` stems whose time has come, oldest first, off the schedule."""
        out: list[str] = []
        while self._due and len(out) < limit:
            stem, deadline = next(iter(self._due.items()))
            if deadline > now:
                break
            del self._due[stem]
            out.append(stem)
        return out


def output_stem(filename: str) -> str | None:
    """The stem of an output file's name, or None if it is not one."""
    for suffix in OUTPUT_SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return None
