"""The scenario files under sims/: each converges with no invariant violation at its default
seed; reports (markdown, PNG plots, the one-screen summary); saved logs that ``cei log``
opens and that are byte-identical for a seed across runs and hash seeds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cei_actors.cli import main

ROOT = Path(__file__).resolve().parents[1]

_SAVE = """
import json, sys
from sims import RunOptions, {name}
s = {name}.run({seed}, options=RunOptions(save_log=sys.argv[1]), **{kw!r})
print(json.dumps({{**s["saved_logs"], "state_digest": s["state_digest"]}}, sort_keys=True))
"""


def _saved_hashes(tmp: Path, name: str, seed: int, hashseed: str, **kw) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", _SAVE.format(name=name, seed=seed, kw=kw), str(tmp)],
                         cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": hashseed},
                         capture_output=True, text=True, timeout=300, check=True)
    urls = json.loads(out.stdout)
    digest = urls.pop("state_digest")
    return {"state_digest": digest,
            **{n: hashlib.sha256(Path(u.removeprefix("sqlite:///")).read_bytes()).hexdigest()
               for n, u in urls.items()}}


def test_saved_logs_are_byte_identical_across_runs_and_hash_seeds(tmp_path):
    """chaos, seed 7: two runs in fresh interpreters under two PYTHONHASHSEEDs save the same
    bytes and end with the same state digest (SIM12: maps hashed in their own order);
    ``cei log`` opens the files and every invariant holds over their whole history."""
    a = _saved_hashes(tmp_path / "a", "chaos", 7, "1", operations=30)
    b = _saved_hashes(tmp_path / "b", "chaos", 7, "2", operations=30)
    assert set(a) == {"provisioner", "epum", "pd", "state_digest"}
    assert a == b
    c = _saved_hashes(tmp_path / "c", "chaos", 8, "1", operations=30)
    assert c["state_digest"] != a["state_digest"] and c != a  # another seed, another run
    for name in set(a) - {"state_digest"}:
        url = f"sqlite:///{tmp_path / 'a' / name}.sqlite"
        assert main(["--log", url, "log", "check", name]) == 0


def test_report_has_plots_markdown_and_the_figures(tmp_path, capsys):
    from sims import RunOptions, iteration

    s = iteration.run(2, options=RunOptions(report_dir=tmp_path), vms=40, site_a=25,
                      failure_rate=0.0)
    assert s["violations"] == [] and s["converged"], s["convergence_problems"]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"iteration-2-{k}.png" for k in
                    ("events", "need-to-running", "placements", "queue", "vms")]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (tmp_path / "iteration-2.md").read_text()
    assert all(f"]({p})" in md for p in pngs) and "converged" in md
    tl = json.loads((tmp_path / "iteration-2-timeline.json").read_text())
    assert max(tl["vms"]["RUNNING"]) == 40 and tl["vms"]["RUNNING"][-1] == 0
    assert len(tl["request_to_running_s"]) == 40
    assert s["request_to_running_s"]["count"] == 40
    assert s["events_by_component"]["epum"] == s["log_heads"]["epum"] > 0


def test_cli_run_json_is_quiet_and_save_log_names_the_command(tmp_path, capsys):
    assert main(["--json", "sim", "run", "overflow", "--seed", "0", "--save-log", str(tmp_path)]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)  # nothing but the JSON
    assert out.err == "" and summary["converged"]
    assert summary["saved_logs"]["pd"] == f"sqlite:///{tmp_path.resolve()}/pd.sqlite"
    assert main(["sim", "run", "overflow", "--seed", "0", "--save-log", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "converged" in text and f"cei --log sqlite:///{tmp_path.resolve()}/pd.sqlite log streams" in text


def test_progress_line_shows_virtual_time_steps_vms_and_processes():
    from cei_actors.cli.simcmds import _Progress
    from sims import RunOptions, overflow

    progress = _Progress()
    progress.shown = -1e9
    seen: list[str] = []

    def watch(system) -> None:
        progress.shown = -1e9  # every call redraws
        progress(system)
        seen.append(progress.bar.tasks[0].description)

    overflow.run(0, options=RunOptions(progress=watch), want=12, quota=6, processes=8)
    assert seen and "virtual" in seen[-1] and "steps/s" in seen[-1]
    assert any(" 0 VMs" not in d and "VMs" in d for d in seen)


@pytest.mark.parametrize("name", ["iteration", "overflow", "storm", "steady", "chaos", "ha",
                                  pytest.param("scale", marks=pytest.mark.slow)])
def test_scenario_converges_at_its_default_seed(name):
    import importlib

    s = importlib.import_module(f"sims.{name}").run(0)
    assert s["violations"] == [], s["violations"]
    assert s["converged"], s["convergence_problems"]


def test_big_converges_small():
    from sims import big

    s = big.run(0, vms=60)
    assert s["violations"] == [] and s["converged"], s["convergence_problems"]
    assert s["processes_scheduled"] == 600 and s["vms_peak"] >= 60


def test_a_scenario_runs_without_the_collector_and_leaves_it_as_it_found_it():
    """SIM11: the collector is off for a whole scenario run (seen from its progress calls and
    its workload), and afterwards on, off or holding frozen objects exactly as before."""
    import gc

    from sims import RunOptions, big

    seen: list[bool] = []
    options = RunOptions(progress=lambda system: seen.append(gc.isenabled()))
    before = (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count())
    s = big.run(0, vms=20, options=options)
    assert s["converged"] and seen and not any(seen)
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == before
    gc.disable()
    try:
        big.run(0, vms=5)
        assert not gc.isenabled()
    finally:
        gc.enable()
    gc.freeze()  # the program's own frozen objects: not the scenario's to unfreeze
    try:
        frozen = gc.get_freeze_count()
        big.run(0, vms=5)
        assert gc.get_freeze_count() == frozen and gc.isenabled()
    finally:
        gc.unfreeze()
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == before


@pytest.mark.slow
def test_big_converges_at_full_size():
    from sims import big

    s = big.run(0)
    assert s["violations"] == [] and s["converged"], s["convergence_problems"]
    assert s["processes_scheduled"] == 100_000 and s["vms_peak"] >= 10_000


def test_sites_have_their_own_clouds_faults_and_agents():
    """Two sites: each has its own simulated cloud; a fault set on one site stays there; a VM
    killed on either site takes its agent with it and EPUM replaces it on the same site."""
    import collections

    from cei_actors.sim.system import CEISystem, SystemConfig

    s = CEISystem(4, SystemConfig(sites={"a": {}, "b": {}}, boot_delay=(2.0, 5.0)))
    s.run_for(5.0)
    clouds = [{"site_name": "a", "size": 3, "rank": 1}, {"site_name": "b", "size": 3, "rank": 2}]
    s.add_domain("d", 6, "overflow", {"clouds": clouds})
    assert s.run_for(120.0, check_every=100) == []
    assert set(s.clouds) == {"a", "b"} and s.convergence() == []
    assert collections.Counter(vm.id[:3] for vm in s.cloud_vms()) == {"i-0": 3, "i-1": 3}
    s.set_cloud("b", max_instances=0)
    assert s.clouds["b"].max_instances == 0 and s.clouds["a"].max_instances is None
    s.set_cloud("b", max_instances=None)
    killed = {s.kill_vm(0), s.kill_vm(5)}
    assert len(killed) == 2
    assert s.run_for(300.0, check_every=100) == []
    assert not killed & set(s.agents) and len(s.agents) == 6
    assert s.convergence() == []
    assert s.summary()["vms_started"] == 8


def test_big_keeps_a_tombstone_of_every_finished_process():
    """Past the PD's tombstone limit a finished process is forgotten without a trace, which
    the invariant cannot tell from a lost one (first seen at 100,000 processes): ``big``
    keeps room for all of them."""
    from sims import big

    assert big.config(10, 100_000).extra["pd"]["tombstone_limit"] >= 100_000
    cramped = big.config(10)
    cramped.extra = {"pd": {"tombstone_limit": 100}}
    s = big.run(0, vms=30, system_config=cramped)
    assert any("lost: not in the PD" in v for v in s["violations"])
