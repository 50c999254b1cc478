"""Reading a process's output file: a byte range, or where its last lines begin.

Used by the agent to answer :class:`~.messages.ReadOutput` and by ``cei process logs`` on
files this host sees (one reader for both)."""

from __future__ import annotations

import os


def tail_offset(path: str | os.PathLike[str], lines: int, block: int = 1 << 16) -> int:
    """The offset in ``path`` where its last ``lines`` lines begin (a last line without its
    newline counts as one; 0 if it has fewer)."""
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        if lines == 0:
            return end
        pos, data = end, b""
        while pos > 0:  # read back from the end until enough lines are in
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
            if data[:-1].count(b"\n") >= lines:
                break
    cut = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return 0
    return pos + cut + 1


def read_chunk(path: str | os.PathLike[str], offset: int, limit: int,
               tail: int | None = None) -> tuple[int, bytes, int]:
    """``(start, data, size)``: up to ``limit`` bytes of ``path`` from ``offset`` (or from
    where its last ``tail`` lines begin), and the file's size when read. Raises
    ``FileNotFoundError`` if it is not there."""
    if tail is not None:
        offset = tail_offset(path, tail)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        return offset, f.read(limit), size
