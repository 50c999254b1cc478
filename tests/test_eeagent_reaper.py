"""The EEAgent's reaper (one fork server per state dir) with real processes and sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from cei_actors.eeagent import reaper as rp
from cei_actors.eeagent import states as st
from cei_actors.eeagent import supervisor as sv
from cei_actors.eeagent.supervisor import DOWN_MSG, LaunchRequest, ProcessSupervisor, read_table
from tests import test_eeagent_supervisor as _sup_tests
from tests.test_eeagent_supervisor import alive, exit_recorded, read_int, wait_until

# the supervisor tests' fixtures: make_sup (shut down at the end), mark (leftovers killed)
make_sup = _sup_tests.make_sup
mark = _sup_tests.mark

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def reapers_of(state_dir: str | Path) -> list[int]:
    """Live reaper processes whose command line names ``state_dir``."""
    needle = str(state_dir).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"reaper.py") for a in cmd) and needle in cmd and alive(int(name)):
            found.append(int(name))
    return found


class Client:
    """A raw line-JSON client of a reaper socket."""

    def __init__(self, state_dir: str) -> None:
        self.dirfd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(rp.socket_address(state_dir, self.dirfd))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the reaper closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, msg: dict) -> dict:
        self.send((json.dumps(msg) + "\n").encode())
        return self.line()

    def close(self) -> None:
        self.sock.close()
        os.close(self.dirfd)


# ------------------------------------------------------------------------------ exits, errors


def test_exact_exit_codes_no_shell_in_between(make_sup):
    sup = make_sup()
    sup.launch("c130", 0, ["sh", "-c", "exit 130"])  # a shell would read 128+2 as SIGINT
    sup.launch("c200", 0, ["sh", "-c", "exit 200"])
    sup.launch("segv", 0, ["sh", "-c", "kill -SEGV $$"])
    assert (sup.wait("c130", 0, timeout=5).exit_code) == 130
    assert (sup.wait("c200", 0, timeout=5).exit_code) == 200
    segv = sup.wait("segv", 0, timeout=5)
    assert (segv.state, segv.exit_code) == (st.FAILED, -signal.SIGSEGV)
    assert "SIGSEGV" in segv.msg
    sup.launch("builtin", 0, ["exec"])  # a shell builtin name is never run as a builtin
    assert sup.wait("builtin", 0, timeout=5).state == st.FAILED


def test_exec_failure_and_vanished_cwd_are_failed_with_a_message(make_sup, tmp_path):
    sup = make_sup()
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF\x00\x01not really")
    garbage.chmod(0o755)  # passes the precheck, the exec itself fails
    bad = sup.launch("garbage", 0, [str(garbage)])
    assert bad.state == st.FAILED and bad.pid is None
    assert "cannot run" in bad.msg and "format" in bad.msg.lower(), bad.msg
    gone = tmp_path / "gone"
    gone.mkdir()
    gone.chmod(0o755)
    real_precheck = sv._precheck

    def precheck_then_remove(command, env, cwd):
        result = real_precheck(command, env, cwd)
        gone.rmdir()  # vanishes between the supervisor's check and the reaper's chdir
        return result

    sv._precheck = precheck_then_remove
    try:
        end = sup.launch("cwd", 0, ["true"], cwd=str(gone))
    finally:
        sv._precheck = real_precheck
    assert end.state == st.FAILED and "cannot change to directory" in end.msg, end
    assert sup.launch("fine", 0, ["true"]).state == st.RUNNING  # the reaper lives on


# ------------------------------------------------------------------------------ launch_many


def test_launch_many_has_the_semantics_of_one_launch_after_the_other(make_sup, tmp_path):
    sup = make_sup(slots=3, grace=0.3)
    with pytest.raises(ValueError):  # a malformed key anywhere: nothing starts
        sup.launch_many([("ok", 0, ["sleep", "30"]), ("", 0, ["true"])])
    assert sup.dump() == []
    infos = sup.launch_many(
        [
            LaunchRequest("a", 0, ["sh", "-c", "exit 4"]),
            {"upid": "b", "round": 0, "command": ["sleep", "30"]},
            ("a", 0, ["true"]),  # a duplicate of the first: the same record
            ("b", 1, ["sleep", "30"]),  # replaces b round 0 (started, then terminated)
            ("nope", 0, ["no-such-program-xyz"]),
            ("c", 0, ["sleep", "30"], None, str(tmp_path)),
            ("d", 0, ["sleep", "30"]),  # a, b/1 (b/0's slot), c: no slot left
        ]
    )
    got = [(i.upid, i.round, i.state) for i in infos]
    assert got[0][:2] == ("a", 0) and got[2] == got[0] and infos[2].pid == infos[0].pid
    assert got[1] == ("b", 0, st.TERMINATING) and infos[1].pid is not None
    assert got[3] == ("b", 1, st.PENDING)
    assert got[4][2] == st.FAILED and "not found" in infos[4].msg
    assert got[5] == ("c", 0, st.RUNNING) and infos[5].cwd == str(tmp_path)
    assert got[6] == ("d", 0, st.REJECTED)
    assert (sup.wait("a", 0, timeout=5).exit_code) == 4
    assert sup.wait("b", 1, states={st.RUNNING}, timeout=5).pid != infos[1].pid
    assert sup.get("b", 0) is None  # ended and forgotten
    assert not alive(infos[1].pid)


def test_launch_many_in_one_batch(make_sup):
    sup = make_sup(slots=200)
    infos = sup.launch_many([(f"u{i}", 0, ["true"]) for i in range(200)])
    assert all(i.state == st.RUNNING for i in infos)
    assert len({i.pid for i in infos}) == 200
    for i in range(200):
        assert sup.wait(f"u{i}", 0, timeout=10).state == st.EXITED


# ------------------------------------------------------------------------------ the reaper


def test_the_reaper_is_the_parent_in_its_own_session_and_recorded(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    info = sup.launch("s", 0, ["sleep", "30"])
    reaper = sup.reaper_pid
    assert reapers_of(state) == [reaper]
    stat = Path(f"/proc/{info.pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2 :].split()
    assert int(fields[1]) == reaper  # the command's parent
    assert int(fields[2]) == info.pid and int(fields[3]) == info.pid  # its own group, session
    rstat = Path(f"/proc/{reaper}/stat").read_bytes()
    rfields = rstat[rstat.rfind(b")") + 2 :].split()
    assert int(rfields[3]) == reaper != os.getsid(0)  # the reaper's own session
    assert read_table(state)["reaper"] == {"pid": reaper, "start_ticks": int(rfields[19])}
    for name in ("reaper.sock", "processes.json"):
        assert (state / name).stat().st_mode & 0o077 == 0, name


def test_shutdown_leaves_no_reaper_behind(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    pids = [sup.launch(f"s{i}", 0, ["sleep", "30"]).pid for i in range(3)]
    reaper = sup.reaper_pid
    sup.shutdown(kill=True, grace=0.5)
    assert not any(alive(p) for p in pids)
    assert not alive(reaper) and reapers_of(state) == []
    assert not Path(f"/proc/{reaper}").exists(), "the reaper was not reaped (a zombie)"
    assert not (state / "reaper.sock").exists()


def test_an_idle_reaper_exits_by_itself(make_sup, tmp_path, monkeypatch):
    monkeypatch.setattr(sv, "REAPER_IDLE", 0.3)
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    sup.launch("t", 0, ["sleep", "1"])
    reaper = sup.reaper_pid
    sup.close()  # no supervisor; it still has a child, so it stays
    time.sleep(0.4)
    assert alive(reaper)
    wait_until(lambda: not alive(reaper), 5, "the idle reaper to exit")
    # the exit it could not report is not lost: a new supervisor (new reaper) gets it
    sup2 = make_sup(state_dir=state)
    t = sup2.get("t", 0)
    assert (t.state, t.exit_code) == (st.EXITED, 0) and DOWN_MSG in t.msg


def test_long_state_dir_path(make_sup, tmp_path):
    state = tmp_path / ("x" * 100) / ("y" * 100)
    assert len(str(state / "reaper.sock")) > 108
    sup = make_sup(state_dir=state)
    sup.launch("t", 0, ["sh", "-c", "exit 6"])
    sup.launch("s", 0, ["sleep", "30"])
    assert sup.wait("t", 0, timeout=5).exit_code == 6
    reaper = sup.reaper_pid
    sup.close()
    sup2 = make_sup(state_dir=state)  # connects to the same reaper again
    assert sup2.reaper_pid == reaper
    assert sup2.get("s", 0).state == st.RUNNING
    sup2.terminate("s", 0, grace=1.0)
    assert sup2.wait("s", 0, timeout=5).state == st.TERMINATED


def test_malformed_or_oversized_input_gets_an_error_and_changes_nothing(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    s = sup.launch("s", 0, ["sleep", "30"])
    reaper = sup.reaper_pid
    c = Client(str(state))
    before = c.ask({"op": "stats", "id": 1})
    assert before["ok"] and before["live"] == 1
    c.send(b"this is not json\n")
    reply = c.line()
    assert (reply["re"], reply["ok"]) == (None, False) and "malformed" in reply["error"]
    bad = [
        (b"[1, 2]\n", "JSON object"),
        (b'{"op": "explode", "id": 7}\n', "unknown op"),
        (b'{"op": "stats", "id": "x"}\n', "id must be"),
        (b'{"op": "spawn", "id": 8, "key": ["k", 0], "argv": "sh", "env": {}, '
         b'"out": "/tmp/o", "err": "/tmp/e"}\n', "argv"),
        (b'{"op": "spawn", "id": 9, "key": ["k"], "argv": ["true"], "env": {}}\n', "key"),
        (b'{"op": "signal", "id": 10, "key": ["s", 0], "pid": 1, "sig": 99999}\n', "signal"),
        (b'{"op": "ack", "id": 11, "seqs": 5}\n', "seqs"),
        (b"\xff\xfe\n", "malformed"),
    ]
    for data, words in bad:
        c.send(data)
        reply = c.line()
        assert reply["ok"] is False and words in reply["error"], (data, reply)
    # oversized: one line larger than the limit, sent in pieces; the tail is skipped too
    big = b'{"op": "stats", "id": 12, "pad": "' + b"x" * (rp.MAX_LINE + 10) + b'"}\n'
    c.send(big)
    reply = c.line()
    assert reply["ok"] is False and "longer than" in reply["error"]
    # signals go only to the reaper's own live children: not to us, not to a wrong key
    me = c.ask({"op": "signal", "id": 13, "key": ["s", 0], "pid": os.getpid(), "sig": 15})
    wrong = c.ask({"op": "signal", "id": 14, "key": ["t", 0], "pid": s.pid, "sig": 15})
    assert me == {"re": 13, "ok": True, "sent": False} and wrong["sent"] is False
    after = c.ask({"op": "stats", "id": 15})
    assert after["ok"] and after["live"] == 1
    c.close()
    # nothing changed: the same reaper, the process still runs, the supervisor still works
    assert sup.reaper_pid == reaper and alive(reaper) and alive(s.pid)
    assert sup.get("s", 0).state == st.RUNNING
    sup.launch("t", 0, ["sh", "-c", "exit 2"])
    assert sup.wait("t", 0, timeout=5).exit_code == 2


def test_a_process_no_record_knows_is_killed_on_readoption(make_sup, tmp_path, mark):
    # as if the agent crashed after the reaper started a process and before it was journaled
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    keep = sup.launch("keep", 0, ["sleep", "30"])
    c = Client(str(state))
    env = {"PATH": os.environ.get("PATH", os.defpath), "CEI_TEST_MARK": mark}
    r = c.ask({"op": "spawn", "id": 1, "key": ["ghost", 0], "argv": ["sleep", "30"], "env": env,
               "out": str(tmp_path / "g.out"), "err": str(tmp_path / "g.err")})
    c.close()
    assert r["ok"] and alive(r["pid"])
    sup.close()
    sup2 = make_sup(state_dir=state)
    wait_until(lambda: not alive(r["pid"]), 5, "the unknown process to be killed")
    assert sup2.get("ghost", 0) is None
    assert sup2.get("keep", 0).state == st.RUNNING and alive(keep.pid)


# ------------------------------------------------------------------------------ reaper death


def test_agent_and_reaper_both_dead_nothing_started_runs_untracked(make_sup, tmp_path, mark):
    """The agent and its reaper die together: a start the agent journaled (PENDING) but whose
    reply it never saw adopts its process; a process no record knows (started just before the
    crash) is killed; journaled processes, and a command's own children, are left running."""
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    keep = sup.launch("keep", 0, ["sh", "-c", "sleep 30 & wait"])  # its child shares the markers
    c = Client(str(state))
    pids = {}
    for key in ("lost", "ghost"):
        env = {"PATH": os.environ.get("PATH", os.defpath), "CEI_TEST_MARK": mark,
               sv.UPID_ENV: key, sv.ROUND_ENV: "0", sv.OWNER_ENV: str(state)}
        r = c.ask({"op": "spawn", "id": 1, "key": [key, 0], "argv": ["sleep", "30"], "env": env,
                   "out": str(tmp_path / f"{key}.out"), "err": str(tmp_path / f"{key}.err")})
        assert r["ok"] and alive(r["pid"])
        pids[key] = r["pid"]
    c.close()
    reaper = sup.reaper_pid
    sup.close()
    os.kill(reaper, signal.SIGKILL)
    wait_until(lambda: not alive(reaper), 5, "the reaper to die")
    # "lost" was journaled as a start in flight (PENDING, no pid), as the agent does first
    table = json.loads((state / "processes.json").read_text())
    entry = dict(next(p for p in table["processes"] if p["upid"] == "keep"))
    entry.update(upid="lost", state=st.PENDING, pid=None, start_ticks=None, started_at=None)
    table["processes"].append(entry)
    (state / "processes.json").write_text(json.dumps(table))

    sup2 = make_sup(state_dir=state)
    assert sup2.reaper_pid != reaper
    wait_until(lambda: not alive(pids["ghost"]), 5, "the untracked process to be killed")
    lost = sup2.get("lost", 0)
    assert (lost.state, lost.pid) == (st.RUNNING, pids["lost"]) and alive(pids["lost"])
    assert sup2.get("keep", 0).state == st.RUNNING and alive(keep.pid)
    assert len([p for p in _sup_tests.marked_pids(mark) if p not in pids.values()]) == 2, (
        "keep and its child still run"
    )
    sup2.terminate("lost", 0, grace=1.0)  # an adopted orphan is signalled directly
    assert sup2.wait("lost", 0, timeout=5).state == st.TERMINATED


def test_reaper_killed_then_a_new_supervisor_adopts_orphans(make_sup, tmp_path):
    state, ready = tmp_path / "agent", tmp_path / "ready"
    sup1 = make_sup(state_dir=state)
    a = sup1.launch("a", 0, ["sleep", "30"])
    b = sup1.launch("b", 0, ["sh", "-c", "sleep 1; exit 3"])
    c = sup1.launch("c", 0, ["sh", "-c", f"echo $$ > {ready}; sleep 2.5; exit 5"])
    read_int(ready)
    reaper = sup1.reaper_pid
    sup1.close()
    os.kill(reaper, signal.SIGKILL)
    wait_until(lambda: not alive(reaper), 5, "the reaper to die")
    wait_until(lambda: not alive(b.pid), 5, "b to end")
    assert alive(a.pid) and alive(c.pid)  # the processes outlive their reaper

    sup2 = make_sup(state_dir=state)
    assert sup2.reaper_pid not in (None, reaper)  # a new reaper
    assert read_table(state)["reaper"]["pid"] == sup2.reaper_pid
    ra, rb = sup2.get("a", 0), sup2.get("b", 0)
    assert (ra.state, ra.pid) == (st.RUNNING, a.pid)
    assert rb.state == st.FAILED and rb.exit_code is None
    assert rb.msg == f"{DOWN_MSG}; exit status unknown"
    # c is not the new reaper's child: its end is noticed (pidfd), its code is unknown
    t0 = time.monotonic()
    rc = sup2.wait("c", 0, timeout=5)
    assert (rc.state, rc.exit_code) == (st.FAILED, None) and "exit status unknown" in rc.msg
    assert time.monotonic() - t0 < 2.5
    sup2.terminate("a", 0, grace=1.0)  # an orphan is signalled directly
    assert sup2.wait("a", 0, timeout=5).state == st.TERMINATED
    wait_until(lambda: not alive(a.pid), 3, "a to die")
    # and the new reaper runs new launches
    sup2.launch("n", 0, ["sh", "-c", "exit 9"])
    assert sup2.wait("n", 0, timeout=5).exit_code == 9


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "poll"])
def test_reaper_killed_under_a_running_supervisor(make_sup, tmp_path, pidfd):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state, _use_pidfd=pidfd)
    assert sup.uses_pidfd is pidfd
    s = sup.launch("s", 0, ["sleep", "30"])
    sup.launch("t", 0, ["sh", "-c", "sleep 0.5; exit 4"])
    reaper = sup.reaper_pid
    os.kill(reaper, signal.SIGKILL)
    wait_until(lambda: sup.reaper_pid not in (None, reaper), 5, "a new reaper")
    assert alive(s.pid)
    end = sup.wait("t", 0, timeout=5)  # an orphan now: ended, status unknown
    assert end.state == st.FAILED and "exit status unknown" in end.msg
    sup.terminate("s", 0, grace=1.0)
    assert sup.wait("s", 0, timeout=5).state == st.TERMINATED
    assert not alive(s.pid)
    sup.launch("n", 0, ["true"])
    assert sup.wait("n", 0, timeout=5).state == st.EXITED
    assert reapers_of(state) == [sup.reaper_pid]


def test_a_reaper_that_cannot_start_is_an_error(tmp_path):
    with pytest.raises(sv.SupervisorError, match="cannot start the reaper"):
        ProcessSupervisor(tmp_path / "agent", 2, python=str(tmp_path / "no-python"))
    # the state dir is free again (not StateDirLockedError)
    with pytest.raises(sv.SupervisorError, match="exited at once"):
        ProcessSupervisor(tmp_path / "agent", 2, python="/bin/false")
    with ProcessSupervisor(tmp_path / "agent", 2) as sup:
        assert sup.reaper_pid is not None
        sup.shutdown()


def test_exits_recorded_by_a_dead_reaper_are_used(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup1 = make_sup(state_dir=state)
    done = sup1.launch("done", 0, ["sh", "-c", "exit 7"])
    assert sup1.wait("done", 0, timeout=5).exit_code == 7  # reported and acknowledged
    sup1.cleanup("done", 0)
    b = sup1.launch("b", 0, ["sh", "-c", "sleep 1; exit 3"])
    a = sup1.launch("a", 0, ["sleep", "30"])
    reaper = sup1.reaper_pid
    sup1.close()
    wait_until(lambda: exit_recorded(state, b.pid), 5, "b's exit recorded")
    lines = [json.loads(x) for x in (state / "reaper.exits").read_text().splitlines()]
    acked = {s for e in lines for s in e.get("ack", [])}
    exits = {e["pid"]: e for e in lines if "seq" in e}
    assert exits[done.pid]["seq"] in acked  # reported and acknowledged
    assert exits[b.pid]["code"] == 3 and exits[b.pid]["seq"] not in acked  # recorded only
    os.kill(reaper, signal.SIGKILL)
    wait_until(lambda: not alive(reaper), 5, "the reaper to die")
    sup2 = make_sup(state_dir=state)  # a new reaper reads the dead one's exits file
    rb = sup2.get("b", 0)
    assert (rb.state, rb.exit_code) == (st.FAILED, 3) and DOWN_MSG in rb.msg
    assert sup2.get("a", 0).state == st.RUNNING and alive(a.pid)


def test_reaper_killed_in_the_middle_of_a_batch_leaves_nothing_untracked(make_sup, tmp_path, mark):
    """The reaper dies while starting a batch: the processes it started before dying (whose
    replies were lost) are found by their environment and adopted, the rest are FAILED; no
    process runs that no record tracks, and shutdown stops them all."""
    import threading

    from tests.test_eeagent_supervisor import marked_pids

    state = tmp_path / "agent"
    n = 300
    sup = make_sup(state_dir=state, slots=n)
    reaper = sup.reaper_pid
    result: list = []
    batch = threading.Thread(
        target=lambda: result.extend(sup.launch_many([(f"b{i}", 0, ["sleep", "30"]) for i in range(n)]))
    )
    batch.start()
    wait_until(lambda: len(marked_pids(mark)) >= 20, 10, "starts")
    os.kill(reaper, signal.SIGKILL)
    batch.join(30)
    assert len(result) == n
    wait_until(lambda: all(p.state != st.PENDING for p in sup.processes()), 10, "lost starts settled")
    procs = {p.upid: p for p in sup.processes()}
    running = {p.pid for p in procs.values() if p.state == st.RUNNING}
    failed = [p for p in procs.values() if p.state == st.FAILED]
    assert running and failed, "the kill should land inside the batch"
    assert all("reaper" in p.msg for p in failed)
    # each live process is one a record tracks (one caught inside the spawn is killed)
    wait_until(lambda: set(marked_pids(mark)) == running, 5, "only tracked processes")
    assert all(p.pid is not None for p in procs.values() if p.state == st.RUNNING)
    sup.shutdown(kill=True, grace=1.0)
    wait_until(lambda: not marked_pids(mark), 10, "every process stopped")


# ------------------------------------------------------------------------------ the lease (EA8)

#: a group that ignores SIGTERM (the shell and its sleeps): only the SIGKILL after grace ends it
STUBBORN = ["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"]


def test_lease_expiry_stops_every_group_and_refuses_spawns_until_renewed(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    soft = sup.launch("soft", 0, ["sleep", "30"])
    hard = sup.launch("hard", 0, STUBBORN)
    assert soft.state == hard.state == st.RUNNING
    c = Client(str(state))
    assert c.ask({"op": "stats", "id": 1})["lease"] is None
    lease, grace = 0.6, 0.4
    until = time.monotonic() + lease
    sup.set_lease(until, grace)
    left = wait_until(lambda: c.ask({"op": "stats", "id": 2})["lease"], 5, "the lease")
    assert 0 < left <= lease
    assert alive(soft.pid) and alive(hard.pid)
    s = sup.wait("soft", 0, timeout=10)
    h = sup.wait("hard", 0, timeout=10)
    gone = time.monotonic()
    assert not alive(soft.pid) and not alive(hard.pid)
    assert until <= gone < until + grace + 2.0, gone - until  # not before the deadline
    # the reaper stopped them (the supervisor never asked) and says why; the exits are exact
    assert (s.state, s.exit_code) == (st.TERMINATED, -signal.SIGTERM), s
    assert (h.state, h.exit_code) == (st.TERMINATED, -signal.SIGKILL), h
    assert sv.FENCED_MSG in s.msg and sv.FENCED_MSG in h.msg
    events = [json.loads(x) for x in (state / "reaper.exits").read_text().splitlines()]
    assert {e["pid"] for e in events if e.get("fenced")} >= {soft.pid, hard.pid}
    # no spawn until a new lease: the error names the expired lease
    late = sup.launch("late", 0, ["sleep", "30"])
    assert late.state == st.FAILED and "lease ran out" in late.msg, late
    raw = c.ask({"op": "spawn", "id": 3, "key": ["raw", 0], "argv": ["true"], "env": {},
                 "out": str(tmp_path / "r.out"), "err": str(tmp_path / "r.err")})
    assert raw["ok"] is False and f"until {until:.3f}" in raw["error"], raw
    # a new lease: spawns again, and it is enforced in turn
    sup.set_lease(time.monotonic() + 30, grace)
    again = sup.launch("again", 0, ["sleep", "30"])
    assert again.state == st.RUNNING and alive(again.pid)
    assert 29 < c.ask({"op": "stats", "id": 4})["lease"] <= 30
    c.close()


def test_lease_renewed_in_time_keeps_the_processes(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    p = sup.launch("p", 0, ["sleep", "30"])
    lease = 0.5
    end = time.monotonic() + 4 * lease
    while time.monotonic() < end:  # renewed every lease / 5
        sup.set_lease(time.monotonic() + lease, 0.2)
        time.sleep(lease / 5)
        assert alive(p.pid) and sup.get("p", 0).state == st.RUNNING
    last = time.monotonic() + lease
    sup.set_lease(last, 0.2)
    info = sup.wait("p", 0, timeout=10)  # not renewed any more
    assert time.monotonic() >= last and info.state == st.TERMINATED and sv.FENCED_MSG in info.msg


def test_a_new_reaper_gets_the_lease_again(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    sup.set_lease(time.monotonic() + 30, 0.2)
    old = sup.reaper_pid
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: sup.reaper_pid not in (None, old), 10, "a new reaper")
    c = Client(str(state))
    assert 0 < c.ask({"op": "stats", "id": 1})["lease"] <= 30
    c.close()


def test_without_a_lease_nothing_is_enforced(make_sup, tmp_path):
    """Standalone use and agents that predate the lease: no deadline, nothing stopped."""
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    sup.launch("p", 0, ["sleep", "30"])
    c = Client(str(state))
    stats = c.ask({"op": "stats", "id": 1})
    assert stats["ok"] and stats["lease"] is None and stats["live"] == 1
    c.close()
    assert sup.launch("q", 0, ["sleep", "30"]).state == st.RUNNING
    assert sup.get("p", 0).state == st.RUNNING


def test_a_malformed_lease_request_is_an_error_and_changes_nothing(make_sup, tmp_path):
    state = tmp_path / "agent"
    sup = make_sup(state_dir=state)
    p = sup.launch("p", 0, ["sleep", "30"])
    c = Client(str(state))
    bad = [
        b'{"op": "lease", "id": 1}\n',
        b'{"op": "lease", "id": 2, "until": "soon"}\n',
        b'{"op": "lease", "id": 3, "until": true}\n',
        b'{"op": "lease", "id": 4, "until": NaN}\n',
        b'{"op": "lease", "id": 5, "until": -Infinity}\n',
        b'{"op": "lease", "id": 6, "until": 1, "grace": -1}\n',
        b'{"op": "lease", "id": 7, "until": 1, "grace": "x"}\n',
        b'{"op": "lease", "id": 8, "until": 1, "grace": 1e9}\n',
    ]

    def check_all() -> None:
        for data in bad:
            c.send(data)
            reply = c.line()
            named = "until" in reply["error"] or "grace" in reply["error"]
            assert reply["ok"] is False and named, (data, reply)

    check_all()  # every deadline given is long past: one taken would stop p at once
    assert c.ask({"op": "stats", "id": 20})["lease"] is None
    # with a lease in force, a bad one leaves it as it was
    good = c.ask({"op": "lease", "id": 21, "until": time.monotonic() + 30, "grace": 0.5})
    assert good["ok"] and 29 < good["left"] <= 30
    check_all()
    assert 28 < c.ask({"op": "stats", "id": 22})["lease"] <= 30
    c.close()
    assert alive(p.pid) and sup.get("p", 0).state == st.RUNNING
    assert sup.launch("q", 0, ["true"]).state in (st.RUNNING, st.EXITED)
