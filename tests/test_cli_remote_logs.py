"""``cei process logs`` of a node whose files this host does not see (issue 15, decision UX4):
the CLI asks the node's EEAgent (``ReadOutput``), found through the PD (``PeerAddress``).

The system runs the PD alone; its only node is an EEAgent process started here by hand, as a
remote VM's would be, with its state in a directory the system does not know (not under the
home's node directories), so every byte ``process logs`` prints came through the agent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_cli_e2e import REPO, cleanup
from test_cli_e2e import data as data_in_child
from test_cli_surface import data, human

from cei_actors.eeagent.supervisor import _file_stem

NODE = "far-1"


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Any:
    """``(home, proc_dir, agent)``: a system whose one node's agent (the process ``agent``)
    keeps its files in ``proc_dir``."""
    base = tmp_path_factory.mktemp("remote")
    home, elsewhere = base / "cei", base / "elsewhere"
    plan = base / "plan.yaml"
    plan.write_text("components:\n  pd:\n    config: {static_resources: true}\nmetrics: off\n")
    agent = None
    try:
        info = data_in_child(home, "up", "--plan", str(plan))
        assert not any(str(d).startswith(str(elsewhere)) for d in info.get("node_dirs") or [])
        agent = subprocess.Popen(
            [sys.executable, "-m", "cei_actors.eeagent", "--node-id", NODE, "--pd",
             f"127.0.0.1:{info['admin_port']}", "--slots", "4", "--state-dir", str(elsewhere / NODE),
             "--epum-name", "", "--heartbeat", "1", "--grace", "1", "--output-retention", "forever",
             "--secret-file", str(home / "secret")],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        data(home, "process", "nodestate", NODE, "pd_domain_default", "RUNNING")
        yield home, elsewhere / NODE / "proc", agent
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(15)
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
        cleanup(home)


def _ran(home: Path, upid: str, script: str, state: str = "EXITED") -> dict[str, Any]:
    data(home, "process", "schedule", "--upid", upid, "--restart-mode", "never", "--", "sh", "-c", script)
    return data(home, "process", "wait", upid, "--state", state, "--timeout", "60")


def test_a_finished_process_s_output_comes_from_its_agent(system) -> None:
    home, proc_dir, _ = system
    script = "i=0; while [ $i -lt 40000 ]; do echo line $i; i=$((i+1)); done; echo oops >&2"
    p = _ran(home, "far-big", script)
    assert p["last_node_id"] == NODE
    assert (proc_dir / (_file_stem("far-big", 0) + ".out")).exists()  # the agent's own files
    want = "".join(f"line {i}\n" for i in range(40000))  # over 256 KiB: several replies
    assert len(want) > 256 * 1024
    assert human(home, "process", "logs", "far-big").stdout == want
    assert human(home, "process", "logs", "far-big", "--stderr").stdout == "oops\n"
    assert human(home, "process", "logs", "far-big", "--tail", "2").stdout == "line 39998\nline 39999\n"
    chunks = [json.loads(line) for line in human(home, "--json", "process", "logs", "far-big").stdout.splitlines()]
    assert len(chunks) >= 2 and {c["node"] for c in chunks} == {NODE}
    assert "".join(c["text"] for c in chunks) == want


def test_follow_streams_from_the_agent_until_the_process_ends(system) -> None:
    home, _, _ = system
    data(home, "process", "schedule", "--upid", "far-follow", "--restart-mode", "never", "--",
         "sh", "-c", "echo one; sleep 2; echo two; echo err >&2")
    data(home, "process", "wait", "far-follow", "--state", "RUNNING", "--timeout", "60")
    proc = human(home, "process", "logs", "far-follow", "--follow")
    assert proc.stdout == "one\ntwo\n" and proc.stderr == ""
    assert data(home, "process", "describe", "far-follow")["state"] == "EXITED"
    assert human(home, "process", "logs", "far-follow", "--stderr", "--follow").stdout == "err\n"


def test_follow_from_before_the_process_is_placed(system) -> None:
    """``--follow`` of a process that has no node yet waits for it, then streams it."""
    home, _, _ = system
    data(home, "process", "schedule", "--upid", "far-early", "--restart-mode", "never", "--",
         "sh", "-c", "sleep 1; echo late")
    assert human(home, "process", "logs", "far-early", "--follow").stdout == "late\n"


def test_unknown_and_cleaned_up_processes_are_one_line_errors(system) -> None:
    home, proc_dir, _ = system
    unknown = human(home, "process", "logs", "far-nosuch", check=False)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("cei: ") and unknown.stderr.count("\n") == 1
    assert "far-nosuch" in unknown.stderr
    _ran(home, "far-gone", "echo bye")
    assert human(home, "process", "logs", "far-gone").stdout == "bye\n"
    for suffix in (".out", ".err"):  # as the agent's output retention removes them
        (proc_dir / (_file_stem("far-gone", 0) + suffix)).unlink()
    gone = human(home, "process", "logs", "far-gone", check=False)
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr == (f"cei: no output of process far-gone round 0 on node {NODE}: it did not run "
                           "there, or its files were removed after the agent's output retention\n")
    follow = human(home, "process", "logs", "far-gone", "--follow", check=False)
    assert follow.returncode == 1 and follow.stderr == gone.stderr


def test_a_gone_node_s_agent_is_a_one_line_error(system) -> None:
    """Last in this module: the node's agent stops (its VM went away), and its output with it."""
    home, _, agent = system
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    gone = human(home, "process", "logs", "far-big", "--tail", "1", check=False)
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr == (f"cei: no output of process far-big round 0: the agent of node {NODE} does "
                           "not answer (the node is gone?)\n")
