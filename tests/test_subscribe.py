"""Subscriptions (cei_actors.subscribe, CEI.subscribe) against a real embedded system.

The PD's log is the reference: every process change a subscriber gets must be exactly the
``(state, round)`` the PD recorded, in the log's order per process.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from pathlib import Path

import msgpack
import pytest
import yaml

from cei_actors.embed import CEI
from cei_actors.eventlog import Snapshot, open_log
from cei_actors.launch.components import component_for
from cei_actors.launch.plan import load_plan
from cei_actors.runtime.runner import replay
from cei_actors.subscribe import Change

PROCESS_EVENTS = {"ProcessCreated", "ProcessScheduled", "ProcessMoved", "ProcessAssigned"}


def described_record(cei, upid: str) -> dict:
    """``describe`` of a process without ``why``: a subscription carries the folded record,
    ``why`` is the live matchmaker's verdict, given by describe and list only (OP9)."""
    described = dict(cei.pd.describe_process(upid))
    described.pop("why", None)
    return described


def plan(home: Path, slots: int = 4, log: str = "sqlite:///${home}/log.sqlite", **more):
    path = home / "plan.yaml"
    path.write_text(yaml.safe_dump({
        **more,
        "log": log,
        "components": {"pd": {"config": {"dispatch_retry_seconds": 2.0}}},
        "pd": {"engines": {"e1": {"slots": slots, "heartbeat_period": 1}}},
        "static_nodes": [{"node_id": "n1"}],
    }))
    return load_plan(path, home=home)


def recorded(home: Path, after: int = 0, url: str | None = None) -> dict[str, list[tuple[int, str, int]]]:
    """Per upid, the (offset, state, round) of every process event in the PD's log (archive
    included)."""
    state_of = {"ProcessCreated": "UNSCHEDULED", "ProcessScheduled": "REQUESTED",
                "ProcessAssigned": "ASSIGNED"}
    out: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
    with open_log(url or f"sqlite:///{home}/log.sqlite") as log:
        for rec in log.read("pd", after + 1):
            if rec.type in PROCESS_EVENTS:
                st = rec.body.get("state") or state_of[rec.type]
                out[rec.body["upid"]].append((rec.offset, st, rec.body.get("round", 0)))
    return dict(out)


def delivered(changes: list[Change]) -> dict[str, list[tuple[int, str, int]]]:
    out: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
    for c in changes:
        if c.kind == "process" and not c.resync:
            out[c.key].append((c.seq, c.state, c.data["round"]))
    return dict(out)


def wait_until(cond, timeout: float = 20.0, cei: CEI | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        if cei is not None:
            cei.run_for(0.05)
        else:
            time.sleep(0.02)


def scripted_run(cei: CEI, tag: str) -> list[str]:
    """Processes that exit, fail, restart and are killed."""
    pd = cei.pd
    upids = [f"{tag}-ok", f"{tag}-fail", f"{tag}-restart", f"{tag}-killed"]
    pd.schedule_process(upids[0], command=["sh", "-c", "exit 0"])
    pd.schedule_process(upids[1], command=["sh", "-c", "exit 2"], restart_mode="never")
    pd.schedule_process(upids[2], command=["sh", "-c", "exit 0"])
    pd.schedule_process(upids[3], command=["sleep", "30"])
    pd.wait_process(upids[0], "EXITED", timeout=30)
    pd.wait_process(upids[1], "FAILED", timeout=30)
    pd.wait_process(upids[2], "EXITED", timeout=30)
    pd.restart_process(upids[2])
    pd.wait_process(upids[3], "RUNNING", timeout=30)
    pd.terminate_process(upids[3])
    pd.wait_process(upids[3], "TERMINATED", timeout=30)
    p = pd.wait_process(upids[2], "EXITED", timeout=30)
    assert p["round"] >= 1
    return upids


@pytest.mark.parametrize("base", ["simpleSystemBase", "multiprocTCPBase"])
def test_every_process_change_is_delivered_as_the_pd_recorded_it(tmp_path, base):
    with CEI(plan(tmp_path), base=base, home=tmp_path) as cei:
        got: list[Change] = []
        threads: set[str] = set()

        def on_change(c: Change) -> None:
            threads.add(threading.current_thread().name)
            got.append(c)

        sub = cei.subscribe(on_change, since="now")
        upids = scripted_run(cei, "s")
        head = open_log(f"sqlite:///{tmp_path}/log.sqlite").head("pd")
        wait_until(lambda: sub.cursor.get("pd", 0) >= head, cei=cei)
        sub.close()
    want = recorded(tmp_path)
    have = delivered(got)
    assert set(upids) <= set(have)
    assert have == want  # every change, exactly the state and round recorded, in log order
    assert threads == {"cei-subscription"}
    seqs = [c.seq for c in got]
    assert seqs == sorted(seqs)  # one stream here: in log order overall


def test_current_state_first_then_changes_and_filters(tmp_path):
    with CEI(plan(tmp_path), base="simpleSystemBase", home=tmp_path) as cei:
        cei.pd.schedule_process("before", command=["sh", "-c", "exit 0"])
        cei.pd.wait_process("before", "EXITED", timeout=30)
        sub = cei.subscribe(upids=["before", "after"])
        first = sub.get(5)
        assert first is not None and first.resync and first.key == "before" and first.state == "EXITED"
        assert first.data == described_record(cei, "before")
        nodes = cei.subscribe(kinds=["node"])
        node = nodes.get(5)
        assert node is not None and node.key == "n1" and node.state == "RUNNING" and node.resync
        cei.pd.schedule_process("other", command=["sh", "-c", "exit 0"])
        cei.pd.schedule_process("after", command=["sh", "-c", "exit 0"])
        cei.pd.wait_process("after", "EXITED", timeout=30)
        cei.pd.wait_process("other", "EXITED", timeout=30)
        keys = set()
        while (c := sub.get(1)) is not None:
            keys.add(c.key)
        assert keys == {"after"}
        sub.close()
        nodes.close()
        with pytest.raises(ValueError, match="unknown change kind"):
            cei.subscribe(kinds=["proccess"])
        with pytest.raises(ValueError, match="since"):
            cei.subscribe(since={"pd": "x"})


def test_a_restarted_host_resumes_from_its_cursor_without_a_gap(tmp_path):
    saved: dict[str, int] = {}
    first: list[Change] = []
    # first run of the host: it handles some changes, saves the cursor of each, then "crashes"
    with CEI(plan(tmp_path), base="simpleSystemBase", home=tmp_path) as cei:
        sub = cei.subscribe(kinds=["process"], since={})
        scripted_run(cei, "a")
        for _ in range(7):  # handle only part of what came (mid-event cursors included)
            c = sub.get(5)
            assert c is not None
            first.append(c)
            saved = dict(c.cursor)
        sub.close()
    # second run (the system restarted too, and did more): resume from the saved cursor
    with CEI(plan(tmp_path), base="simpleSystemBase", home=tmp_path) as cei:
        scripted_run(cei, "b")
        head = open_log(f"sqlite:///{tmp_path}/log.sqlite").head("pd")
        sub = cei.subscribe(kinds=["process"], since=saved)
        second: list[Change] = []
        wait_until(lambda: (second.extend(iter(lambda: sub.get(0), None)) or
                            sub.cursor.get("pd", 0) >= head), cei=cei)
        sub.close()
    dups = [c for c in second if c.seq <= saved["pd"]]
    assert not dups
    merged = first + [c for c in second
                      if (c.stream, c.seq, c.key) not in {(f.stream, f.seq, f.key) for f in first}]
    assert delivered(merged) == recorded(tmp_path)  # nothing lost across the restart
    assert any(c.key.startswith("b-") for c in second)


def test_a_slow_subscriber_gets_the_current_state(tmp_path):
    with CEI(plan(tmp_path, slots=8), base="simpleSystemBase", home=tmp_path) as cei:
        release = threading.Event()
        got: list[Change] = []

        def slow(c: Change) -> None:
            release.wait(60)
            got.append(c)

        sub = cei.subscribe(slow, kinds=["process"], since="now", max_pending=5)
        upids = [f"p{i}" for i in range(12)]
        for u in upids:
            cei.pd.schedule_process(u, command=["sh", "-c", "exit 0"], restart_mode="never")
        for u in upids:
            cei.pd.wait_process(u, "EXITED", timeout=60)
        head = open_log(f"sqlite:///{tmp_path}/log.sqlite").head("pd")
        release.set()
        wait_until(lambda: sub.cursor.get("pd", 0) >= head, cei=cei)
        sub.close()
        final = {u: described_record(cei, u) for u in upids}
    assert sub.coalesced > 0
    last: dict[str, Change] = {}
    for c in got:
        if c.key in last:
            assert c.seq > last[c.key].seq  # still in order per entity
        last[c.key] = c
    assert set(last) == set(upids)  # no process dropped
    for u in upids:  # and each ends on its current state
        assert last[u].data == final[u]
    assert sum(c.coalesced for c in got) == sub.coalesced


def test_iterator_and_asyncio_stream(tmp_path):
    with CEI(plan(tmp_path), base="multiprocTCPBase", home=tmp_path) as cei:
        sub = cei.subscribe(kinds=["process"], upids=["it"], since="now")
        cei.pd.schedule_process("it", command=["sh", "-c", "exit 0"])
        states = []
        for c in sub:
            states.append(c.state)
            if c.state == "EXITED":
                break
        assert states[0] == "REQUESTED" and states[-1] == "EXITED"
        sub.close()

        async def consume() -> list[str]:
            s = cei.subscribe(kinds=["process"], upids=["as"], since="now")
            cei.pd.schedule_process("as", command=["sh", "-c", "exit 0"])
            out = []
            async for c in s.stream():
                out.append(c.state)
                if c.state == "EXITED":
                    break
            s.close()
            return out

        out = asyncio.run(consume())
        assert out[0] == "REQUESTED" and out[-1] == "EXITED"


def test_memory_log_on_the_tcp_base_is_refused_clearly(tmp_path):
    with CEI(plan(tmp_path), base="multiprocTCPBase", home=tmp_path,
             log_url="memory://subs-refused") as cei:
        with pytest.raises(Exception, match="memory:// log"):
            cei.subscribe()
        cei.pd.schedule_process("m", command=["sh", "-c", "exit 0"])
        assert cei.pd.wait_process("m", "EXITED", timeout=30)["state"] == "EXITED"  # polls


def ha_plan(home: Path):
    path = home / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "log": "sqlite:///${home}/log.sqlite",
        "components": {"pd": {"config": {"dispatch_retry_seconds": 2.0}},
                       "ha": {"config": {"poll_interval": 0.5}}},
        "pd": {"engines": {"e1": {"slots": 4, "heartbeat_period": 0.5}}},
        "static_nodes": [{"node_id": "n1"}],
    }))
    return load_plan(path, home=home)


def test_ha_group_changes_and_a_resume_inside_one_event(tmp_path):
    with CEI(ha_plan(tmp_path), base="simpleSystemBase", home=tmp_path) as cei:
        sub = cei.subscribe(kinds=["process", "ha"], groups=["web"], since="now")
        cei.ha.create_group("web", "npreserving", {"preserve_n": 2},
                            {"command": ["sleep", "60.125"], "restart_mode": "never"})
        g = cei.ha.wait_group("web", "STEADY", timeout=30)
        got: list[Change] = []
        wait_until(lambda: (got.extend(iter(lambda: sub.get(0), None)) or
                            any(c.kind == "ha" and c.state == "STEADY" for c in got)), cei=cei)
        sub.close()
    copies = {c["upid"] for c in g["copies"]}
    procs = [c for c in got if c.kind == "process"]
    assert {c.key for c in procs} == copies and all(c.group == "web" for c in procs)
    want = {u: v for u, v in recorded(tmp_path).items() if u in copies}
    have = delivered(procs)
    assert all(have[u] == want[u][:len(have[u])] for u in copies)  # a prefix, as recorded
    statuses = [c.state for c in got if c.kind == "ha"]
    assert statuses[0] == "PENDING" and statuses[-1] == "STEADY" and "READY" in statuses
    # a PD event that moved a copy to RUNNING also changed the group's status: two changes,
    # one event; resuming from the first one's cursor gives the second again, not a gap
    pairs = [(a, b) for a, b in zip(got, got[1:], strict=False)
             if (a.stream, a.seq) == (b.stream, b.seq)]
    assert pairs, [(c.kind, c.stream, c.seq) for c in got]
    a, b = pairs[0]
    assert a.cursor[a.stream] == a.seq - 1 and b.cursor[b.stream] == b.seq
    with CEI(ha_plan(tmp_path), base="simpleSystemBase", home=tmp_path) as cei:
        again = cei.subscribe(kinds=["process", "ha"], groups=["web"], since=a.cursor)
        resumed = []
        wait_until(lambda: (resumed.extend(iter(lambda: again.get(0), None)) or
                            any(c.kind == "process" for c in resumed)), cei=cei)
        again.close()
    # the PD stream resumes at the event of ``a``: it comes again, nothing before it does.
    # (HA statuses are derived from two streams, so their path after a resume may differ
    # from the first run's: each is recomputed from the logs, level-based.)
    first = next(c for c in resumed if c.kind == "process")
    assert (first.key, first.state, first.stream, first.seq) == (a.key, a.state, a.stream, a.seq)
    assert all(c.seq > a.cursor[c.stream] for c in resumed)


@pytest.mark.parametrize("log", ["zk", "sqlite"])
def test_from_the_start_of_a_truncated_log_on_zookeeper_and_sqlite(tmp_path, log, request):
    """A subscriber that resumes from offset 0 of a log whose early history was truncated into
    the archive (LT1) still gets every change the PD recorded, on ZooKeeper as on SQLite."""
    if log == "zk":
        url = f"zk://{request.getfixturevalue('zk_hosts')}"
    else:
        url = f"sqlite:///{tmp_path}/log.sqlite"
    the_plan = plan(tmp_path, log=url, log_history={"archive": "sqlite:///${home}/archive.sqlite"})
    with CEI(the_plan, base="simpleSystemBase", home=tmp_path) as cei:
        scripted_run(cei, "t")
        with open_log(the_plan.log_url) as opened:
            head = opened.head("pd")
            pd = component_for("pd", {"config": the_plan.start_config("pd")})
            at = head - 3  # a snapshot there, then the truncation the runner makes after one
            blob = msgpack.packb(pd.snapshot(replay(pd, opened, "pd", at)), use_bin_type=True)
            opened.save_snapshot(Snapshot("pd", at, time.time(), pd.snapshot_version, blob))
            moved = opened.truncate("pd", at)
            assert moved > 0 and opened.archive is not None
        sub = cei.subscribe(kinds=["process"], since={})
        got: list[Change] = []
        wait_until(lambda: (got.extend(iter(lambda: sub.get(0), None)) or
                            sub.cursor.get("pd", 0) >= head), cei=cei)
        sub.close()
    want = recorded(tmp_path, url=the_plan.log_url)
    assert delivered(got) == want and len(want) == 4
