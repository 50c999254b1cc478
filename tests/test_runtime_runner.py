"""The runner: decide, append under the fence, apply; recovery; snapshots; bad input."""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cei_actors.eventlog import Fenced, open_log
from cei_actors.runtime.example import Add, Counters, Dump, Get, Tick
from cei_actors.runtime.messages import ErrorReply, Message, Ok
from cei_actors.runtime.runner import NotReady, Runner, replay


def fresh(url=None, **kw):
    log = open_log(url or f"memory://{uuid.uuid4().hex}")
    runner = Runner(Counters(), log, clock=lambda: 100.0, rng=random.Random(1), **kw)
    runner.recover()
    return runner


def test_decide_append_apply_and_reply():
    r = fresh()
    assert r.handle(Add("a", 5)).reply == Ok(5)
    assert r.handle(Add("a", -2)).reply == Ok(3)
    assert r.head == 2 and r.state.counters == {"a": 3}
    assert r.handle(Get("a")).reply == Ok(3)
    assert r.head == 2  # queries write nothing


def test_refused_and_malformed_messages_change_nothing():
    r = fresh()
    r.handle(Add("a", 1))
    before = (r.head, dict(r.state.counters))
    for bad in [Add("a", -5), Get("zz"), Add("", 1), Add("a", "7"), Add(5, 1), "not a message", Message()]:
        reply = r.handle(bad).reply
        assert isinstance(reply, ErrorReply), bad
        assert reply.code in ("bad_request", "not_found")
    assert (r.head, r.state.counters) == before
    assert "Add.amount: expected int" in r.handle(Add("a", "7")).reply.message


def test_a_raising_core_is_contained():
    class Broken(Counters):
        def decide(self, state, message, ctx):
            if isinstance(message, Get):
                raise RuntimeError("boom")
            return super().decide(state, message, ctx)

    r = Runner(Broken(), open_log(f"memory://{uuid.uuid4().hex}"))
    r.recover()
    reply = r.handle(Get("x")).reply
    assert reply.code == "internal" and "boom" in reply.message
    assert r.handle(Add("x", 1)).reply == Ok(1)


def test_group_commit_is_one_append():
    r = fresh()
    appends = []
    real = r.log.append
    r.log.append = lambda *a: appends.append(a) or real(*a)
    decisions = r.handle_many([Add("a", 1), Add("a", -9), Add("b", 2), Get("a")])
    assert [d.reply for d in decisions] == [Ok(1), decisions[1].reply, Ok(2), Ok(1)]
    assert isinstance(decisions[1].reply, ErrorReply)
    assert len(appends) == 1 and len(appends[0][2]) == 2


def test_recovery_by_replay_equals_state_before():
    url = f"memory://{uuid.uuid4().hex}"
    r = fresh(url)
    for i in range(50):
        r.handle(Add(f"c{i % 7}", i))
    again = fresh(url)
    assert again.state == r.state and again.head == r.head == 50
    assert replay(Counters(), again.log, "example") == r.state


def test_deposed_runner_is_fenced_and_must_recover():
    url = f"memory://{uuid.uuid4().hex}"
    old = fresh(url)
    old.handle(Add("a", 1))
    new = fresh(url)
    with pytest.raises(Fenced):
        old.handle(Add("a", 1))
    with pytest.raises(NotReady):
        old.handle(Add("a", 1))
    assert new.handle(Add("a", 1)).reply == Ok(2)
    assert replay(Counters(), new.log, "example").counters == {"a": 2}


def test_snapshot_then_tail(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    r = fresh(url, snapshot_every=10)
    for _ in range(25):
        r.handle(Add("a", 1))
    snap = r.log.load_snapshot("example")
    assert snap is not None and snap.offset == 20
    r.log.save_snapshot(snap)
    again = fresh(url)
    assert again.state.counters == {"a": 25} and again.head == 25


def test_a_big_state_is_snapshotted_in_proportion_to_its_size(tmp_path):
    from cei_actors.runtime.runner import SNAPSHOT_BYTES_PER_EVENT

    url = f"sqlite:///{tmp_path}/log.db"
    r = fresh(url, snapshot_every=10)
    for i in range(10):  # ten counters with long names: a snapshot far bigger than 10 events
        r.handle(Add(f"counter-{i:03d}-" + "x" * 2000, 1))
    first = r.log.load_snapshot("example")
    assert first is not None and first.offset == 10
    wait = len(first.data) // SNAPSHOT_BYTES_PER_EVENT
    assert wait > 100
    for _ in range(wait - 1):
        r.handle(Add("a", 1))
    assert r.log.load_snapshot("example").offset == 10
    r.handle(Add("a", 1))
    assert r.log.load_snapshot("example").offset == 10 + wait
    # a runner that recovers from that snapshot keeps the same pace
    again = fresh(url, snapshot_every=10)
    for _ in range(20):
        again.handle(Add("a", 1))
    assert again.log.load_snapshot("example").offset == 10 + wait


def test_bad_snapshot_falls_back_to_full_replay(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    r = fresh(url, snapshot_every=5)
    for _ in range(7):
        r.handle(Add("a", 1))

    class NewFormat(Counters):
        def restore(self, data):
            raise KeyError("format changed")

    again = Runner(NewFormat(), open_log(url))
    again.recover()
    assert again.state.counters == {"a": 7}


def test_timers_are_effects_after_recovery():
    r = Runner(Counters(tick=0.5), open_log(f"memory://{uuid.uuid4().hex}"))
    d = r.recover()
    assert [e.key for e in d.effects] == ["tick"]
    d = r.handle(Tick())
    assert r.state.ticks == 1 and [e.key for e in d.effects] == ["tick"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(-5, 5)), max_size=40), st.integers(1, 8))
def test_state_always_equals_replay_and_never_negative(ops, every):
    url = f"memory://{uuid.uuid4().hex}"
    r = fresh(url, snapshot_every=every)
    for name, amount in ops:
        r.handle(Add(name, amount))
        assert all(v >= 0 for v in r.state.counters.values())
    assert replay(Counters(), r.log, "example") == r.state
    assert fresh(url).state == r.state
    assert r.handle(Dump()).reply.value["counters"] == r.state.counters


def test_events_from_recovered_are_applied_and_persisted():
    from cei_actors.runtime.core import Decision
    from cei_actors.runtime.example import CounterAdded

    class Boot(Counters):
        def recovered(self, state, ctx):
            if "boot" not in state.counters:
                return Decision(events=[CounterAdded("boot", 1, ctx.now)])
            return Decision()

    url = f"memory://{uuid.uuid4().hex}"
    r = Runner(Boot(), open_log(url))
    r.recover()
    assert r.state.counters == {"boot": 1} and r.head == 1
    again = Runner(Boot(), open_log(url))
    again.recover()
    assert again.state.counters == {"boot": 1} and again.head == 1


# ---- an event that would not read back is never written (issue 12) ---------------------------


class Sloppy(Counters):
    """A core with bugs: for some names it emits events that cannot be stored."""

    def decide(self, state, message, ctx):
        from cei_actors.runtime.core import Decision
        from cei_actors.runtime.example import CounterAdded

        bad = {
            "tuple": CounterAdded(("t", 1), 1, ctx.now),  # a tuple reads back as a list
            "huge": CounterAdded("h", 2**70, ctx.now),  # over msgpack's ints
            "nan": CounterAdded("n", 1, float("nan")),  # never equal to itself
            "big": CounterAdded("b" * 600_000, 1, ctx.now),  # over MAX_EVENT_BYTES
        }.get(getattr(message, "name", None))
        if bad is not None:
            return Decision(events=[CounterAdded("x", 1, ctx.now), bad], reply=Ok("sloppy"))
        return super().decide(state, message, ctx)


class EagerSloppy(Sloppy):
    """Applies its events inside decide, as the PD does (docs/decisions.md PD1)."""

    applies_in_decide = True

    def decide(self, state, message, ctx):
        decision = super().decide(state, message, ctx)
        state.pre = list(decision.events)
        for event in decision.events:
            Counters.apply(self, state, event)
        return decision

    def apply(self, state, event):
        pre = getattr(state, "pre", None)
        if pre and pre[0] is event:
            pre.pop(0)
            return state
        return super().apply(state, event)


def test_unstorable_events_are_refused_and_the_rest_of_the_batch_is_kept():
    r = Runner(Sloppy(), open_log(f"memory://{uuid.uuid4().hex}"), clock=lambda: 100.0)
    r.recover()
    epoch = r.fence.epoch
    batch = [Add("a", 1), Add("tuple", 1), Add("a", 2), Add("huge", 1), Add("nan", 1), Add("big", 1), Add("b", 1)]
    replies = [d.reply for d in r.handle_many(batch)]
    assert [replies[i] for i in (0, 2, 6)] == [Ok(1), Ok(3), Ok(1)]
    refused = {batch[i].name: replies[i] for i in (1, 3, 4, 5)}
    assert all(x.code == "bad_request" and x.request == "Add" for x in refused.values()), refused
    assert "event CounterAdded: name: a tuple reads back as a list" in refused["tuple"].message
    assert "event CounterAdded: amount: int 1180591620717411303424 is out of msgpack's range" in refused["huge"].message
    assert "event CounterAdded: at: NaN" in refused["nan"].message
    assert "over the limit of 524288 bytes for one event (its field name is" in refused["big"].message
    assert r.ready and r.fence.epoch == epoch and r.head == 3  # nothing of the refused ones
    assert r.state.counters == {"a": 3, "b": 1}
    assert replay(Sloppy(), r.log, "example") == r.state


def test_a_core_that_applies_in_decide_is_rebuilt_from_the_log_after_a_refusal():
    url = f"memory://{uuid.uuid4().hex}"
    r = Runner(EagerSloppy(tick=0.5), open_log(url), clock=lambda: 100.0)
    r.recover()
    epoch = r.fence.epoch
    decisions = r.handle_many([Add("a", 1), Add("tuple", 1), Add("a", 2)])
    assert [d.reply for d in decisions][::2] == [Ok(1), Ok(3)]
    assert decisions[1].reply.code == "bad_request"
    assert [e.key for e in decisions[1].effects] == ["tick"]  # the rebuild's reconciliation
    assert r.ready and r.fence.epoch == epoch and r.head == 2
    assert r.state.counters == {"a": 3}  # neither "x" nor ("t", 1) from the refused decision
    assert replay(EagerSloppy(), r.log, "example") == r.state


def test_the_history_worker_is_one_thread_that_survives_a_failed_job_and_ends_with_its_owner():
    import gc
    import threading

    from cei_actors.runtime.runner import _HistoryWorker

    worker = _HistoryWorker("history-test")
    ran: list[int] = []

    def boom() -> None:
        raise RuntimeError("planted")

    assert worker.submit(ran.append, (1,)) and worker.wait(10)
    thread = worker._thread
    assert thread is not None and thread.is_alive()
    started = threading.Event()
    release = threading.Event()

    def held() -> None:
        started.set()
        release.wait(10)

    assert worker.submit(held, ())
    assert started.wait(10) and worker.busy() and not worker.submit(ran.append, (2,))  # one at a time
    release.set()
    assert worker.wait(10) and not worker.busy()
    assert worker.submit(boom, ()) and worker.wait(10)
    assert worker.submit(ran.append, (3,)) and worker.wait(10)
    assert ran == [1, 3] and worker._thread is thread  # never a second thread
    del worker
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


class _FieldCounters(Counters):
    """Counters whose ``CounterAdded`` folds straight from a stored body, counting the folds."""

    def __init__(self) -> None:
        super().__init__()
        self.folded: list[str] = []

    def body_appliers(self, state):
        def added(state, name, amount, at):
            self.folded.append(name)
            state.counters[name] = state.counters.get(name, 0) + amount
            return state

        return {("CounterAdded", 1): added}


def test_recovery_folds_stored_rows_as_building_and_applying_each_record_would():
    """RT2: recovery reads stored rows, folds the component's body-folded types from the body
    and builds the rest from it; rows with recorded inputs, and every kind of bad row, go the
    way of ``from_record`` and say what they said before."""
    from cei_actors.eventlog import CorruptLog, UnknownEventType
    from cei_actors.eventlog.batch import encode_rows, packb

    url = f"memory://{uuid.uuid4().hex}"
    r = fresh(url)
    for i in range(30):
        r.handle(Add(f"c{i % 7}", i))
    r.handle(Tick())
    recording = Runner(Counters(), open_log(url), clock=lambda: 100.0, rng=random.Random(1), record_inputs=True)
    recording.recover()
    for i in range(5):  # rows with a fifth item: the inputs
        recording.handle(Add("rec", i))
    again = Runner(_FieldCounters(), open_log(url), snapshot_every=10**9)
    again.recover()
    assert again.state == replay(Counters(), again.log, "example") == recording.state
    assert again.head == recording.head == 36
    assert again.component.folded == [f"c{i % 7}" for i in range(30)]  # not the rows with inputs

    def broken(row):
        log = open_log(f"memory://{uuid.uuid4().hex}")
        fence = log.acquire("example")
        log._put("example", fence.epoch, [(1, encode_rows("example", 1, fence.epoch, [packb(row)]))])
        runner = Runner(_FieldCounters(), log, snapshot_every=10**9)
        with pytest.raises(Exception) as caught:
            runner.recover()
        assert not runner.ready
        return caught.value

    err = broken(["CounterAdded", 1, 1.0])
    assert isinstance(err, CorruptLog) and "wrong shape" in str(err)
    err = broken(["Nope", 1, 1.0, {}])
    assert isinstance(err, UnknownEventType)
    for body in ({"name": "a"}, {"name": "a", "amount": 1, "at": 1.0, "x": 2}, [1]):
        err = broken(["CounterAdded", 1, 1.0, body])
        assert isinstance(err, CorruptLog) and "does not fit" in str(err), body
    err = broken(["TickRecorded", 1, 1.0, {"when": 1.0}])
    assert isinstance(err, CorruptLog) and "does not fit" in str(err)


@pytest.mark.parametrize("core", [Sloppy, EagerSloppy])
def test_handle_of_one_message_is_handle_many_of_it_without_the_batch_path(core, monkeypatch):
    """Decision RT13: ``handle`` decides one message on its own path (not through
    ``handle_many``) with ``handle_many([message])``'s outcome: replies, effects, heads, the
    log's records and the state, for accepted, refused, unstorable and query messages, a
    core that applies in ``decide`` included, and a runner recording its inputs."""
    messages = [Add("a", 1), Add("tuple", 1), Get("a"), Add("a", -9), Add("huge", 1), Add("b", 2),
                Get("zz"), Add("nan", 1), Add("a", 2), Dump()]

    def run(one: bool) -> tuple[list, list, Runner]:
        r = Runner(core(), open_log(f"memory://{uuid.uuid4().hex}"), clock=lambda: 100.0,
                   rng=random.Random(3))
        r.recover()
        if one:
            def refused(*args, **kwargs):
                raise AssertionError("handle went through handle_many")
            monkeypatch.setattr(r, "handle_many", refused)
        out, heads = [], []
        for m in messages:
            d = r.handle(m) if one else r.handle_many([m])[0]
            out.append((d.reply, [getattr(e, "key", e) for e in d.effects]))
            heads.append(r.head)
        return out, heads, r

    single, single_heads, a = run(True)
    batched, batched_heads, b = run(False)
    assert single == batched and single_heads == batched_heads
    assert a.state.counters == b.state.counters
    rows = [[(x.type, x.body) for x in r.log.read("example", 1, r.head)] for r in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) == a.head > 0
    # a runner recording its inputs stores the same rows, inputs included, either way
    recorded = []
    for one in (True, False):
        r = fresh(record_inputs=True)
        for m in (Add("a", 1), Get("a"), Add("b", 2)):
            assert (r.handle(m) if one else r.handle_many([m])[0]).reply is not None
        recorded.append([(x.type, x.body, x.input) for x in r.log.read("example", 1, r.head)])
    assert recorded[0] == recorded[1] and recorded[0] and all(row[2] for row in recorded[0])
