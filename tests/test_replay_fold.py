"""Replaying a long log fast must not change an answer (decision RS1).

A PD log written by the real PD core under a random workload (constraints, node_exclusive
tags, throttles, node losses, restarts, system boots, forgetting with a small tombstone bound,
crashes with and without snapshots) is folded by :class:`~cei_actors.debug.Replay` (garbage
collector paused, matchmaker and tombstone records built once at the end) and, event by
event, the way the runner folds (every index kept in step). At many offsets both give the
same records and the same answers to what ``why`` asks the matchmaker.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path
from typing import Any

from pd_harness import Sim, config

from cei_actors.debug import Replay
from cei_actors.debug.reader import Checkpoints
from cei_actors.epum.messages import NodeState
from cei_actors.eventlog import open_log
from cei_actors.pd import states as ps
from cei_actors.pd.logic import ProcessDispatcher
from cei_actors.pd.matchmaker import Matchmaker
from cei_actors.pd.messages import (
    ForgetProcesses,
    KillProcess,
    MonitorResources,
    RestartProcess,
    RetryDispatches,
    ScheduleProcess,
    SetSystemBoot,
)

CONF = config(
    restart_throttling_config={"minimum_time_between_starts": 1.5},
    dispatch_retry_seconds=2.0,
    needs_interval=0.5,
    retention=2.0,
    tombstone_limit=6,
)


def _workload(sim: Sim, rng: random.Random, steps: int) -> None:
    procs = nodes = 0
    for _ in range(steps):
        k = rng.random()
        if k < 0.08 or not nodes:
            sim.add_node(f"n{nodes}", zone=rng.choice("ab"))
            nodes += 1
        elif k < 0.35:
            zone, tag = rng.choice([None, None, "a", "b"]), rng.choice([None, None, "T"])
            sim.ok(ScheduleProcess(
                f"p{procs}", command=["x"], restart_mode=rng.choice(list(ps.RESTART_MODES)),
                queueing_mode=rng.choice(list(ps.QUEUEING_MODES)), node_exclusive=tag,
                constraints={"zone": zone} if zone else None))
            procs += 1
        elif k < 0.45 and procs:
            upid = f"p{rng.randrange(procs)}"
            p = sim.state.processes.get(upid)
            if p is not None and p.state in ps.TERMINAL:
                sim.ok(ScheduleProcess(upid, command=["y"], restart_mode=p.restart_mode))
        elif k < 0.5 and procs:
            sim.handle(KillProcess(f"p{rng.randrange(procs)}"))
        elif k < 0.54 and procs:
            sim.handle(RestartProcess(f"p{rng.randrange(procs)}"))
        elif k < 0.68:
            copies = sorted(sim.running_copies())
            if copies:
                key = rng.choice(copies)
                for aid in sim.running_copies()[key]:
                    sim.agents[aid].procs[key] = rng.choice([ps.EXITED, ps.FAILED, ps.TERMINATED])
                sim.heartbeat_all()
        elif k < 0.72 and sim.state.nodes:
            sim.lose_node(rng.choice(sorted(sim.state.nodes)), rng.choice(["TERMINATED", "FAILED"]))
        elif k < 0.74 and sim.state.nodes:  # a node coming back (a NodeState for a known node)
            sim.ok(NodeState(rng.choice(sorted(sim.state.nodes)), "pd_domain_e1", "RUNNING", {}))
        elif k < 0.76:
            sim.ok(SetSystemBoot(rng.random() < 0.5))
        elif k < 0.78:
            sim.crash(snapshot=rng.random() < 0.5)
        else:
            sim.now += rng.choice([0.5, 1.0, 2.5])
            for message in (MonitorResources(), RetryDispatches(), ForgetProcesses()):
                sim.handle(message)
            for key in ("throttle", "needs"):
                timer = sim.timers.pop(key, None)
                if timer is not None:
                    sim.handle(timer.message)
            sim.heartbeat_all()


def _asked(state: Any) -> dict[str, Any]:
    """What ``why`` reads of the matchmaker: per queued process its class, whether it is
    fresh or throttled (until when), and every node's verdict."""
    mm = state.mm
    out = {}
    for upid in state.queue():
        p = state.processes[upid]
        out[upid] = (
            mm.where.get(upid), upid in mm.fresh, mm.throttled_set.get(upid),
            [mm.verdict(p, n) for n in sorted(state.nodes.values(), key=lambda n: n.seq)],
        )
    return out


def _derived(state: Any) -> dict[str, Any]:
    return {
        # a restore (snapshot, checkpoint) keeps these as sets, not in the order they arose
        "unacked": set(state.unacked), "terminating": set(state.terminating),
        "live": +state.live_count, "occupied": +state.occupied, "counts": +state.state_count,
        "ended": state.ended, "used": {n.node_id: (n.used, dict(n.tags)) for n in state.nodes.values()},
        "assigned": {r.resource_id: dict(r.assigned) for r in state.resources.values()},
    }


def test_replay_fold_gives_the_same_state_and_verdicts_as_the_runner_fold(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'pd.sqlite'}"
    sim = Sim(CONF, url=url, seed=7)
    _workload(sim, random.Random(20261203), 700)
    pd = ProcessDispatcher(CONF)
    log = open_log(url)
    records = list(log.read("pd"))
    log.close()
    head = len(records)
    assert head > 1500
    checked = set(range(1, head + 1, 97)) | {head}
    seen = {"tombstones": 0, "queued": 0, "throttled": 0, "forgotten": 0}
    step = pd.initial_state()
    with Replay(url, configs={"pd": {"config": CONF}}) as replay:
        assert replay.log.snapshots("pd"), "the workload crashes with snapshots too"
        for r in records:
            step = pd.apply(step, pd.registry.from_record(r))
            if r.offset not in checked:
                continue
            for snapshots in (False, True):
                fast = replay.state("pd", r.offset, snapshots=snapshots)
                assert fast.to_data() == step.to_data(), (r.offset, snapshots)
                assert _asked(fast) == _asked(step), (r.offset, snapshots)
                assert _derived(fast) == _derived(step), (r.offset, snapshots)
            seen["tombstones"] += len(step.tombstones) > 0
            seen["queued"] += bool(step.queue())
            seen["throttled"] += bool(step.mm.throttled_set)
    seen["forgotten"] = sum(len(r.body["upids"]) for r in records if r.type == "ProcessesForgotten")
    assert min(seen.values()) > 2, seen  # the points checked cover what the fast fold defers


def test_replay_restores_the_collector_and_the_state_reads_normally(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'pd.sqlite'}"
    sim = Sim(CONF, url=url, seed=3)
    _workload(sim, random.Random(5), 150)
    assert gc.isenabled()
    with Replay(url, configs={"pd": {"config": CONF}}) as replay:
        state = replay.state("pd", replay.head("pd"))
    assert gc.isenabled()
    assert state == sim.state
    assert isinstance(state.mm, Matchmaker)  # the index is whole again
    gc.disable()
    try:
        with Replay(url, configs={"pd": {"config": CONF}}) as replay:
            replay.state("pd", 5)
        assert not gc.isenabled()
    finally:
        gc.enable()


def _ckpts(root: Path) -> list[Path]:
    return sorted(root.rglob("*.ckpt"))


def test_checkpoints_start_later_folds_and_never_change_an_answer(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Checkpoints, "min_events", 200)
    monkeypatch.setattr(Checkpoints, "every", 500)
    url = f"sqlite:///{tmp_path / 'pd.sqlite'}"
    _workload(Sim(CONF, url=url, seed=7), random.Random(11), 700)
    cache = tmp_path / "cache"
    configs = {"pd": {"config": CONF}}
    with Replay(url, configs=configs, cache=None) as plain:
        head = plain.head("pd")
        points = [head // 3, head // 2, head - 1, head]
        want = {at: plain.state("pd", at, snapshots=False) for at in points}
    assert head > 1100
    with Replay(url, configs=configs, cache=cache) as cold:
        first = cold.state("pd", head // 2, snapshots=False)
        assert cold.folded == ("pd", 1, head // 2)
    assert first.to_data() == want[head // 2].to_data() and _asked(first) == _asked(want[head // 2])
    saved = [int(p.stem) for p in _ckpts(cache)]
    assert sorted(saved) == [500, head // 2], saved  # on the way, and where the fold ended
    for path in _ckpts(cache):
        assert path.stat().st_mode & 0o777 == 0o600
    assert (cache.stat().st_mode & 0o777) == 0o700
    for at in points:
        with Replay(url, configs=configs, cache=cache) as warm:
            got = warm.state("pd", at, snapshots=False)
            expected_start = max(k for k in [*saved, 0] if k <= at) + 1
            assert warm.folded[1] == expected_start, (at, warm.folded)
        assert got.to_data() == want[at].to_data(), at
        assert _asked(got) == _asked(want[at]) and _derived(got) == _derived(want[at]), at
        saved = [int(p.stem) for p in _ckpts(cache)]


def test_a_checkpoint_of_another_log_at_the_same_url_is_not_used(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Checkpoints, "min_events", 100)
    path = tmp_path / "pd.sqlite"
    url = f"sqlite:///{path}"
    cache = tmp_path / "cache"
    configs = {"pd": {"config": CONF}}
    _workload(Sim(CONF, url=url, seed=7), random.Random(1), 300)
    with Replay(url, configs=configs, cache=cache) as r:
        at = r.head("pd") - 5
        r.state("pd", at, snapshots=False)
    assert [int(p.stem) for p in _ckpts(cache)] == [at]
    for leftover in tmp_path.glob("pd.sqlite*"):
        leftover.unlink()
    _workload(Sim(CONF, url=url, seed=7), random.Random(2), 300)  # another log, same place
    with Replay(url, configs=configs, cache=None) as r:
        want = r.state("pd", at, snapshots=False)
    with Replay(url, configs=configs, cache=cache) as r:
        got = r.state("pd", at, snapshots=False)
        assert r.folded == ("pd", 1, at)  # the stale checkpoint was refused
    assert got.to_data() == want.to_data() and _asked(got) == _asked(want)
    # and a damaged cache file is no checkpoint either
    [ckpt] = _ckpts(cache)
    ckpt.write_bytes(b"\x93garbage")
    with Replay(url, configs=configs, cache=cache) as r:
        assert r.state("pd", at, snapshots=False).to_data() == want.to_data()
        assert r.folded == ("pd", 1, at)


def test_field_handlers_take_exactly_the_event_fields_and_defaults():
    """A replay folds these bodies straight into the handler (``fn(state, **body)``, RS3): a
    parameter named or defaulted unlike the event's field would fold a body differently."""
    import dataclasses
    import inspect

    from cei_actors.pd.state import FIELD_HANDLERS

    assert FIELD_HANDLERS
    pd = ProcessDispatcher(CONF)
    assert set(pd.body_appliers(pd.initial_state()).values()) == set(FIELD_HANDLERS.values())
    for cls, fn in FIELD_HANDLERS.items():
        params = list(inspect.signature(fn).parameters.values())[1:]
        want = [(f.name, None if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls)]
        got = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in params]
        assert got == want, cls.__name__


def test_a_body_that_does_not_fit_is_named_at_its_offset(tmp_path: Path):
    from cei_actors.eventlog import CorruptLog, PendingEvent

    url = f"sqlite:///{tmp_path / 'pd.sqlite'}"
    log = open_log(url)
    fence = log.acquire("pd")
    body = {"upid": "p", "round": 0, "state": ps.RUNNING, "at": 1.0, "extra": 1}
    log.append(fence, 0, [PendingEvent("ProcessMoved", 1, 1.0, body)])
    log.close()
    with Replay(url, cache=None) as replay:
        try:
            replay.state("pd", 1)
        except CorruptLog as exc:
            assert "offset 1" in str(exc) and "body does not fit 'ProcessMoved'" in str(exc), exc
        else:
            raise AssertionError("a foreign body folded")


def test_a_stored_row_of_the_wrong_shape_is_named_at_its_offset(tmp_path: Path):
    """The fold reads stored rows straight (RS3): a damaged row is a one-line error at its
    offset, whether its type is one folded from the body or not."""
    import sqlite3

    import msgpack

    from cei_actors.eventlog import CorruptLog, PendingEvent
    from cei_actors.eventlog.batch import encode_rows

    moved = {"upid": "p", "round": 0, "state": ps.RUNNING, "at": 1.0, "msg": ""}
    for k, (bad, words) in enumerate(((["ProcessMoved", 1, 1.0], "wrong shape"), ([["x"], 1, 1.0, {}], "does not apply"),
                       (["ProcessMoved", 1, 1.0, [1]], "body does not fit"),
                       (["SystemBootSet", 1, 1.0, {"on": True}], "body does not fit"))):
        path = tmp_path / f"pd{k}.sqlite"
        log = open_log(f"sqlite:///{path}")
        log.append(log.acquire("pd"), 0, [PendingEvent("ProcessMoved", 1, 1.0, moved)] * 3)
        log.close()
        good = msgpack.packb(["ProcessMoved", 1, 1.0, moved], use_bin_type=True)
        db = sqlite3.connect(path)
        db.execute("UPDATE batches SET blob = ? WHERE stream = 'pd' AND first = 1",
                   (encode_rows("pd", 1, 1, [good, msgpack.packb(bad, use_bin_type=True), good]),))
        db.commit()
        db.close()
        with Replay(f"sqlite:///{path}", cache=None) as replay:
            assert replay.state("pd", 1).processes == {}
            try:
                replay.state("pd", 3)
            except CorruptLog as exc:
                assert "offset 2" in str(exc) and words in str(exc), (bad, exc)
            else:
                raise AssertionError(f"{bad} folded")


def test_a_replay_builds_a_tombstone_record_only_when_asked_for(tmp_path: Path, monkeypatch):
    """RS4: the records of processes forgotten during a replay's fold are built on demand,
    one per :meth:`Tombstones.get`, all for ``to_data``; each the same as the live fold's."""
    from cei_actors.pd.state import Process

    url = f"sqlite:///{tmp_path / 'pd.sqlite'}"
    sim = Sim(CONF, url=url, seed=7)
    _workload(sim, random.Random(20261203), 400)
    live = sim.state
    buried = list(live.tombstones)
    assert len(buried) >= 3
    built: list[str] = []
    real = Process.tombstone
    monkeypatch.setattr(Process, "tombstone", lambda p: (built.append(p.upid), real(p))[1])
    with Replay(url, configs={"pd": {"config": CONF}}) as replay:
        state = replay.state("pd", replay.head("pd"), snapshots=False)
    assert built == []
    assert state.tombstones.get(buried[0]) == live.tombstones.get(buried[0])
    assert state.tombstones.get(buried[0]) == live.tombstones.get(buried[0])  # built once
    assert built == [buried[0]]
    assert state.tombstones.to_data() == live.tombstones.to_data()
    assert sorted(built) == sorted(buried)


def test_a_fold_leaves_its_state_in_the_oldest_generation(tmp_path: Path):
    """RS4: what a fold built is counted as old when the collector comes back on, so the
    next young collections do not scan the whole new state (and the collector stays on)."""
    url = f"sqlite:///{tmp_path / 'pd.sqlite'}"
    sim = Sim(CONF, url=url, seed=3)
    _workload(sim, random.Random(5), 150)
    before = gc.get_threshold()
    gc.set_threshold(10**9, 10**9, 10**9)  # no collection of its own during the test
    try:
        with Replay(url, configs={"pd": {"config": CONF}}) as replay:
            state = replay.state("pd", replay.head("pd"), snapshots=False)
        p = next(iter(state.processes.values()))
        assert gc.isenabled() and gc.get_freeze_count() == 0
        assert any(o is p for o in gc.get_objects(generation=2))
        assert not any(o is p for o in gc.get_objects(generation=0))
    finally:
        gc.set_threshold(*before)


def _spec_log(path: Path, procs: int, batch: int) -> tuple[str, Any]:
    """A PD log of ``procs`` processes scheduled with one spec (and one with its own), in
    appends of ``batch`` events, and the state the runner's fold reaches."""
    from cei_actors.eventlog import PendingEvent  # noqa: F401 - the log's row form
    from cei_actors.pd.events import NodeAdded, ProcessMoved, ProcessScheduled, ResourceAdded

    pd = ProcessDispatcher(CONF)
    spec = {"command": ["sleep", "60"], "constraints": {"engine": "e1"}, "engine": "e1",
            "node_exclusive": None, "queueing_mode": ps.QUEUE_ALWAYS, "restart_mode": ps.RESTART_NEVER,
            "subscribers": [], "configuration": {"k": [1, 2]}, "min_start_interval": None,
            "omit_from_system_restart": False, "env": {"A": "b"}, "cwd": None, "definition_id": None,
            "name": None}
    events: list[Any] = [NodeAdded("n0", "pd_domain_e1", "e1", {"site": "here"}, 1.0),
                         ResourceAdded("a0", "n0", 4, 1.0)]
    for i in range(procs):
        own = dict(spec, command=["own"]) if i == procs // 2 else spec
        events.append(ProcessScheduled(f"p{i}", 0, own, 2.0 + i))
        events.append(ProcessMoved(f"p{i}", 0, ps.WAITING, 2.0 + i))
    url = f"sqlite:///{path}"
    log = open_log(url)
    fence = log.acquire("pd")
    state, head = pd.initial_state(), 0
    for k in range(0, len(events), batch):
        chunk = events[k:k + batch]
        head = log.append(fence, head, [pd.registry.to_pending(e, 1.0) for e in chunk])
        for e in chunk:
            state = pd.apply(state, e)
    log.close()
    return url, state


def test_a_repeated_spec_is_decoded_once_and_the_fold_answers_the_same(tmp_path: Path):
    """RS5: processes scheduled with one spec share its decoded values in a replay; the
    state is the runner's, and a process with a spec of its own keeps its own."""
    url, live = _spec_log(tmp_path / "pd.sqlite", 120, 30)
    with Replay(url, configs={"pd": {"config": CONF}}, cache=None) as replay:
        state = replay.state("pd", replay.head("pd"), snapshots=False)
    assert state.to_data() == live.to_data()
    assert _asked(state) == _asked(live)
    commands = {id(p.command) for p in state.processes.values()}
    configs = {id(p.configuration) for p in state.processes.values()}
    # learnt once seen twice in a sample of the rows: the first batches decode it each time
    assert len(commands) < 40 and len(configs) < 40, (len(commands), len(configs))
    own = state.processes["p60"]
    assert own.command == ["own"] and all(p.command is not own.command for p in state.processes.values()
                                          if p.upid != "p60")


def test_shared_values_fall_back_to_a_plain_decode_when_a_placeholder_is_lost():
    """RS5: a pattern replaced inside a ``bin`` value, or an ext value of the placeholder's
    type already in the payload, makes the count of placeholders differ: the payload is
    decoded plainly, to the same rows as without sharing."""
    import msgpack

    from cei_actors.eventlog.batch import SharedValues, encode_rows, open_batch

    spec = {"command": ["x"], "env": None}
    row = ["ProcessScheduled", 1, 1.0, {"upid": "p", "round": 0, "spec": spec, "at": 1.0}]
    shared = SharedValues({"ProcessScheduled": ("spec",)})
    shared.every = 1
    shared.learn([row, row])
    hidden = b"\xa4spec" + msgpack.packb(spec, use_bin_type=True)
    for k, extra in enumerate(([hidden], msgpack.ExtType(127, b"\x00"), [b"a" + hidden + b"z", 5])):
        odd = ["Other", 1, 1.0, {"blob": extra}]
        rows = [msgpack.packb(r, use_bin_type=True) for r in (row, odd, row)]
        blob = encode_rows("pd", 1, 1, rows)
        plain = open_batch(blob, "pd", 1)
        before = shared.shared
        got = open_batch(blob, "pd", 1, shared=shared)
        assert got == plain, k
        assert shared.shared == before, k  # nothing was shared from this payload
    good = encode_rows("pd", 1, 1, [msgpack.packb(row, use_bin_type=True)] * 3)
    _, _, rows = open_batch(good, "pd", 1, shared=shared)
    assert rows == open_batch(good, "pd", 1)[2] and rows[0][3]["spec"] is rows[2][3]["spec"]
    copy = shared.unshared(rows[1])  # for a reader that may change it
    assert copy == rows[1] and copy[3]["spec"] is not rows[1][3]["spec"]


def test_a_replay_buries_forgotten_processes_without_making_tombstones(tmp_path: Path, monkeypatch):
    """RS6: a replay's fold buries each forgotten process as a plain tuple (most are dropped
    by the bound before anyone asks); a tombstone is made when one is asked for, and the map
    bounds, orders and reads back as the live fold's."""
    import cei_actors.runtime.tombstones as tmod

    made: list[str] = []

    class Counted(tmod.Tombstone):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            made.append("x")
            super().__init__(*args)

    url = f"sqlite:///{tmp_path / 'pd.sqlite'}"
    sim = Sim(CONF, url=url, seed=7)
    _workload(sim, random.Random(20261203), 400)
    live = sim.state
    assert len(live.tombstones) == CONF["tombstone_limit"]
    monkeypatch.setattr(tmod, "Tombstone", Counted)
    with Replay(url, configs={"pd": {"config": CONF}}) as replay:
        state = replay.state("pd", replay.head("pd"), snapshots=False)
    assert made == []
    first = next(iter(live.tombstones))
    assert list(state.tombstones) == list(live.tombstones)
    assert state.tombstones.over(keep=CONF["tombstone_limit"] - 1) and not state.tombstones.over(keep=99)
    got, want = state.tombstones.get(first), live.tombstones.get(first)
    assert (got.record, got.ended_at, got.forgotten_at) == (want.record, want.ended_at, want.forgotten_at)
    assert len(made) == 1
    assert state.tombstones.to_data() == live.tombstones.to_data()


def test_tombstones_buried_later_bound_and_read_like_buried_ones():
    from cei_actors.runtime.tombstones import Tombstones

    now, later = Tombstones(), Tombstones()
    for k in range(6):
        now.bury(f"u{k}", {"upid": f"u{k}"}, k, 10 + k)
        later.bury_later(f"u{k}", f"u{k}", k, 10 + k)
    now.bury("u1", {"upid": "u1"}, 1, 20)  # a second burial counts as the newest
    later.bury_later("u1", "u1", 1, 20)
    assert list(later) == list(now) == ["u0", "u2", "u3", "u4", "u5", "u1"]
    assert later.over(before=11) and not later.over(before=10)
    later.bound(keep=4, before=11)
    now.bound(keep=4, before=11)
    assert list(later) == list(now) == ["u3", "u4", "u5", "u1"]
    later.settle(lambda upid: {"upid": upid})
    assert later.remove("u3") == now.remove("u3")
    assert later == now and later.to_data() == now.to_data()
