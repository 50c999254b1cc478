"""The HA service on a real system: `up` with a PD, two HA replicas and two static nodes (real
EEAgents running real processes); a killed copy is replaced, and after kill -9 of the HA
leader the standby takes over its copies without doubling them."""

from __future__ import annotations

import os
import signal

import yaml
from test_launch_system import down_clean, home, processes_mentioning, second_leads, wait_for  # noqa: F401

from cei_actors.cli import main as cei
from cei_actors.ha.client import HAClient
from cei_actors.launch.launcher import connect, up
from cei_actors.launch.plan import load_plan
from cei_actors.runtime.client import ServiceClient

SLEEP = "60.375"


def copies_running() -> list[int]:
    """Pids of the group's real processes (``sleep 60.375``) on this machine."""
    return sorted(pid for pid, cmd in processes_mentioning(f"sleep {SLEEP}") if cmd.startswith("sleep"))


def web_upids(conn) -> list[str]:
    return sorted(p["upid"] for p in conn.pd.describe_processes() if p["upid"].startswith("web-"))


def static_plan(tmp_path, ha_replicas: int = 1):
    """A PD with two static nodes (in-system EEAgents) and the HA service."""
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "log": "sqlite:///${home}/log.sqlite",
        "components": {
            "pd": {"config": {"dispatch_retry_seconds": 2.0}},
            "ha": {"replicas": ha_replicas, "config": {"poll_interval": 0.5}},
        },
        "pd": {"engines": {"e1": {"slots": 2, "heartbeat_period": 0.5}}},
        "static_nodes": [{"node_id": "n1"}, {"node_id": "n2"}],
    }))
    return path


def test_npreserving_on_a_real_system_survives_a_kill_and_an_ha_failover(home, tmp_path, capsys):  # noqa: F811
    info = up(load_plan(static_plan(tmp_path, ha_replicas=2), home=home), home)
    assert info["components"]["ha"] == ["ha", "ha.1"]
    with connect(home) as conn:
        conn.ha.create_group("web", "npreserving", {"preserve_n": 2},
                             {"command": ["sleep", SLEEP], "restart_mode": "never"})
        g = conn.ha.wait_group("web", "STEADY", timeout=30)
        first = sorted(c["upid"] for c in g["copies"])
        assert len(first) == 2 and {c["node_id"] for c in g["copies"]} <= {"n1", "n2"}
        assert wait_for(lambda: len(copies_running()) == 2, timeout=10)

        # a copy's process dies (kill -9): the PD records FAILED, HA schedules a replacement
        os.kill(copies_running()[0], signal.SIGKILL)

        def replaced():
            g = conn.ha.describe_group("web")
            upids = sorted(c["upid"] for c in g["copies"])
            return g["status"] == "STEADY" and upids != first and g
        g = wait_for(replaced, timeout=30)
        assert g, conn.ha.describe_group("web")
        second = sorted(c["upid"] for c in g["copies"])
        assert len(set(second) & set(first)) == 1
        assert wait_for(lambda: len(copies_running()) == 2, timeout=10)
        assert len(web_upids(conn)) == 3  # one replacement, nothing doubled

        reps = conn.status()["components"]["ha"]
        assert [(r["name"], r["leader"]) for r in reps] == [("ha", True), ("ha.1", False)]
        os.kill(reps[0]["pid"], signal.SIGKILL)

    with connect(home) as conn:
        address = wait_for(lambda: second_leads(conn, "ha"), timeout=20)
        assert address is not None
        ha = HAClient(ServiceClient(conn.asys, address, timeout=10.0))
        g = ha.wait_group("web", "STEADY", timeout=20)
        assert sorted(c["upid"] for c in g["copies"]) == second  # neither forgotten nor doubled
        assert len(web_upids(conn)) == 3 and len(copies_running()) == 2

        # the new leader replaces a dead copy too (the PD greeted it: it gets the notices)
        os.kill(copies_running()[0], signal.SIGKILL)

        def replaced_again():
            g = ha.describe_group("web")
            return g["status"] == "STEADY" and sorted(c["upid"] for c in g["copies"]) != second
        assert wait_for(replaced_again, timeout=30), ha.describe_group("web")
        assert wait_for(lambda: len(copies_running()) == 2, timeout=10)
        assert len(web_upids(conn)) == 4

        # lower N: the oldest copy goes
        g = ha.describe_group("web")
        oldest, newest = g["copies"][0]["upid"], g["copies"][1]["upid"]
        ha.reconfigure_group("web", parameters={"preserve_n": 1})
        g = ha.wait_group("web", "STEADY", timeout=30)
        assert [c["upid"] for c in g["copies"]] == [newest]
        assert conn.pd.describe_process(oldest)["state"] == "TERMINATED"
        assert wait_for(lambda: len(copies_running()) == 1, timeout=10)

    capsys.readouterr()
    assert cei(["--home", str(home), "--json", "log", "check", "ha"]) == 0
    assert '"ok": true' in capsys.readouterr().out
    down_clean(home, info, f"sleep {SLEEP}")


def test_cli(home, tmp_path, capsys):  # noqa: F811
    """`cei ha create|list|describe|status|reconfigure|wait|remove --json` on a running system."""
    import json

    info = up(load_plan(static_plan(tmp_path), home=home), home)
    base = ["--home", str(home), "--json", "ha"]

    def run(*args: str) -> tuple[int, object, str]:
        capsys.readouterr()
        rc = cei([*base, *args])
        got = capsys.readouterr()
        return rc, (json.loads(got.out) if got.out.strip() else None), got.err

    rc, g, _ = run("create", "web", "--preserve-n", "2", "--restart-mode", "never",
                   "--node-exclusive", "web", "--", "sleep", SLEEP)
    assert rc == 0 and g["target"] == 2 and g["process"]["node_exclusive"] == "web"
    rc, g, _ = run("wait", "web", "--timeout", "30")
    assert rc == 0 and g["status"] == "STEADY"
    rc, rows, _ = run("list")
    assert rc == 0 and rows == [{"name": "web", "policy": "npreserving", "status": "STEADY",
                                 "target": 2, "copies": 2, "removing": False}]
    rc, g, _ = run("describe", "web")
    assert rc == 0 and {c["node_id"] for c in g["copies"]} == {"n1", "n2"}  # node_exclusive
    rc, st, _ = run("status", "web")
    assert rc == 0 and st["status"] == "STEADY" and st["wants"] == "nothing: steady"
    rc, rows, _ = run("status")
    assert rc == 0 and rows == [{"name": "web", "status": "STEADY"}]
    rc, g, _ = run("reconfigure", "web", "--preserve-n", "1")
    assert rc == 0 and g["target"] == 1
    rc, _, err = run("reconfigure", "web", "--set", "bogus=1")
    assert rc == 1 and "unknown parameter" in err and err.count("\n") == 1
    rc, _, err = run("create", "x", "--preserve-n", "1")
    assert rc == 2 and "COMMAND" in err
    rc, _, err = run("describe", "nope")
    assert rc == 1 and "no HA group 'nope'" in err
    rc, g, _ = run("wait", "web", "--timeout", "30")
    assert rc == 0
    assert wait_for(lambda: len(copies_running()) == 1, timeout=10)
    rc, r, _ = run("remove", "web")
    assert rc == 0 and r["removing"] is True
    assert wait_for(lambda: run("list")[1] == [], timeout=20)
    assert wait_for(lambda: not copies_running(), timeout=10)
    down_clean(home, info, f"sleep {SLEEP}")
