"""Honest outcomes (issue 12 §4, §5): a request without a reply in time is an unknown outcome
(its own exception and CLI exit status), retries of a schedule never run the work twice, and
`cei up` on a damaged log fails at once with the component's own reason. Real thespian
systems, real actor processes (suspended with SIGSTOP), the real `cei` command."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_cli_e2e import cleanup, data, leftovers, run_cli
from waiting import wait_for

from cei_actors.embed import CEI, OutcomeUnknown
from cei_actors.eventlog import open_log
from cei_actors.launch.plan import load_plan
from cei_actors.runtime.client import RequestFailed, ServiceClient
from cei_actors.runtime.control import Start, Status, Stop
from cei_actors.runtime.example import Add, Get
from cei_actors.runtime.system import start_actor

ACTOR = "cei_actors.runtime.example_actor.ExampleActor"


@contextlib.contextmanager
def suspended(pid: int) -> Iterator[None]:
    """``pid`` stopped (SIGSTOP) for the block; continued afterwards, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def static_plan_file(tmp_path: Path) -> Path:
    """A small plan: the PD alone with one static node (no Provisioner, no EPUM)."""
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "log": "sqlite:///${home}/log.sqlite",
        "components": {"pd": {"config": {"dispatch_retry_seconds": 2.0}}},
        "pd": {"engines": {"e1": {"slots": 2, "heartbeat_period": 1}}},
        "static_nodes": [{"node_id": "n1"}],
    }))
    return path


# ---- the client ----------------------------------------------------------------------------


def test_a_timeout_is_an_unknown_outcome_and_the_request_may_still_take_effect(tcp_system):
    address = start_actor(tcp_system, ACTOR, Start(f"memory://{uuid.uuid4().hex}"))
    with ServiceClient(tcp_system, address, timeout=10) as client:
        pid = client.call(Status())["pid"]
        with suspended(pid), pytest.raises(OutcomeUnknown) as info:
            client.call(Add("a", 1), timeout=1.0)
        assert not isinstance(info.value, RequestFailed)
        assert info.value.request == "Add" and "may have taken effect" in info.value.message
        # The request was delivered: once the actor runs again it is recorded.
        wait_for(lambda: client.call(Get("a")) == 1, what="the sent Add to take effect")
        client.call(Stop())


# ---- embedding ----------------------------------------------------------------------------


def test_embed_surfaces_outcome_unknown_and_a_once_retry_runs_nothing_twice(tmp_path):
    plan = load_plan(static_plan_file(tmp_path), home=tmp_path)
    with CEI(plan, home=tmp_path, timeout=1.5) as cei:
        pid = cei.info["pids"]["pd"]
        cei.pd.process_counts()  # finds the leader while it answers
        with suspended(pid), pytest.raises(OutcomeUnknown):
            cei.pd.schedule_process("job", command=["true"], restart_mode="never", once=True)
        ended = cei.pd.wait_process("job", ["EXITED", "FAILED"], timeout=30)
        assert ended["state"] == "EXITED" and ended["round"] == 0
        # the retry after the unknown outcome: the same process as it stands, no new round
        again = cei.pd.schedule_process("job", command=["true"], restart_mode="never", once=True)
        assert again["state"] == "EXITED" and again["round"] == 0
        with pytest.raises(RequestFailed, match="different parameters"):
            cei.pd.schedule_process("job", command=["false"], restart_mode="never", once=True)
        # without ``once`` an ended process is run again (the original's schedule semantics)
        assert cei.pd.schedule_process("job", command=["true"], restart_mode="never")["round"] == 1


# ---- the command line -----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path):
    path = tmp_path / "cei"
    try:
        yield path
    finally:
        cleanup(path)


def test_cli_unknown_outcome_exits_3_and_a_retry_with_the_printed_upid_runs_once(home, tmp_path):
    info = data(home, "up", "--plan", str(static_plan_file(tmp_path)))
    with suspended(info["pids"]["pd"]):
        proc = run_cli("--home", str(home), "--request-timeout", "1.5",
                       "process", "schedule", "--restart-mode", "never", "--", "true")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    first = re.fullmatch(r"cei: scheduling process (p-\w+) \(to retry: --upid \1\)", lines[0])
    assert first, lines  # the id is out before the request is sent
    upid = first.group(1)
    assert len(lines) == 2 and lines[1].startswith("cei: outcome unknown: ScheduleProcess")
    assert f"check with `cei process describe {upid}`" in lines[1]
    # it did take effect: it runs, once
    ended = data(home, "process", "wait", upid, "--state", "EXITED")
    assert ended["round"] == 0
    retry = data(home, "process", "schedule", "--upid", upid, "--restart-mode", "never", "--", "true")
    assert (retry["state"], retry["round"]) == ("EXITED", 0)
    assert [p["upid"] for p in data(home, "process", "list")] == [upid]


def test_cli_exit_status_3_is_documented():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert re.search(r"^  3  outcome unknown", proc.stdout, re.M), proc.stdout


# ---- `up` on a damaged log -------------------------------------------------------------------


def test_up_on_a_corrupt_stream_fails_fast_with_the_components_reason(home, tmp_path):
    plan = str(static_plan_file(tmp_path))
    data(home, "up", "--plan", plan)
    data(home, "process", "schedule", "--upid", "a", "--", "true")
    data(home, "process", "wait", "a", "--state", "EXITED")
    data(home, "down")
    log = open_log(f"sqlite:///{home}/log.sqlite")
    try:
        firsts = log._index("pd")
        assert len(firsts) >= 2
        log._corrupt("pd", firsts[1], b"not a batch")
    finally:
        log.close()
    started = time.monotonic()
    proc = run_cli("--home", str(home), "up", "--plan", plan, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "pd cannot recover from its log: CorruptLog: stream 'pd' at offset " in last, last
    assert f"at offset {firsts[1]}" in last
    assert took < 20, f"`up` took {took:.1f}s to fail"
    assert not (home / "system.json").exists()
    wait_for(lambda: not leftovers(home), timeout=20, what="nothing of the failed system left")
