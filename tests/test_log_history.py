"""Issue 13, the bounded log and no recovery cliff, through the runner and `cei log`:
truncation after snapshots on every backend, fall back from a bad snapshot, snapshots over
the old decode limit, snapshots taken by a forked child, a flat ZooKeeper tree."""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Iterator

import msgpack
import pytest
from kazoo.client import KazooClient

from cei_actors.cli import main
from cei_actors.eventlog import batch, open_log
from cei_actors.runtime import runner as runner_module
from cei_actors.runtime.example import Add, Counters
from cei_actors.runtime.runner import Runner, replay

BACKENDS = ["memory", "sqlite", pytest.param("zk", marks=pytest.mark.zk)]


@pytest.fixture(params=BACKENDS)
def log_url(request, tmp_path) -> Iterator:
    """A function giving the URL of a fresh log of this backend (``archived``: with an archive)."""
    kind = request.param

    def make(name: str, archived: bool = True) -> str:
        if kind == "memory":
            url = f"memory://{uuid.uuid4().hex}"
        elif kind == "sqlite":
            url = f"sqlite:///{tmp_path}/{name}.db"
        else:
            url = f"zk://{request.getfixturevalue('zk_hosts')}-{name}"
        if archived:
            url += f"?archive=sqlite:///{tmp_path}/{name}-archive.db"
        return url

    return make


def run(url: str, messages: int, snapshot_every: int = 10) -> Runner:
    r = Runner(Counters(), open_log(url), clock=lambda: 100.0, rng=random.Random(1),
               snapshot_every=snapshot_every)
    r.recover()
    for i in range(messages):
        r.handle(Add(f"c{i % 7}", i))
        assert r.wait_history(10)  # truncation runs in the background; keep the test exact
    return r


def runner_logs(caplog) -> None:
    """Let the runner's warnings reach caplog even if a logging config ran before (e.g. an
    actor system's, which disables existing loggers)."""
    logger = logging.getLogger("cei_actors.runtime.runner")
    logger.disabled, logger.propagate = False, True
    caplog.set_level(logging.WARNING, logger="cei_actors.runtime.runner")


def cli(capsys, url: str, *argv: str) -> object:
    code = main(["--json", "--log", url, "log", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_after_many_snapshots_only_the_tail_is_live_and_cei_log_answers_the_same(log_url, capsys):
    kept = run(log_url("kept", archived=False), 200)  # never truncated: the reference
    cut = run(log_url("cut"), 200)
    log = cut.log
    assert log.snapshots("example") == [200, 190]
    live = log._index("example")
    assert live == list(range(191, 201))  # only what follows the older kept snapshot
    assert kept.log._index("example")[0] == 1
    assert replay(Counters(), log, "example") == replay(Counters(), kept.log, "example")
    assert replay(Counters(), log, "example", 57).counters == replay(Counters(), kept.log, "example", 57).counters
    # the logs the runners wrote (a memory:// URL names a new log each time it is made); the
    # cut one without its archive option: the log names its archive
    a, b = kept.log.url, cut.log.url.split("?")[0]
    for argv in (["streams"], ["show", "example"], ["show", "example", "--from", "40", "--to", "60"],
                 ["state", "example", "--at", "33"], ["diff", "example", "12", "150"],
                 ["check", "example"]):
        assert cli(capsys, b, *argv) == cli(capsys, a, *argv), argv
    kept.log.close()
    log.close()


def test_a_corrupt_newest_snapshot_falls_back_to_the_previous_one(log_url, caplog):
    url = log_url("fallback")
    r = run(url, 25)
    assert r.log.snapshots("example") == [20, 10]
    want = r.state.counters
    r.log._corrupt_snapshot("example", 20)
    runner_logs(caplog)
    again = Runner(Counters(), open_log(url.split("?")[0]), clock=lambda: 100.0, snapshot_every=10)
    again.recover()
    assert again.state.counters == want and again.head == 25
    text = caplog.text
    assert "stream example: snapshot at offset 20 unreadable" in text
    assert "recovering from the snapshot at offset 10 instead of offset 20" in text
    # the bad snapshot is replaced at the next append
    again.handle(Add("a", 1))
    assert again.wait_history(10)
    assert again.log.snapshots("example") == [26, 20]
    assert again.log.load_snapshot("example").offset == 26
    r.log.close()
    again.log.close()


def test_every_snapshot_unreadable_replays_the_archive(tmp_path, caplog):
    runner_logs(caplog)
    url = f"sqlite:///{tmp_path}/log.db?archive={tmp_path}/archive"
    r = run(url, 35)
    assert r.log._index("example")[0] == 21
    for offset in r.log.snapshots("example"):
        r.log._corrupt_snapshot("example", offset)
    again = Runner(Counters(), open_log(url), snapshot_every=10)
    again.recover()
    assert again.state.counters == r.state.counters
    assert "no usable snapshot (skipped offsets 30, 20); replaying from offset 1" in caplog.text


def test_a_snapshot_over_the_old_decode_limit_recovers(tmp_path, monkeypatch, caplog):
    """Issue 13: a 70.7 MB snapshot was saved, then refused on load (64 MiB), forever. The
    limit is set to 256 KiB here so that the test stays fast; the state is ~1.2 MB."""
    runner_logs(caplog)
    monkeypatch.setattr(batch, "DEFAULT_MAX_DECODE_BYTES", 256 * 1024)
    url = f"sqlite:///{tmp_path}/log.db"
    r = run(url, 0)
    for i in range(300):
        r.handle(Add(f"counter-{i:04d}-" + "x" * 4000, 1))
    assert r.take_snapshot()
    size = len(r.log.load_snapshot("example").data)
    assert size > 4 * batch.DEFAULT_MAX_DECODE_BYTES
    again = Runner(Counters(), open_log(url))
    again.recover()
    assert again.state.counters == r.state.counters
    assert "snapshot" not in caplog.text  # recovered from it, no fall back


def test_a_due_snapshot_of_a_big_state_is_taken_by_a_forked_child(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "BACKGROUND_SNAPSHOT_BYTES", 0)  # every state is "big"
    calls = []
    real = Counters.snapshot

    def counted(self, state):
        calls.append(1)  # in this process only: the child's calls are not seen here
        return real(self, state)

    monkeypatch.setattr(Counters, "snapshot", counted)
    url = f"sqlite:///{tmp_path}/log.db?archive=sqlite:///{tmp_path}/archive.db"
    r = Runner(Counters(), open_log(url), snapshot_every=10)
    r.recover()
    assert r.background_snapshots
    for i in range(9):
        r.handle(Add("a", i))
    assert r.take_snapshot()  # asked for: taken in place
    assert r.wait_history(30) and len(calls) == 1
    for i in range(10):
        r.handle(Add("b", i))  # the 10th makes one due
    assert r.wait_history(30)
    assert len(calls) == 1, "the due snapshot was taken in this process, not in a child"
    assert r.log.snapshots("example") == [19, 9]
    snap = r.log.load_snapshot("example")
    restored = Counters().restore(msgpack.unpackb(snap.data, raw=False))
    assert restored.counters == replay(Counters(), r.log, "example", 19).counters
    assert r.log._index("example")[0] == 10  # and the log was truncated after it


@pytest.mark.zk
def test_zookeeper_znodes_stay_flat_under_a_steady_load(zk_hosts, zk_client: KazooClient, tmp_path):
    url = f"zk://{zk_hosts}?archive=sqlite:///{tmp_path}/archive.db"
    r = Runner(Counters(), open_log(url), snapshot_every=20)
    r.recover()

    def tree() -> tuple[int, int]:
        count = size = 0
        stack = ["/"]
        while stack:
            path = stack.pop()
            stat = zk_client.exists(path)
            count, size = count + 1, size + stat.dataLength
            stack += [f"{path.rstrip('/')}/{c}" for c in zk_client.get_children(path)]
        return count, size

    seen = []
    for _ in range(12):
        for i in range(100):
            r.handle(Add(f"c{i % 5}", 1))
        assert r.wait_history(30)
        seen.append(tree())
    warm = seen[2]
    assert max(c for c, _ in seen[2:]) <= 1.5 * warm[0], seen
    assert max(s for _, s in seen[2:]) <= 1.5 * warm[1], seen
    assert r.head == 1200 and sum(replay(Counters(), r.log, "example").counters.values()) == 1200
    r.log.close()
