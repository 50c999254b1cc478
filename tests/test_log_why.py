"""``cei log why/trace/state/diff`` on real SQLite logs written by the real PD and EPUM cores.

Each reason ``why`` names is produced by driving the components into it, then read back from
the log at the offsets where it held and where it no longer did.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pd_harness import ENGINE, Sim, config

from cei_actors.cli import main
from cei_actors.debug import Replay, trace, why
from cei_actors.epum.logic import EPUM
from cei_actors.epum.messages import AddDomainDefinition, DeciderPass
from cei_actors.eventlog import PendingEvent, open_log
from cei_actors.pd import states as ps
from cei_actors.pd.messages import KillProcess, ScheduleProcess, SetSystemBoot
from cei_actors.runtime.core import Send
from cei_actors.runtime.runner import Runner

T0 = 1_790_000_000.0  # 2026-09-21: record times a person can read


def url_in(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'log.sqlite'}"


def pd_sim(tmp_path: Path, **over: Any) -> Sim:
    sim = Sim(config(static_resources=True, **over), url=url_in(tmp_path))
    sim.now = T0
    return sim


def head(sim: Sim) -> int:
    return sim.runner.head


def ask(url: str, entity: str, at: Any = None, now: float | None = None) -> dict[str, Any]:
    with Replay(url, now=now) as r:
        return why(r, entity, at)


def reasons(answer: dict[str, Any]) -> list[str]:
    return [b["reason"] for b in answer["blockers"]]


def node_verdict(answer: dict[str, Any], node_id: str) -> dict[str, Any]:
    [v] = [v for v in answer["nodes"] if v["node_id"] == node_id]
    return v


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- a reason per test ------------------------------------------------------------------------


def test_why_constraint_names_key_wanted_and_had(tmp_path):
    sim = pd_sim(tmp_path)
    sim.add_node("n1", site="here")
    sim.ok(ScheduleProcess("p1", command=["true"], constraints={"site": "nowhere"}))
    assert sim.pstate("p1") == ps.WAITING
    waiting = head(sim)
    sim.now += 5
    sim.add_node("n2", site="nowhere")
    assert sim.pstate("p1") in ps.PLACED
    answer = ask(sim.url, "p1", waiting)
    assert answer["kind"] == "process" and answer["state"] == ps.WAITING
    v = node_verdict(answer, "n1")
    assert (v["reason"], v["key"], v["wanted"], v["had"]) == ("constraint", "site", "nowhere", "here")
    assert "constraint site: wanted 'nowhere', had 'here'" in v["text"]
    assert [h["type"] for h in answer["history"]] == ["ProcessScheduled", "ProcessMoved"]
    later = ask(sim.url, "p1")
    assert later["state"] in ps.PLACED and later["node_id"] == "n2" and later["nodes"] == []
    before = ask(sim.url, "p1", 1)  # the first node's NodeAdded: the process comes later
    assert before["state"] is None and reasons(before) == ["not_yet"] and before["history"] == []
    domain = ask(sim.url, f"pd_domain_{ENGINE}")  # a log without EPUM: the PD's nodes name it
    assert domain["kind"] == "domain" and len(domain["state"]["nodes"]) == 2


def test_why_no_free_slot_until_one_frees(tmp_path):
    sim = pd_sim(tmp_path)  # 2 slots per agent
    sim.add_node("n1")
    for upid in ("a", "b", "c"):
        sim.ok(ScheduleProcess(upid, command=["true"]))
    sim.heartbeat_all()
    assert sim.pstate("c") == ps.WAITING
    full = head(sim)
    sim.now += 1
    sim.finish("a")
    sim.heartbeat_all()
    assert sim.pstate("c") in ps.PLACED
    v = node_verdict(ask(sim.url, "c", full), "n1")
    assert (v["reason"], v["slots"], v["assigned"], v["foreign"]) == ("no_free_slot", 2, 2, 0)
    assert ask(sim.url, "c")["state"] in ps.PLACED


def test_why_engine_missing(tmp_path):
    engines = {ENGINE: {"slots": 2}, "gpu": {"slots": 1}}
    sim = pd_sim(tmp_path, engines=engines)
    sim.add_node("n1")
    sim.ok(ScheduleProcess("g", command=["true"], execution_engine_id="gpu"))
    answer = ask(sim.url, "g")
    assert answer["state"] == ps.WAITING and reasons(answer) == ["engine_missing"]
    assert answer["blockers"][0]["other_engines"] == [ENGINE]
    v = node_verdict(answer, "n1")
    assert (v["reason"], v["wanted"], v["had"]) == ("engine", "gpu", ENGINE)


def test_why_node_exclusive_names_the_holder(tmp_path):
    sim = pd_sim(tmp_path)
    sim.add_node("n1")
    sim.ok(ScheduleProcess("x1", command=["true"], node_exclusive="db"))
    sim.ok(ScheduleProcess("x2", command=["true"], node_exclusive="db"))
    taken = head(sim)
    v = node_verdict(ask(sim.url, "x2", taken), "n1")
    assert (v["reason"], v["tag"], v["held_by"]) == ("node_exclusive", "db", "x1")
    sim.now += 1
    sim.add_node("n2")
    assert node_verdict(ask(sim.url, "x2", taken), "n1")["reason"] == "node_exclusive"
    assert ask(sim.url, "x2")["node_id"] == "n2"


def test_why_throttled_until_the_interval_passes(tmp_path):
    sim = pd_sim(tmp_path)
    sim.add_node("n1")
    conf = {"process": {"minimum_time_between_starts": 100.0}}
    sim.ok(ScheduleProcess("t", command=["true"], restart_mode="ALWAYS", configuration=conf))
    for _ in range(2):  # two dispatches are free; the third waits for the interval
        sim.heartbeat_all()
        sim.now += 1
        sim.finish("t", ps.FAILED)
        sim.heartbeat_all()
    assert sim.pstate("t") == ps.WAITING
    answer = ask(sim.url, "t")
    [b] = answer["blockers"]
    assert b["reason"] == "throttled" and b["until"] == pytest.approx(T0 + 1 + 100.0)
    assert node_verdict(answer, "n1")["reason"] == "fits"  # a slot is there: only the throttle holds it
    assert ask(sim.url, "t", now=T0 + 200)["blockers"][0]["reason"] == "throttled"  # at the head's time


def test_why_system_boot_parks_the_process(tmp_path):
    sim = pd_sim(tmp_path)
    sim.add_node("n1")
    sim.ok(ScheduleProcess("s", command=["true"]))
    sim.heartbeat_all()
    running = head(sim)
    sim.now += 1
    sim.ok(SetSystemBoot(True))
    assert sim.pstate("s") == ps.UNSCHEDULED_PENDING
    answer = ask(sim.url, "s")
    assert reasons(answer) == ["system_boot"] and answer["blockers"][0]["system_boot"] is True
    assert answer["nodes"] == []  # the boot removed every node
    assert ask(sim.url, "s", running)["state"] == ps.RUNNING


# ---- reasons that come from EPUM: the PD and EPUM cores on one log -----------------------------


class World:
    """A PD (harness) and a real EPUM core on the same SQLite log; the PD's messages to EPUM
    are delivered and a decider pass follows each; EPUM's launches go nowhere (no cloud)."""

    def __init__(self, tmp_path: Path, **engine: Any) -> None:
        self.url = url_in(tmp_path)
        self.pd = Sim(config(engines={ENGINE: {"slots": 1, **engine}}), url=self.url)
        self.pd.now = T0
        self.epum = Runner(EPUM({"timers": False}), open_log(self.url), clock=lambda: self.pd.now,
                           rng=random.Random(3))
        self.epum.recover()
        self.epum.handle(AddDomainDefinition("pd_default", {
            "general": {"engine_class": "needy"}, "engine_conf": {}, "health": {}}))
        self.relay()  # the PD's AddDomain and SubscribeDomain from its recovery

    def relay(self) -> None:
        while True:
            sends = [s for s in self.pd.sent if isinstance(s, Send) and s.to == "epum"]
            self.pd.sent = [s for s in self.pd.sent if s not in sends]
            if not sends:
                return
            for s in sends:
                self.epum.handle(s.message)
            self.epum.handle(DeciderPass())

    def do(self, message: Any) -> Any:
        out = self.pd.ok(message)
        self.relay()
        return out


def test_why_no_node_yet_names_the_registered_need(tmp_path):
    w = World(tmp_path)
    w.do(ScheduleProcess("p", command=["true"]))
    answer = ask(w.url, "p")
    [b] = answer["blockers"]
    assert b["reason"] == "no_node" and b["need"] == 1 and b["domain_id"] == f"pd_domain_{ENGINE}"
    assert b["instances"] == {"REQUESTING": 1}
    assert answer["at"]["offsets"]["epum"] > 0


def test_why_engine_at_capacity(tmp_path):
    w = World(tmp_path, maximum_vms=1)
    w.do(ScheduleProcess("p1", command=["true"]))
    w.do(ScheduleProcess("p2", command=["true"]))
    w.pd.now += 5
    w.pd.add_node("n1")
    w.relay()
    answer = ask(w.url, "p2")
    assert answer["state"] == ps.WAITING
    assert node_verdict(answer, "n1")["reason"] == "no_free_slot"
    [b] = answer["blockers"]
    assert (b["reason"], b["need"], b["maximum_vms"]) == ("engine_at_capacity", 1, 1)


def test_why_destroyed_node_shows_the_engine_decision(tmp_path):
    w = World(tmp_path)
    w.do(ScheduleProcess("p", command=["true"]))
    with Replay(w.url) as r:
        epum = r.state("epum", r.head("epum"))
    [iid] = list(epum.instances)
    alive = w.epum.head
    w.pd.now += 10
    w.do(KillProcess("p"))
    answer = ask(w.url, iid)
    assert answer["kind"] == "node"
    [d] = answer["destroyed"]
    assert d["decision"] == {"engine": "needy", "rule": "scale down",
                             "figures": {"valid": 1, "target": 0, "retirable_first": []}}
    assert "engine needy rule 'scale down' (valid=1, target=0" in d["text"]
    types = [h["type"] for h in answer["history"]]
    assert types[0] == "InstanceLaunchRequested" and "InstanceDestroyRequested" in types
    with Replay(w.url) as r:
        assert why(r, iid, alive, "epum")["destroyed"] == []


def test_a_destroy_recorded_without_figures_still_reads(tmp_path):
    url = url_in(tmp_path)
    log = open_log(url)
    fence = log.acquire("epum")
    log.append(fence, 0, [PendingEvent("InstanceDestroyRequested", 1, T0,
                                       {"instance_ids": ["i-old"], "reason": "scale down", "at": T0})])
    log.close()
    [d] = ask(url, "i-old")["destroyed"]
    assert d["decision"] is None and "figures not recorded" in d["text"]


# ---- times, entities, trace ---------------------------------------------------------------------


def test_at_takes_offsets_iso_times_and_relative_times(tmp_path, capsys):
    sim = pd_sim(tmp_path)
    sim.add_node("n1", site="here")
    sim.ok(ScheduleProcess("p", command=["true"], constraints={"site": "x"}))
    waiting_at = head(sim)
    sim.now = T0 + 600
    sim.add_node("n2", site="x")
    iso = datetime.fromtimestamp(T0 + 300, UTC).isoformat()
    assert ask(sim.url, "p", iso)["state"] == ps.WAITING
    assert ask(sim.url, "p", iso)["at"]["offsets"]["pd"] == waiting_at
    assert ask(sim.url, "p", "-10m", now=T0 + 900)["state"] == ps.WAITING  # T0 + 300
    assert ask(sim.url, "p", "-1m", now=T0 + 900)["state"] in ps.PLACED
    code, out, _ = cli(capsys, "--log", sim.url, "log", "why", "p", "--at", iso)
    assert code == 0 and "WAITING" in out and "2026-09-21 " in out
    assert "constraint site: wanted 'x', had 'here'" in out
    code, _, err = cli(capsys, "--log", sim.url, "log", "why", "p", "--at", "yesterday")
    assert code == 1 and err.count("\n") == 1 and "--at yesterday:" in err


def test_state_and_diff_by_entity(tmp_path, capsys):
    sim = pd_sim(tmp_path)
    sim.add_node("n1")
    for i in range(9):
        sim.ok(ScheduleProcess(f"p{i}", command=["sleep", "1"]))
    sim.heartbeat_all()
    a = head(sim)
    sim.now += 1
    sim.finish("p0")
    sim.heartbeat_all()
    b = head(sim)
    code, out, _ = cli(capsys, "--json", "--log", sim.url, "log", "state", "pd", "p0", "--at", str(a))
    data = json.loads(out)
    assert code == 0 and list(data) == ["processes"] and [p["upid"] for p in data["processes"]] == ["p0"]
    code, out, _ = cli(capsys, "--json", "--log", sim.url, "log", "state", "pd", "--entity", "n1")
    data = json.loads(out)  # the node, its agent and the processes placed there
    assert set(data) == {"nodes", "resources", "processes"} and len(data["nodes"]) == 1
    assert {p["node_id"] or p["last_node_id"] for p in data["processes"]} == {"n1"}  # or ran there
    code, out, _ = cli(capsys, "--json", "--log", sim.url, "log", "diff", "pd", str(a), str(b), "--entity", "p0")
    changes = {c["path"]: c for c in json.loads(out)}
    assert changes["processes.p0.state"]["before"] == ps.RUNNING
    assert changes["processes.p0.state"]["after"] == ps.EXITED
    assert all(path.startswith("processes.p0.") for path in changes)
    code, out, _ = cli(capsys, "--log", sim.url, "log", "diff", "pd", str(a), str(b))
    assert "processes.p0.state" in out and "processes.p3" not in out  # only what changed
    assert len(out) < 2000


def test_trace_follows_a_process_to_its_node_and_need(tmp_path):
    w = World(tmp_path)
    w.do(ScheduleProcess("p", command=["true"]))
    with Replay(w.url) as r:
        [iid] = list(r.state("epum", r.head("epum")).instances)
    w.pd.now += 5
    w.pd.add_node(iid)  # the launched instance comes up and its agent reports
    w.relay()
    assert w.pd.pstate("p") in ps.PLACED
    with Replay(w.url) as r:
        rows = trace(r, "p")
    types = [(h["stream"], h["type"]) for h in rows]
    assert ("epum", "NeedRegistered") in types and ("epum", "InstanceLaunchRequested") in types
    assert ("pd", "NodeAdded") in types and ("pd", "ProcessAssigned") in types
    order = [t for _, t in types]
    assert order.index("NeedRegistered") < order.index("InstanceLaunchRequested") < order.index("NodeAdded") \
        < order.index("ProcessAssigned")
    assert all(h["body"].get("upid") in (None, "p") for h in rows)


# ---- reading never writes; damage is one line ---------------------------------------------------


def _fingerprint(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes())
            for p in sorted(directory.iterdir()) if p.is_file()}


def test_no_log_command_writes(tmp_path, capsys):
    w = World(tmp_path)
    w.do(ScheduleProcess("p", command=["true"]))
    w.epum.log.close()
    w.pd.runner.log.close()
    before = _fingerprint(tmp_path)
    url = w.url
    for argv in (["streams"], ["show", "pd"], ["state", "pd"], ["state", "pd", "p", "--at", "2"],
                 ["diff", "pd", "1", "3"], ["check", "pd"], ["check", "epum"], ["why", "p"],
                 ["trace", "p"], ["why", "nosuch"]):
        cli(capsys, "--log", url, "log", *argv)
        assert _fingerprint(tmp_path) == before, argv
    cli(capsys, "--log", f"sqlite:///{tmp_path / 'none.sqlite'}", "log", "streams")
    assert _fingerprint(tmp_path) == before and not (tmp_path / "none.sqlite").exists()


def test_foreign_and_damaged_logs_are_one_line_errors(tmp_path, capsys):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(os.urandom(8192))
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    for path, words in ((junk, "damaged or not a log"), (other, "not a cei log")):
        before = path.read_bytes()
        code, out, err = cli(capsys, "--log", f"sqlite:///{path}", "log", "why", "p")
        assert code == 1 and out == "" and err.count("\n") == 1 and words in err, err
        assert path.read_bytes() == before
    # a good log with one batch damaged: the error names the stream and the offset
    sim = pd_sim(tmp_path / "good")
    sim.add_node("n1")
    sim.ok(ScheduleProcess("p", command=["true"]))
    sim.runner.log.close()
    path = tmp_path / "good" / "log.sqlite"
    db = sqlite3.connect(path)
    [(first,)] = db.execute("SELECT first FROM batches WHERE stream='pd' ORDER BY first DESC LIMIT 1")
    db.execute("UPDATE batches SET blob = ? WHERE stream='pd' AND first = ?", (b"\x00" * 40, first))
    db.commit()
    db.close()
    for argv in (["why", "p"], ["state", "pd"], ["show", "pd"], ["trace", "p"], ["check", "pd"]):
        code, out, err = cli(capsys, "--log", f"sqlite:///{path}", "log", *argv)
        assert code == 1 and err.count("\n") == 1 and f"at offset {first}" in err, (argv, err)
        assert "Traceback" not in err


# ---- a real system's log: SQLite and ZooKeeper --------------------------------------------------


def _log_json(capsys, *argv: str) -> Any:
    code, out, err = cli(capsys, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def _zk_tree(client: Any, path: str) -> dict[str, tuple[int, int, int]]:
    """Every znode under ``path`` with its (mzxid, pzxid, version): a write of any kind shows."""
    out = {}
    stack = [path]
    while stack:
        p = stack.pop()
        _, stat = client.get(p)
        out[p] = (stat.mzxid, stat.pzxid, stat.version)
        stack += [f"{p.rstrip('/')}/{c}" for c in client.get_children(p)]
    return out


@pytest.mark.parametrize("log", ["sqlite", "zk"])
def test_state_at_head_equals_status_and_describe_on_a_real_system(tmp_path, log, request, capsys):
    from test_launch_system import make_plan

    from cei_actors.cli.system import collect_status
    from cei_actors.launch.launcher import connect, down, read_info, up
    from cei_actors.launch.plan import load_plan

    home = tmp_path / "home"
    zk_hosts = request.getfixturevalue("zk_hosts") if log == "zk" else None
    plan = load_plan(make_plan(tmp_path), home=home, log_url=f"zk://{zk_hosts}" if zk_hosts else None)
    up(plan, home)
    try:
        url = read_info(home)["log_url"]
        with connect(home) as conn:
            pd = conn.pd
            pd.schedule_process("long", command=["sleep", "30"], restart_mode="never")
            pd.schedule_process("held", command=["true"], constraints={"site": "nowhere"})
            assert pd.wait_process("long", "RUNNING", timeout=40)["state"] == "RUNNING"
            assert pd.wait_process("held", "WAITING", timeout=10)["state"] == "WAITING"
            for _ in range(20):  # the system runs on: compare when nothing was appended meanwhile
                status = collect_status(conn)
                described = {p["upid"]: p for p in pd.describe_processes()}
                state = _log_json(capsys, "--home", str(home), "log", "state", "pd", "--at", "HEAD")
                heads = {s["stream"]: s["head"] for s in _log_json(capsys, "--home", str(home), "log", "streams")}
                again = collect_status(conn)
                if all(again["components"][c][0]["head"] == status["components"][c][0]["head"] == heads[c]
                       for c in ("pd", "epum")):
                    break
            else:
                raise AssertionError("the system never held still long enough to compare")
    finally:
        down(home)
    procs = {p["upid"]: p for p in state["processes"]}
    assert set(procs) == set(described) == {"long", "held"}
    for upid, d in described.items():
        p = procs[upid]
        assert (p["state"], p["round"], p["node_id"], p["resource_id"], p["starts"], p["dispatches"], p["msg"]) \
            == (d["state"], d["round"], d["node_id"], d["assigned"], d["starts"], d["dispatches"], d["msg"]), upid
    counts: dict[str, int] = {}
    for p in procs.values():
        counts[p["state"]] = counts.get(p["state"], 0) + 1
    assert counts == {k: v for k, v in status["processes"].items() if v}
    logged = {r["resource_id"]: (r["node_id"], r["slots"], r["state"]) for r in state["resources"]}
    shown = {r["resource_id"]: (r["node_id"], r["slots"], r["state"]) for r in status["resources"]}
    assert logged == shown and logged
    for r in status["resources"]:
        placed = sorted(p["upid"] for p in procs.values() if p["resource_id"] == r["resource_id"])
        assert placed == sorted(u for u, _ in r["assigned"])
    assert {n["node_id"] for n in state["nodes"]} == {n["node_id"] for n in status["nodes"]}

    # the down system's log answers why and trace, and reading it writes nothing
    answer = _log_json(capsys, "--log", url, "log", "why", "held")
    assert answer["state"] in ("WAITING", "TERMINATED")  # down terminates what ran
    if zk_hosts:
        from kazoo.client import KazooClient

        server, chroot = zk_hosts.split("/", 1)
        client = KazooClient(hosts=server)
        client.start(timeout=15)
        try:
            before = _zk_tree(client, f"/{chroot}")
            for argv in (["streams"], ["why", "long"], ["trace", "long"], ["state", "pd"], ["check", "pd"]):
                cli(capsys, "--log", url, "log", *argv)
            code, _, err = cli(capsys, "--log", f"zk://{server}/{chroot}-none", "log", "streams")
            assert code == 1 and "no log at" in err
            assert _zk_tree(client, f"/{chroot}") == before
            assert client.exists(f"/{chroot}-none") is None
        finally:
            client.stop()
            client.close()
    rows = _log_json(capsys, "--log", url, "log", "trace", "long")
    kinds = {(h["stream"], h["type"]) for h in rows}
    assert {("epum", "InstanceLaunchRequested"), ("provisioner", "LaunchRequested"),
            ("pd", "NodeAdded"), ("pd", "ProcessAssigned")} <= kinds, kinds


def test_why_ha_group_shows_its_state_and_history():
    from ha_harness import World as HAWorld

    from cei_actors.ha.messages import CreateGroup

    w = HAWorld()
    w.ok(CreateGroup("svc", "npreserving", {"preserve_n": 2}, {"command": ["sleep", "60"]}))
    for _ in range(3):
        w.tick()
    assert len(w.running("svc")) == 2
    with Replay(w.url) as r:
        answer = why(r, "svc")
    assert answer["kind"] == "group"
    [group] = answer["state"]["groups"]
    assert group["name"] == "svc"
    types = [h["type"] for h in answer["history"]]
    assert types[0] == "GroupCreated" and types.count("CopyScheduled") == 2


def test_the_throttle_interval_comes_from_the_plan(tmp_path, capsys):
    import yaml

    from cei_actors.launch.plan import default_plan_text

    sim = pd_sim(tmp_path, restart_throttling_config={"minimum_time_between_starts": 50.0})
    sim.add_node("n1")
    sim.ok(ScheduleProcess("t", command=["true"], restart_mode="ALWAYS"))
    for _ in range(2):
        sim.heartbeat_all()
        sim.now += 1
        sim.finish("t", ps.FAILED)
        sim.heartbeat_all()
    assert sim.pstate("t") == ps.WAITING and sim.state.mm.is_throttled("t")
    plan = yaml.safe_load(default_plan_text())
    plan["components"]["pd"]["config"]["restart_throttling_config"] = {"minimum_time_between_starts": 50.0}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    home = ["--home", str(tmp_path / "nohome"), "--log", sim.url]
    answer = json.loads(cli(capsys, "--json", *home, "log", "--plan", str(tmp_path / "plan.yaml"), "why", "t")[1])
    assert [b["reason"] for b in answer["blockers"]] == ["throttled"]
    assert answer["blockers"][0]["until"] == pytest.approx(T0 + 1 + 50.0)
    # under the built-in plan (1 s between starts) the same log shows no throttle at that point
    answer = json.loads(cli(capsys, "--json", *home, "log", "why", "t")[1])
    assert answer["blockers"] == [] and node_verdict(answer, "n1")["reason"] == "fits"
    assert not (tmp_path / "nohome").exists()
