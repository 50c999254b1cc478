"""What an operator trips over, each as the one clear error or behaviour it must be (issue 15,
"Errors that must reach the user"): plans, log URLs, the home's remembered log."""

from __future__ import annotations

import pytest

from cei_actors.cli import main
from cei_actors.launch.launcher import remember_log_url, remembered_log_url
from cei_actors.launch.plan import PlanError, load_plan


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_plan_merges_with_the_defaults(tmp_path):
    """A plan giving only a component's replicas gets the default log, registry, engines and
    that component's default config (its own keys win); only the components it names run."""
    path = tmp_path / "plan.yaml"
    path.write_text("components:\n  pd: {replicas: 2, config: {fence_time: 20.0}}\n")
    plan = load_plan(path, home=tmp_path)
    assert plan.log_url.startswith(f"sqlite:///{tmp_path.resolve()}/log.sqlite")
    assert list(plan.components) == ["pd"] and plan.components["pd"].replicas == 2
    conf = plan.components["pd"].config
    assert conf["fence_time"] == 20.0 and conf["dispatch_retry_seconds"] == 5.0
    assert "local" in plan.registry["sites"] and "default" in plan.pd["engines"]


def test_a_typo_is_named_with_a_suggestion(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text("compnents:\n  pd: {replicas: 1}\n")
    with pytest.raises(PlanError) as info:
        load_plan(path, home=tmp_path)
    assert info.value.key == "compnents" and "did you mean 'components'?" in str(info.value)
    path.write_text("components:\n  pd: {replicas: 1, confg: {}}\n")
    code, out, err = run(capsys, "--home", str(tmp_path / "h"), "up", "--plan", str(path))
    assert code == 1 and err.count("\n") == 1
    assert "components.pd.confg" in err and "did you mean 'config'?" in err and "log" not in err.split("(")[0]


def test_broken_yaml_is_one_line_with_line_and_column(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text("log: [a\n  b: c\n")
    code, _, err = run(capsys, "--home", str(tmp_path / "h"), "up", "--plan", str(path))
    assert code == 1 and err.count("\n") == 1 and "\\n" not in err
    assert "line 2, column 4" in err and str(path) in err
    bad = tmp_path / "def.yml"
    bad.write_text("general:\n  engine_class: [x\n")
    code, _, err = run(capsys, "--home", str(tmp_path / "h"), "domain-definition", "add", "x",
                       "--definition", str(bad))
    assert code == 1 and err.count("\n") == 1 and "line 3, column 1" in err


def test_relative_sqlite_log_in_a_plan_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "plan.yaml"
    path.write_text("log: sqlite:///rel/log.sqlite\nlog_history: {archive: none}\n")
    assert load_plan(path, home=tmp_path).log_url == f"sqlite:///{tmp_path}/rel/log.sqlite"
    assert load_plan(None, home=tmp_path, log_url="sqlite:////abs/x.sqlite?a=1").log_url.startswith(
        "sqlite:////abs/x.sqlite?a=1")


def test_the_home_remembers_its_log_after_down(tmp_path, capsys):
    """After `down` (no system.json) `cei log` reads the log the home's system wrote, not a
    new empty SQLite file under the home."""
    home = tmp_path / "h"
    home.mkdir()
    remember_log_url(home, "memory://remembered")
    assert remembered_log_url(home) == "memory://remembered"
    code, out, err = run(capsys, "--home", str(home), "log", "streams")
    assert code == 0 and "memory://remembered" in out
    assert not (home / "log.sqlite").exists()
