"""The embedding API, and the example host container run as a real program."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cei_actors.embed import CEI
from cei_actors.launch.plan import load_plan

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "host_container.py"


@pytest.mark.parametrize("base", ["multiprocTCPBase", "simpleSystemBase"])
def test_host_container_example_runs(tmp_path, base):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--base", base, "--home", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "process hello: EXITED (exit code 0)" in out
    assert "[cei] pd ready" in out
    # the host reacted to what it was told: HA kept 2 copies through the loss of one
    assert "[callback] process hello EXITED round 0" in out
    lines = out.splitlines()
    steady = [i for i, line in enumerate(lines) if line.startswith("[callback] ha web STEADY (2 of 2")]
    killed = next(i for i, line in enumerate(lines) if line.startswith("killing "))
    assert steady and steady[0] < killed < steady[-1], out
    victim = next(line for line in lines if "(replaced " in line).split("(replaced ")[1].rstrip(")")
    assert any(line.startswith(f"[callback] process {victim} FAILED") for line in lines[killed:]), out
    if base == "multiprocTCPBase":  # the node itself died
        node = lines[killed].split()[2]
        assert f"[callback] node {node} TERMINATED [epum]" in lines[killed:], out
    assert "[callback] ha web REMOVED" in out
    assert "callbacks received: ha " in out


def static_plan(tmp_path: Path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "log": "sqlite:///${home}/log.sqlite",
        "components": {"pd": {"config": {"dispatch_retry_seconds": 2.0}}},
        "pd": {"engines": {"e1": {"slots": 2, "heartbeat_period": 1}}},
        "static_nodes": [{"node_id": "n1"}],
    }))
    return load_plan(path, home=tmp_path)


def test_embedded_in_this_process_leaves_the_host_alone(tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    root = (list(logging.root.handlers), logging.root.level)
    with CEI(static_plan(tmp_path), base="simpleSystemBase", home=tmp_path) as cei:
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        assert (list(logging.root.handlers), logging.root.level) == root
        cei.pd.schedule_process("p", command=["sh", "-c", "exit 3"], restart_mode="never")
        proc = cei.pd.wait_process("p", ["EXITED", "FAILED"], timeout=30)
        assert proc["state"] == "FAILED" and "exit code 3" in proc["msg"]
        status = cei.status()
        assert status["components"]["pd"][0]["leader"] is True
        with pytest.raises(Exception, match="runs no epum"):
            cei.epum.list_domains()
    assert (tmp_path / "log.sqlite").exists()  # the log stays
    # a second embedded run on the same home recovers the process from the log
    with CEI(static_plan(tmp_path), base="simpleSystemBase", home=tmp_path) as cei:
        assert cei.pd.describe_process("p")["state"] == "FAILED"


def test_temporary_home_is_removed(tmp_path):
    cei = CEI(static_plan(tmp_path), base="simpleSystemBase")
    cei.start()
    home = cei.home
    assert home is not None and home.exists()
    cei.stop()
    cei.stop()  # twice is fine
    assert not home.exists()
