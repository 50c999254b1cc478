"""Components spread over two actor systems joined in a convention (two "hosts" on loopback
ports of this machine), with the log on ZooKeeper."""

from __future__ import annotations

import pytest
import yaml
from test_launch_system import assert_nothing_left, make_plan, processes_mentioning

from cei_actors.launch.launcher import LaunchError, connect, down, read_info, up
from cei_actors.launch.plan import load_plan


def split_plan(tmp_path, name, components):
    data = yaml.safe_load(make_plan(tmp_path).read_text())
    data["components"] = {k: v for k, v in data["components"].items() if k in components}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def homes(tmp_path):
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    try:
        yield a, b
    finally:
        for home in (b, a):
            if read_info(home) is not None:
                down(home)


def test_provisioner_and_epum_on_one_system_pd_on_another(homes, tmp_path, zk_hosts):
    home_a, home_b = homes
    log = f"zk://{zk_hosts}"
    plan_a = load_plan(split_plan(tmp_path, "a", {"provisioner", "epum"}), home=home_a, log_url=log)
    plan_b = load_plan(split_plan(tmp_path, "b", {"pd"}), home=home_b, log_url=log)
    steps: list[str] = []
    info_a = up(plan_a, home_a, progress=steps.append)
    assert any("another system must join" in s for s in steps)
    with pytest.raises(LaunchError, match="cannot join"):
        up(plan_b, home_b, join=1)
    info_b = up(plan_b, home_b, join=f"127.0.0.1:{info_a['admin_port']}")
    assert info_b["remote"] == {"admin_port": info_a["admin_port"], "components": ["epum", "provisioner"]}
    with connect(home_b) as conn:
        status = conn.status()
        assert sorted(status["components"]) == ["epum", "pd", "provisioner"]
        assert all(r["leader"] for reps in status["components"].values() for r in reps)
        pids = {reps[0]["pid"] for reps in status["components"].values()}
        assert len(pids) == 3
        conn.pd.schedule_process("hello", command=["sh", "-c", "echo hello"])
        assert conn.pd.wait_process("hello", ["EXITED", "FAILED"], timeout=40)["state"] == "EXITED"
        assert conn.epum.list_domains() == ["pd_domain_default"]  # EPUM on the other system
        # the EEAgent "VM" joined the PD's system (host b)
        assert processes_mentioning(f"--pd 127.0.0.1:{info_b['admin_port']} ")
    down(home_b)
    # host a's nodes (joined to b's admin) are a's to stop
    assert processes_mentioning(f"--pd 127.0.0.1:{info_b['admin_port']} ")
    down(home_a)
    assert_nothing_left(home_b, info_b)
    assert_nothing_left(home_a, info_a)
