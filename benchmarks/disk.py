"""The work dir's disk, for the benchmarks that create files (the EEAgent's output files).

On ext4 without a journal (this VM's disk), a file create scans past every inode of its block
group deleted in the last 5 s, or in the last 305 s while that inode's table block is dirty
(the kernel's ``recently_deleted``): after a burst of deletions nearby, such as the cleanup of
the last benchmark or test run, a create costs up to 1 ms instead of 0.03 for minutes. The
benchmarks measure that cost before they run, warn when it is high, and delete nothing of their
own until they are done.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

#: A file create slower than this (CPU ms) makes a launch figure a figure of the disk.
SLOW_CREATE_MS = 0.2


def file_create_cost(directory: str, n: int = 400) -> float:
    """CPU ms to create (and close) one empty file in ``directory``: what each output file of
    a launch costs on this disk, measured in the same run. The files are left in place (the
    caller removes ``directory``): deleting them would make the next creates slow."""
    d = tempfile.mkdtemp(prefix="create-", dir=directory)
    t = time.process_time()
    for i in range(n):
        os.close(os.open(os.path.join(d, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    return (time.process_time() - t) / n * 1000


def check_disk(directory: str) -> float:
    """What creating a file in ``directory`` costs now (CPU ms), with a warning when it is slow."""
    cost = file_create_cost(directory)
    if cost > SLOW_CREATE_MS:
        print(f"warning: creating a file in {directory} costs {cost:.2f} ms now (many files were "
              "deleted near it in the last minutes); each launch creates two output files, so the "
              "launch figures are low: wait some minutes or pass --workdir elsewhere",
              file=sys.stderr)
    return cost
