"""ZooKeeper-specific behaviour of the event log: lost replies, expiry, outages, limits, failover."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, NoNodeError

from cei_actors.eventlog import (
    BadLogUrl,
    EventLogError,
    Fence,
    Fenced,
    LogUnavailable,
    PendingEvent,
    Snapshot,
    open_log,
)
from cei_actors.eventlog.zookeeper import ArchiveNotConfigured, ZkLog
from cei_actors.testing.zkserver import ZkServer, expire_session, unreachable_address

pytestmark = pytest.mark.zk


def ev(i: int, pad: int = 10) -> PendingEvent:
    return PendingEvent("Thing", 1, 1000.0 + i, {"i": i, "pad": "x" * pad})


def bodies(log: ZkLog, stream: str = "s", start: int = 1) -> list[int]:
    return [r.body["i"] for r in log.read(stream, start)]


@pytest.fixture
def open_zk(zk_hosts: str) -> Iterator:
    """Open ZkLogs on this test's chroot (query options as keywords); closed afterwards."""
    opened: list[ZkLog] = []

    def make(**options: object) -> ZkLog:
        log = open_log(f"zk://{zk_hosts}", **options)
        assert isinstance(log, ZkLog)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def walk(client: KazooClient, path: str = "/") -> Iterator[tuple[str, int, int]]:
    """Every znode under ``path``: (path, number of children, data length)."""
    stat = client.exists(path)
    yield path, stat.numChildren, stat.dataLength
    for child in client.get_children(path):
        yield from walk(client, f"{path.rstrip('/')}/{child}")


class LoseReplies:
    """Wraps ``ZkLog._commit``: scripted commits raise ConnectionLoss before or after committing."""

    def __init__(self, log: ZkLog, script: list[str], on_loss=None) -> None:
        self.real = log._commit
        self.script = list(script)  # "before" | "after" | "ok", one per commit; then "ok"
        self.on_loss = on_loss
        self.calls: list[str] = []
        log._commit = self  # type: ignore[method-assign]

    def __call__(self, txn, timeout):
        step = self.script.pop(0) if self.script else "ok"
        self.calls.append(step)
        if step == "before":
            raise ConnectionLoss()
        result = self.real(txn, timeout)
        if step == "after":
            if self.on_loss:
                self.on_loss()
            raise ConnectionLoss()
        return result


# ---- lost replies, expiry, outages -----------------------------------------------------------


def test_lost_reply_after_commit_stores_exactly_once(open_zk):
    log = open_zk()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    lose = LoseReplies(log, ["after"])
    assert log.append(fence, 1, [ev(2), ev(3)]) == 3
    assert lose.calls == ["after"]  # the read-back found it stored: no second commit
    assert log.append(fence, 3, [ev(4)]) == 4
    assert bodies(open_zk()) == [1, 2, 3, 4]


def test_lost_request_before_commit_is_retried_once(open_zk):
    log = open_zk()
    fence = log.acquire("s")
    lose = LoseReplies(log, ["before", "before", "ok"])
    assert log.append(fence, 0, [ev(1), ev(2)]) == 2
    assert lose.calls == ["before", "before", "ok"]
    assert bodies(open_zk()) == [1, 2]


def test_mixed_lost_replies_keep_the_log_exact(open_zk):
    log = open_zk()
    log.max_atomic_bytes = 4096  # several multis per append, each may lose its reply
    fence = log.acquire("s")
    LoseReplies(log, ["after", "before", "ok", "after", "after", "before", "ok"] * 3)
    head, expected = 0, []
    for i in range(10):
        batch = [ev(10 * i + j, pad=1500) for j in range(4)]
        head = log.append(fence, head, batch)
        expected += [e.body["i"] for e in batch]
    reader = open_zk()
    assert bodies(reader) == expected
    assert [r.offset for r in reader.read("s")] == list(range(1, 41))


def test_lost_reply_while_fenced_reports_fenced(open_zk):
    log, rival = open_zk(), open_zk()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    LoseReplies(log, ["before"], on_loss=None)
    rival.acquire("s")
    with pytest.raises(Fenced):
        log.append(fence, 1, [ev(2)])
    assert bodies(rival) == [1]


def test_session_expiry_while_idle_then_append_succeeds_under_the_same_epoch(open_zk):
    log = open_zk(session_timeout=4)
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    old_session = log._client.client_id
    expire_session(log._client)
    assert log.append(fence, 1, [ev(2)]) == 2  # the epoch still holds: the append is valid
    assert log._client.client_id != old_session
    assert bodies(open_zk()) == [1, 2]


def test_session_expiry_while_idle_then_deposed_append_is_fenced(open_zk):
    log, rival = open_zk(session_timeout=4), open_zk()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    expire_session(log._client)
    rival.acquire("s")
    with pytest.raises(Fenced):
        log.append(fence, 1, [ev(2)])
    assert bodies(rival) == [1]


def test_session_expiry_with_a_reply_in_flight_is_an_explicit_unknown(open_zk):
    log = open_zk(session_timeout=4)
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    LoseReplies(log, ["after"], on_loss=lambda: expire_session(log._client))
    with pytest.raises(
        LogUnavailable, match="session expired.*unknown.*retrying the same append is safe"
    ):
        log.append(fence, 1, [ev(2), ev(3)])
    # the append had been stored: retrying it is recognised as done, never duplicated
    assert log.append(fence, 1, [ev(2), ev(3)]) == 3
    assert bodies(open_zk()) == [1, 2, 3]


def test_unreachable_server_raises_log_unavailable_within_the_timeout():
    with unreachable_address() as address:
        t0 = time.monotonic()
        with pytest.raises(LogUnavailable, match=address):
            open_log(f"zk://{address}/cei?timeout=1")
        assert time.monotonic() - t0 < 3


def test_unknown_options_are_refused_before_connecting():
    with pytest.raises(BadLogUrl, match="bogus"):
        open_log("zk://127.0.0.1:1/cei?bogus=1")


def test_server_gone_mid_life_raises_log_unavailable_then_recovers(tmp_path):
    with ZkServer(tmp_path / "zk") as server:
        log = open_log(f"zk://{server.hosts}/cei?timeout=1&session_timeout=10")
        try:
            fence = log.acquire("s")
            log.append(fence, 0, [ev(1)])
            server.kill()
            t0 = time.monotonic()
            with pytest.raises(LogUnavailable, match="unreachable"):
                log.append(fence, 1, [ev(2)])
            with pytest.raises(LogUnavailable):
                list(log.read("s"))
            assert time.monotonic() - t0 < 5
            server.restart()
            # the failed append may or may not have been stored: retrying it is safe, and a
            # caller retries until the client has reconnected (kazoo backs off between tries)
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert log.append(fence, 1, [ev(2)]) == 2
                    break
                except LogUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert bodies(log) == [1, 2]
        finally:
            log.close()


def test_server_restart_mid_appends_keeps_the_log_dense(tmp_path):
    with ZkServer(tmp_path / "zk") as server:
        log = open_log(f"zk://{server.hosts}/cei?timeout=15")
        try:
            fence = log.acquire("s")
            head, expected = 0, []
            for i in range(60):
                if i == 20:
                    threading.Timer(0.01, server.restart).start()
                batch = [ev(3 * i + j) for j in range(3)]
                head = log.append(fence, head, batch)
                expected += [e.body["i"] for e in batch]
            assert bodies(log) == expected
        finally:
            log.close()


# ---- limits ----------------------------------------------------------------------------------


def test_no_parent_znode_exceeds_the_bucket_size(open_zk, zk_client):
    log = open_zk(bucket=50)
    fence = log.acquire("s")
    head = 0
    for i in range(160):
        head = log.append(fence, head, [ev(i)])
    head = log.append(fence, head, [ev(1000 + j) for j in range(70)])  # straddles a boundary
    assert bodies(log)[-3:] == [1067, 1068, 1069]
    nodes = list(walk(zk_client))
    buckets = [(p, n) for p, n, _ in nodes if "/b/" in p and p.count("/") == 4]
    assert len(buckets) == 4  # offsets 1-230 in buckets of 50 offsets
    assert max(n for _, n in buckets) == 50
    assert all(n <= 50 for _, n, _ in nodes)


def test_an_append_over_a_megabyte_is_split_into_small_znodes_and_multis(open_zk, zk_client):
    log = open_zk()
    commits = LoseReplies(log, [])
    fence = log.acquire("s")
    big = [ev(i, pad=30_000) for i in range(50)]  # ~1.5 MB
    assert log.append(fence, 0, big) == 50
    assert len(commits.calls) >= 2  # over max_atomic_bytes: more than one multi
    sizes = [size for path, _, size in walk(zk_client) if "/b/" in path and path.count("/") == 5]
    assert len(sizes) >= 6 and max(sizes) <= log.max_batch_bytes + 40_000
    assert sum(sizes) > 1_400_000
    assert bodies(open_zk()) == list(range(50))


def test_a_single_event_over_the_znode_limit_is_refused_clearly(open_zk):
    log = open_zk()
    fence = log.acquire("s")
    with pytest.raises(EventLogError, match="znode limit"):
        log.append(fence, 0, [ev(0, pad=1_100_000)])
    assert log.head("s") == 0
    assert log.append(fence, 0, [ev(1)]) == 1


def test_append_without_an_epoch_is_fenced(open_zk):
    log = open_zk()
    with pytest.raises(Fenced):
        log.append(Fence("never", 1), 0, [ev(1)])


def test_orphan_cleanup_is_fenced(open_zk):
    log, rival = open_zk(), open_zk()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    rival.acquire("s")
    with pytest.raises(Fenced):
        log._delete("s", fence.epoch, log._index("s"))
    assert bodies(rival) == [1]


# ---- reads -------------------------------------------------------------------------------------


def test_multiread_answers_each_op_on_its_own(open_zk):
    log = open_zk()
    assert log._multiread  # ZooKeeper >= 3.6 here: the probe at start succeeded
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    first = log._batch_path("s", 1)
    got = log._read_many(
        [("data", first), ("data", first + "0"), ("children", log._bucket_path("s", 0))]
    ).get(timeout=5)
    assert got[0] == log._get("s", 1)
    assert isinstance(got[1], NoNodeError)
    assert got[2] == [first.rsplit("/", 1)[1]]


@pytest.mark.parametrize(("total", "per"), [(250, 1), (900, 7), (1500, 300)])
def test_grouped_read_ahead_and_single_gets_read_the_same(open_zk, total, per):
    writer = open_zk(bucket=100)
    fence = writer.acquire("s")
    head = 0
    for i in range(0, total, per):
        batch = [ev(j, pad=(j * 37) % 900) for j in range(i, min(i + per, total))]
        head = writer.append(fence, head, batch)
    grouped, single = open_zk(readahead=20_000), open_zk(multiread="false")
    assert not single._multiread
    for start in sorted({1, 2, 99, 100, 101, total // 2, total - 1, total, total + 1}):
        want = list(range(start - 1, total))
        assert bodies(grouped, start=start) == want
        assert bodies(single, start=start) == want
    assert [r.offset for r in grouped.read("s", 10, 20)] == list(range(10, 21))


# ---- archive, snapshots, tail ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "dir"])
def test_archive_shrinks_zookeeper_and_keeps_history(open_zk, zk_client, tmp_path, kind):
    archive = f"sqlite:///{tmp_path}/archive.db" if kind == "sqlite" else str(tmp_path / "archive")
    log = open_zk(archive=archive, bucket=100)
    fence = log.acquire("s")
    head = 0
    for i in range(300):
        head = log.append(fence, head, [ev(i)])
    before = len(list(walk(zk_client)))
    log.save_snapshot(Snapshot("s", 290, 0.0, 1, b"state"))
    assert log.truncate("s", 291) == 290
    after = len(list(walk(zk_client)))
    assert after <= before - 290 + 2  # the batches and the emptied buckets are gone
    buckets = zk_client.get_children("/streams/s/b")
    assert sorted(buckets) == [f"{2:016d}", f"{3:016d}"]  # 291-299 and 300; buckets 0-1 removed
    reader = open_zk(archive=archive)
    assert bodies(reader) == list(range(300))
    assert bodies(reader, start=150)[:2] == [149, 150]
    assert reader.head("s") == 300
    # a log opened without the option finds the archive the writer recorded in the chroot
    plain = open_zk()
    assert plain.archive == archive
    assert bodies(plain) == list(range(300))
    for i in range(300, 310):
        head = log.append(fence, head, [ev(i)])
    log.save_snapshot(Snapshot("s", 305, 0.0, 1, b"state"))
    plain.truncate("s", 306)
    assert bodies(reader, start=291) == list(range(290, 310))


def test_a_log_that_never_had_an_archive_refuses_to_truncate(zk_hosts):
    log = open_log(f"zk://{zk_hosts}/never-archived")
    try:
        fence = log.acquire("s")
        log.append(fence, log.append(fence, 0, [ev(1)]), [ev(2)])
        log.save_snapshot(Snapshot("s", 2, 0.0, 1, b"state"))
        with pytest.raises(ArchiveNotConfigured, match=r"\?archive="):
            log.truncate("s", 2)
        assert bodies(log) == [1, 2]
    finally:
        log.close()


def test_snapshots_are_chunked_and_the_old_one_is_removed(open_zk, zk_client):
    log = open_zk(keep_snapshots=1)
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1), ev(2), ev(3)])
    big = bytes(range(256)) * 10_000  # 2.5 MB: five data chunks and a head
    log.save_snapshot(Snapshot("s", 1, 1.0, 3, big))
    log.save_snapshot(Snapshot("s", 2, 2.0, 3, big[::-1]))
    snap = open_zk().load_snapshot("s")
    assert snap is not None and snap.offset == 2 and snap.data == big[::-1]
    children = zk_client.get_children("/streams/s/snap")
    assert len(children) == 2 and "manifest" in children
    chunk_dir = next(c for c in children if c != "manifest")
    sizes = [
        zk_client.exists(f"/streams/s/snap/{chunk_dir}/{c}").dataLength
        for c in zk_client.get_children(f"/streams/s/snap/{chunk_dir}")
    ]
    assert len(sizes) == 6 and max(sizes) <= 512 * 1024 + 8
    # two kept (the default): a third snapshot drops the oldest
    two = open_zk()
    two.save_snapshot(Snapshot("s", 3, 3.0, 3, b"three"))
    assert two.snapshots("s") == [3, 2]
    two.save_snapshot(Snapshot("s", 1, 1.0, 3, b"late"))  # older than both kept: dropped
    assert two.snapshots("s") == [3, 2]
    assert len(zk_client.get_children("/streams/s/snap")) == 3
    assert two.load_snapshot("s", 2).data == big[::-1]


def test_half_written_snapshot_is_never_loaded(open_zk):
    log = open_zk()
    fence = log.acquire("s")
    log.append(fence, 0, [ev(1)])
    log.save_snapshot(Snapshot("s", 1, 1.0, 1, b"good"))
    real = log._swap_manifest

    def crash(*args, **kwargs):
        raise ConnectionError("writer died before the manifest swap")

    log._swap_manifest = crash  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        log.save_snapshot(Snapshot("s", 1, 2.0, 1, b"x" * 2_000_000))
    log._swap_manifest = real  # type: ignore[method-assign]
    snap = open_zk().load_snapshot("s")
    assert snap is not None and snap.data == b"good"


def test_tail_wakes_on_a_watch_not_on_a_poll(open_zk):
    writer, follower = open_zk(), open_zk()
    fence = writer.acquire("s")
    writer.append(fence, 0, [ev(1)])
    assert len(follower.tail("s", 0, timeout=1)) == 1
    latencies = []
    for k in range(3):
        done = {}

        def append(k=k, done=done):
            done["t"] = time.monotonic()
            writer.append(fence, 1 + k, [ev(2 + k)])

        timer = threading.Timer(0.3, append)
        timer.start()
        got = follower.tail("s", 1 + k, timeout=5)
        latencies.append(time.monotonic() - done["t"])
        timer.join()
        assert [r.offset for r in got] == [2 + k]
    assert max(latencies) < 0.2, latencies


# ---- failover ----------------------------------------------------------------------------------


def test_leader_killed_mid_appends_on_an_ensemble(zk_ensemble):
    url = f"zk://{zk_ensemble.hosts}/failover?timeout=20"
    log = open_log(url)
    errors: list[BaseException] = []
    expected: list[int] = []
    progress = threading.Event()
    try:
        fence = log.acquire("s")

        def writer():
            head = 0
            try:
                for i in range(150):
                    batch = [ev(5 * i + j) for j in range(5)]
                    head = log.append(fence, head, batch)
                    expected.extend(e.body["i"] for e in batch)
                    if i == 40:
                        progress.set()
            except BaseException as exc:  # reported below
                errors.append(exc)
                progress.set()

        thread = threading.Thread(target=writer)
        thread.start()
        assert progress.wait(20)
        zk_ensemble.kill(zk_ensemble.wait_for_leader())
        thread.join(60)
        assert not thread.is_alive()
        assert not errors, errors
        assert len(expected) == 750
        with contextlib.closing(open_log(url)) as reader:
            records = list(reader.read("s"))
            assert [r.offset for r in records] == list(range(1, 751))
            assert [r.body["i"] for r in records] == expected == list(range(750))
    finally:
        log.close()
