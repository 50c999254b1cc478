"""ProcessSupervisor with real processes, plus the pure states and heartbeat helpers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from cei_actors.eeagent import states as st
from cei_actors.eeagent.heartbeat import HeartbeatScheduler, build_heartbeat
from cei_actors.eeagent.supervisor import (
    DOWN_MSG,
    ProcessLiveError,
    ProcessSupervisor,
    StateDirLockedError,
    UnknownProcessError,
    default_base_env,
    read_table,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ helpers


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def exit_recorded(state_dir: Path, pid: int) -> bool:
    """Has the reaper of ``state_dir`` recorded the exit of ``pid`` (not just seen it end)?"""
    try:
        lines = (state_dir / "reaper.exits").read_text().splitlines()
    except OSError:
        return False
    return any(f'"pid":{pid},' in line and '"seq"' in line for line in lines)


def wait_until(pred, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def read_int(path: Path, timeout: float = 5.0) -> int:
    return wait_until(
        lambda: path.exists() and path.read_text().strip() and int(path.read_text()),
        timeout,
        f"{path}",
    )


def marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries this test's marker."""
    found = []
    needle = f"CEI_TEST_MARK={mark}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(name)):
            found.append(int(name))
    return found


@pytest.fixture
def mark():
    """A marker put into every test process's environment; leftovers are killed at the end."""
    m = uuid.uuid4().hex
    yield m
    leftovers = marked_pids(m)
    for pid in leftovers:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
    for pid in leftovers:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    if leftovers:  # pragma: no cover - a test or the supervisor left something running
        print(f"killed leftover processes {leftovers}")


@pytest.fixture
def make_sup(tmp_path, mark):
    made: list[ProcessSupervisor] = []

    def make(state_dir: Path | None = None, slots: int = 4, **kw) -> ProcessSupervisor:
        kw.setdefault("grace", 2.0)
        kw.setdefault(
            "base_env", {"PATH": os.environ.get("PATH", os.defpath), "CEI_TEST_MARK": mark}
        )
        sup = ProcessSupervisor(state_dir or tmp_path / "agent", slots, **kw)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.shutdown(kill=True, grace=0.2)


# ------------------------------------------------------------------------------ exits


def test_exit_codes_map_to_states(make_sup):
    sup = make_sup()
    sup.launch("ok", 0, ["true"])
    sup.launch("no", 0, ["false"])
    sup.launch("three", 0, ["sh", "-c", "exit 3"])
    sup.launch("sig", 0, ["sh", "-c", "kill -KILL $$"])
    ok = sup.wait("ok", 0, timeout=5)
    assert (ok.state, ok.exit_code) == (st.EXITED, 0)
    no = sup.wait("no", 0, timeout=5)
    assert (no.state, no.exit_code) == (st.FAILED, 1)
    three = sup.wait("three", 0, timeout=5)
    assert (three.state, three.exit_code, three.msg) == (st.FAILED, 3, "exit code 3")
    sig = sup.wait("sig", 0, timeout=5)
    assert (sig.state, sig.exit_code) == (st.FAILED, -9)
    assert "SIGKILL" in sig.msg
    assert {p["upid"]: p["state"] for p in sup.dump()} == {
        "no": st.FAILED,
        "ok": st.EXITED,
        "sig": st.FAILED,
        "three": st.FAILED,
    }
    assert set(sup.dump()[0]) == {"upid", "round", "state", "msg", "exit_code", "pid"}


def test_on_change_fires_at_once_on_exit(make_sup, tmp_path):
    seen: list[tuple[float, list[dict]]] = []
    fired = threading.Event()

    def on_change(snapshot):
        seen.append((time.time(), snapshot))
        if any(p["upid"] == "quick" and p["state"] == st.EXITED for p in snapshot):
            fired.set()

    sup = make_sup(on_change=on_change)
    # the command ends when told (a bare `true` could end before the launch's own change is
    # taken on a busy machine, and that change would then already say EXITED)
    go = tmp_path / "go"
    info = sup.launch("quick", 0, ["sh", "-c", f'while [ ! -e "{go}" ]; do sleep 0.01; done'])
    assert info.state == st.RUNNING
    assert seen and seen[0][1][0]["state"] == st.RUNNING  # launch is a change too
    go.touch()
    assert fired.wait(10), "on_change was not called for the exit"
    # Behaviour only; the figure is printed for the curious (see benchmarks/).
    end = sup.get("quick", 0)
    t_cb = next(t for t, snap in seen if snap[0]["state"] == st.EXITED)
    print(f"noticed -> on_change: {(t_cb - end.ended_at) * 1000:.2f} ms")


def test_output_env_and_cwd(make_sup, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    sup = make_sup()
    info = sup.launch(
        "env",
        0,
        ["sh", "-c", 'echo "FOO=$FOO"; pwd; echo oops >&2'],
        env={"FOO": "bar"},
        cwd=str(work),
    )
    assert sup.wait("env", 0, timeout=5).state == st.EXITED
    out = Path(info.stdout_path).read_text().split()
    assert out == ["FOO=bar", str(work)]
    assert Path(info.stderr_path).read_text() == "oops\n"


def test_default_base_env_is_minimal():
    env = default_base_env({"PATH": "/x", "HOME": "/h", "AWS_SECRET_ACCESS_KEY": "s", "FOO": "1"})
    assert env == {"PATH": "/x", "HOME": "/h"}
    assert default_base_env({})["PATH"] == os.defpath


def test_bad_cwd_or_executable_is_failed_not_raised(make_sup, tmp_path):
    sup = make_sup()
    a = sup.launch("nocwd", 0, ["true"], cwd=str(tmp_path / "missing"))
    assert a.state == st.FAILED and "working directory" in a.msg and a.pid is None
    b = sup.launch("noexe", 0, ["no-such-program-xyz"])
    assert b.state == st.FAILED and "not found" in b.msg
    c = sup.launch("empty", 0, [])
    assert c.state == st.FAILED and "non-empty" in c.msg
    script = tmp_path / "notexec.sh"
    script.write_text("#!/bin/sh\n")
    d = sup.launch("noexec", 0, [str(script)])
    assert d.state == st.FAILED and "not executable" in d.msg
    # the slot accounting ignores them
    assert sup.launch("fine", 0, ["true"]).state == st.RUNNING


# ------------------------------------------------------------------------------ terminate


def test_terminate_sigterm(make_sup):
    sup = make_sup(grace=5.0)
    info = sup.launch("sleeper", 0, ["sleep", "30"])
    t0 = time.monotonic()
    assert sup.terminate("sleeper", 0).state == st.TERMINATING
    end = sup.wait("sleeper", 0, timeout=5)
    assert end.state == st.TERMINATED
    assert end.exit_code == -signal.SIGTERM
    assert time.monotonic() - t0 < 2.0  # well inside the grace period
    assert not alive(info.pid)
    # terminating again, or a finished process, is a no-op
    assert sup.terminate("sleeper", 0).state == st.TERMINATED
    sup.launch("done", 0, ["true"])
    sup.wait("done", 0, timeout=5)
    assert sup.terminate("done", 0).state == st.EXITED


def test_terminate_escalates_to_sigkill_after_grace(make_sup, tmp_path):
    ready = tmp_path / "ready"
    sup = make_sup()
    sup.launch("stubborn", 0, ["sh", "-c", f"trap '' TERM; echo $$ > {ready}; exec sleep 30"])
    read_int(ready)
    t0 = time.monotonic()
    sup.terminate("stubborn", 0, grace=0.4)
    end = sup.wait("stubborn", 0, timeout=5)
    took = time.monotonic() - t0
    assert end.state == st.TERMINATED
    assert "SIGKILL" in end.msg
    assert 0.35 <= took < 3.0


def test_terminate_kills_the_whole_group(make_sup, tmp_path):
    child = tmp_path / "child"
    sup = make_sup()
    sup.launch("parent", 0, ["sh", "-c", f"sleep 30 & echo $! > {child}; wait"])
    kid = read_int(child)
    assert alive(kid)
    sup.terminate("parent", 0, grace=2.0)
    assert sup.wait("parent", 0, timeout=5).state == st.TERMINATED
    wait_until(lambda: not alive(kid), 3, "the child to die")


def test_leftovers_in_the_group_die_with_the_command(make_sup, tmp_path):
    # The child ignores SIGTERM and the parent exits on its own: the group is swept on exit.
    child = tmp_path / "child"
    sup = make_sup()
    sup.launch(
        "daemonish", 0, ["sh", "-c", f"(trap '' TERM; exec sleep 30) & echo $! > {child}; exit 0"]
    )
    kid = read_int(child)
    assert sup.wait("daemonish", 0, timeout=5).state == st.EXITED
    wait_until(lambda: not alive(kid), 3, "the leftover child to die")


def test_terminate_unknown_raises_keyerror(make_sup):
    sup = make_sup()
    with pytest.raises(UnknownProcessError) as exc:
        sup.terminate("ghost", 0)
    assert isinstance(exc.value, KeyError)
    assert "ghost" in str(exc.value)


# ------------------------------------------------------------------------------ slots, keys


def test_slots_reject_extra_launches(make_sup):
    sup = make_sup(slots=2)
    sup.launch("a", 0, ["sleep", "30"])
    sup.launch("b", 0, ["sleep", "30"])
    c = sup.launch("c", 0, ["sleep", "30"])
    assert c.state == st.REJECTED and c.pid is None and "slot" in c.msg
    sup.terminate("a", 0, grace=1.0)
    sup.wait("a", 0, timeout=5)
    assert sup.launch("c", 1, ["true"]).state == st.RUNNING  # slot freed
    zero = make_sup(state_dir=Path(sup.state_dir + "-zero"), slots=0)
    assert zero.launch("z", 0, ["true"]).state == st.REJECTED


def test_duplicate_launch_starts_one_process(make_sup, tmp_path):
    count = tmp_path / "count"
    sup = make_sup()
    cmd = ["sh", "-c", f"echo x >> {count}; sleep 30"]
    first = sup.launch("dup", 0, cmd)
    second = sup.launch("dup", 0, cmd)
    assert second.pid == first.pid
    wait_until(count.exists, 5, "the process to start")
    time.sleep(0.2)
    assert count.read_text() == "x\n"
    assert [p["upid"] for p in sup.dump()] == ["dup"]


def test_higher_round_replaces_a_live_lower_round(make_sup, tmp_path):
    ready = tmp_path / "ready"
    sup = make_sup(slots=1, grace=0.3)
    # the old round ignores SIGTERM, so it takes the SIGKILL after the grace period
    old = sup.launch("u", 0, ["sh", "-c", f"trap '' TERM; echo $$ > {ready}; exec sleep 30"])
    read_int(ready)
    new = sup.launch("u", 1, ["sleep", "30"])  # the slot passes to the new round
    assert new.state == st.PENDING  # it waits for the old round to be gone
    assert [(p["round"], p["state"]) for p in sup.dump()] == [
        (0, st.TERMINATING),
        (1, st.PENDING),
    ]
    running = sup.wait("u", 1, states={st.RUNNING}, timeout=5)
    assert not alive(old.pid)
    assert sup.get("u", 0) is None  # terminated and cleaned up
    assert running.pid != old.pid
    # a stale request for the old round is answered with the newest record
    stale = sup.launch("u", 0, ["sleep", "30"])
    assert (stale.round, stale.pid) == (1, running.pid)
    # a terminal lower round is simply forgotten
    sup.terminate("u", 1, grace=1.0)
    sup.wait("u", 1, timeout=5)
    assert sup.launch("u", 2, ["true"]).state == st.RUNNING
    assert [(p["upid"], p["round"]) for p in sup.dump()] == [("u", 2)]


def test_cleanup(make_sup):
    sup = make_sup()
    sup.launch("live", 0, ["sleep", "30"])
    with pytest.raises(ProcessLiveError):
        sup.cleanup("live", 0)
    sup.launch("done", 0, ["true"])
    sup.wait("done", 0, timeout=5)
    assert sup.cleanup("done", 0) is True
    assert sup.get("done", 0) is None
    assert sup.cleanup("done", 0) is False  # unknown: no-op
    assert [p["upid"] for p in sup.dump()] == ["live"]


def test_cleanup_many_answers_per_key_and_survives_a_restart(make_sup):
    sup = make_sup()
    sup.launch("live", 0, ["sleep", "30"])
    for u in ("d1", "d2"):
        sup.launch(u, 0, ["true"])
        sup.wait(u, 0, timeout=5)
    got = sup.cleanup_many([("d1", 0), ("live", 0), ("nope", 3), ("d2", 0)])
    assert got[0] is True and got[2] is False and got[3] is True
    assert isinstance(got[1], ProcessLiveError)  # returned, not raised: the others still ran
    assert [p["upid"] for p in sup.dump()] == ["live"]
    state_dir = sup.state_dir
    sup.close()
    again = make_sup(state_dir=state_dir)
    assert [p["upid"] for p in again.dump()] == ["live"]  # the journal has the removals


# ------------------------------------------------------------------------------ restart


def test_restart_readopts_running_and_reports_exited_meanwhile(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup1 = make_sup(state_dir=state)
    a = sup1.launch("a", 0, ["sleep", "30"])
    b = sup1.launch("b", 0, ["sh", "-c", "sleep 1; exit 3"])
    with pytest.raises(StateDirLockedError):
        ProcessSupervisor(state, 4)
    sup1.close()
    assert alive(a.pid)  # close() leaves processes running
    wait_until(lambda: exit_recorded(state, b.pid), 5, "b's exit recorded by the reaper")

    sup2 = make_sup(state_dir=state)
    ra, rb = sup2.get("a", 0), sup2.get("b", 0)
    assert (ra.state, ra.pid) == (st.RUNNING, a.pid)
    assert (rb.state, rb.exit_code) == (st.FAILED, 3)
    assert DOWN_MSG in rb.msg
    sup2.terminate("a", 0, grace=1.0)
    assert sup2.wait("a", 0, timeout=5).state == st.TERMINATED
    assert not alive(a.pid)


def test_restart_keeps_the_sigkill_deadline_of_a_terminating_process(make_sup, tmp_path):
    state, ready = tmp_path / "agent", tmp_path / "ready"
    sup1 = make_sup(state_dir=state)
    sup1.launch("s", 0, ["sh", "-c", f"trap '' TERM; echo $$ > {ready}; exec sleep 30"])
    read_int(ready)
    t0 = time.monotonic()
    sup1.terminate("s", 0, grace=0.5)
    sup1.close()
    sup2 = make_sup(state_dir=state)
    assert sup2.get("s", 0).state == st.TERMINATING
    end = sup2.wait("s", 0, timeout=5)
    assert end.state == st.TERMINATED and "SIGKILL" in end.msg
    assert 0.45 <= time.monotonic() - t0 < 3.0


AGENT1 = textwrap.dedent(
    """
    import json, os, sys
    from cei_actors.eeagent.supervisor import ProcessSupervisor
    env = {"PATH": os.environ["PATH"], "CEI_TEST_MARK": sys.argv[2]}
    sup = ProcessSupervisor(sys.argv[1], 4, base_env=env)
    sup.launch("a", 0, ["sleep", "30"])
    sup.launch("b", 0, ["sh", "-c", "sleep 0.2; exit 3"])
    sup.launch("c", 0, ["sh", "-c", "sleep 2; exit 5"])
    print(json.dumps({"dump": sup.dump(), "reaper": sup.reaper_pid}), flush=True)
    os._exit(0)  # an agent crash: no close()
    """
)


def test_agent_crash_then_a_new_supervisor_readopts(make_sup, tmp_path, mark):
    state = tmp_path / "agent"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", AGENT1, str(state), mark],
        check=True, capture_output=True, text=True, env=env, timeout=30,
    ).stdout
    doc = json.loads(out)
    first = {p["upid"]: p for p in doc["dump"]}
    assert all(p["state"] == st.RUNNING for p in first.values())
    assert alive(doc["reaper"]), "the reaper outlives the agent"
    wait_until(lambda: not alive(first["b"]["pid"]), 5, "b to end")

    changes = []
    sup = make_sup(state_dir=state, on_change=changes.append)
    assert sup.reaper_pid == doc["reaper"]  # the same reaper, re-adopted
    a, b, c = sup.get("a", 0), sup.get("b", 0), sup.get("c", 0)
    assert (a.state, a.pid) == (st.RUNNING, first["a"]["pid"])
    # b ended while no agent ran: the reaper kept its true exit code
    assert (b.state, b.exit_code) == (st.FAILED, 3) and DOWN_MSG in b.msg
    assert c.state == st.RUNNING, "c should still run when the agent comes back"
    c_end = sup.wait("c", 0, timeout=5)
    assert (c_end.state, c_end.exit_code, c_end.msg) == (st.FAILED, 5, "exit code 5")
    wait_until(  # delivered by the watcher just after wait() saw it
        lambda: any(p["upid"] == "c" and p["state"] == st.FAILED for s in changes for p in s),
        2,
        "on_change with c FAILED",
    )
    sup.terminate("a", 0, grace=1.0)
    assert sup.wait("a", 0, timeout=5).state == st.TERMINATED
    wait_until(lambda: not alive(first["a"]["pid"]), 3, "a to die")


def test_reused_pid_is_not_adopted(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup1 = make_sup(state_dir=state)
    sup1.launch("x", 0, ["sleep", "30"])
    reaper = sup1.reaper_pid
    sup1.close()
    os.kill(reaper, signal.SIGKILL)  # so x is an orphan, known only by pid and start time
    wait_until(lambda: not alive(reaper), 5, "the reaper to die")
    table = json.loads((state / "processes.json").read_text())
    real_pid = table["processes"][0]["pid"]
    table["processes"][0]["start_ticks"] += 1  # as if the pid now belonged to another process
    (state / "processes.json").write_text(json.dumps(table))
    sup2 = make_sup(state_dir=state)
    x = sup2.get("x", 0)
    assert x.state == st.FAILED and DOWN_MSG in x.msg
    assert alive(real_pid)  # and it was not signalled
    os.killpg(real_pid, signal.SIGKILL)  # not our child: init reaps it


# ------------------------------------------------------------------------------ misc


def test_shutdown_kills_everything(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    pids = [sup.launch(f"s{i}", 0, ["sleep", "30"]).pid for i in range(3)]
    sup.shutdown(kill=True, grace=1.0)
    assert not any(alive(p) for p in pids)
    table = json.loads((state / "processes.json").read_text())
    assert {p["state"] for p in table["processes"]} == {st.TERMINATED}


def test_states_order_and_helpers():
    assert st.ORDER == (
        "PENDING",
        "RUNNING",
        "TERMINATING",
        "TERMINATED",
        "EXITED",
        "FAILED",
        "REJECTED",
    )
    assert [st.rank(s) for s in st.ORDER] == sorted(st.rank(s) for s in st.ORDER)
    assert [st.CODES[s] for s in st.ORDER] == sorted(st.CODES.values())
    assert st.is_after(st.EXITED, st.TERMINATED) and not st.is_after(st.PENDING, st.RUNNING)
    assert [s for s in st.ORDER if st.is_terminal(s)] == [
        "TERMINATED",
        "EXITED",
        "FAILED",
        "REJECTED",
    ]
    assert [s for s in st.ORDER if st.is_live(s)] == ["PENDING", "RUNNING", "TERMINATING"]
    assert st.normalize("500-RUNNING") == st.normalize(("500", "RUNNING")) == "RUNNING"
    assert st.with_code(st.FAILED) == "850-FAILED"
    with pytest.raises(ValueError):
        st.rank("RUNNNING")


def test_heartbeat_message_and_schedule():
    dump = [
        {
            "upid": "b",
            "round": 1,
            "state": "FAILED",
            "msg": "exit code 3",
            "exit_code": 3,
            "pid": 9,
        },
        {"upid": "a", "round": 0, "state": "RUNNING", "msg": "", "exit_code": None, "pid": 8},
    ]
    hb = build_heartbeat("agent-1", "node-1", dump, 100.5)
    assert hb == {
        "eeagent_id": "agent-1",
        "node_id": "node-1",
        "timestamp": 100.5,
        "processes": [
            {"upid": "a", "round": 0, "state": "RUNNING", "msg": ""},
            {"upid": "b", "round": 1, "state": "FAILED", "msg": "exit code 3"},
        ],
    }
    sched = HeartbeatScheduler(interval=30)
    assert sched.due(0) and sched.delay(0) == 0
    sched.sent(10)
    assert not sched.due(20) and sched.delay(20) == 20
    sched.sent(25)  # an on-change heartbeat pushes the periodic one back
    assert not sched.due(40) and sched.due(55)


# ------------------------------------------------------------------------------ EA3: journal


def test_journal_is_compacted_and_reloaded(make_sup, tmp_path, monkeypatch):
    from cei_actors.eeagent import supervisor as sv

    monkeypatch.setattr(sv, "COMPACT_LINES", 8)
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state, slots=40)
    for i in range(20):  # one line for each start and one for each exit (a separate save)
        sup.launch(f"j{i}", 0, ["sleep", "0.03"])
        sup.wait(f"j{i}", 0, timeout=5)
    for i in range(0, 20, 2):  # 40 lines + 8 of these >= 4 per record left: compacted
        sup.cleanup(f"j{i}", 0)
    table = json.loads((state / "processes.json").read_text())
    assert table["journal"] > 1  # compacted on the way
    assert read_table(state) is not None
    saved = {(p["upid"], p["state"], p["exit_code"]) for p in read_table(state)["processes"]}
    assert saved == {(f"j{i}", st.EXITED, 0) for i in range(1, 20, 2)}
    sup.close()
    sup2 = make_sup(state_dir=state)
    assert {(p["upid"], p["state"]) for p in sup2.dump()} == {
        (f"j{i}", st.EXITED) for i in range(1, 20, 2)
    }


def test_a_stale_journal_is_ignored(tmp_path):
    # a crash between writing a compacted table and starting its journal
    state = tmp_path / "agent"
    state.mkdir()
    rec = {"upid": "x", "round": 0, "state": "EXITED", "msg": "exit code 0", "exit_code": 0}
    (state / "processes.json").write_text(
        json.dumps({"version": 1, "boot_id": None, "journal": 5, "processes": [rec]})
    )
    (state / "processes.journal").write_text(
        json.dumps({"journal": 4}) + "\n" + json.dumps({"del": ["x", 0]}) + "\n"
    )
    assert [p["upid"] for p in read_table(state)["processes"]] == ["x"]
    (state / "processes.journal").write_text(
        json.dumps({"journal": 5}) + "\n" + json.dumps({"del": ["x", 0]}) + "\n{\"put\": {\"up"
    )
    assert read_table(state)["processes"] == []  # applied; the torn last line is ignored


def test_terminate_right_after_launch_is_prompt(make_sup):
    # the reaper signals the group only after posix_spawn returned (the command exec'd)
    sup = make_sup(grace=10.0)
    for i in range(15):
        sup.launch(f"t{i}", 0, ["sleep", "30"])
        t0 = time.monotonic()
        sup.terminate(f"t{i}", 0)
        end = sup.wait(f"t{i}", 0, timeout=5)
        assert end.state == st.TERMINATED and time.monotonic() - t0 < 2.0, end
        sup.cleanup(f"t{i}", 0)


def test_a_blocking_on_change_does_not_block_launch(make_sup):
    # on_change runs without any supervisor lock held: a callback that waits for a launch
    # made on another thread must not deadlock (it did while delivery held a lock)
    launched = threading.Event()
    calls = []

    def on_change(snapshot):
        calls.append(len(snapshot))
        if len(calls) == 1:
            assert launched.wait(5), "launch() on the other thread was blocked"

    sup = make_sup(on_change=on_change)
    t = threading.Thread(target=lambda: sup.launch("first", 0, ["sleep", "30"]))
    t.start()
    wait_until(lambda: calls, 5, "the first callback")
    sup.launch("second", 0, ["sleep", "30"])  # must return while the callback waits
    launched.set()
    t.join(5)
    wait_until(lambda: calls[-1] == 2, 5, "the newest snapshot delivered")


# ------------------------------------------------------------------------------ output retention


def test_output_retention_schedule_is_pure_and_ordered():
    from cei_actors.eeagent.retention import OutputRetention, output_stem

    r = OutputRetention(10.0)
    r.adopt([("old", 50.0), ("older", 40.0)])
    r.schedule("a", 100.0)
    r.schedule("b", 101.0)
    r.cancel("b")
    assert r.next_deadline() == 50.0
    assert r.take_due(60.0, 10) == ["older", "old"]
    assert r.take_due(109.9, 10) == []
    r.schedule("c", 100.5)
    assert r.take_due(200.0, 1) == ["a"] and r.take_due(200.0, 5) == ["c"] and len(r) == 0
    keep = OutputRetention(None)
    keep.schedule("a", 1.0)
    keep.adopt([("b", 1.0)])
    assert keep.next_deadline() is None and keep.take_due(1e12, 10) == []
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            OutputRetention(bad)
    assert output_stem("x.r0.out") == "x.r0" and output_stem("x.r0.err") == "x.r0"
    assert output_stem(".out") is None and output_stem("notes.txt") is None


def test_output_files_are_removed_a_retention_after_cleanup(make_sup):
    sup = make_sup(output_retention=0.5)
    sup.launch("a", 0, ["sh", "-c", "echo out; echo err >&2"])
    sup.launch("kept", 0, ["true"])
    sup.wait("a", 0, timeout=5)
    sup.wait("kept", 0, timeout=5)
    info = sup.get("a", 0)
    out, err = Path(info.stdout_path), Path(info.stderr_path)
    kept = Path(sup.get("kept", 0).stdout_path)
    assert out.read_text() == "out\n" and err.read_text() == "err\n"
    assert sup.cleanup("a", 0)
    time.sleep(0.2)
    assert out.exists() and err.exists()  # still within the retention
    wait_until(lambda: not out.exists() and not err.exists(), 5, "the old output to go")
    assert kept.exists()  # never cleaned up: kept


def test_a_relaunch_of_a_cleaned_up_key_keeps_its_output(make_sup):
    sup = make_sup(output_retention=0.3)
    sup.launch("a", 0, ["sh", "-c", "echo one"])
    sup.wait("a", 0, timeout=5)
    path = Path(sup.get("a", 0).stdout_path)
    sup.cleanup("a", 0)
    sup.launch("a", 0, ["sh", "-c", "sleep 0.8; echo two"])
    time.sleep(0.6)
    assert path.exists()
    sup.wait("a", 0, timeout=5)
    assert path.read_text() == "one\ntwo\n"


def test_a_new_supervisor_removes_old_leftover_output(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    sup.launch("live", 0, ["sleep", "30"])
    wait_until(lambda: sup.get("live", 0).state == st.RUNNING, 5, "RUNNING")
    owned = Path(sup.get("live", 0).stdout_path)
    sup.close()  # the process keeps running; the next supervisor adopts it
    proc = state / "proc"
    old = [proc / "gone-1.r0.out", proc / "gone-1.r0.err"]
    young, other = proc / "gone-2.r0.out", proc / "notes.txt"
    hour_ago = time.time() - 3600
    for p in [*old, young, other]:
        p.write_text("x")
    for p in [*old, other, owned]:
        os.utime(p, (hour_ago, hour_ago))
    again = make_sup(state_dir=state, output_retention=600)
    wait_until(lambda: not any(p.exists() for p in old), 5, "the leftovers to go")
    assert young.exists() and other.exists() and owned.exists()
    assert again.get("live", 0).state == st.RUNNING


# ------------------------------------------------------------------------------ one table, real and pure


class _PureAgent:
    """The pure table driven as the simulator drives it, with model processes: ``sleep``
    ends on SIGTERM; a command that traps TERM ends only on SIGKILL."""

    def __init__(self, slots: int, grace: float) -> None:
        from cei_actors.eeagent.state import ProcessTable

        self.t, self.slots, self.grace, self.now, self.pid = ProcessTable(), slots, grace, 0.0, 0

    def launch(self, upid: str, round_: int, command: list[str]) -> None:
        from cei_actors.eeagent import logic

        self._apply(logic.launch(self.t, upid, round_, command, slots=self.slots,
                                 grace=self.grace, now=self.now, stamp=self.now).actions)

    def after(self, seconds: float) -> None:
        from cei_actors.eeagent import logic

        self.now += seconds
        self._apply(logic.kill_due(self.t, list(self.t), self.now))

    def _apply(self, actions) -> None:
        from cei_actors.eeagent import logic

        for a in actions:
            if isinstance(a, logic.Start):
                self.pid += 1
                logic.started(self.t, a.record, self.pid, None, self.now)
            elif isinstance(a, logic.Signal):
                traps = "trap" in " ".join(a.record.command)
                if a.sig == signal.SIGKILL or not traps:
                    self._apply(logic.exited(self.t, a.record.key, a.record.pid, -a.sig, self.now)[1])

    def rows(self) -> list[tuple]:
        return [(r["upid"], r["round"], r["state"], r["msg"]) for r in self.t.dump()]


def _rows(sup: ProcessSupervisor) -> list[tuple]:
    return [(r["upid"], r["round"], r["state"], r["msg"]) for r in sup.dump()]


def test_real_agent_and_pure_table_obey_the_same_slot_and_supersede_rules(make_sup):
    """The same launches on the real supervisor (real processes, the real reaper) and on the
    pure table the simulator drives give the same records, step by step: the slot limit, a
    superseding round waiting for the old one, a stale round, and an old round still ending
    (it ignores SIGTERM) after its successor failed: it keeps its slot and blocks its upid."""
    grace = 1.5
    sup = make_sup(slots=2, grace=grace)
    pure = _PureAgent(slots=2, grace=grace)
    sleep = ["sleep", "30"]
    stubborn = ["sh", "-c", "trap '' TERM; sleep 30"]

    def both(upid: str, round_: int, command: list[str]) -> None:
        sup.launch(upid, round_, command)
        pure.launch(upid, round_, command)

    both("a", 0, sleep)
    both("b", 0, stubborn)
    both("c", 0, sleep)  # no slot left
    assert _rows(sup) == pure.rows()
    assert pure.rows()[2] == ("c", 0, st.REJECTED, "no free slot: 2 of 2 slots in use")

    both("a", 1, sleep)  # supersedes a0: SIGTERM, a1 waits, then runs
    sup.wait("a", 1, states=[st.RUNNING], timeout=10)
    assert sup.get("a", 0) is None
    both("a", 0, sleep)  # stale: nothing happens
    assert _rows(sup) == pure.rows()
    assert [r[:3] for r in pure.rows()] == [("a", 1, st.RUNNING), ("b", 0, st.RUNNING),
                                           ("c", 0, st.REJECTED)]

    both("b", 1, [])  # a malformed round: FAILED, and b0 is told to stop (it ignores SIGTERM)
    both("c", 1, sleep)  # b0 still runs: its slot is not free
    both("b", 2, sleep)  # waits for b0, in b0's slot
    assert _rows(sup) == pure.rows()
    assert [r[:3] for r in pure.rows()] == [
        ("a", 1, st.RUNNING), ("b", 0, st.TERMINATING), ("b", 2, st.PENDING),
        ("c", 1, st.REJECTED)]

    sup.wait("b", 2, states=[st.RUNNING], timeout=grace + 10)  # b0 SIGKILLed after the grace
    pure.after(grace)
    assert _rows(sup) == pure.rows()
    assert sup.get("b", 0) is None and pure.t.get(("b", 0)) is None


def test_ends_caused_by_the_node_going_away_carry_the_cause(make_sup, tmp_path):
    """F3/OP7: the processes a shutdown (the agent's SIGTERM) or the reaper's SIGTERM stops end
    with ``cause`` node in the dump (and the table); one that ended on its own, or one the PD
    asked to terminate, has none."""
    sup = make_sup(state_dir=tmp_path / "a")
    sup.launch("crash", 0, ["sh", "-c", "exit 3"])
    sup.wait("crash", 0, timeout=10)
    asked = sup.launch("asked", 0, ["sleep", "30"]).pid
    sup.launch("long", 0, ["sleep", "30"])
    sup.terminate("asked", 0)
    sup.shutdown(kill=True, grace=2.0)
    rows = {r["upid"]: r for r in sup.dump()}
    assert rows["long"]["state"] == st.TERMINATED and rows["long"]["cause"] == st.CAUSE_NODE
    assert "stopped with its node" in rows["long"]["msg"]
    assert "cause" not in rows["crash"] and rows["crash"]["state"] == st.FAILED
    assert "cause" not in rows["asked"] and not alive(asked)
    table = {p["upid"]: p for p in json.loads((tmp_path / "a" / "processes.json").read_text())["processes"]}
    assert table["long"]["cause"] == st.CAUSE_NODE and table["crash"]["cause"] is None
    # the reaper's SIGTERM (the VM's init stops everything) stops the processes for the node too
    sup2 = make_sup(state_dir=tmp_path / "b")
    sup2.launch("long", 0, ["sleep", "30"])
    os.kill(sup2.reaper_pid, signal.SIGTERM)
    row = sup2.wait("long", 0, timeout=10)
    assert row.state == st.FAILED and "killed by signal SIGTERM" in row.msg
    assert sup2.dump()[0]["cause"] == st.CAUSE_NODE
