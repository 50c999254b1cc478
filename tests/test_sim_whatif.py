"""What-if (``cei sim replay``): a recorded log's workload re-simulated under another policy.

The recorded runs are real simulated systems (the Provisioner, EPUM and PD cores) whose logs
are saved as SQLite files, and a real system's log (``tests/data/verify-log.sqlite``, from a
short ``cei up``); nothing is stubbed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cei_actors.cli import main
from cei_actors.eventlog import PendingEvent
from cei_actors.eventlog.sqlite import SqliteLog
from cei_actors.sim.savelog import save_logs
from cei_actors.sim.system import CEISystem, SystemConfig
from cei_actors.sim.whatif import compare, extract, open_logs

DATA = Path(__file__).parent / "data"
REAL_LOG = DATA / "verify-log.sqlite"
#: the sanity check's tolerance: the re-simulation under the recorded policy against the log
VM_HOURS_TOLERANCE = 0.05


def record(directory: Path, seed: int = 3, processes: int = 40) -> Path:
    """A small recorded run: batch jobs arriving over ten minutes (some fail a round, one is
    killed), a VM lost, a user's preserve_n domain resized; its logs saved in ``directory``."""
    system = CEISystem(seed, SystemConfig(slots=4))
    rng = random.Random(seed)
    system.run_for(10.0)
    system.add_domain("static", 1)
    for i in range(processes):
        system.schedule(f"p{i:03d}", rng.uniform(120.0, 600.0), fail_rounds=int(i % 10 == 9))
        system.run_for(rng.expovariate(1 / 15.0))
        if i == 20:
            system.kill_vm(0)
            system.kill_process("p018")
            system.reconfigure_domain("static", 2)
    system.run_for(1200.0)
    save_logs(system, directory)
    return directory


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record(tmp_path_factory.mktemp("recorded"))


def run(recorded: Path, engine: str | None = None, **settings: Any) -> dict[str, Any]:
    logs = open_logs(str(recorded))
    try:
        return compare(logs, engine, settings)
    finally:
        for r in set(logs.values()):
            r.close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_inputs_are_extracted_from_the_log(recorded):
    logs = open_logs(str(recorded))
    try:
        w = extract(logs)
    finally:
        for r in set(logs.values()):
            r.close()
    assert len(w.processes) == 40 and w.engine == "needy" and w.slots == 4
    killed = [p for p in w.processes if p.killed_at is not None]
    assert [p.upid for p in killed] == ["p018"]
    assert {p.upid for p in w.processes if p.fail_rounds} >= {"p009", "p019"}
    assert all(120.0 <= p.duration <= 620.0 for p in w.processes if p.upid != "p018")
    assert len(w.node_losses) == 1 and w.boot_times and w.launch_failures == 0
    assert [(d.op, d.domain_id, d.preserve_n) for d in w.domains] == [
        ("add", "static", 1), ("reconfigure", "static", 2)]
    assert not w.assumptions, w.assumptions


def test_own_policy_reproduces_the_recorded_outcome(recorded):
    """The sanity check: VM-hours within 5 %, the same processes finished and failed, the
    same launches within two (the VM lost lands on another node)."""
    result = run(recorded)
    rec, sim = result["runs"]["recorded"], result["runs"]["simulated"]
    assert abs(sim["vm_hours"] - rec["vm_hours"]) <= VM_HOURS_TOLERANCE * rec["vm_hours"], (rec, sim)
    assert (sim["processes_finished"], sim["processes_failed"], sim["processes_unfinished"]) == (
        rec["processes_finished"], rec["processes_failed"], rec["processes_unfinished"])
    assert abs(sim["launches"] - rec["launches"]) <= 2, (rec, sim)
    assert result["policies"]["simulated"]["engine"] == "needy"
    assert "what-if" not in result["runs"]


def test_preserve_n_holds_idle_vms_that_needy_gives_back(recorded):
    result = run(recorded, "preserve_n")
    needy, fixed = result["runs"]["simulated"], result["runs"]["what-if"]
    assert fixed["idle_vm_hours"] > needy["idle_vm_hours"] * 1.5, (needy, fixed)
    assert fixed["vm_hours"] > needy["vm_hours"]
    assert fixed["processes_finished"] == needy["processes_finished"]
    assert any("preserve_n not given: the PD domain's recorded peak" in a for a in result["assumptions"])
    # a smaller pool than the peak: the queue waits longer
    small = run(recorded, "preserve_n", preserve_n=2)["runs"]["what-if"]
    assert small["queue_wait_s"]["max"] > needy["queue_wait_s"]["max"], (needy, small)


def test_cli_table_json_and_report(recorded, tmp_path, capsys):
    code, out, err = cli(capsys, "sim", "replay", str(recorded), "--engine", "needy",
                         "--set", "maximum_vms=2", "--report", str(tmp_path / "rep"))
    assert code == 0, err
    assert "idle VM-hours" in out and "what-if" in out and "maximum_vms=2" in out
    for name in ("whatif.json", "whatif.md", "whatif-vms.png", "whatif-queue.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert (tmp_path / "rep" / "whatif-vms.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "rep" / "whatif.md").read_text()
    assert "| VM-hours |" in md and "![VMs over time](whatif-vms.png)" in md
    code, out, err = cli(capsys, "--json", "sim", "replay", str(recorded), "--engine", "needy",
                         "--set", "maximum_vms=2")
    assert code == 0, err
    doc = json.loads(out)
    capped = doc["runs"]["what-if"]
    assert capped["peak_vms"] <= 2 + 2  # the PD domain's cap, plus the user's domain
    assert capped["queue_wait_s"]["max"] > doc["runs"]["simulated"]["queue_wait_s"]["max"]


def test_a_log_without_epum_says_what_it_assumed(recorded, tmp_path, capsys):
    only_pd = tmp_path / "only-pd"
    only_pd.mkdir()
    shutil.copy(recorded / "pd.sqlite", only_pd / "pd.sqlite")
    code, out, err = cli(capsys, "sim", "replay", str(only_pd))
    assert code == 0, err
    assert "assumed: no epum stream" in out
    assert "assumed: no boot times recorded: assumed 30 s" in out
    assert "assumed: no slots per node recorded: assumed 4" in out


def test_a_real_systems_log(capsys):
    """The log of a short ``cei up`` (two sleeps and a process no node matches)."""
    before = REAL_LOG.read_bytes()
    code, out, err = cli(capsys, "--json", "sim", "replay", str(REAL_LOG), "--engine", "preserve_n",
                         "--extend", "120")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["inputs"]["processes"] == 3 and doc["inputs"]["kills"] == 2
    assert doc["inputs"]["engine"] == "needy" and doc["inputs"]["boot_times"] == 1
    for name in ("recorded", "simulated", "what-if"):
        figures = doc["runs"][name]
        assert (figures["processes_finished"], figures["processes_unfinished"]) == (2, 1), (name, figures)
        assert figures["vm_hours"] > 0 and figures["launches"] >= 1, (name, figures)
    # the what-if holds a pool of the recorded peak after the work is gone; needy gives it back
    assert doc["runs"]["what-if"]["vm_hours"] > doc["runs"]["simulated"]["vm_hours"]
    assert any("the runs go on 120 s past the log's end" in a for a in doc["assumptions"])
    assert REAL_LOG.read_bytes() == before  # read-only


def _bad_logs(recorded: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(os.urandom(8192))
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    empty = tmp_path / "empty.sqlite"
    SqliteLog(f"sqlite:///{empty}", str(empty)).close()
    damaged = tmp_path / "damaged"
    shutil.copytree(recorded, damaged)
    db = sqlite3.connect(damaged / "pd.sqlite")
    [(first,)] = db.execute("SELECT first FROM batches WHERE stream='pd' ORDER BY first LIMIT 1 OFFSET 3")
    db.execute("UPDATE batches SET blob = ? WHERE stream='pd' AND first = ?", (b"\x00" * 40, first))
    db.commit()
    db.close()
    (tmp_path / "nothing").mkdir()
    foreign = tmp_path / "foreign.sqlite"  # a pd stream whose second event is not the PD's
    log = SqliteLog(f"sqlite:///{foreign}", str(foreign))
    fence = log.acquire("pd")
    log.append(fence, 0, [PendingEvent("ProcessScheduled", 1, 1.0, {"upid": "a", "round": 0, "spec": {},
                                                                      "at": 1.0}),
                          PendingEvent("ProcessScheduled", 1, 2.0, {"upid": "b", "colour": "red"})])
    log.close()
    misfit = tmp_path / "misfit.sqlite"  # the right fields, a spec that is no mapping
    log = SqliteLog(f"sqlite:///{misfit}", str(misfit))
    log.append(log.acquire("pd"), 0, [PendingEvent("ProcessScheduled", 1, 1.0, {
        "upid": "a", "round": 0, "spec": "sleep 5", "at": 1.0})])
    log.close()
    return [(junk, "damaged or not a log"), (other, "not a cei log"),
            (empty, "no pd stream in the log (streams: none)"),
            (damaged, f"stream 'pd' at offset {first}"),
            (foreign, "stream 'pd' at offset 2: body does not fit 'ProcessScheduled'"),
            (misfit, "stream 'pd' at offset 1: ProcessScheduled does not fit"),
            (tmp_path / "nothing", "no *.sqlite logs"), (tmp_path / "missing", "no such file")]


def test_corrupt_foreign_and_empty_logs_are_one_line_errors(recorded, tmp_path, capsys):
    for path, words in _bad_logs(recorded, tmp_path):
        code, out, err = cli(capsys, "sim", "replay", str(path))
        assert code == 1 and out == "" and err.count("\n") == 1, (path, err)
        assert words in err and "Traceback" not in err, (path, err)


def test_bad_requests_are_one_line_errors(recorded, capsys):
    for argv, words in ((["--engine", "nosuch"], "unknown engine"),
                        (["--set", "nokey=1"], "unknown key(s) nokey"),
                        (["--engine", "preserve_n", "--set", "preserve_n=-1"], "preserve_n"),
                        (["--set", "novalue"], "expected KEY=VALUE"),
                        (["--extend", "nan"], "--extend nan: expected seconds from 0"),
                        (["--extend", "1e19"], "--extend 1e+19: expected seconds from 0")):
        code, out, err = cli(capsys, "sim", "replay", str(recorded), *argv)
        assert code in (1, 2) and err.count("\n") == 1 and words in err, (argv, err)


def test_a_log_whose_history_was_cut_says_so(recorded, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(recorded, cut)
    db = sqlite3.connect(cut / "pd.sqlite")
    [(second,)] = db.execute("SELECT first FROM batches WHERE stream='pd' ORDER BY first LIMIT 1 OFFSET 1")
    db.execute("DELETE FROM batches WHERE stream='pd' AND first < ?", (second,))
    db.commit()
    db.close()
    code, out, err = cli(capsys, "sim", "replay", str(cut))
    assert code == 0, err
    assert f"assumed: the pd stream's history starts at offset {second}" in out


def test_a_zookeeper_log(recorded, zk_hosts, capsys):
    """The recorded pd and epum streams copied into a ZooKeeper log read the same."""
    from cei_actors.eventlog import open_log

    url = f"zk://{zk_hosts}"
    log = open_log(url)
    try:
        for stream in ("pd", "epum"):
            with open_logs(str(recorded / f"{stream}.sqlite"))[stream] as source:
                events = [PendingEvent(r.type, r.version, r.timestamp, r.body) for r in source.records(stream)]
            fence, head = log.acquire(stream), 0
            for i in range(0, len(events), 50):
                head = log.append(fence, head, events[i:i + 50])
    finally:
        log.close()
    code, out, err = cli(capsys, "--json", "sim", "replay", url)
    assert code == 0, err
    from_zk = json.loads(out)
    code, out, err = cli(capsys, "--json", "sim", "replay", str(recorded))
    assert code == 0, err
    assert from_zk["runs"] == json.loads(out)["runs"]
