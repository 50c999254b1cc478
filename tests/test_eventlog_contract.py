"""The contract every event-log backend passes: memory, SQLite and ZooKeeper alike."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cei_actors.eventlog import (
    CorruptLog,
    EventLog,
    Fenced,
    InvalidStream,
    OffsetConflict,
    PendingEvent,
    Snapshot,
    batch,
    open_log,
)
from cei_actors.eventlog.batch import encode_batch
from cei_actors.private_files import write_secret_file

BACKENDS = ["memory", "sqlite", pytest.param("zk", marks=pytest.mark.zk),
            pytest.param("zk-acl", marks=pytest.mark.zk)]


@pytest.fixture(params=BACKENDS)
def make_log(request, tmp_path):
    """A factory of log instances that all see the same fresh storage."""
    kind = request.param
    if kind == "memory":
        url = f"memory://{uuid.uuid4().hex}"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path}/log.db"
    else:
        # truncate moves batches out of ZooKeeper, so a ZooKeeper log needs an archive
        url = f"zk://{request.getfixturevalue('zk_hosts')}?archive=sqlite:///{tmp_path}/zk-archive.db"
        if kind == "zk-acl":  # the same contract on a chroot protected by digest credentials
            auth = tmp_path / "zk-auth"
            write_secret_file(auth, b"cei:contract-password")
            url += f"&auth_file={auth}"
    opened: list[EventLog] = []

    def make(**options) -> EventLog:
        log = open_log(url, **options)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def ev(i: int, pad: int = 10) -> PendingEvent:
    return PendingEvent("Thing", 1, 1000.0 + i, {"i": i, "pad": "x" * pad})


def bodies(log: EventLog, stream: str = "s", start: int = 1) -> list[int]:
    return [r.body["i"] for r in log.read(stream, start)]


def test_order_and_dense_offsets(make_log):
    log = make_log()
    fence = log.acquire("s")
    head = log.append(fence, 0, [ev(1), ev(2)])
    head = log.append(fence, head, [ev(3)])
    head = log.append(fence, head, [ev(4), ev(5), ev(6)])
    assert head == 6 == log.head("s")
    records = list(log.read("s"))
    assert [r.offset for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.body["i"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r.epoch == fence.epoch and r.stream == "s" for r in records)
    assert [r.offset for r in log.read("s", 2, 4)] == [2, 3, 4]
    assert [r.offset for r in log.read("s", 5)] == [5, 6]
    assert list(log.read("s", 7)) == []
    assert log.streams() == ["s"]
    assert log.head("empty") == 0 and list(log.read("empty")) == []


def test_append_at_wrong_head_is_refused(make_log):
    log = make_log()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    with pytest.raises(OffsetConflict):
        log.append(fence, 0, [ev(2)])
    with pytest.raises(OffsetConflict):
        log.append(fence, 5, [ev(2)])
    assert bodies(log) == [1]


def test_deposed_writer_is_fenced_and_stores_nothing(make_log):
    old, new = make_log(), make_log()
    f_old = old.acquire("s")
    old.append(f_old, 0, [ev(1)])
    f_new = new.acquire("s")
    assert f_new.epoch > f_old.epoch
    with pytest.raises(Fenced):
        old.append(f_old, 1, [ev(2), ev(3)])
    assert bodies(new) == [1]
    new.append(f_new, 1, [ev(4)])
    assert bodies(old) == [1, 4]
    assert [r.epoch for r in old.read("s")] == [f_old.epoch, f_new.epoch]


def test_retry_after_unknown_outcome_is_idempotent(make_log):
    log = make_log()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    real_put = log._put
    calls = []

    def lost_reply(stream, epoch, batches):
        real_put(stream, epoch, batches)
        if not calls:
            calls.append(1)
            raise TimeoutError("reply lost")

    log._put = lost_reply
    with pytest.raises(TimeoutError):
        log.append(fence, 1, [ev(2), ev(3)])
    assert log.append(fence, 1, [ev(2), ev(3)]) == 3
    assert bodies(log) == [1, 2, 3]
    # a different append at the same offsets is a conflict, not a silent overwrite
    other = make_log()
    f2 = other.acquire("s")
    other._heads[("s", f2.epoch)] = 1
    with pytest.raises(OffsetConflict):
        other.append(f2, 1, [ev(99)])
    assert bodies(log) == [1, 2, 3]


def test_snapshot_then_tail_recovery(make_log):
    log = make_log()
    fence = log.acquire("s")
    head = log.append(fence, 0, [ev(i) for i in range(1, 11)])
    assert log.load_snapshot("s") is None
    log.save_snapshot(Snapshot("s", 7, 5.0, 1, b"state-at-7"))
    head = log.append(fence, head, [ev(11)])
    snap = make_log().load_snapshot("s")
    assert snap is not None and (snap.offset, snap.data, snap.version) == (7, b"state-at-7", 1)
    assert bodies(log, start=snap.offset + 1) == [8, 9, 10, 11]
    with pytest.raises(ValueError):
        log.save_snapshot(Snapshot("s", 99, 5.0, 1, b"future"))


def test_truncate_keeps_offsets_and_history(make_log):
    log = make_log()
    fence = log.acquire("s")
    head = 0
    for i in range(1, 21):
        head = log.append(fence, head, [ev(i)])
    with pytest.raises(ValueError):
        log.truncate("s", 5)  # no snapshot covers it
    log.save_snapshot(Snapshot("s", 15, 0.0, 1, b"x"))
    with pytest.raises(ValueError):
        log.truncate("s", 17)
    moved = log.truncate("s", 16)
    assert moved == 15
    assert len(log._index("s")) == 5
    assert log.head("s") == 20
    head = log.append(fence, head, [ev(21)])
    assert head == 21
    assert bodies(log) == list(range(1, 22))  # archived history still replayable
    assert bodies(log, start=16) == list(range(16, 22))


def test_corrupt_batch_is_detected_with_stream_and_offset(make_log):
    log = make_log()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    log.append(fence, 1, [ev(2)])
    blob = bytearray(log._get("s", 2))
    blob[-3] ^= 0xFF
    log._corrupt("s", 2, bytes(blob))
    with pytest.raises(CorruptLog) as info:
        list(log.read("s"))
    assert info.value.stream == "s" and info.value.offset == 2
    assert "checksum" in str(info.value)
    log._corrupt("s", 2, b"garbage")
    with pytest.raises(CorruptLog):
        list(log.read("s", 2))


def test_epoch_going_backwards_is_detected(make_log):
    log = make_log()
    f1 = log.acquire("s")
    log.append(f1, 0, [ev(1)])
    f2 = log.acquire("s")
    log.append(f2, 1, [ev(2)])
    log._corrupt("s", 2, encode_batch("s", 2, f1.epoch - 1, [ev(2)]))
    with pytest.raises(CorruptLog, match="epoch went back"):
        list(log.read("s"))


def test_oversized_append_is_split_into_batches(make_log):
    log = make_log()
    fence = log.acquire("s")
    big = [ev(i, pad=20_000) for i in range(60)]  # ~1.2 MB in all
    assert log.append(fence, 0, big) == 60
    assert len(log._index("s")) > 1
    assert bodies(log) == list(range(60))
    assert all(len(log._get("s", f)) <= log.max_batch_bytes + 64 * 1024 for f in log._index("s"))


def test_unfinished_split_append_is_invisible_and_repaired(make_log):
    log = make_log()
    log.max_batch_bytes = 4096
    log.max_atomic_bytes = 4096
    fence = log.acquire("s")
    log.append(fence, 0, [ev(0)])
    real_put = log._put
    puts = []

    def crash_after_first(stream, epoch, batches):
        if puts:
            raise ConnectionError("writer died")
        puts.append(1)
        real_put(stream, epoch, batches)

    log._put = crash_after_first
    with pytest.raises(ConnectionError):
        log.append(fence, 1, [ev(i, pad=3000) for i in range(1, 5)])
    reader = make_log()
    assert bodies(reader) == [0] and reader.head("s") == 1
    new_fence = reader.acquire("s")
    assert reader.append(new_fence, 1, [ev(7)]) == 2
    assert bodies(reader) == [0, 7]


def test_tail_follows_new_appends(make_log):
    log, follower = make_log(), make_log()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    assert [r.offset for r in follower.tail("s", 0, timeout=1)] == [1]
    t0 = time.monotonic()
    assert follower.tail("s", 1, timeout=0.2) == []
    assert time.monotonic() - t0 >= 0.15
    timer = threading.Timer(0.1, lambda: log.append(fence, 1, [ev(2)]))
    timer.start()
    got = follower.tail("s", 1, timeout=5)
    timer.join()
    assert [r.offset for r in got] == [2]


def test_concurrent_readers_see_dense_prefixes(make_log):
    log = make_log()
    fence = log.acquire("s")
    errors: list[str] = []
    done = threading.Event()

    def reader():
        r = make_log()
        while not done.is_set():
            offsets = [rec.offset for rec in r.read("s")]
            if offsets != list(range(1, len(offsets) + 1)):
                errors.append(f"not dense: {offsets[:5]}...")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    head = 0
    for i in range(40):
        head = log.append(fence, head, [ev(i), ev(i)])
    done.set()
    for t in threads:
        t.join()
    assert not errors
    assert head == 80


def test_bad_stream_names_are_refused(make_log):
    log = make_log()
    for bad in ["", "Upper", "has space", "../x", "a" * 200]:
        with pytest.raises(InvalidStream):
            log.acquire(bad)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 5)),
            st.tuples(st.just("failover"), st.just(0)),
            st.tuples(st.just("stale"), st.integers(1, 3)),
        ),
        max_size=15,
    )
)
def test_log_equals_the_successful_appends(make_log, steps):
    stream = f"p{uuid.uuid4().hex[:8]}"
    log = make_log()
    fence = log.acquire(stream)
    old = None
    expected: list[int] = []
    n = 0
    for op, k in steps:
        if op == "append":
            batch = [ev(n + j) for j in range(k)]
            log.append(fence, len(expected), batch)
            expected += [n + j for j in range(k)]
            n += k
        elif op == "failover":
            old, fence = fence, log.acquire(stream)
        elif old is not None:
            with pytest.raises((Fenced, OffsetConflict)):
                log.append(old, len(expected), [ev(-1)] * k)
    assert [r.body["i"] for r in log.read(stream)] == expected
    assert [r.offset for r in log.read(stream)] == list(range(1, len(expected) + 1))
    assert log.head(stream) == len(expected)


# ---- truncation into the archive, several snapshots, chunked snapshots (issue 13) ----------


def test_batch_checksums_name_every_batch_archive_included(make_log):
    """What a reader's cache checks a log against (decision RS2): the stored CRC of each
    batch up to an offset, live or archived; another log's batches give other checksums."""
    log = make_log()
    fence = log.acquire("s")
    head = 0
    for i in range(1, 11):
        head = log.append(fence, head, [ev(i), ev(100 + i)])
    sums = log.batch_checksums("s", 20)
    assert [first for first, _ in sums] == list(range(1, 21, 2))
    assert all(crc == batch.batch_checksum(log._get("s", first), "s", first) for first, crc in sums)
    assert log.batch_checksums("s", 6) == sums[:3]  # batches starting at or before 6
    log.save_snapshot(Snapshot("s", 12, 0.0, 1, b"x"))
    assert log.truncate("s", 13) == 6
    assert log.batch_checksums("s", 20) == sums
    other = make_log().acquire("t")
    make_log().append(other, 0, [ev(1), ev(999)])
    assert log.batch_checksums("t", 2)[0][1] != sums[0][1]


@pytest.fixture(params=BACKENDS)
def make_archived_log(request, tmp_path):
    """Like ``make_log``, but every backend has an archive (a SQLite file; a directory for
    zk-acl), given to the first log opened; later ones find it recorded in the log."""
    kind = request.param
    archive = str(tmp_path / "archive-dir") if kind == "zk-acl" else f"sqlite:///{tmp_path}/archive.db"
    if kind == "memory":
        url = f"memory://{uuid.uuid4().hex}"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path}/log.db"
    else:
        url = f"zk://{request.getfixturevalue('zk_hosts')}"
        if kind == "zk-acl":
            auth = tmp_path / "zk-auth"
            write_secret_file(auth, b"cei:contract-password")
            url += f"?auth_file={auth}"
    opened: list[EventLog] = []

    def make(**options) -> EventLog:
        if not opened:
            options.setdefault("archive", archive)
        log = open_log(url, **options)
        opened.append(log)
        return log

    make.archive = archive
    yield make
    for log in opened:
        log.close()


def _fill(log: EventLog, fence, head: int, upto: int) -> int:
    for i in range(head + 1, upto + 1):
        head = log.append(fence, head, [ev(i)])
    return head


def test_truncated_history_is_in_the_archive_and_read_across(make_archived_log):
    log = make_archived_log()
    assert log.archive == make_archived_log.archive
    fence = log.acquire("s")
    head = _fill(log, fence, 0, 40)
    before = [tuple(r) for r in log.read("s")]
    for at in (10, 20, 30):
        log.save_snapshot(Snapshot("s", at, 0.0, 1, b"x"))
        log.truncate("s", min(log.snapshots("s")) + 1)
    assert log.snapshots("s") == [30, 20]  # two kept (the default)
    assert log._index("s") == list(range(21, 41))  # only the tail after the older snapshot is live
    assert [tuple(r) for r in log.read("s")] == before
    assert [r.offset for r in log.read("s", 5, 25)] == list(range(5, 26))
    # a reader opened without the option finds the archive the log recorded
    reader = make_archived_log()
    assert reader.archive == make_archived_log.archive
    assert [tuple(r) for r in reader.read("s")] == before
    assert reader.head("s") == 40
    assert log.append(fence, head, [ev(41)]) == 41


def test_a_crash_between_archiving_and_deleting_leaves_duplicates_never_gaps(make_archived_log):
    log = make_archived_log()
    fence = log.acquire("s")
    _fill(log, fence, 0, 12)
    log.save_snapshot(Snapshot("s", 10, 0.0, 1, b"x"))
    store = log._archive_store
    real_put = store.put

    def put_then_die(stream, items):
        real_put(stream, items)
        raise KeyboardInterrupt("crashed after archiving, before deleting")

    store.put = put_then_die
    with pytest.raises(KeyboardInterrupt):
        log.truncate("s", 11)
    store.put = real_put
    assert len(log._index("s")) == 12 and store.index("s") == list(range(1, 11))
    assert bodies(log) == list(range(1, 13))  # each event once
    assert log.truncate("s", 11) == 10  # finishing the job is idempotent
    assert bodies(make_archived_log()) == list(range(1, 13))


def test_a_tailing_reader_keeps_its_place_when_its_position_is_truncated(make_archived_log):
    writer, follower = make_archived_log(), make_archived_log()
    fence = writer.acquire("s")
    head = _fill(writer, fence, 0, 5)
    seen = [r.offset for r in follower.tail("s", 0, timeout=1)]
    assert seen == [1, 2, 3, 4, 5]
    head = _fill(writer, fence, head, 30)
    writer.save_snapshot(Snapshot("s", 25, 0.0, 1, b"x"))
    writer.truncate("s", 26)  # the follower's position (5) is now only in the archive
    assert writer._index("s")[0] == 26
    got = follower.tail("s", seen[-1], timeout=1)
    assert [r.offset for r in got] == list(range(6, 31))


def test_snapshots_kept_are_the_newest_by_offset(make_log):
    log = make_log(keep_snapshots=2)
    fence = log.acquire("s")
    _fill(log, fence, 0, 5)
    for at in (1, 3, 5, 2):  # the late one at 2 is older than both kept
        log.save_snapshot(Snapshot("s", at, float(at), 1, f"at-{at}".encode()))
    assert log.snapshots("s") == [5, 3]
    assert log.load_snapshot("s").data == b"at-5"
    assert log.load_snapshot("s", 3).data == b"at-3"
    assert log.load_snapshot("s", 1) is None
    log.save_snapshot(Snapshot("s", 5, 9.0, 1, b"again-5"))  # same offset: replaced
    assert log.snapshots("s") == [5, 3] and make_log().load_snapshot("s").data == b"again-5"


def test_a_damaged_snapshot_is_reported_and_the_older_one_still_loads(make_log):
    log = make_log()
    fence = log.acquire("s")
    _fill(log, fence, 0, 4)
    log.save_snapshot(Snapshot("s", 2, 0.0, 1, b"two" * 1000))
    log.save_snapshot(Snapshot("s", 4, 0.0, 1, b"four" * 1000))
    log._corrupt_snapshot("s", 4)
    with pytest.raises(CorruptLog, match="snapshot"):
        make_log().load_snapshot("s")
    assert make_log().load_snapshot("s", 2).data == b"two" * 1000


def test_a_snapshot_over_the_decode_limit_is_saved_in_chunks_and_loads(make_log, monkeypatch):
    """The old single-blob limit (64 MiB) refused on load what save accepted; here the limit
    is set to 256 KiB so the test stays fast: a 1.5 MB snapshot must still load."""
    monkeypatch.setattr(batch, "DEFAULT_MAX_DECODE_BYTES", 256 * 1024)
    log = make_log()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    big = bytes(range(256)) * 6000
    log.save_snapshot(Snapshot("s", 1, 1.0, 1, big))
    snap = make_log().load_snapshot("s")
    assert snap is not None and snap.data == big
