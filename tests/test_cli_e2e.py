"""The ``cei`` command end to end against a real system (subprocesses, real EEAgent "VMs"):
up, schedule, kill a node, see the restart, terminate, down, up again (replay), and the demo."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_for

from cei_actors.launch.launcher import NotRunning, down

REPO = Path(__file__).resolve().parent.parent


def run_cli(*argv: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cei_actors.cli ARGV`` with its output in files, not pipes (see
    :func:`test_up_returns_with_piped_output`)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run([sys.executable, "-m", "cei_actors.cli", *argv], stdout=out, stderr=err,
                              cwd=REPO, timeout=timeout)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def cei(home: Path, *argv: str, check: bool = True, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run ``cei --json --home HOME ARGV``."""
    proc = run_cli("--json", "--home", str(home), *argv, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cei {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def data(home: Path, *argv: str) -> Any:
    return json.loads(cei(home, *argv).stdout)


def leftovers(home: Path) -> list[int]:
    """Live processes whose command line or environment mentions ``home``."""
    needle = str(home).encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                text = f.read()
            with contextlib.suppress(OSError), open(f"/proc/{entry.name}/environ", "rb") as f:
                text += f.read()
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if needle in text and stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


def cleanup(home: Path) -> None:
    """``down`` (if anything is up), then SIGKILL whatever still mentions ``home``."""
    with contextlib.suppress(NotRunning, Exception):
        down(home)
    for pid in leftovers(home):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def home(tmp_path: Path):
    path = tmp_path / "cei"
    try:
        yield path
    finally:
        cleanup(path)


def test_up_schedule_kill_restart_terminate_down_up(home: Path) -> None:
    info = data(home, "up")
    assert info["admin_port"] and (home / "system.json").exists()
    cei(home, "definition", "create", "sleeper", "--", "sleep", "60")

    p = data(home, "process", "schedule", "--upid", "e1", "--restart-mode", "abnormal", "--", "sleep", "60")
    assert p["upid"] == "e1" and p["round"] == 0 and p["restart_mode"] == "ABNORMAL"
    p = data(home, "process", "schedule", "--upid", "e2", "--definition", "sleeper")
    p = data(home, "process", "wait", "e1", "--state", "RUNNING", "--timeout", "40")
    assert p["state"] == "RUNNING" and p["node_id"]
    first_node = p["node_id"]
    [node] = [n for n in data(home, "node", "list") if n["node_id"] == first_node]
    assert node["state"] == "RUNNING" and node["domain_id"] == "pd_domain_default" and node["site"] == "local"

    killed = data(home, "node", "kill", first_node)
    assert killed["node_id"] == first_node and killed["process_groups"]

    def restarted() -> dict | None:
        """e1 RUNNING again, in a later round, on another node"""
        p = data(home, "process", "describe", "e1")
        return p if p["state"] == "RUNNING" and p["round"] >= 1 and p["node_id"] != first_node else None

    p = wait_for(restarted, timeout=40, every=0.3)
    assert p["round"] == 1
    lost = {n["node_id"]: n["state"] for n in data(home, "node", "list", "--all")}
    assert lost[first_node] in ("TERMINATED", "FAILED")

    p = data(home, "process", "terminate", "e1")
    assert p["upid"] == "e1" and p["state"] in ("TERMINATING", "TERMINATED")
    p = data(home, "process", "wait", "e1", "--state", "TERMINATED", "--timeout", "30")
    assert p["state"] == "TERMINATED"
    before = data(home, "status")
    assert before["components"]["pd"][0]["leader"] is True

    result = data(home, "down")
    assert result["killed"] == []
    gone = cei(home, "status", check=False)
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr == f"cei: system not up (no {home / 'system.json'}): run cei up\n"

    data(home, "up")
    after = data(home, "status")
    assert after["components"]["pd"][0]["head"] >= before["components"]["pd"][0]["head"]
    assert [d["domain_id"] for d in after["domains"]] == ["pd_domain_default"]
    e1 = data(home, "process", "describe", "e1")
    assert (e1["state"], e1["round"]) == ("TERMINATED", 1)
    assert data(home, "definition", "list") == ["sleeper"]
    # e2 was running when the system went down; after the replay it is back in play
    e2 = data(home, "process", "describe", "e2")
    assert e2["state"] not in ("EXITED", "FAILED")
    cei(home, "process", "terminate", "e2")
    data(home, "down")
    assert leftovers(home) == []


def test_demo(tmp_path: Path) -> None:
    demo_home = tmp_path / "demo"
    try:
        proc = run_cli("demo", "--dir", str(demo_home), timeout=150)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        out = proc.stdout
        for needle in ("needs 4 nodes", "asks the Provisioner", "KILL -9 node", "restarted on node",
                       "all the work is done", "no node left", "summary: 20/20 processes finished successfully"):
            assert needle in out, needle
        assert leftovers(demo_home) == []
    finally:
        cleanup(demo_home)


def test_up_returns_with_piped_output(home: Path) -> None:
    """``out=$(cei --json up)`` must return: the background system may not hold the caller's pipes."""
    proc = subprocess.run([sys.executable, "-m", "cei_actors.cli", "--json", "--home", str(home), "up"],
                          capture_output=True, text=True, cwd=REPO, timeout=10)
    assert proc.returncode == 0 and json.loads(proc.stdout)["admin_port"]
