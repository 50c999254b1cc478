"""``cei log ...`` against a real SQLite log written by a real runner."""

from __future__ import annotations

import json
import logging
import random
import re

import msgpack
import pytest

from cei_actors.cli import main
from cei_actors.eventlog import CorruptLog, LogLost, Snapshot, open_log
from cei_actors.runtime.example import Add, Counters
from cei_actors.runtime.runner import Runner


@pytest.fixture
def home(tmp_path):
    runner = Runner(Counters(), open_log(f"sqlite:///{tmp_path / 'log.sqlite'}"), rng=random.Random(0))
    runner.recover()
    for i in range(1, 6):
        runner.handle(Add("a", i))
    runner.handle(Add("b", 7))
    runner.log.close()
    return tmp_path


def runner_logs(caplog):
    """Let the runner's warnings reach caplog even if a logging config ran before (e.g. an
    actor system's, which disables existing loggers)."""
    logger = logging.getLogger("cei_actors.runtime.runner")
    logger.disabled, logger.propagate = False, True
    caplog.set_level(logging.WARNING, logger="cei_actors.runtime.runner")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_streams_show_state(home, capsys):
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "streams")
    assert code == 0 and json.loads(out) == [{"stream": "example", "head": 6, "epoch": 1}]
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "show", "example", "--from", "2", "--to", "3")
    events = json.loads(out)
    assert [e["offset"] for e in events] == [2, 3] and events[0]["type"] == "CounterAdded"
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "state", "example", "--at", "3")
    assert json.loads(out)["counters"] == {"a": 6}


def test_diff_and_check(home, capsys):
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "diff", "example", "5", "2")
    changes = {c["path"]: c for c in json.loads(out)}
    assert changes["counters.a"]["before"] == 3 and changes["counters.a"]["after"] == 15
    assert "counters.b" not in changes
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "diff", "example", "5", "6")
    assert json.loads(out) == [{"path": "counters.b", "change": "added", "after": 7}]
    code, out, _ = run(capsys, "--home", str(home), "log", "check", "example")
    assert code == 0 and "every invariant held" in out


def test_check_reports_first_broken_event(home, capsys, monkeypatch):
    monkeypatch.setattr(Counters, "invariants", lambda self, s: ["a above 10"] if s.counters.get("a", 0) > 10 else [])
    code, out, err = run(capsys, "--json", "--home", str(home), "log", "check", "example")
    assert code == 1
    assert json.loads(out) == {"ok": False, "offset": 5, "type": "CounterAdded", "broken": ["a above 10"]}


def test_errors_are_one_line(home, capsys):
    code, _, err = run(capsys, "--home", str(home), "log", "state", "nosuch")
    assert code == 1 and err.count("\n") == 1 and "no stream 'nosuch' in the log" in err
    code, _, err = run(capsys, "--log", "bogus://x", "log", "streams")
    assert code == 1 and "unknown scheme" in err
    with pytest.raises(SystemExit) as info:
        main(["log", "show"])
    assert info.value.code == 2


# ---- snapshots: `check` verifies them (issue 12 §5) -------------------------------------------


def _runner(home):
    return Runner(Counters(), open_log(f"sqlite:///{home / 'log.sqlite'}"), rng=random.Random(0))


def test_check_passes_a_good_snapshot(home, capsys):
    runner = _runner(home)
    runner.recover()
    assert runner.take_snapshot()
    runner.handle(Add("a", 100))
    runner.log.close()
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "check", "example")
    assert code == 0 and json.loads(out) == {
        "ok": True, "checked": 7, "snapshot": {"offset": 6, "ok": True, "problem": None},
        "snapshots": [{"offset": 6, "ok": True, "problem": None}]}


def test_check_fails_on_a_snapshot_that_does_not_decode(home, capsys, caplog):
    runner_logs(caplog)
    log = open_log(f"sqlite:///{home / 'log.sqlite'}")
    log._put_snapshot("example", 4, [b"garbage, not a snapshot"], 2)
    with pytest.raises(CorruptLog):
        log.load_snapshot("example")
    log.close()
    runner = _runner(home)
    runner.recover()  # the component recovers by replay, and says why
    assert runner.state.counters == {"a": 15, "b": 7}
    assert "snapshot at offset 4 unreadable" in caplog.text
    runner.log.close()
    code, out, err = run(capsys, "--home", str(home), "log", "check", "example")
    assert code == 1
    assert "every invariant held" in out and "snapshot at offset 4: snapshot does not decode" in out
    assert err.startswith("cei: stream 'example': bad snapshot at offset 4: snapshot does not decode")


def test_check_fails_on_a_snapshot_other_than_the_replay(home, capsys):
    log = open_log(f"sqlite:///{home / 'log.sqlite'}")
    wrong = msgpack.packb({"counters": {"a": 999}, "ticks": 0}, use_bin_type=True)
    assert Counters().restore(msgpack.unpackb(wrong)).counters == {"a": 999}
    log.save_snapshot(Snapshot("example", 3, 0.0, Counters.snapshot_version, wrong))
    log.close()
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "check", "example")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["snapshot"]["offset"] == 3
    assert "restores to a state other than the replay up to offset 3" in result["snapshot"]["problem"]
    assert "counters.a" in result["snapshot"]["problem"]


# ---- the SQLite file's marker (issue 12 §5) ---------------------------------------------------


def test_a_new_sqlite_log_is_marked_and_reopens(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.sqlite'}"
    with open_log(url) as log:
        assert log.streams() == []
    marker = tmp_path / "new.sqlite.id"
    assert len(marker.read_text().strip()) == 32
    with open_log(url) as log:
        assert log.head("example") == 0


@pytest.mark.parametrize("damage", ["emptied", "deleted", "truncated"])
def test_a_log_file_that_lost_its_events_is_refused_naming_the_file(home, capsys, damage):
    path = home / "log.sqlite"
    if damage == "emptied":
        path.write_bytes(b"")
    elif damage == "deleted":
        path.unlink()
    else:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    before = sorted(p.name for p in home.iterdir())
    size = path.stat().st_size if path.exists() else None
    with pytest.raises(LogLost, match=re.escape(str(path).lstrip("/"))):
        open_log(f"sqlite:///{path}")
    code, out, err = run(capsys, "--home", str(home), "log", "streams")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert str(path).lstrip("/") in err
    assert ("is missing" if damage == "deleted" else "is empty" if damage == "emptied" else "damaged") in err
    if damage != "truncated":  # (SQLite's -wal/-shm appear when it reads a damaged header)
        assert sorted(p.name for p in home.iterdir()) == before  # nothing created in its place
    assert (path.stat().st_size if path.exists() else None) == size  # nor written
    # removing the marker starts a new, empty log on purpose
    if damage != "truncated":
        (home / "log.sqlite.id").unlink()
        with open_log(f"sqlite:///{path}") as log:
            assert log.streams() == []


@pytest.mark.parametrize("argv, words", [
    (["log", "show", "nostream"], "no stream 'nostream'"),
    (["log", "state", "example", "--at", "-5"], "--at -5"),
    (["log", "state", "example", "--at", "7"], "--at 7"),
    (["log", "show", "example", "--from", "-1"], "--from -1"),
    (["log", "show", "example", "--to", "99"], "--to 99"),
    (["log", "diff", "example", "2", "-1"], "SEQ_B -1"),
    (["log", "check", "nostream"], "no stream 'nostream' in the log"),
    (["log", "state", "nostream"], "no stream 'nostream' in the log"),
    (["log", "diff", "nostream", "1", "2"], "no stream 'nostream' in the log"),
    (["log", "show", "example", "--from", "5", "--to", "2"], "--from 5 is after --to 2"),
    (["log", "diff", "example", "1", "6", "nobody"], "holds nothing about 'nobody'"),
])
def test_unknown_streams_and_offsets_are_errors(home, capsys, argv, words):
    """An unknown stream or an offset outside 0..head: exit 1, one line naming it, nothing on
    stdout (it used to print nothing and exit 0). Every command names a stream missing from
    the log alike; an empty range and a diff of an entity neither point holds are errors too
    (they printed nothing, or "no change", and exited 0)."""
    code, out, err = run(capsys, "--home", str(home), *argv)
    assert code == 1 and out == "" and err.count("\n") == 1 and words in err, err
    assert "offsets 0 to 6" in err or "stream" in err


def test_offsets_at_the_bounds_are_fine(home, capsys):
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "state", "example", "--at", "0")
    assert code == 0 and json.loads(out)["counters"] == {}
    code, out, _ = run(capsys, "--json", "--home", str(home), "log", "show", "example", "--from", "6", "--to", "6")
    assert code == 0 and [e["offset"] for e in json.loads(out)] == [6]


def test_a_relative_sqlite_url_is_relative_to_the_working_directory(home, capsys, monkeypatch):
    """``sqlite:///log.sqlite`` is ./log.sqlite (as SQLAlchemy reads it), not /log.sqlite;
    ``sqlite:////ABS`` stays absolute; messages show the file's path, no doubled slashes."""
    monkeypatch.chdir(home)
    code, out, _ = run(capsys, "--json", "--log", "sqlite:///log.sqlite", "log", "streams")
    assert code == 0 and json.loads(out) == [{"stream": "example", "head": 6, "epoch": 1}]
    code, _, err = run(capsys, "--log", f"sqlite:///{home}/log.sqlite", "log", "show", "x")
    assert code == 1 and f"log {home}/log.sqlite " in err and "//" not in err
