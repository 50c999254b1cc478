"""The one /proc stat reader, on real processes."""

from __future__ import annotations

import os
import subprocess
import sys

from cei_actors.runtime import procfs


def test_stat_of_a_real_child_with_a_hostile_name(tmp_path):
    # a command name with spaces and ")" must not shift the fields
    exe = tmp_path / "a b) c"
    os.symlink(sys.executable, exe)
    proc = subprocess.Popen([str(exe), "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        s = procfs.stat(proc.pid)
        assert s is not None
        assert s.ppid == os.getpid()
        assert s.pgrp == proc.pid and s.session == proc.pid
        assert not s.dead
        assert procfs.start_ticks(proc.pid) == s.start_ticks
        assert procfs.alive(proc.pid, s.start_ticks)
        assert not procfs.alive(proc.pid, s.start_ticks + 1)  # another start time: a reused pid
        # the same process (its state, R/S/D, may change between two reads)
        assert (proc.pid, s.start_ticks) in [(pid, c.start_ticks) for pid, c in procfs.children()[os.getpid()]]
    finally:
        proc.kill()
        os.waitpid(proc.pid, 0)
    assert procfs.stat(proc.pid) is None and not procfs.alive(proc.pid)


def test_a_zombie_is_dead():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        import time

        deadline = time.monotonic() + 10
        while (s := procfs.stat(pid)) is not None and not s.dead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s is not None and s.dead and s.state == "Z"
        assert not procfs.alive(pid)
    finally:
        os.waitpid(pid, 0)
