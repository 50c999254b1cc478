"""A system's home is 0700 and its log files 0600 whatever the umask (issue 12 §6)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_cli_e2e import cleanup, run_cli

from cei_actors.eventlog import open_log
from cei_actors.eventlog.records import PendingEvent
from cei_actors.private_files import SecretFileError, read_secret_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_up_makes_the_home_0700_and_its_log_files_0600(tmp_path: Path, umask: int) -> None:
    home = tmp_path / "cei"
    home.mkdir()
    os.chmod(home, 0o755)  # an existing, world-readable home is tightened with a note
    old = os.umask(umask)
    try:
        proc = run_cli("--home", str(home), "up")
    finally:
        os.umask(old)
    try:
        assert proc.returncode == 0, proc.stderr
        assert mode(home) == 0o700
        for name in ("log.sqlite", "log.sqlite-wal", "log.sqlite-shm", "system.log", "system.json"):
            assert (home / name).exists(), name
            assert mode(home / name) == 0o600, f"{name}: {mode(home / name):04o}"
        assert "now 0700" in proc.stdout
    finally:
        cleanup(home)


def test_an_existing_open_sqlite_log_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    with open_log(f"sqlite:///{path}") as log:
        log.append(log.acquire("s"), 0, [PendingEvent("T", 1, 1.0, {"n": 1})])
    for p in tmp_path.iterdir():
        os.chmod(p, 0o644)
    old = os.umask(0)
    try:
        with open_log(f"sqlite:///{path}") as log:
            log.append(log.acquire("s"), 1, [PendingEvent("T", 1, 2.0, {"n": 2})])
            files = sorted(tmp_path.iterdir())
            assert {p.name for p in files} >= {"log.sqlite", "log.sqlite-wal", "log.sqlite-shm"}
            assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        os.umask(old)


def test_a_secret_file_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"k")
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_secret_file(path, "key file")
    os.chmod(path, 0o600)
    assert read_secret_file(path, "key file") == b"k"
    with pytest.raises(SecretFileError, match="No such file"):
        read_secret_file(tmp_path / "nope", "key file")
