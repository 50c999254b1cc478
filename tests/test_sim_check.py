"""``cei sim check``: the hypothesis machines as a user command; a failing run is shrunk, its
logs saved as SQLite, and ``cei log check`` finds the broken invariant in them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from cei_actors.cli import main
from cei_actors.pd.events import ProcessAssigned
from cei_actors.sim.check import FAULTS, ChaosMachine, machine, run_check


@pytest.fixture
def planted_bug() -> type[ChaosMachine]:
    """A machine with one extra rule: the PD writes a placement on a node that does not
    exist (a bug that breaks the PD's own invariant and the simulator's)."""

    class Planted(ChaosMachine):
        faults = frozenset()

        @precondition(lambda self: self.s.scheduled and self.s.sim.nodes["pd"].up)
        @rule(i=st.integers(0, 100))
        def misplace(self, i: int) -> None:
            runner = self.s.sim.nodes["pd"].runner
            upid = sorted(self.s.scheduled)[i % len(self.s.scheduled)]
            p = runner.state.processes.get(upid)
            if p is None:
                return
            now = self.s.sim.clock.now()
            event = ProcessAssigned(upid, p.round, "no-such-node", now)
            runner.head = runner.log.append(runner.fence, runner.head,
                                            [runner.component.registry.to_checked(event, now)])
            runner.state = runner.component.apply(runner.state, event)

    return Planted


def test_check_finds_a_planted_bug_and_saves_the_smallest_failing_run(planted_bug, tmp_path, capsys):
    result = run_check(planted_bug, examples=30, seed=3, steps=8, save_dir=tmp_path / "logs")
    assert not result.passed
    assert "no-such-node" in result.error
    assert "misplace" in result.error  # hypothesis' smallest failing steps
    assert set(result.saved) == {"provisioner", "epum", "pd"}
    pd_url = result.saved["pd"]
    assert Path(pd_url.removeprefix("sqlite:///")).is_file()
    command = next(c for c in result.commands if c.endswith("log check pd"))
    assert command == f"cei --log {pd_url} log check pd"
    # the command the report gives finds the broken invariant in the saved log
    assert main(command.split()[1:]) == 1
    out = capsys.readouterr()
    assert "not held by its resource no-such-node" in out.out + out.err


def test_a_sound_system_passes_and_saves_nothing(tmp_path):
    result = run_check(machine(["vm", "cloud"]), examples=3, seed=1, steps=6, save_dir=tmp_path)
    assert result.passed, result.error
    assert result.saved == {} and list(tmp_path.iterdir()) == []


def test_cli_check_runs_and_refuses_unknown_faults(tmp_path, capsys):
    assert main(["--json", "sim", "check", "--examples", "2", "--steps", "4", "--seed", "5",
                 "--faults", "vm", "--save-log", str(tmp_path)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["passed"] and got["faults"] == ["vm"] and got["examples"] == 2
    assert main(["sim", "check", "--faults", "vm,meteor"]) == 1
    err = capsys.readouterr().err
    assert "unknown fault kind(s) meteor" in err and all(k in err for k in FAULTS)
