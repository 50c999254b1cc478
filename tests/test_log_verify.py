"""``cei log verify``: a recorded log replayed against the current code (decision DBG6).

A real system (``cei up``, thespian, real EEAgent processes) records its inputs; its log
verifies clean, a planted change to a PD rule is reported at the decision it changes, and a
log recorded by an earlier version of the code (tests/data/) still verifies.

To record the committed log again: ``python tests/test_log_verify.py`` (then commit
tests/data/verify-log.sqlite).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cei_actors.cli import main
from cei_actors.debug import Replay
from cei_actors.debug.verify import verify
from cei_actors.launch.plan import default_plan_text
from cei_actors.pd import logic as pd_logic
from cei_actors.pd.messages import ScheduleProcess

DATA = Path(__file__).parent / "data"
COMMITTED_LOG = DATA / "verify-log.sqlite"
COMMITTED_PLAN = DATA / "verify-plan.yaml"


def recording_plan(path: Path) -> Path:
    """The built-in plan with every component recording its inputs, its whole history in
    the one log file (no archive)."""
    data = yaml.safe_load(default_plan_text())
    data["log_history"]["archive"] = "none"
    for comp in data["components"].values():
        comp.setdefault("config", {})["record_inputs"] = True
    path.write_text(yaml.safe_dump(data))
    return path


def record_real_log(workdir: Path, out: Path) -> Path:
    """Run a real system under the recording plan: two processes run, one is killed, one is
    held back by a constraint; then ``down``. The log is copied to ``out``."""
    from cei_actors.launch.launcher import connect, down, read_info, up
    from cei_actors.launch.plan import load_plan

    home = workdir / "home"
    plan = load_plan(recording_plan(workdir / "plan.yaml"), home=home,
                     log_url=f"sqlite:///{workdir / 'log.sqlite'}")
    up(plan, home)
    try:
        url = read_info(home)["log_url"]
        with connect(home) as conn:
            pd = conn.pd
            pd.schedule_process("first", command=["sleep", "30"], restart_mode="never")
            pd.schedule_process("second", command=["sleep", "30"], restart_mode="never")
            pd.schedule_process("held", command=["true"], constraints={"site": "nowhere"})
            for upid in ("first", "second"):
                assert pd.wait_process(upid, "RUNNING", timeout=60)["state"] == "RUNNING"
            pd.terminate_process("first")
            assert pd.wait_process("first", "TERMINATED", timeout=30)["state"] == "TERMINATED"
    finally:
        down(home)
    src = Path(url.removeprefix("sqlite:///").partition("?")[0])
    db = sqlite3.connect(src)
    try:
        db.execute(f"VACUUM INTO '{out}'")
    finally:
        db.close()
    return out


@pytest.fixture(scope="module")
def real_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("verify")
    return record_real_log(work, work / "recorded.sqlite")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_real_systems_log_verifies_clean(real_log, tmp_path, capsys):
    plan = recording_plan(tmp_path / "plan.yaml")
    before = real_log.read_bytes()
    code, out, err = cli(capsys, "--json", "log", "--plan", str(plan), "verify", str(real_log))
    assert code == 0, out + err
    report = json.loads(out)
    streams = {s["stream"]: s for s in report["streams"]}
    assert {"pd", "epum", "provisioner"} <= set(streams)
    for name in ("pd", "epum", "provisioner"):
        s = streams[name]
        assert s["ok"] and s["recorded"] and s["difference"] is None, s
        assert s["decisions"] > 0 and s["events"] > 0, s
    assert streams["pd"]["unchecked"] == 0
    assert real_log.read_bytes() == before  # verifying never writes
    code, out, _ = cli(capsys, "log", "--plan", str(plan), "verify", str(real_log), "--stream", "pd")
    assert code == 0 and "every one decided the same" in out, out


def _first_offset_naming(url: str, stream: str, upid: str) -> int:
    with Replay(url) as r:
        for rec in r.records(stream):
            if rec.body.get("upid") == upid:
                return rec.offset
    raise AssertionError(f"no event names {upid}")


def test_a_planted_pd_change_is_reported_at_its_decision(real_log, tmp_path, monkeypatch, capsys):
    """A new version that schedules ``second`` with another restart mode: the first decision
    that differs is the one on ``ScheduleProcess('second')``, at its first event."""
    handlers = pd_logic._HANDLERS
    original = handlers[ScheduleProcess]

    def changed(pd: Any, tx: Any, m: ScheduleProcess) -> None:
        if m.upid == "second":
            m = ScheduleProcess(**{**m.__dict__, "restart_mode": "always"})
        original(pd, tx, m)

    monkeypatch.setitem(handlers, ScheduleProcess, changed)
    plan = recording_plan(tmp_path / "plan.yaml")
    url = f"sqlite:///{real_log}"
    code, out, err = cli(capsys, "--json", "log", "--plan", str(plan), "verify", str(real_log), "--stream", "pd")
    assert code == 1
    [report] = json.loads(out)["streams"]
    diff = report["difference"]
    assert diff["offset"] == _first_offset_naming(url, "pd", "second")
    assert diff["input"]["type"] == "ScheduleProcess" and diff["input"]["fields"]["upid"] == "second"
    assert diff["expected"] != diff["got"]
    def restart_mode(events: list[dict[str, Any]]) -> Any:
        [spec] = [e["body"]["spec"] for e in events if e["type"] == "ProcessScheduled"]
        return spec["restart_mode"]

    assert restart_mode(diff["got"]) != restart_mode(diff["expected"])
    # in text: the offset, the input, expected and got
    code, out, err = cli(capsys, "log", "--plan", str(plan), "verify", str(real_log), "--stream", "pd")
    assert code == 1 and f"offset {diff['offset']}" in out and "expected:" in out and "got:" in out
    assert err.count("\n") == 1 and "decided differently" in err


def test_the_log_recorded_by_an_earlier_version_verifies(capsys):
    """The committed log (recorded by a real system, tests/data/) against today's code."""
    assert COMMITTED_LOG.stat().st_size < 200 * 1024
    before = COMMITTED_LOG.read_bytes()
    code, out, err = cli(capsys, "--json", "log", "--plan", str(COMMITTED_PLAN), "verify", str(COMMITTED_LOG))
    assert code == 0, out + err
    streams = {s["stream"]: s for s in json.loads(out)["streams"]}
    assert all(s["recorded"] and s["decisions"] > 0 for n, s in streams.items() if n in ("pd", "epum"))
    assert COMMITTED_LOG.read_bytes() == before


@pytest.mark.parametrize("name", ["pd", "epum", "ha", "provisioner"])
def test_random_inputs_recorded_by_a_runner_verify_clean(name):
    """Any message sequence (test_poison's strategies: well-formed, poisoned, foreign),
    decided by a recording runner in batches: the log verifies clean, every input re-run."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_poison import COMPONENTS, message_of

    make, own, others = COMPONENTS[name]
    classes = st.one_of(st.sampled_from(own), st.sampled_from(others))
    batches = st.lists(st.lists(classes.flatmap(message_of), min_size=1, max_size=4), min_size=1, max_size=4)

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batches)
    def check(batches: list[list[Any]]) -> None:
        runner = make()
        runner.record_inputs = True
        runner.recover()  # a recorded leadership starts here
        start = runner.head
        for batch in batches:
            runner.handle_many(batch)
        with Replay(runner.log) as r:
            [report] = verify(r, [runner.stream], {runner.stream: runner.component})
        assert report.ok, report.as_dict()
        if runner.head > start:  # inputs are stored with the next event: none, nothing stored
            assert report.recorded and report.decisions >= 1, report.as_dict()
            # events are folded unchecked only after a gap (inputs too big) or for a secret
            assert report.unchecked == 0 or _gaps_or_secrets(runner.log, runner.stream), report.as_dict()

    check()


def _gaps_or_secrets(log: Any, stream: str) -> bool:
    import msgpack

    entries = [msgpack.unpackb(b, raw=False, strict_map_key=False) for r in log.read(stream) for b in (r.input or [])]
    return any("gap" in e or "skip" in e for e in entries)


def test_inputs_holding_secrets_are_not_recorded(tmp_path):
    """AddCredentials holds clear credentials: the log keeps only that it came (the event
    holds them sealed), and verify folds its event unchecked and goes on checking."""
    from test_poison import COMPONENTS

    from cei_actors.provisioner.messages import AddCredentials

    runner = COMPONENTS["provisioner"][0]()
    runner.record_inputs = True
    runner.recover()
    secret = "s3cr3t-value-never-stored"
    runner.handle_many([AddCredentials("sim1", {"access_key": "AK", "secret_key": secret})])
    assert runner.head > 0
    raw = b"".join(b for r in runner.log.read(runner.stream) for b in (r.input or []))
    assert b"AddCredentials" in raw and secret.encode() not in raw
    with Replay(runner.log) as r:
        [report] = verify(r, [runner.stream], {runner.stream: runner.component})
    assert report.ok and report.unchecked >= 1 and report.difference is None, report.as_dict()


def _counters_log(url: str) -> None:
    """Counters recorded on ``url``: 2 checked adds; then inputs without events beyond what
    one event may carry (a gap: the next add is folded unchecked); a new leadership (checked
    again from its ``recovered``) adds twice more."""
    from cei_actors.eventlog import open_log
    from cei_actors.runtime.example import Add, Counters, Get
    from cei_actors.runtime.runner import MAX_INPUT_BYTES, Runner

    log = open_log(url)
    try:
        runner = Runner(Counters(), log, stream="example", record_inputs=True)
        runner.recover()
        runner.handle_many([Add("a", 1), Add("b", 2)])
        big = "x" * (MAX_INPUT_BYTES // 4)
        runner.handle_many([Get("a" + big) for _ in range(5)])  # not_found: no events, recorded
        runner.handle(Add("a", 3))
        runner = Runner(Counters(), log, stream="example", record_inputs=True)
        runner.recover()
        runner.handle_many([Add("a", 4), Add("c", 5)])
        assert runner.head == 5
    finally:
        log.close()


def test_a_gap_in_the_recorded_inputs_is_folded_unchecked_until_a_new_leadership(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.sqlite'}"
    _counters_log(url)
    with Replay(url) as r:
        [report] = verify(r)
        rows = list(r.records("example"))
    assert max(len(b"".join(x.input or [])) for x in rows) < 300 * 1024  # the inputs of one event are bounded
    assert report.ok and report.recorded and report.events == 5
    assert report.unchecked == 1  # Add("a", 3), after the gap
    assert report.decisions == 6  # recovered, 2 adds, recovered, 2 adds


def test_verify_reads_a_zookeeper_log(zk_hosts, capsys):
    url = f"zk://{zk_hosts}"
    _counters_log(url)
    code, out, err = cli(capsys, "--log", url, "log", "verify", "--stream", "example")
    assert code == 0, err
    assert "example: 5 events re-folded, 6 recorded decisions re-run" in out, out
    assert "1 events without a checkable input" in out


def test_a_log_without_inputs_is_re_folded_and_says_so(tmp_path, capsys):
    from cei_actors.eventlog import open_log
    from cei_actors.runtime.example import Add, Counters
    from cei_actors.runtime.runner import Runner

    url = f"sqlite:///{tmp_path / 'log.sqlite'}"
    log = open_log(url)
    runner = Runner(Counters(), log, stream="example", snapshot_every=2)
    runner.recover()
    for i in range(5):
        runner.handle(Add("a", i))
    log.close()
    code, out, err = cli(capsys, "--log", url, "log", "verify")
    assert code == 0, err
    assert "5 events re-folded" in out and "decisions cannot be checked" in out
    assert "snapshot at offset 4: restores to the state re-folded up to it" in out
    with Replay(url) as r:
        [report] = verify(r)
    assert report.ok and not report.recorded and report.events == 5


def test_corrupt_and_foreign_logs_are_one_line_errors(tmp_path, capsys):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(os.urandom(8192))
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    for path, words in ((junk, "damaged or not a log"), (other, "not a cei log"),
                        (tmp_path / "missing.sqlite", "missing")):
        code, out, err = cli(capsys, "log", "verify", str(path))
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert words in err or "no log" in err, err
    # a damaged batch, and damaged recorded inputs: the error names the stream and the offset
    for damage in ("batch", "inputs"):
        copy = tmp_path / f"{damage}.sqlite"
        shutil.copy(COMMITTED_LOG, copy)
        db = sqlite3.connect(copy)
        if damage == "batch":
            [(first,)] = db.execute("SELECT first FROM batches WHERE stream='pd' ORDER BY first DESC LIMIT 1")
            db.execute("UPDATE batches SET blob = ? WHERE stream='pd' AND first = ?", (b"\x00" * 40, first))
        else:
            first = _damage_inputs(db)
        db.commit()
        db.close()
        code, out, err = cli(capsys, "log", "--plan", str(COMMITTED_PLAN), "verify", str(copy), "--stream", "pd")
        assert code == 1 and err.count("\n") == 1 and f"at offset {first}" in err, (damage, err)
        assert "Traceback" not in err
    code, out, err = cli(capsys, "log", "verify", str(COMMITTED_LOG), "--stream", "nope")
    assert code == 1 and err.count("\n") == 1 and "no stream 'nope'" in err, err


def _damage_inputs(db: sqlite3.Connection) -> int:
    """Rewrite the first pd batch that carries inputs so its inputs are not msgpack; returns
    the offset of the record that carries them."""
    import msgpack

    from cei_actors.eventlog.batch import decode_batch, encode_rows

    for first, blob in db.execute("SELECT first, blob FROM batches WHERE stream='pd' ORDER BY first"):
        records, group_end = decode_batch(blob, "pd", first)
        if any(r.input for r in records):
            rows = []
            hit = None
            for r in records:
                row = [r.type, r.version, r.timestamp, r.body]
                if r.input and hit is None:
                    row.append([b"\xc1not msgpack"])
                    hit = r.offset
                elif r.input:
                    row.append(r.input)
                rows.append(msgpack.packb(row, use_bin_type=True))
            epoch = records[0].epoch
            db.execute("UPDATE batches SET blob = ? WHERE stream='pd' AND first = ?",
                       (encode_rows("pd", first, epoch, rows, group_end), first))
            assert hit is not None
            return hit
    raise AssertionError("no recorded inputs in the pd stream")


if __name__ == "__main__":  # record the committed log again
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        DATA.mkdir(exist_ok=True)
        COMMITTED_LOG.unlink(missing_ok=True)
        record_real_log(Path(tmp), COMMITTED_LOG)
        recording_plan(COMMITTED_PLAN)
    print(f"{COMMITTED_LOG}: {COMMITTED_LOG.stat().st_size} bytes", file=sys.stderr)
