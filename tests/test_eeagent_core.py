"""The EEAgent's pure process table (eeagent/state.py + logic.py): property tests.

A hypothesis state machine drives the table with launches, terminations, exits (of real
and of unknown or stale processes), SIGKILL deadlines and cleanups, and plays the processes
itself: a Start action gives a fresh pid, a Signal lets the process end. After every step it
checks the rules the real and the simulated agents share.
"""

from __future__ import annotations

import signal

from hypothesis import settings
from hypothesis import strategies as hs
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cei_actors.eeagent import logic
from cei_actors.eeagent import states as st
from cei_actors.eeagent.state import ProcessTable

SLOTS = 3
UPIDS = ("a", "b", "c", "d", "e")
GRACE = 5.0
GOOD = ["true"]


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = ProcessTable()
        self.now = 0.0
        self.next_pid = 100
        self.running: dict[int, tuple[str, int]] = {}  # pid -> key: processes that exist

    # -- playing the processes

    def apply(self, actions: list[logic.Action]) -> None:
        for a in actions:
            rec = a.record
            if isinstance(a, logic.Start):
                assert rec.state == st.PENDING and rec.waiting_for is None, rec
                assert self.t.get(rec.key) is rec
                # the upid's newest round, and no older round of it still live
                for other in self.t.by_upid[rec.upid].values():
                    assert other.round <= rec.round
                    assert other is rec or not st.is_live(other.state), other
                self.next_pid += 1
                logic.started(self.t, rec, self.next_pid, None, self.now)
                self.running[self.next_pid] = rec.key
                # never more processes than slots, never two of one upid
                assert len(self.running) <= SLOTS, self.running
                assert len({k[0] for k in self.running.values()}) == len(self.running)
            elif isinstance(a, logic.Signal):
                assert rec.pid is not None and rec.pid in self.running
                assert rec.state == st.TERMINATING
            else:
                assert self.t.get(rec.key) is not rec

    # -- inputs

    @rule(upid=hs.sampled_from(UPIDS), round_=hs.integers(0, 4), bad=hs.booleans())
    def launch(self, upid: str, round_: int, bad: bool) -> None:
        before = self.t.get((upid, round_))
        newest = self.t.newest(upid)
        live = self.t.live_count()
        rec, new, actions = logic.launch(
            self.t, upid, round_, [] if bad else GOOD, slots=SLOTS, grace=GRACE,
            now=self.now, stamp=self.now,
        )
        if before is not None:  # a duplicate: nothing happens
            assert rec is before and not new and not actions
            return
        if newest is not None and newest.round > round_:  # stale: the newest answers
            assert rec is newest and not new and not actions
            return
        assert new and self.t.get((upid, round_)) is rec
        frees = any(st.is_live(r.state) for r in self.t.by_upid[upid].values() if r is not rec)
        if bad:
            assert rec.state == st.FAILED
        elif live - frees >= SLOTS:
            assert rec.state == st.REJECTED
            assert rec.msg == f"no free slot: {live - frees} of {SLOTS} slots in use"
        else:
            assert rec.state in (st.PENDING, st.RUNNING)
        if newest is not None:
            if not st.is_live(newest.state) or newest.state == st.PENDING:
                assert self.t.get(newest.key) is None  # forgotten at once
            else:
                assert newest.superseded and newest.state == st.TERMINATING
        self.apply(actions)

    @rule(data=hs.data())
    def terminate(self, data: hs.DataObject) -> None:
        key = data.draw(self._keys())
        rec = self.t.get(key)
        was = rec.state if rec else None
        got, changed, actions = logic.terminate(self.t, key, GRACE, now=self.now, stamp=self.now)
        assert got is rec
        if rec is None:
            assert not changed and not actions
        elif was == st.PENDING:
            assert rec.state == st.TERMINATED and rec.msg == logic.NOT_STARTED_MSG
        elif was == st.RUNNING:
            assert rec.state == st.TERMINATING and rec.kill_at == self.now + GRACE
        else:
            assert not changed and rec.state == was
        self.apply(actions)

    @precondition(lambda self: self.running)
    @rule(data=hs.data(), code=hs.sampled_from([0, 1, 2, -9, -15]))
    def process_ends(self, data: hs.DataObject, code: int) -> None:
        pid = data.draw(hs.sampled_from(sorted(self.running)))
        key = self.running.pop(pid)
        rec, actions = logic.exited(self.t, key, pid, code, self.now)
        assert rec is not None and rec.state in st.TERMINAL_STATES
        if rec.superseded:
            assert self.t.get(key) is None  # made way: forgotten
        self.apply(actions)

    @rule(data=hs.data(), pid=hs.integers(0, 99), code=hs.integers(-9, 3))
    def exit_of_nobody_is_ignored(self, data: hs.DataObject, pid: int, code: int) -> None:
        key = data.draw(self._keys())
        dump, dirty = self.t.dump(), set(self.t.dirty)
        rec, actions = logic.exited(self.t, key, pid, code, self.now)  # pids < 100: never ours
        assert rec is None and not actions
        assert self.t.dump() == dump and self.t.dirty == dirty

    @rule(dt=hs.floats(0.5, 10.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.apply(logic.kill_due(self.t, list(self.t), self.now))
        for rec in self.t:
            assert not (rec.state == st.TERMINATING and rec.kill_at is not None
                        and rec.kill_at <= self.now)

    @rule(data=hs.data())
    def cleanup(self, data: hs.DataObject) -> None:
        key = data.draw(self._keys())
        rec = self.t.get(key)
        live = self.t.live_count()
        result, actions = logic.cleanup(self.t, key)
        if rec is None:
            assert result is False and not actions
        elif st.is_terminal(rec.state):
            assert result is True and self.t.get(key) is None
            assert self.t.live_count() == live  # a terminal record held no slot
        else:
            assert isinstance(result, str) and self.t.get(key) is rec
        self.apply(actions)

    def _keys(self) -> hs.SearchStrategy[tuple[str, int]]:
        known = sorted(self.t.records)
        fresh = hs.tuples(hs.sampled_from(UPIDS), hs.integers(0, 4))
        return hs.one_of(hs.sampled_from(known), fresh) if known else fresh

    # -- invariants

    @invariant()
    def indices_match_the_records(self) -> None:
        recs = self.t.records
        live = {r.upid for r in recs.values() if r.state in st.LIVE_STATES}
        assert self.t.live_count() == len(live) <= SLOTS
        assert self.t.dump() == [recs[k].row() for k in sorted(recs)]
        assert {(u, r) for u, rs in self.t.by_upid.items() for r in rs} == set(recs)

    @invariant()
    def each_process_has_its_live_record(self) -> None:
        for pid, key in self.running.items():
            rec = self.t.get(key)
            assert rec is not None and rec.pid == pid and rec.state in (st.RUNNING, st.TERMINATING)
        for rec in self.t:
            if rec.state in (st.RUNNING, st.TERMINATING):
                assert self.running.get(rec.pid) == rec.key  # type: ignore[arg-type]

    @invariant()
    def a_superseded_round_never_runs_again(self) -> None:
        for rec in self.t:
            if rec.superseded:  # only ends, then is forgotten
                assert rec.state in (st.RUNNING, st.TERMINATING), rec
            if rec.waiting_for is not None:  # waits for its live older round only
                old = self.t.get(rec.waiting_for)
                assert rec.state == st.PENDING and old is not None and old.superseded
                assert old.state in st.LIVE_STATES


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestTable = TableMachine.TestCase


def test_supersede_waits_for_the_old_round_then_starts():
    t = ProcessTable()
    old, _, acts = logic.launch(t, "p", 0, GOOD, slots=1, grace=2.0, now=0.0, stamp=0.0)
    assert acts == [logic.Start(old)]
    logic.started(t, old, 7, None, 0.0)
    new, is_new, acts = logic.launch(t, "p", 1, GOOD, slots=1, grace=2.0, now=1.0, stamp=1.0)
    # the slot passes to the new round, which waits; the old one is told to stop
    assert is_new and new.state == st.PENDING and new.waiting_for == ("p", 0)
    assert acts == [logic.Signal(old, signal.SIGTERM)] and old.kill_at == 3.0
    # a repeat of the old round is a duplicate: nothing happens
    assert logic.launch(t, "p", 0, GOOD, slots=1, grace=2.0, now=1.0, stamp=1.0) == (old, False, [])
    assert logic.kill_due(t, [old], 2.9) == []
    assert logic.kill_due(t, [old], 3.0) == [logic.Signal(old, signal.SIGKILL)]
    rec, acts = logic.exited(t, ("p", 0), 7, -9, 3.5)
    assert rec is old and old.msg == "terminated: SIGKILL after 2 s grace"
    assert t.get(("p", 0)) is None and acts == [logic.Forgotten(old), logic.Start(new)]
    assert new.waiting_for is None
    # the old round is stale now: launching it again answers with the newest, starts nothing
    assert logic.launch(t, "p", 0, GOOD, slots=1, grace=2.0, now=4.0, stamp=4.0) == (new, False, [])


def test_an_old_round_still_ending_after_a_failed_successor_keeps_its_slot_and_blocks_its_upid():
    t = ProcessTable()
    a0, _, _ = logic.launch(t, "a", 0, GOOD, slots=1, grace=2.0, now=0.0, stamp=0.0)
    logic.started(t, a0, 7, None, 0.0)
    a1, _, acts = logic.launch(t, "a", 1, [], slots=1, grace=2.0, now=0.0, stamp=0.0)
    assert a1.state == st.FAILED and a0.superseded and acts == [logic.Signal(a0, signal.SIGTERM)]
    # a0's process still runs: no other upid gets its slot, and a newer round of "a" waits
    b0, _, acts = logic.launch(t, "b", 0, GOOD, slots=1, grace=2.0, now=0.0, stamp=0.0)
    assert b0.state == st.REJECTED and not acts
    a2, _, acts = logic.launch(t, "a", 2, GOOD, slots=1, grace=2.0, now=0.0, stamp=0.0)
    assert a2.state == st.PENDING and a2.waiting_for == a0.key and acts == [logic.Forgotten(a1)]
    assert logic.exited(t, a0.key, 7, -15, 1.0)[1] == [logic.Forgotten(a0), logic.Start(a2)]


def test_exit_texts():
    t = ProcessTable()
    msgs = []
    for i, code in enumerate((0, 3, -15, None)):
        rec, _, _ = logic.launch(t, f"u{i}", 0, GOOD, slots=9, grace=1.0, now=0.0, stamp=0.0)
        logic.started(t, rec, i + 10, None, 0.0)
        msgs.append(logic.exited(t, rec.key, i + 10, code, 1.0)[0].msg)  # type: ignore[union-attr]
    assert msgs == ["exit code 0", "exit code 3", "killed by signal SIGTERM",
                    "exit status unknown (its reaper had died)"]
    assert [r.state for r in t.sorted()] == [st.EXITED, st.FAILED, st.FAILED, st.FAILED]
