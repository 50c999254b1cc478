"""Decision FO5: a due snapshot of a big state is written by a snapshotter process that folds
the log from the last snapshot; the leader only spawns it (it never forks its heap). A
failed snapshotter is a warning and the next snapshot is forked; what a snapshotter cannot
rebuild (a memory log, a component of this process only) is forked as before (LT3)."""

from __future__ import annotations

import gc
import logging
import os
import random
import threading

import msgpack
import pytest
from waiting import wait_for

from cei_actors.eventlog import Snapshot, open_log
from cei_actors.eventlog.batch import unpack_state
from cei_actors.pd import states as ps
from cei_actors.pd.events import NodeAdded, ProcessScheduled, ResourceAdded
from cei_actors.pd.logic import ProcessDispatcher
from cei_actors.runtime import runner as runner_module
from cei_actors.runtime.client import BadRequest, ServiceClient
from cei_actors.runtime.control import Start, Status, Stop
from cei_actors.runtime.example import Add, Counters
from cei_actors.runtime.runner import Runner, replay, snapshot_blob
from cei_actors.runtime.snapshotter import fold_class, write_snapshot
from cei_actors.runtime.system import start_actor


@pytest.fixture
def forks(monkeypatch) -> list[int]:
    """Every ``os.fork`` of this process (a snapshotter is spawned without one), and every
    state is "big" (due snapshots go to another process)."""
    monkeypatch.setattr(runner_module, "BACKGROUND_SNAPSHOT_BYTES", 0)
    seen: list[int] = []
    real = os.fork

    def counted() -> int:
        pid = real()
        if pid:
            seen.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counted)
    return seen


def warnings_of_the_runner(caplog) -> None:
    logger = logging.getLogger("cei_actors.runtime.runner")
    logger.disabled, logger.propagate = False, True
    caplog.set_level(logging.WARNING, logger="cei_actors.runtime.runner")


def leader(url: str, every: int = 10) -> Runner:
    r = Runner(Counters(), open_log(url), clock=lambda: 100.0, rng=random.Random(1), snapshot_every=every)
    r.recover()
    return r


def check_snapshotted(r: Runner, offsets: list[int]) -> None:
    assert r.log.snapshots("example") == offsets
    snap = r.log.load_snapshot("example")
    assert Counters().restore(unpack_state(snap.data)).counters == replay(Counters(), r.log, "example", offsets[0]).counters


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("zk", marks=pytest.mark.zk)])
def test_a_due_snapshot_is_written_by_a_snapshotter_without_a_fork(backend, forks, tmp_path, request, monkeypatch):
    calls = []
    real = Counters.snapshot
    monkeypatch.setattr(Counters, "snapshot", lambda self, state: calls.append(1) or real(self, state))
    archive = f"archive=sqlite:///{tmp_path}/archive.db"
    url = (f"sqlite:///{tmp_path}/log.db?{archive}" if backend == "sqlite"
           else f"zk://{request.getfixturevalue('zk_hosts')}?{archive}")
    r = leader(url)
    assert r._snapshotter_fold_class() is not None
    pids = set()
    for i in range(25):
        r.handle(Add(f"c{i % 3}", i))  # the 10th and 20th make one due
        assert r.wait_history(60)
        if r._snapshotter is not None:
            pids.add(r._snapshotter.pid)
    assert forks == [] and calls == [], "the leader forked or serialized its state itself"
    assert len(pids) == 1, "one snapshotter process serves every snapshot"
    proc = r._snapshotter
    check_snapshotted(r, [20, 10])
    assert r.log_stats.snapshot_bytes == len(r.log.load_snapshot("example").data)
    assert r.log._index("example")[0] == 11  # truncated below the oldest kept, as after any snapshot
    again = Runner(Counters(), open_log(url))
    again.recover()
    assert again.state.counters == r.state.counters
    r.log.close()
    again.log.close()
    del r
    gc.collect()
    assert proc.poll() == 0  # gone with its runner


def test_a_failed_snapshotter_is_a_warning_and_the_next_snapshot_is_forked(forks, tmp_path, caplog):
    warnings_of_the_runner(caplog)
    url = f"sqlite:///{tmp_path}/log.db"
    r = leader(url, every=5)
    r.log.url = f"{url}?bogus=1"  # what the snapshotter opens: it refuses it
    for _ in range(5):
        r.handle(Add("a", 1))
    assert r.wait_history(60)
    assert r.log.snapshots("example") == [] and forks == []
    assert "the snapshotter for offset 5 failed (BadLogUrl: log URL " in caplog.text
    assert r._snapshotter is None  # stopped
    assert "the next snapshot is taken by a forked child" in caplog.text
    assert r.state.counters == {"a": 5} and r.ready  # the leader goes on
    for _ in range(5):
        r.handle(Add("a", 1))
    assert r.wait_history(60)
    assert len(forks) == 1
    check_snapshotted(r, [10])
    r.log.url = url  # the next one tries a snapshotter again
    for _ in range(5):
        r.handle(Add("a", 1))
    assert r.wait_history(60)
    assert len(forks) == 1
    check_snapshotted(r, [15, 10])


def test_a_snapshotter_that_cannot_start_gives_way_to_a_fork(forks, tmp_path, caplog, monkeypatch):
    warnings_of_the_runner(caplog)
    r = leader(f"sqlite:///{tmp_path}/log.db", every=5)
    monkeypatch.setattr(runner_module.sys, "executable", str(tmp_path / "no-such-python"))
    for _ in range(5):
        r.handle(Add("a", 1))
    assert r.wait_history(60)
    assert forks == [] and r.log.snapshots("example") == []
    assert "the snapshotter for offset 5 failed (FileNotFoundError: " in caplog.text
    for _ in range(5):
        r.handle(Add("a", 1))
    assert r.wait_history(60)
    assert len(forks) == 1
    check_snapshotted(r, [10])


class _Variant(Counters):
    """A component of this process only: a snapshotter would build Counters instead."""

    def snapshot(self, state):
        return {**super().snapshot(state), "variant": True}


class _Decides(Counters):
    """Decides otherwise, folds and snapshots as Counters: a snapshotter can write for it."""

    def decide(self, state, message, ctx):
        return super().decide(state, message, ctx)


def test_what_a_snapshotter_cannot_rebuild_is_forked(forks, tmp_path):
    mem = leader(f"memory://{tmp_path.name}", every=5)
    variant = Runner(_Variant(), open_log(f"sqlite:///{tmp_path}/log.db"), snapshot_every=5)
    variant.recover()
    assert mem._snapshotter_fold_class() is None and variant._snapshotter_fold_class() is None
    assert fold_class(Counters()) == fold_class(_Decides()) == "cei_actors.runtime.example:Counters"
    assert fold_class(_Variant()) is None
    for r in (mem, variant):
        for _ in range(5):
            r.handle(Add("a", 1))
        assert r.wait_history(60)
        assert r.log.snapshots("example") == [5]
    assert len(forks) == 2


def test_the_snapshotters_pd_snapshot_is_the_leaders(tmp_path):
    """The snapshotter builds the PD with the replay configuration (launch.components); the
    snapshot it writes from the log equals the one the leader, configured otherwise, takes of
    its state at the same offset."""
    pd = ProcessDispatcher({"engines": {"e1": {"slots": 4}}, "static_resources": True,
                            "restart_throttling_config": {"minimum_time_between_starts": 0}})
    url = f"sqlite:///{tmp_path}/log.db"
    log = open_log(url)
    fence = log.acquire("pd")
    spec = {"command": ["true"], "constraints": {"engine": "e1"}, "engine": "e1", "node_exclusive": None,
            "queueing_mode": ps.QUEUE_ALWAYS, "restart_mode": ps.RESTART_NEVER, "subscribers": [],
            "configuration": {}, "min_start_interval": None, "omit_from_system_restart": False,
            "env": None, "cwd": None, "definition_id": None, "name": None}
    events = [ProcessScheduled(f"p{i}", 0, spec, float(i)) for i in range(300)]
    events += [e for n in range(3) for e in (NodeAdded(f"n{n}", "pd_domain_e1", "e1", {"hostname": f"h{n}"}, 1.0),
                                             ResourceAdded(f"a{n}", f"n{n}", 4, 1.0))]
    head = 0
    for k in range(0, len(events), 100):  # a snapshot in the middle: the snapshotter folds on from it
        chunk = events[k:k + 100]
        head = log.append(fence, head, [pd.registry.to_pending(e, 1.0) for e in chunk])
        if k == 100:
            state = replay(pd, log, "pd")
            log.save_snapshot(Snapshot("pd", head, 1.0, pd.snapshot_version, snapshot_blob(pd, state)))
    assert log.snapshots("pd") == [200]
    size = write_snapshot(ProcessDispatcher({"engines": {"default": {"slots": 1}}}), log, "pd", head, 2.0)
    assert log.snapshots("pd") == [head, 200] and size == len(log.load_snapshot("pd").data)
    leaders = pd.snapshot(replay(pd, log, "pd"))
    assert unpack_state(log.load_snapshot("pd").data) == msgpack.unpackb(msgpack.packb(leaders, use_bin_type=True), raw=False, strict_map_key=False)
    assert write_snapshot(pd, log, "pd", head - 5, 3.0) == 0  # a newer one is stored: nothing to do
    log.close()


# ---- in a real actor process ----------------------------------------------------------------

ACTOR = "cei_actors.runtime.example_actor.ExampleActor"


def _children_of(pid: int) -> list[str]:
    """Command lines of the processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_an_actor_process_has_its_big_snapshots_written_by_a_snapshotter(tcp_system, tmp_path):
    """The example actor on SQLite: its state passes BACKGROUND_SNAPSHOT_BYTES, and the next
    due snapshot is written by a ``cei_actors.runtime.snapshotter`` child of the actor."""
    url = f"sqlite:///{tmp_path}/log.db"
    address = start_actor(tcp_system, ACTOR, Start(url, snapshot_every=10))
    seen: list[str] = []
    stop = threading.Event()
    with ServiceClient(tcp_system, address, timeout=30) as client:
        pid = client.call(Status())["pid"]

        def watch() -> None:
            while not stop.is_set():
                seen.extend(c for c in _children_of(pid) if "cei_actors.runtime.snapshotter" in c)
                stop.wait(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for i in range(10):  # ~300 KB of state; the snapshot at 10 is taken in place
                client.call(Add(f"big{i}-" + "x" * 30_000, 1))
            with open_log(url) as log:
                assert log.snapshots("example") == [10]
                due = 10 + len(log.load_snapshot("example").data) // runner_module.SNAPSHOT_BYTES_PER_EVENT
            for _ in range(10, due):
                client.call(Add("small", 1))
            wait_for(lambda: _snapshots(url) == [due, 10], timeout=60)
        finally:
            stop.set()
            watcher.join()
        assert seen, "no snapshotter process was seen"
        with open_log(url) as log:
            snap = log.load_snapshot("example")
            assert Counters().restore(unpack_state(snap.data)).counters == replay(Counters(), log, "example", due).counters
        client.call(Stop())


def _snapshots(url: str) -> list[int]:
    with open_log(url) as log:
        return log.snapshots("example")


def test_a_bad_snapshot_writer_setting_is_refused(tcp_system, tmp_path):
    address = tcp_system.createActor(ACTOR)
    with ServiceClient(tcp_system, address) as client:
        with pytest.raises(BadRequest, match="snapshot_writer: expected process or fork"):
            client.call(Start(f"sqlite:///{tmp_path}/log.db", config={"snapshot_writer": "thread"}))
        assert client.call(Status())["mode"] == "idle"  # nothing changed: it may start again
        client.call(Start(f"sqlite:///{tmp_path}/log.db", config={"snapshot_writer": "fork"}))
        assert client.call(Add("a", 2)) == 2
        client.call(Stop())


@pytest.mark.parametrize("path", ["os:path", "cei_actors.runtime.core:Context", "cei_actors.nowhere:X"])
def test_a_job_naming_anything_but_a_component_of_the_package_is_refused(path, tmp_path):
    import io
    import json

    from cei_actors.runtime.snapshotter import serve

    job = {"log": f"sqlite:///{tmp_path}/log.db", "stream": "example", "upto": 1, "ts": 0.0, "component": path}
    answers = io.StringIO()
    serve(io.StringIO(json.dumps(job) + "\n"), answers)
    answer = json.loads(answers.getvalue())
    assert set(answer) == {"error"} and answer["error"].count("\n") == 0
    assert not (tmp_path / "log.db").exists() or open_log(f"sqlite:///{tmp_path}/log.db").snapshots("example") == []


def test_a_snapshotter_whose_leader_died_exits_quietly(tmp_path):
    """A leader killed (-9) while its snapshotter works: the snapshot is saved, the answer
    cannot be written, and the snapshotter ends with status 0 and nothing on stderr."""
    import json
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path}/log.db"
    r = leader(url, every=1000)
    for _ in range(3):
        r.handle(Add("a", 1))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the leader's end of the answers: gone
    job = {"log": url, "stream": "example", "upto": r.head, "ts": 1.0,
           "component": "cei_actors.runtime.example:Counters"}
    proc = subprocess.run([sys.executable, "-m", "cei_actors.runtime.snapshotter"],
                          input=(json.dumps(job) + "\n").encode(), stdout=write_end,
                          stderr=subprocess.PIPE, timeout=60)
    os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == b""
    assert open_log(url).snapshots("example") == [r.head]
