"""The ``cei`` command without a system: parsing, usage errors (exit 2), one-line errors (exit 1),
and the JSON shapes of DESIGN.md §6 against a stubbed connection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cei_actors.cli import main, parse
from cei_actors.launch import launcher
from cei_actors.runtime.client import NotFound


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ---- parsing --------------------------------------------------------------------------------


def test_schedule_parses_command_after_double_dash() -> None:
    args = parse([
        "process", "schedule", "--upid", "u1", "--restart-mode", "always", "--queueing-mode", "start_only",
        "--constraint", "engine=default", "--constraint", "hostname=h", "--node-exclusive", "tag",
        "--", "sh", "-c", "echo --not-an-option",
    ])
    assert args.upid == "u1" and args.restart_mode == "ALWAYS" and args.queueing_mode == "START_ONLY"
    assert args.constraint == ["engine=default", "hostname=h"] and args.node_exclusive == "tag"
    assert args.cmdline == ["sh", "-c", "echo --not-an-option"]


def test_options_between_id_and_double_dash() -> None:
    args = parse(["definition", "create", "hello", "--name", "greeting", "--", "echo", "-n", "hi"])
    assert args.definition_id == "hello" and args.name == "greeting" and args.cmdline == ["echo", "-n", "hi"]
    assert parse(["process", "schedule", "sleep", "1"]).cmdline == ["sleep", "1"]


def test_wait_and_list_take_state_names_in_any_case() -> None:
    args = parse(["process", "wait", "u1", "--state", "running", "--timeout", "3"])
    assert args.state == ["RUNNING"] and args.timeout == 3.0
    assert parse(["process", "list", "--state", "Exited"]).state == "EXITED"


@pytest.mark.parametrize("argv", [
    ["bogus"],
    ["process"],
    ["process", "schedule", "--restart-mode", "sometimes", "--", "true"],
    ["process", "wait", "u1"],
    ["process", "wait", "u1", "--state", "NOT_A_STATE"],
    ["process", "list", "--state", "nope"],
    ["domain", "reconfigure", "d1"],
    ["system-boot", "maybe"],
    ["dt", "add", "x"],
    ["process", "list", "--", "sleep", "1"],
    ["process", "schedule", "true", "--", "sleep", "1"],
])
def test_usage_errors_exit_2_with_one_line(capsys, tmp_path, argv) -> None:
    code, out, err = run(capsys, "--home", str(tmp_path), *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("cei: ")


@pytest.mark.parametrize("argv", [
    ["process", "schedule"],                      # neither COMMAND nor --definition
    ["domain", "add", "d1"],                      # no --engine, no --definition
    ["domain", "add", "d1", "--engine", "needy", "--set", "no-equals-sign"],
])
def test_meaningless_command_lines_exit_2(capsys, tmp_path, argv) -> None:
    code, out, err = run(capsys, "--home", str(tmp_path), *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["ha", "wait", "g", "--timeout", "-1"], ["provisioner", "terminate-all", "--timeout", "-5"],
    ["provisioner", "terminate-all", "--timeout", "nan"], ["demo", "--work", "0"], ["demo", "--timeout", "inf"],
    ["process", "wait", "u1", "--state", "RUNNING", "--timeout", "-1"],
    ["process", "list", "--watch", "--interval", "-2"], ["node", "list", "--watch", "--interval", "0"],
])
def test_a_timeout_must_be_a_positive_number_of_seconds(capsys, tmp_path, argv) -> None:
    """A negative or endless timeout is a usage error before anything is sent (terminate-all
    with --timeout -5 disabled the Provisioner and terminated every node, then said "still
    running after -5s")."""
    code, out, err = run(capsys, "--home", str(tmp_path), *argv)
    assert code == 2 and out == "" and "expected a positive number of seconds" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["status"], ["down"], ["process", "list"], ["process", "describe", "u1"], ["node", "list"],
    ["domain", "list"], ["system-boot", "off"], ["provisioner", "status"], ["site", "list"],
])
def test_system_not_up_is_one_line_exit_1(capsys, tmp_path, argv) -> None:
    code, out, err = run(capsys, "--json", "--home", str(tmp_path), *argv)
    assert code == 1 and out == ""
    assert err == f"cei: system not up (no {tmp_path / 'system.json'}): run cei up\n"


def test_invalid_plan_is_one_line_exit_1(capsys, tmp_path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("components: {pd: {replicas: zero}}\npd: {engines: {default: {slots: 2}}}\n")
    code, out, err = run(capsys, "--home", str(tmp_path / "home"), "up", "--plan", str(plan))
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("cei: invalid plan: ") and str(plan) in err
    code, out, err = run(capsys, "--home", str(tmp_path / "home"), "up", "--plan", str(tmp_path / "missing.yaml"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "missing.yaml" in err


# ---- JSON shapes against a stub ---------------------------------------------------------------

PROCESS = {
    "upid": "u1", "state": "RUNNING", "round": 0, "node_id": "n1", "assigned": "n1", "restart_mode": "ABNORMAL",
    "queueing_mode": "ALWAYS", "constraints": {"engine": "default"}, "command": ["sleep", "9"], "msg": "",
}
INSTANCE = {"node_id": "n1", "instance_id": "n1", "domain_id": "pd_domain_default", "state": "RUNNING", "site": "local"}
DOMAIN = {"domain_id": "pd_domain_default", "engine": "needy", "definition_id": "pd_default",
          "config": {"general": {"engine_class": "needy"}, "engine_conf": {"preserve_n": 1}}, "instances": [INSTANCE]}
NODE = {"node_id": "n1", "state": "RUNNING", "site": "local", "iaas_id": "local-000001", "launch_id": "l1"}
RESOURCE = {"resource_id": "n1", "node_id": "n1", "engine": "default", "slots": 4, "state": "OK",
            "assigned": [["u1", 0]]}


class StubPD:
    def describe_processes(self, upids=None, state=None) -> list[dict[str, Any]]:
        return [PROCESS] if state in (None, PROCESS["state"]) else []

    def describe_process(self, upid: str) -> dict[str, Any]:
        if upid != "u1":
            raise NotFound(f"no process {upid!r}", "not_found")
        return PROCESS

    def schedule_process(self, upid: str, definition_id=None, **kw: Any) -> dict[str, Any]:
        return {**PROCESS, "upid": upid, "state": "WAITING", "node_id": None,
                "restart_mode": kw["restart_mode"] or "ABNORMAL", "constraints": kw["constraints"] or {}}

    def terminate_process(self, upid: str) -> dict[str, Any]:
        return {**PROCESS, "state": "TERMINATING"}

    def wait_process(self, upid: str, states: Any, timeout: float = 30.0, every: float = 0.05) -> dict[str, Any]:
        if upid == "ended":
            return {**PROCESS, "upid": upid, "state": "FAILED"}
        raise TimeoutError(f"process {upid} is WAITING (round 0), not {sorted(states)}")

    def dump(self) -> dict[str, Any]:
        return {"processes": [PROCESS], "nodes": [{"node_id": "n1", "domain_id": "pd_domain_default"}],
                "resources": [RESOURCE], "needs": {"default": {"need": 1, "nodes": 1}}}


class StubEPUM:
    def list_domains(self) -> list[str]:
        return ["pd_domain_default"]

    def describe_domain(self, domain_id: str) -> dict[str, Any]:
        return DOMAIN


class StubProvisioner:
    def describe_nodes(self, node_ids=None) -> list[dict[str, Any]]:
        return [NODE]


class StubConnection:
    pd, epum, provisioner = StubPD(), StubEPUM(), StubProvisioner()
    info = {"components": {"pd": ["pd"], "epum": ["epum"], "provisioner": ["provisioner"]}}

    def status(self) -> dict[str, Any]:
        replica = {"name": "pd", "leader": True, "ready": True, "epoch": 2, "head": 40, "pid": 1, "mode": "ready"}
        return {"components": {"pd": [replica]}, "processes": {"RUNNING": 1}, "domains": ["pd_domain_default"],
                "nodes": {"RUNNING": 1}, "log_url": "sqlite:///x", "admin_port": 1}

    def close(self) -> None:
        pass


@pytest.fixture
def stub_home(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "system.json").write_text("{}")
    monkeypatch.setattr(launcher, "connect", lambda home, timeout=10.0: StubConnection())
    return tmp_path


def test_process_json_shapes(capsys, stub_home) -> None:
    home = ["--json", "--home", str(stub_home)]
    code, out, _ = run(capsys, *home, "process", "list")
    [p] = json.loads(out)
    assert code == 0 and {"upid", "state", "round", "node_id", "restart_mode", "queueing_mode", "constraints"} <= set(p)
    code, out, _ = run(capsys, *home, "process", "schedule", "--upid", "u2", "--restart-mode", "never",
                       "--constraint", "engine=default", "--", "true")
    p = json.loads(out)
    assert code == 0 and p["upid"] == "u2" and p["node_id"] is None and p["restart_mode"] == "NEVER"
    assert p["constraints"] == {"engine": "default"}
    code, out, _ = run(capsys, *home, "process", "terminate", "u1")
    assert code == 0 and json.loads(out)["state"] == "TERMINATING"


def test_unknown_upid_and_wait_timeout_are_one_line_exit_1(capsys, stub_home) -> None:
    code, out, err = run(capsys, "--home", str(stub_home), "process", "describe", "nope")
    assert code == 1 and out == "" and err == "cei: no process 'nope'\n"
    code, out, err = run(capsys, "--home", str(stub_home), "process", "wait", "u1", "--state", "RUNNING",
                         "--timeout", "0.1")
    assert code == 1 and out == "" and err.startswith("cei: timed out after 0.1s: process u1 is WAITING")
    code, out, err = run(capsys, "--home", str(stub_home), "process", "wait", "ended", "--state", "RUNNING")
    assert code == 1 and out == "" and err == "cei: process ended ended FAILED (round 0), not RUNNING\n"


def test_node_domain_status_json_shapes(capsys, stub_home) -> None:
    home = ["--json", "--home", str(stub_home)]
    code, out, _ = run(capsys, *home, "node", "list")
    [n] = json.loads(out)
    assert code == 0 and n["node_id"] == "n1" and n["state"] == "RUNNING"
    assert n["domain_id"] == "pd_domain_default" and n["site"] == "local" and n["processes"] == 1
    code, out, _ = run(capsys, *home, "domain", "list")
    [d] = json.loads(out)
    assert {"domain_id", "engine", "config", "instances"} <= set(d) and d["instances"][0]["node_id"] == "n1"
    code, out, _ = run(capsys, *home, "status")
    s = json.loads(out)
    assert s["components"]["pd"][0]["leader"] is True and s["processes"] == {"RUNNING": 1}
    assert s["domains"][0]["need"] == 1 and s["nodes"][0]["node_id"] == "n1" and s["resources"][0]["used"] == 1


def test_tables_without_json(capsys, stub_home) -> None:
    code, out, _ = run(capsys, "--home", str(stub_home), "process", "list")
    assert code == 0 and "u1" in out and "RUNNING" in out
    code, out, _ = run(capsys, "--home", str(stub_home), "status")
    assert code == 0 and "components" in out and "pd_domain_default" in out and "processes: RUNNING 1" in out


def test_library_logging_stays_off_the_terminal_unless_asked(tmp_path) -> None:
    """kazoo logs every failed reconnect; without -v the user sees only the one-line error
    (issue 15: 19 kazoo lines came before it)."""
    from test_cli_e2e import run_cli

    url = "zk://127.0.0.1:1/x?timeout=2"  # port 1: nothing listens, every connect is refused
    quiet = run_cli("--home", str(tmp_path), "--log", url, "log", "streams", timeout=60)
    assert quiet.returncode == 1 and quiet.stdout == ""
    assert quiet.stderr.count("\n") == 1 and quiet.stderr.startswith("cei: "), quiet.stderr
    loud = run_cli("-v", "--home", str(tmp_path), "--log", url, "log", "streams", timeout=60)
    assert loud.returncode == 1 and "Connection dropped" in loud.stderr
