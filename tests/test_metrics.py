"""Prometheus metrics: the collector's rendering, the runner's counts, the plan key, and a real
system scraped over HTTP (urllib) against ``cei status --json`` / ``cei process list --json``."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_for as poll

from cei_actors.cli.metrics import parse
from cei_actors.embed import CEI
from cei_actors.eventlog import open_log
from cei_actors.launch.plan import PlanError, default_plan_text, load_plan
from cei_actors.runtime.example import Add, Counters
from cei_actors.runtime.metrics import Histogram, Reports, make_report
from cei_actors.runtime.runner import Runner
from tests.test_cli_e2e import cei, cleanup, data, leftovers, run_cli
from tests.test_launch_system import make_plan

# ------------------------------------------------------------------------------ the collector


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scrape_reports(reports: Reports) -> dict[str, list[Any]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(reports)
    text = generate_latest(registry).decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(text)}


def test_reports_render_counters_gauges_histograms_and_go_stale() -> None:
    clock = Clock()
    reports = Reports(clock)
    hist = Histogram((0.01, 0.1))
    for v in (0.005, 0.05, 0.05, 3.0):
        hist.observe(v)
    reports.add(make_report("pd.1", "pd", 1.0, [
        ("cei_appends", {}, 7), ("cei_pd_processes", {"state": "RUNNING"}, 3),
    ], [("cei_append_seconds", {}, hist)]))
    got = scrape_reports(reports)
    base = {"component": "pd", "replica": "pd.1"}
    assert got["cei_up"] == [("cei_up", base, 1.0)]
    assert got["cei_appends"] == [("cei_appends_total", base, 7.0)]
    assert got["cei_pd_processes"] == [("cei_pd_processes", {**base, "state": "RUNNING"}, 3.0)]
    buckets = {s[1]["le"]: s[2] for s in got["cei_append_seconds"] if s[0].endswith("_bucket")}
    assert buckets == {"0.01": 1.0, "0.1": 3.0, "+Inf": 4.0}
    assert ("cei_append_seconds_count", base, 4.0) in got["cei_append_seconds"]
    assert ("cei_append_seconds_sum", base, pytest.approx(3.105)) in got["cei_append_seconds"]

    clock.now += 60  # silent for longer than 3 intervals and 5 s: up 0, figures dropped
    got = scrape_reports(reports)
    assert got["cei_up"] == [("cei_up", base, 0.0)] and "cei_appends" not in got


def test_the_runner_counts_appends_by_event_type_and_their_latency() -> None:
    runner = Runner(Counters(), open_log("memory://metrics-runner"), snapshot_every=2)
    runner.recover()
    runner.handle_many([Add("a", 1), Add("b", 2)])
    runner.handle(Add("a", 3))
    stats = runner.log_stats
    assert stats.appends == 2
    assert sum(stats.events.values()) == 3 and len(stats.events) == 1
    assert sum(stats.append_seconds.counts) == 2 and stats.append_seconds.total > 0
    assert stats.snapshots == 1 and stats.snapshot_bytes > 0


# ------------------------------------------------------------------------------ the plan key


def test_plan_metrics_key(tmp_path: Path) -> None:
    assert load_plan(None, home=tmp_path).metrics == {"port": 0, "address": "127.0.0.1", "interval": 1.0}

    def plan(metrics: Any) -> Any:
        raw = yaml.safe_load(default_plan_text())
        raw["metrics"] = metrics
        path = tmp_path / "plan.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_plan(path, home=tmp_path).metrics

    assert plan(False) is None and plan("off") is None
    assert plan({"port": 9464}) == {"port": 9464, "address": "127.0.0.1", "interval": 1.0}
    for bad, key in (({"port": 70000}, "metrics.port"), ({"address": "localhost"}, "metrics.address"),
                     ({"interval": 0}, "metrics.interval"), ({"prot": 1}, "metrics.prot")):
        with pytest.raises(PlanError, match=key.replace(".", r"\.")):
            plan(bad)


# ------------------------------------------------------------------------------ a real system


def listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of every socket listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:
                out.append(address)
    return out


def samples(families: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for f in families for s in f["samples"] if s["name"] == name]


@pytest.fixture
def home(tmp_path: Path):
    path = tmp_path / "cei"
    try:
        yield path
    finally:
        cleanup(path)


def test_a_running_system_is_scraped_and_agrees_with_status(home: Path, tmp_path: Path) -> None:
    plan = make_plan(tmp_path, pd=2)
    info = data(home, "up", "--plan", str(plan))
    where = info["metrics"]
    assert where["address"] == "127.0.0.1" and where["port"] > 0
    assert where["url"] == f"http://127.0.0.1:{where['port']}/metrics"
    # loopback only: every listener on the port is 127.0.0.1 (0100007F), none on 0.0.0.0 or ::
    assert listeners(where["port"]) == ["0100007F"]

    for i in range(3):
        cei(home, "process", "schedule", "--upid", f"m{i}", "--", "sleep", "60")
    for i in range(3):
        cei(home, "process", "wait", f"m{i}", "--state", "RUNNING", "--timeout", "60")

    def agree() -> dict[str, Any] | None:
        """the scraped figures equal cei status --json and cei process list --json"""
        status = data(home, "status")
        procs = data(home, "process", "list")
        with urllib.request.urlopen(where["url"], timeout=10) as response:
            assert response.status == 200
            families = parse(response.read().decode())
        by_state: dict[str, int] = {}
        for p in procs:
            by_state[p["state"]] = by_state.get(p["state"], 0) + 1
        scraped = {s["labels"]["state"]: int(s["value"]) for s in samples(families, "cei_pd_processes")}
        nodes = {s["labels"]["state"]: int(s["value"]) for s in samples(families, "cei_provisioner_nodes")}
        leaders = {s["labels"]["replica"]: s["value"] for s in samples(families, "cei_leader")}
        epochs = {s["labels"]["replica"]: s["value"] for s in samples(families, "cei_epoch")}
        want_leaders = {r["name"]: 1.0 if r["leader"] and r["mode"] == "ready" else 0.0
                        for rs in status["components"].values() for r in rs}
        want_epochs = {r["name"]: float(r["epoch"]) for rs in status["components"].values() for r in rs}
        need = {s["labels"]["engine"]: s["value"] for s in samples(families, "cei_pd_engine_need")}
        have = {s["labels"]["domain"]: s["value"] for s in samples(families, "cei_epum_domain_have")}
        ok = (scraped == by_state == status["processes"] == {"RUNNING": 3}
              and nodes == status["node_counts"]
              and {k: v for k, v in leaders.items() if not k.startswith("eeagent")} == want_leaders
              and {k: v for k, v in epochs.items() if not k.startswith("eeagent")} == want_epochs
              and all(need.get("default") == d["need"] and have.get(d["domain_id"]) == d["instances"]
                      for d in status["domains"]))
        return families if ok else None

    families = poll(agree, timeout=30, every=0.5)
    # the standby reports too, as not leading, with no state figures (nothing counted twice)
    assert {s["labels"]["replica"] for s in samples(families, "cei_pd_processes")} == {"pd"}
    assert {s["labels"]["replica"]: s["value"] for s in samples(families, "cei_up")}["pd.1"] == 1.0
    [launches] = [s for s in samples(families, "cei_launches_total") if s["labels"]["replica"] == "pd"]
    assert launches["value"] >= 3
    assert sum(s["value"] for s in samples(families, "cei_heartbeats_received_total")) > 0
    assert [s for s in samples(families, "cei_append_seconds_count") if s["value"] > 0]
    agents = {s["labels"]["replica"]: s["value"] for s in samples(families, "cei_eeagent_processes")
              if s["labels"]["state"] == "RUNNING"}
    assert sum(agents.values()) == 3

    # `cei metrics` names the URL and prints the same samples
    shown = json.loads(cei(home, "metrics", "cei_pd_").stdout)
    assert shown["url"] == where["url"] and {f["name"] for f in shown["metrics"]} >= {"cei_pd_processes"}
    assert all(f["name"].startswith("cei_pd_") for f in shown["metrics"])
    text = run_cli("--home", str(home), "metrics", "cei_pd_processes")
    assert text.returncode == 0
    assert text.stdout.splitlines() == [
        f"# metrics from {where['url']}",
        'cei_pd_processes{component="pd",replica="pd",state="RUNNING"} 3',
    ]
    assert f"metrics: {where['url']}" in run_cli("--home", str(home), "status").stdout

    # `down` stops the endpoint with the system
    collector = info["pids"]["metrics"]
    cei(home, "down")
    assert listeners(where["port"]) == [] and not Path(f"/proc/{collector}").exists()
    gone = run_cli("--home", str(home), "metrics")
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr == f"cei: system not up (no {home / 'system.json'}): run cei up\n"


def test_metrics_off_serves_nothing_and_says_so(home: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(make_plan(tmp_path).read_text())
    raw["metrics"] = "off"
    plan = tmp_path / "off.yaml"
    plan.write_text(yaml.safe_dump(raw))
    info = data(home, "up", "--plan", str(plan))
    assert info["metrics"] is None and "metrics" not in info["pids"]
    got = run_cli("--home", str(home), "metrics")
    assert got.returncode == 1 and got.stdout == ""
    assert got.stderr == f"cei: the system in {home} serves no metrics (its plan says `metrics: off`)\n"


def test_a_busy_port_fails_up_in_one_line_and_leaves_nothing(home: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        raw = yaml.safe_load(make_plan(tmp_path).read_text())
        raw["metrics"] = {"port": port}
        plan = tmp_path / "busy.yaml"
        plan.write_text(yaml.safe_dump(raw))
        got = run_cli("--home", str(home), "up", "--plan", str(plan))
    assert got.returncode == 1
    assert got.stderr == (f"cei: up failed: cannot serve metrics on 127.0.0.1:{port}: Address already "
                          "in use (the plan's metrics: port, address)\n")
    assert not (home / "system.json").exists()
    assert leftovers(home) == []


def test_embedded_static_agents_report_to_the_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "log": "sqlite:///${home}/log.sqlite",
        "components": {"pd": {"config": {"dispatch_retry_seconds": 2.0}}},
        "pd": {"engines": {"e1": {"slots": 2, "heartbeat_period": 0.5}}},
        "static_nodes": [{"node_id": "n1"}],
        "metrics": {"interval": 0.2},
    }))
    with CEI(load_plan(path, home=tmp_path), home=tmp_path) as system:
        url = system.info["metrics"]["url"]
        system.pd.schedule_process("p1", command=["sleep", "60"])
        system.pd.wait_process("p1", ["RUNNING"], timeout=30)

        def running_on_n1() -> list[dict[str, Any]] | None:
            """the static agent reports its RUNNING process"""
            with urllib.request.urlopen(url, timeout=10) as response:
                families = parse(response.read().decode())
            found = [s for s in samples(families, "cei_eeagent_processes")
                     if s["labels"] == {"component": "eeagent", "replica": "eeagent:n1", "state": "RUNNING"}
                     and s["value"] == 1.0]
            return families if found else None

        families = poll(running_on_n1, timeout=30)
        [launched] = [s for s in samples(families, "cei_launches_total")
                      if s["labels"]["replica"] == "eeagent:n1"]
        assert launched["value"] == 1.0
    with pytest.raises(OSError):  # stopped with the system
        urllib.request.urlopen(url, timeout=5)


def test_state_figures_of_ha_and_the_provisioner() -> None:
    from cei_actors.ha import state as ha_state
    from cei_actors.ha.actor import metrics as ha_metrics
    from cei_actors.ha.events import CopyScheduled, CopyTerminating, GroupCreated
    from cei_actors.provisioner.actor import metrics as provisioner_metrics
    from cei_actors.provisioner.state import Node, ProvisionerState

    s = ha_state.HAState()
    for event in (GroupCreated("g", "npreserving", {"preserve_n": 3}, {"command": ["true"]}, ["pd"], 3, 0.0),
                  CopyScheduled("g", "u1", "pd", 0.0), CopyScheduled("g", "u2", "pd", 0.0),
                  CopyTerminating("g", ["u2"], "scale down", 0.0)):
        s = ha_state.apply(s, event)
    assert ha_metrics(s) == [("cei_ha_groups", {}, 1.0), ("cei_ha_group_target", {"group": "g"}, 3.0),
                             ("cei_ha_group_copies", {"group": "g"}, 1.0)]

    p = ProvisionerState()
    for nid, st in (("a", "RUNNING"), ("b", "RUNNING"), ("c", "FAILED")):
        p.nodes[nid] = Node(nid, "l1", None, st)
    assert provisioner_metrics(p)[:2] == [("cei_provisioner_nodes", {"state": "FAILED"}, 1.0),
                                          ("cei_provisioner_nodes", {"state": "RUNNING"}, 2.0)]
