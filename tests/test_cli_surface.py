"""What a kubectl or nomad user expects of ``cei`` (issue 15): output options anywhere, -o
formats, --no-headers, --version, shell completion, whole ids in piped tables, ids by unique
prefix, human times, ``process logs``, ``--watch``, ``log show --follow``, progress on a
terminal only. The end-to-end part shares one real system (module fixture)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cli_e2e import REPO, cleanup, run_cli
from test_cli_e2e import data as data_in_child

from cei_actors.cli import build_parser, main, parse
from cei_actors.cli.completion import bash_script
from cei_actors.cli.ids import resolve
from cei_actors.cli.output import CliError, Output, age, human_time, humanized


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ---- options and formats (no system) ----------------------------------------------------------


def test_output_options_count_before_or_after_the_subcommand() -> None:
    assert parse(["--json", "process", "list"]).json is True
    assert parse(["process", "list", "--json"]).json is True
    assert parse(["process", "list"]).json is False
    args = parse(["process", "list", "-o", "wide", "--no-headers"])
    assert (args.output, args.json, args.no_headers) == ("wide", False, True)
    args = parse(["-o", "yaml", "node", "describe", "n1"])
    assert (args.output, args.json) == ("yaml", True)
    assert parse(["domain", "list", "-o", "name"]).json is True  # a machine format
    assert parse(["--no-headers", "status"]).no_headers is True


def test_json_with_another_format_is_a_usage_error(capsys, tmp_path) -> None:
    code, out, err = run(capsys, "--home", str(tmp_path), "process", "list", "--json", "-o", "yaml")
    assert code == 2 and out == "" and err.count("\n") == 1 and "--json and -o yaml" in err
    code, out, err = run(capsys, "--home", str(tmp_path), "process", "list", "-o", "table")
    assert code == 2 and out == "" and "invalid choice" in err


def test_version(capsys) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and re.fullmatch(r"cei \d+\.\d+\.\d+\S*\n", out)


def _complete(script: str, *words: str) -> list[str]:
    """What bash's completion function offers for ``cei WORDS`` (the last word being typed)."""
    line = " ".join(json.dumps(w) for w in ["cei", *words])
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                           f'source "$1"; COMP_WORDS=({line}); COMP_CWORD={len(words)}; _cei; '
                           'printf "%s\\n" "${COMPREPLY[@]}"', "bash", script],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.split("\n") if w]


def test_bash_completion_is_valid_and_completes_commands_and_options(tmp_path: Path) -> None:
    proc = run_cli("completion", "bash")
    assert proc.returncode == 0
    script = tmp_path / "cei.bash"
    script.write_text(proc.stdout)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert _complete(str(script), "pro") == ["process", "provisioner"]
    assert set(_complete(str(script), "process", "l")) == {"list", "logs"}
    assert "--follow" in _complete(str(script), "--home", "x", "process", "logs", "--")
    assert _complete(str(script), "node", "list", "-o", "") == ["json", "yaml", "wide", "name"]
    assert _complete(str(script), "completion", "z") == ["zsh"]
    assert _complete(str(script), "--home", str(tmp_path / "cei.ba")) == [str(script)]  # a value: files
    zsh = run_cli("completion", "zsh")
    assert zsh.returncode == 0 and "bashcompinit" in zsh.stdout and "_cei()" in zsh.stdout


def test_completion_covers_every_subcommand() -> None:
    script = bash_script(build_parser())
    for words in ("process logs", "log show", "ha wait", "sim run", "domain-definition list"):
        assert f"'{words}')" in script, words


def test_piped_tables_keep_every_cell_whole() -> None:
    """rich cut cells to an 80-column console when piped (``i-c646a8…``); piped tables are now
    plain aligned text, nothing cut, nothing wrapped."""
    long_id = "p-" + "0123456789abcdef" * 6
    stream = io.StringIO()
    rows = [{"upid": long_id, "state": "RUNNING", "command": "sleep 1000 " * 8}, {"upid": "u2", "state": "EXITED"}]
    Output(None, stream, tty=False).table(rows, ["upid", "state", "command"], title="2 processes")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "2 processes" and lines[1].split() == ["upid", "state", "command"]
    assert lines[2].split()[:2] == [long_id, "RUNNING"] and lines[2].endswith("sleep 1000")
    assert lines[3].split() == ["u2", "EXITED"]
    assert lines[1].index("state") == lines[2].index("RUNNING") == lines[3].index("EXITED")


def test_terminal_tables_fold_long_cells_instead_of_cutting_them() -> None:
    long_id = "p-" + "0123456789abcdef" * 6
    stream = io.StringIO()
    Output(None, stream, tty=True).table([{"upid": long_id, "state": "RUNNING"}], ["upid", "state"])
    text = stream.getvalue()
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert "…" not in text and first_column == long_id


def test_no_headers_wide_and_name() -> None:
    rows = [{"upid": "u1", "state": "RUNNING", "engine": "default"}]
    stream = io.StringIO()
    Output(None, stream, headers=False, tty=False).table(rows, ["upid", "state"], title="t", wide=["engine"])
    assert stream.getvalue() == "u1   RUNNING\n"
    stream = io.StringIO()
    Output("wide", stream, tty=False).table(rows, ["upid", "state"], title="t", wide=["engine"])
    assert stream.getvalue().splitlines()[1].split() == ["upid", "state", "engine"]
    stream = io.StringIO()
    Output("name", stream).table(rows + [{"upid": "u2"}], ["upid", "state"])
    assert stream.getvalue() == "u1\nu2\n"
    stream = io.StringIO()
    Output("yaml", stream).emit({"upid": "u1", "state_time": 1796233940.28})
    assert yaml.safe_load(stream.getvalue()) == {"upid": "u1", "state_time": 1796233940.28}
    with pytest.raises(CliError, match="no id"):
        Output("name", io.StringIO()).emit({"ok": True})


def test_human_times_in_tables_and_describe_raw_in_json() -> None:
    now = 1796233940.28
    assert age(45) == "45s" and age(200) == "3m20s" and age(7500) == "2h5m" and age(3 * 86400 + 7200) == "3d2h"
    text = human_time(now - 180, now)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(3m ago\)", text)
    assert human_time(now + 60, now).endswith("(in 1m)")
    data = {"state_time": now - 5, "round": 3, "heartbeat_timeout": 30.0, "nodes": [{"changed_at": now}]}
    shown = humanized(data, now)
    assert shown["state_time"].endswith("(5s ago)") and shown["round"] == 3 and shown["heartbeat_timeout"] == 30.0
    assert shown["nodes"][0]["changed_at"].endswith("(0s ago)")
    stream = io.StringIO()
    Output(None, stream).describe({"upid": "u1", "state_time": time.time() - 120}, title="process u1")
    assert stream.getvalue().startswith("process u1\nupid: u1\nstate_time: ")
    assert "(2m ago)" in stream.getvalue()
    stream = io.StringIO()
    Output(True, stream).describe({"upid": "u1", "state_time": now})
    assert json.loads(stream.getvalue())["state_time"] == now


def test_times_are_utc_everywhere_and_at_takes_them_back(monkeypatch) -> None:
    """One rule (decision OP5): people's times are UTC marked Z, in tables and describe as in
    the log tools, whatever the host's time zone, and ``--at`` reads what they show."""
    from cei_actors.debug import human_time as log_time
    from cei_actors.debug import parse_at

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # +05:30: a local time would show 05:30 here
    time.tzset()
    try:
        ts = 1796233940.28  # 2026-12-02 17:52:20.280 UTC
        assert human_time(ts, ts + 90) == "2026-12-02 17:52:20Z (1m30s ago)"
        assert log_time(ts) == "2026-12-02 17:52:20.280Z"
        assert parse_at("2026-12-02 17:52:20Z", now=ts) == ("time", 1796233940.0)
        shown = humanized({"next_start": ts, "retry_at": ts, "min_start_interval": 5.0}, ts - 16)
        assert shown == {"next_start": "2026-12-02 17:52:20Z (in 16s)", "retry_at": "2026-12-02 17:52:20Z (in 16s)",
                         "min_start_interval": 5.0}
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_every_option_says_what_it_does() -> None:
    """``--help`` documents every flag and argument (many had none: `--seed`, `--from`,
    `--allocation`, `process wait --timeout`, ...)."""
    import argparse

    from cei_actors.cli import _subcommand_parsers

    parser = build_parser()
    bare = [f"{p.prog} {a.option_strings or a.dest}" for p in [parser, *_subcommand_parsers(parser)]
            for a in p._actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and not a.help]
    assert bare == []


def test_ids_by_unique_prefix() -> None:
    ids = ["p-1234", "p-1299", "q-1", "q"]
    assert resolve("process", "p-12", ["p-1234"]) == "p-1234"
    assert resolve("process", "p-123", ids) == "p-1234"
    assert resolve("process", "q", ids) == "q"  # an exact id wins over the longer ones
    assert resolve("process", "zz", ids) == "zz"  # unknown: the component says so
    with pytest.raises(CliError) as err:
        resolve("process", "p-1", ids)
    assert str(err.value) == "process id 'p-1' is ambiguous: p-1234, p-1299"


# ---- against a real system ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Any:
    path = tmp_path_factory.mktemp("surface") / "cei"
    try:
        data_in_child(path, "up")
        # one node stays up: processes start without a node boot each (the tests stay quick)
        data(path, "domain", "reconfigure", "pd_domain_default", "--set", "preserve_n=1")
        yield path
    finally:
        cleanup(path)


def wait_for(what, timeout: float = 60.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what.__doc__ or what}")
        time.sleep(every)


def human(home: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``cei --home HOME ARGV`` run in this process (as the console script runs it, stdout and
    stderr not terminals): its exit status and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--home", str(home), *argv])
        except SystemExit as exc:
            code = int(exc.code or 0)
    proc = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"cei {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def data(home: Path, *argv: str) -> Any:
    """The JSON result of ``cei --json ARGV`` (in this process)."""
    return json.loads(human(home, "--json", *argv).stdout)


def test_process_logs_in_every_round_and_describe_keeps_the_node(home: Path) -> None:
    upid = "logs-" + "x" * 50  # longer than a rich column on 80 columns
    cmd = 'echo "out of round $(cat /proc/sys/kernel/random/uuid)"; echo "to stderr" >&2'
    data(home, "process", "schedule", "--upid", upid, "--restart-mode", "never", "--", "sh", "-c", cmd)
    p = data(home, "process", "wait", upid, "--state", "EXITED", "--timeout", "60")
    assert p["node_id"] is None and p["last_node_id"]  # the node it ran on is kept once it ended
    nodes = [n["node_id"] for n in data(home, "node", "list", "--all")]
    assert p["last_node_id"] in nodes
    first = human(home, "process", "logs", upid).stdout
    assert first.startswith("out of round ") and first.count("\n") == 1
    assert human(home, "process", "logs", upid, "--stderr").stdout == "to stderr\n"
    data(home, "process", "restart", upid)
    wait_for(lambda: (lambda q: q["round"] == 1 and q["state"] == "EXITED")(data(home, "process", "describe", upid)))
    second = human(home, "process", "logs", upid[:8]).stdout  # by prefix, the latest round
    assert second.startswith("out of round ") and second != first
    assert human(home, "process", "logs", upid, "--round", "0").stdout == first
    bad = human(home, "process", "logs", upid, "--round", "7", check=False)
    assert bad.returncode == 1 and bad.stdout == "" and bad.stderr == f"cei: process {upid} has rounds 0 to 1, not 7\n"
    # the table piped: the whole upid, the whole node id, a human age
    table = human(home, "process", "list").stdout
    [row] = [line for line in table.splitlines() if line.startswith(upid)]
    ran_on = data(home, "process", "describe", upid)["last_node_id"]
    assert row.split()[:4] == [upid, "EXITED", "1", ran_on] and re.search(r" \d+[smhd] ", row)
    wide = human(home, "process", "list", "-o", "wide").stdout
    [row] = [line for line in wide.splitlines() if line.startswith(upid)]
    assert row.split().count(ran_on) == 2  # node_id and last_node_id and re.search(r"\d\d:\d\d:\d\d \(\d+[smhd]", row)
    described = human(home, "process", "describe", upid[:10]).stdout
    assert f"upid: {upid}\n" in described and re.search(r"state_time: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(", described)
    assert isinstance(data(home, "process", "describe", upid)["state_time"], float)


def test_process_logs_from_the_agent_match_the_files(home: Path) -> None:
    """``--from-agent`` asks a local-site node's agent (a separate process, UX4) for what this
    host could read from its files: the same bytes. The process keeps running, so its node
    stays (an idle node may be retired, and its agent with it)."""
    data(home, "process", "schedule", "--upid", "asked-agent", "--restart-mode", "never", "--",
         "sh", "-c", "seq 1 5; echo e >&2; exec sleep 300")
    p = data(home, "process", "wait", "asked-agent", "--state", "RUNNING", "--timeout", "60")
    wait_for(lambda: human(home, "process", "logs", "asked-agent", check=False).stdout == "1\n2\n3\n4\n5\n")
    try:
        for extra in ((), ("--stderr",), ("--tail", "2")):
            local = human(home, "process", "logs", "asked-agent", *extra).stdout
            assert human(home, "process", "logs", "asked-agent", "--from-agent", *extra).stdout == local, extra
        chunk = data(home, "process", "logs", "asked-agent", "--from-agent")
        assert chunk["node"] == p["node_id"] and chunk["text"] == "1\n2\n3\n4\n5\n"
        assert data(home, "process", "logs", "asked-agent")["path"].endswith(".out")
    finally:
        data(home, "process", "terminate", "asked-agent")


def test_process_logs_follow_until_the_process_ends(home: Path) -> None:
    data(home, "process", "schedule", "--upid", "follow-me", "--restart-mode", "never", "--",
         "sh", "-c", "echo one; sleep 2; echo two")
    data(home, "process", "wait", "follow-me", "--state", "RUNNING", "--timeout", "60")
    proc = human(home, "process", "logs", "follow-", "--follow")
    assert proc.stdout == "one\ntwo\n" and proc.stderr == ""
    assert data(home, "process", "describe", "follow-me")["state"] == "EXITED"
    assert human(home, "process", "logs", "follow-me", "--tail", "1").stdout == "two\n"
    bad = human(home, "process", "logs", "follow-me", "--tail", "-1", check=False)
    assert bad.returncode == 1 and bad.stderr == "cei: --tail: expected a number of lines >= 0, got -1\n"


@pytest.mark.parametrize("text", ["", "a\n", "a\nb\nc\n", "a\nb\nc", "\n\n\n", "line of output\n" * 400])
def test_tail_offset_gives_the_last_lines(tmp_path: Path, text: str) -> None:
    from cei_actors.cli.process import tail_offset

    path = tmp_path / "p.out"
    path.write_text(text)
    lines = text.splitlines(keepends=True)
    for n in (0, 1, 2, 3, 50, 1000):
        assert text[tail_offset(path, n, block=7):] == ("".join(lines[-n:]) if n else ""), n


def test_ids_by_prefix_against_the_system(home: Path) -> None:
    for upid in ("pre-aaa1", "pre-aaa2", "pre-bbb3"):
        data(home, "process", "schedule", "--upid", upid, "--", "sleep", "300")
    assert data(home, "process", "describe", "pre-aaa1")["upid"] == "pre-aaa1"  # whole
    assert data(home, "process", "describe", "pre-b")["upid"] == "pre-bbb3"  # unique prefix
    amb = human(home, "process", "terminate", "pre-a", check=False)
    assert amb.returncode == 1 and amb.stdout == ""
    assert amb.stderr == "cei: process id 'pre-a' is ambiguous: pre-aaa1, pre-aaa2\n"
    for given, upid in (("pre-aaa1", "pre-aaa1"), ("pre-aaa2", "pre-aaa2"), ("pre-b", "pre-bbb3")):
        assert data(home, "process", "terminate", given)["upid"] == upid
    node = data(home, "node", "list", "--all")[0]["node_id"]
    assert data(home, "node", "describe", node[:12])["node_id"] == node
    assert data(home, "domain", "describe", "pd_dom")["domain_id"] == "pd_domain_default"
    data(home, "ha", "create", "web-frontend", "--preserve-n", "1", "--", "sleep", "300")
    assert data(home, "ha", "describe", "web-f")["name"] == "web-frontend"
    assert data(home, "ha", "status", "web")["name"] == "web-frontend"
    data(home, "ha", "remove", "web-")
    unknown = human(home, "node", "describe", "zz-no-such-node", check=False)
    assert unknown.returncode == 1 and unknown.stderr == "cei: unknown node 'zz-no-such-node'\n"


def test_a_second_up_and_ha_list_wide(home: Path) -> None:
    """A second ``up`` refuses in one line without first saying which log it would use (it
    did); ``ha list -o wide`` adds why, wants, pds and created_at (it showed the plain columns)."""
    again = human(home, "up", check=False)
    assert again.returncode == 1 and again.stdout == "" and "already up" in again.stderr
    data(home, "ha", "create", "wide-one", "--preserve-n", "0", "--", "sleep", "300")
    try:
        wide = human(home, "ha", "list", "-o", "wide").stdout.splitlines()
        assert wide[1].split() == ["name", "policy", "status", "target", "copies", "removing", "why", "wants",
                                   "pds", "created_at"]
        row = next(line for line in wide if line.startswith("wide-one "))
        assert "pd" in row.split() and re.search(r"\d\d:\d\d:\d\dZ \(\d+s ago\)", row), row
    finally:
        data(home, "ha", "remove", "wide-one")


def test_a_read_without_a_reply_says_it_changed_nothing(home: Path) -> None:
    """A read that times out (the PD stopped) exits 3 as any request without a reply, but its
    line does not say the read "may have taken effect" (it did): it points at ``cei status``."""
    from test_outcomes import suspended

    pid = json.loads((home / "system.json").read_text())["pids"]["pd"]
    with suspended(pid):
        proc = human(home, "--request-timeout", "1", "process", "list", check=False)
    assert proc.returncode == 3 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("cei: no reply: DescribeProcesses: sent to ") and "taken effect" not in proc.stderr
    assert "a read changes nothing (`cei status` shows what serves)" in proc.stderr


def test_metrics_by_name(home: Path) -> None:
    """``cei metrics -o name`` lists the metric names (it was an error: "no id to print")."""
    names = human(home, "metrics", "-o", "name", "cei_pd_").stdout.splitlines()
    assert names and all(n.startswith("cei_pd_") for n in names) and len(set(names)) == len(names), names


def test_a_domains_instances_count_its_live_nodes() -> None:
    """After a ``down`` (the Provisioner disabled, EPUM still replacing) and an ``up``, a
    domain of one showed ``instances 12``: its rejected and terminated launches counted. The
    column now counts live nodes (as ``cei_epum_domain_have``); ``states`` still shows all."""
    from cei_actors.cli.domain import summary

    row = summary({"domain_id": "d1", "instances": [{"state": s} for s in (
        "REJECTED", "REJECTED", "TERMINATED", "FAILED", "RUNNING", "PENDING")]})
    assert row["instances"] == 2 and row["states"] == "FAILED 1, PENDING 1, REJECTED 2, RUNNING 1, TERMINATED 1"


def test_status_says_what_a_mode_means() -> None:
    """NOT HEALTHY said only "not serving (suspended)" while the log was unreachable: the mode
    is now explained (here: a leader that lost its ZooKeeper session)."""
    from cei_actors.cli.system import component_problems

    replicas = {"pd": [{"mode": "suspended", "running": True, "ready": False, "since": 1796233940.0}],
                "epum": [{"mode": "ready", "running": True, "ready": True}]}
    assert component_problems(replicas) == [{
        "component": "pd", "since": 1796233940.0,
        "error": "not serving (suspended: its leadership is in doubt (its log session is lost); requests wait "
                 "until the log is back)"}]


def _lines_until(proc: subprocess.Popen, found, timeout: float = 60.0) -> list[str]:
    """Lines of ``proc``'s stdout until ``found(line)`` is true."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if found(line):
                return lines
    raise AssertionError(f"not seen within {timeout}s; got {lines[-3:]}")


def _popen(home: Path, *argv: str) -> subprocess.Popen:
    # Ctrl-C as a terminal sends it: a process started with SIGINT ignored (by a pytest-xdist
    # worker, or as a background job of a shell) keeps it ignored and would never see one
    return subprocess.Popen([sys.executable, "-m", "cei_actors.cli", "--home", str(home), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_watch_prints_the_list_again_when_it_changes(home: Path) -> None:
    watch = _popen(home, "process", "list", "--watch", "--interval", "0.2", "--json")
    try:
        first = json.loads(_lines_until(watch, lambda line: True)[0])
        assert "watched-1" not in {p["upid"] for p in first}
        data(home, "process", "schedule", "--upid", "watched-1", "--", "sleep", "300")
        lines = _lines_until(watch, lambda line: "watched-1" in line)
        assert all(isinstance(json.loads(line), list) for line in lines)  # one document a line
    finally:
        code, err = _interrupt(watch)
    assert code == 0 and err == ""
    data(home, "process", "terminate", "watched-1")
    for argv in (("node", "list"), ("domain", "list"), ("status",)):
        proc = _popen(home, *argv, "--watch", "--json")
        try:
            json.loads(_lines_until(proc, lambda line: True)[0])
        finally:
            code, err = _interrupt(proc)
        assert code == 0 and err == "", argv


def test_watch_redraws_on_a_change_in_the_logs_not_on_the_interval(home: Path) -> None:
    """With the logs followed (S2), a watch prints a change at once, whatever its poll
    interval (UX5): here 120 s, so only the change can have caused the new version."""
    watch = _popen(home, "process", "list", "--watch", "--interval", "120", "--json")
    try:
        _lines_until(watch, lambda line: True)
        t0 = time.monotonic()
        data(home, "process", "schedule", "--upid", "watched-2", "--", "sleep", "300")
        _lines_until(watch, lambda line: "watched-2" in line, timeout=60)
        assert time.monotonic() - t0 < 60
    finally:
        code, err = _interrupt(watch)
    assert code == 0 and err == ""
    data(home, "process", "terminate", "watched-2")


def test_log_show_follow_prints_new_events(home: Path) -> None:
    head = {s["stream"]: s["head"] for s in data(home, "log", "streams")}["pd"]
    follow = _popen(home, "--json", "log", "show", "pd", "--from", str(head), "--follow")
    try:
        _lines_until(follow, lambda line: json.loads(line)["offset"] == head)
        data(home, "process", "schedule", "--upid", "followed-1", "--", "true")
        lines = _lines_until(follow, lambda line: "followed-1" in line)
        assert json.loads(lines[-1])["type"] == "ProcessScheduled"
    finally:
        code, err = _interrupt(follow)
    assert code == 0 and err == ""
    bounded = human(home, "log", "show", "pd", "--from", "1", "--to", "2", "--follow")
    assert [line.split()[0] for line in bounded.stdout.splitlines()] == ["1", "2"]
    assert re.match(r"\s+1 e\d+ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z? ", bounded.stdout)


def _on_a_terminal(argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run ``cei ARGV`` with stdout and stderr on a pseudo-terminal; its exit status and output."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "cei_actors.cli", *argv])
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_only(home: Path) -> None:
    data(home, "process", "schedule", "--upid", "slow-start", "--", "sh", "-c", "sleep 3")
    code, shown = _on_a_terminal(["--home", str(home), "process", "wait", "slow-start", "--state", "EXITED",
                                  "--timeout", "60"])
    assert code == 0 and "waiting for slow-start" in shown and "slow-start EXITED (round 0)" in shown
    data(home, "process", "restart", "slow-start")
    piped = human(home, "process", "wait", "slow-start", "--state", "EXITED", "--timeout", "60")
    assert piped.stdout == "slow-start EXITED (round 1)\n" and piped.stderr == ""


def test_output_files_are_found_on_local_site_and_static_nodes(tmp_path: Path) -> None:
    """``process logs`` finds the files real agents wrote, in both node layouts a system has."""
    from cei_actors.cli.process import output_file
    from cei_actors.eeagent.supervisor import ProcessSupervisor

    site, static = tmp_path / "nodes", tmp_path / "static"
    for state_dir, upid, rnd in ((site / "nodes" / "local-000001" / "eeagent", "on-site", 0),
                                 (static / "n2", "on-static", 3)):
        with ProcessSupervisor(state_dir, 1, output_retention=None) as sup:
            sup.launch(upid, rnd, ["sh", "-c", f"echo {upid}; echo err >&2"])
            sup.wait(upid, rnd, timeout=30)
            sup.cleanup(upid, rnd)
    found = output_file([site, static], "on-site", 0, ".out")
    assert found is not None and found.read_text() == "on-site\n"
    assert output_file([site, static], "on-static", 3, ".err").read_text() == "err\n"
    assert output_file([site, static], "on-static", 2, ".out") is None
    assert output_file([site], "on-static", 3, ".out") is None


def test_a_connection_waits_on_the_logs_not_by_asking_again(home: Path) -> None:
    """``cei process wait`` and ``ha wait`` (and any ``connect()`` user) follow the logs: a wait
    that would only ask again after 30 s returns as soon as the PD records the change."""
    from cei_actors.launch.launcher import connect

    data(home, "process", "schedule", "--upid", "waited-on", "--restart-mode", "never", "--",
         "sh", "-c", "sleep 1")
    with connect(home) as conn:
        pd = conn.pd
        assert pd.changes is not None
        t0 = time.monotonic()
        ended = pd.wait_process("waited-on", ["EXITED", "FAILED", "TERMINATED"], timeout=60, every=30)
        assert ended["state"] in ("EXITED", "FAILED", "TERMINATED")
        assert time.monotonic() - t0 < 25
        watcher = conn.watcher()
        assert watcher.running
    assert not watcher.running  # closing the connection stops its watcher
