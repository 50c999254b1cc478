"""The local process driver: each node is a process group on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from libcloud.compute.base import NodeDriver
from libcloud.compute.types import NodeState
from waiting import wait_for

from cei_actors.provisioner.drivers import LocalNodeNotFound, LocalProcessDriver

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

SLEEP = ["sleep", "60"]
# a shell with two background children, all in the node's process group
FAMILY = ["sh", "-c", "sleep 60 & sleep 60 & wait"]


@pytest.fixture
def drivers():
    made: list[LocalProcessDriver] = []

    def make(state_dir, command=SLEEP, **kw) -> LocalProcessDriver:
        d = LocalProcessDriver(state_dir, command, grace_period=2.0, **kw)
        made.append(d)
        return d

    yield make
    for d in made:  # never leave processes behind
        for node in d.list_nodes():
            if node.state == NodeState.RUNNING:
                d.destroy_node(node)


def group_members(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = raw[raw.rindex(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                out.append(int(entry))
    return out


def by_id(d: LocalProcessDriver) -> dict:
    return {n.id: n for n in d.list_nodes()}


def test_start_list_running_and_destroy(tmp_path, drivers):
    d = drivers(tmp_path)
    assert isinstance(d, NodeDriver)
    node = d.create_node("vm-a", None, None, ex_clienttoken="tok-a")
    assert node.state == NodeState.RUNNING
    assert node.public_ips == ["127.0.0.1"] and node.private_ips == ["127.0.0.1"]
    pid = node.extra["pid"]
    assert node.extra["pgid"] == pid  # its own session and process group
    assert os.getsid(pid) == pid
    listed = by_id(d)[node.id]
    assert listed.state == NodeState.RUNNING and listed.extra["client_token"] == "tok-a"
    assert d.destroy_node(node) is True
    assert not Path(f"/proc/{pid}").exists() or group_members(pid) == []
    gone = by_id(d)[node.id]
    assert gone.state == NodeState.TERMINATED and gone.extra["status"] == "destroyed"


def test_idempotent_by_client_token(tmp_path, drivers):
    d = drivers(tmp_path)
    a = d.create_node("vm", None, None, ex_clienttoken="tok")
    b = d.create_node("vm", None, None, ex_clienttoken="tok")
    assert a.id == b.id and a.extra["pid"] == b.extra["pid"]
    assert len(d.list_nodes()) == 1
    # a new driver instance on the same state dir knows the token too
    c = drivers(tmp_path).create_node("vm", None, None, ex_clienttoken="tok")
    assert c.id == a.id and len(d.list_nodes()) == 1


def _lose_record(state_dir: Path, node_id: str) -> None:
    """As if the Provisioner died between the node's spawn and its record: the table forgets it."""
    path = state_dir / "nodes.json"
    table = json.loads(path.read_text())
    del table["nodes"][node_id]
    path.write_text(json.dumps(table))


def test_a_create_that_died_before_its_record_is_not_doubled_or_leaked(tmp_path, drivers):
    """The next create of the same client token stops the unrecorded node's process before it
    starts the one it records; `kill_unrecorded` (used by `cei down`) stops any other."""
    d = drivers(tmp_path)
    lost = d.create_node("vm", None, None, ex_clienttoken="tok")
    other = d.create_node("vm2", None, None, ex_clienttoken="tok2")
    _lose_record(tmp_path, lost.id)
    _lose_record(tmp_path, other.id)
    assert group_members(lost.extra["pgid"]) and group_members(other.extra["pgid"])
    again = d.create_node("vm", None, None, ex_clienttoken="tok")
    assert again.id != lost.id
    wait_for(lambda: not group_members(lost.extra["pgid"]), timeout=10, what="the unrecorded node's end")
    assert group_members(again.extra["pgid"]) and group_members(other.extra["pgid"])
    assert other.extra["pid"] in d.kill_unrecorded()
    wait_for(lambda: not group_members(other.extra["pgid"]), timeout=10, what="the other unrecorded node's end")
    assert group_members(again.extra["pgid"])  # the recorded one lives


def test_concurrent_creates_same_token_start_one_process(tmp_path, drivers):
    d1, d2 = drivers(tmp_path), drivers(tmp_path)
    results: list[str] = []
    lock = threading.Lock()

    def create(d):
        node = d.create_node("vm", None, None, ex_clienttoken="tok")
        with lock:
            results.append(node.id)

    threads = [threading.Thread(target=create, args=(d1 if i % 2 else d2,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert len(d1.list_nodes()) == 1


def test_second_driver_instance_sees_and_destroys_nodes(tmp_path, drivers):
    d1 = drivers(tmp_path, FAMILY)
    node = d1.create_node("vm", None, None, ex_clienttoken="tok")
    pgid = node.extra["pgid"]
    assert wait_for(lambda: len(group_members(pgid)) == 4)  # init + sh + two sleeps

    d2 = drivers(tmp_path, FAMILY)  # e.g. after a Provisioner restart
    seen = by_id(d2)[node.id]
    assert seen.state == NodeState.RUNNING and seen.extra["client_token"] == "tok"
    d2.destroy_node(seen)
    assert group_members(pgid) == []  # children killed too
    assert by_id(d1)[node.id].state == NodeState.TERMINATED
    table = json.loads((tmp_path / "nodes.json").read_text())
    assert table["nodes"][node.id]["pid"] == node.extra["pid"]


def test_destroy_escalates_to_sigkill(tmp_path, drivers):
    stubborn = ["sh", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"]
    d = LocalProcessDriver(tmp_path, stubborn, grace_period=0.3)
    node = d.create_node("vm", None, None)
    pgid = node.extra["pgid"]
    assert wait_for(lambda: len(group_members(pgid)) == 3)  # init + sh + sleep
    t0 = time.monotonic()
    d.destroy_node(node)
    assert time.monotonic() - t0 >= 0.15  # the init gives its command half the grace
    assert group_members(pgid) == []


def test_exited_process_shows_terminated_with_exit_code(tmp_path, drivers):
    d = drivers(tmp_path, ["sh", "-c", "echo hello from {name}; exit 3"])
    node = d.create_node("vm-x", None, None)
    assert wait_for(lambda: by_id(d)[node.id].state == NodeState.TERMINATED)
    done = by_id(d)[node.id]
    assert done.extra["status"] == "exited" and done.extra["exit_code"] == 3
    assert "hello from vm-x" in Path(done.extra["log"]).read_text()
    assert d.destroy_node(done) is True  # destroying an exited node is fine


def test_terminated_nodes_linger_then_drop_out(tmp_path, drivers):
    class Clock:
        t = 1000.0

        def now(self):
            return self.t

    clock = Clock()
    d = drivers(tmp_path, ["true"], terminated_linger=60.0, forget_after=100.0, clock=clock)
    node = d.create_node("vm", None, None, ex_clienttoken="tok")
    assert wait_for(lambda: by_id(d)[node.id].state == NodeState.TERMINATED)
    clock.t += 60.0
    assert d.list_nodes() == []
    with pytest.raises(LocalNodeNotFound, match="NotFound"):
        d.destroy_node(node)
    # still known by token until forgotten
    assert d.create_node("vm", None, None, ex_clienttoken="tok").id == node.id
    clock.t += 100.0
    d.list_nodes()
    fresh = d.create_node("vm", None, None, ex_clienttoken="tok")
    assert fresh.id != node.id  # forgotten token: a new node, and ids are never reused


def test_pid_reuse_is_detected(tmp_path, drivers):
    d = drivers(tmp_path)
    node = d.create_node("vm", None, None)
    d.destroy_node(node)
    # Pretend the node's pid was reused by an unrelated process (its own process group).
    other = subprocess.Popen(SLEEP, start_new_session=True)
    try:
        table_path = tmp_path / "nodes.json"
        table = json.loads(table_path.read_text())
        raw = Path(f"/proc/{other.pid}/stat").read_bytes()
        other_ticks = int(raw[raw.rindex(b")") + 2 :].split()[19])
        table["nodes"][node.id].update(
            pid=other.pid,
            pgid=other.pid,
            start_ticks=other_ticks - 1,
            exited_at=None,
            destroyed_at=None,
        )
        table_path.write_text(json.dumps(table))
        seen = by_id(d)[node.id]
        assert seen.state == NodeState.TERMINATED  # start time differs: not our process
        d.destroy_node(seen)  # must not signal the other process's group
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_command_template_userdata_and_env(tmp_path, drivers):
    script = (
        "import os, sys, pathlib;"
        "print('ARGS', sys.argv[1:]);"
        "print('ENV', os.environ['CEI_NODE_ID'], os.environ['CEI_NODE_NAME'], os.environ['EXTRA']);"
        "print('UD', pathlib.Path(os.environ['CEI_USERDATA_FILE']).read_text())"
    )
    command = ["{python}", "-c", script, "--node-id", "{node_id}", "--zone", "{zone}"]
    d = drivers(tmp_path, command, vars={"zone": "z1"}, env={"EXTRA": "yes"})
    node = d.create_node("vm-t", None, None, ex_userdata="hello userdata", ex_vars={"zone": "z2"})
    assert wait_for(lambda: by_id(d)[node.id].state == NodeState.TERMINATED)
    out = Path(node.extra["log"]).read_text()
    assert f"ARGS ['--node-id', '{node.id}', '--zone', 'z2']" in out
    assert f"ENV {node.id} vm-t yes" in out
    assert "UD hello userdata" in out
    assert node.extra["argv"][0] == sys.executable


def test_callable_command(tmp_path, drivers):
    calls = []

    def command(name, userdata, tvars):
        calls.append((name, userdata, tvars["node_id"]))
        return ["sh", "-c", f"echo {name}-{userdata}"]

    d = drivers(tmp_path, command)
    node = d.create_node("vm-c", None, None, ex_userdata="u")
    assert calls == [("vm-c", "u", node.id)]
    assert wait_for(lambda: "vm-c-u" in Path(node.extra["log"]).read_text())


def test_bad_template_and_missing_command_create_nothing(tmp_path, drivers):
    d = drivers(tmp_path, ["echo", "{nope}"])
    with pytest.raises(ValueError, match="nope"):
        d.create_node("vm", None, None)
    assert d.list_nodes() == []
    with pytest.raises(ValueError, match="no command"):
        LocalProcessDriver(tmp_path).create_node("vm", None, None)
    ok = drivers(tmp_path).create_node("vm", None, None)
    assert ok.id == "local-000002"  # the failed create used up its id


def test_unknown_node(tmp_path, drivers):
    with pytest.raises(LocalNodeNotFound):
        drivers(tmp_path).destroy_node("local-999999")


# A command that leaves a process in its own session behind a double fork (as the EEAgent's
# reaper and its commands are), writes that process's pid and its own, and waits.
ESCAPER = [
    "sh", "-c",
    "(setsid sleep 300 & echo $! > {node_dir}/escaped.pid) ; echo $$ > {node_dir}/main.pid; "
    "while true; do sleep 1; done",
]


def _pid_in(path: Path) -> int:
    assert wait_for(lambda: path.exists() and path.read_text().strip(), timeout=10)
    return int(path.read_text())


def alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


def escaped_node(d: LocalProcessDriver):
    node = d.create_node("vm", None, None)
    node_dir = Path(node.extra["node_dir"])
    escaped, main = _pid_in(node_dir / "escaped.pid"), _pid_in(node_dir / "main.pid")
    assert wait_for(lambda: os.getsid(escaped) == escaped)  # out of the node's session
    assert escaped != node.extra["pgid"]
    return node, escaped, main


def test_destroy_ends_processes_that_left_the_nodes_session(tmp_path, drivers):
    d = drivers(tmp_path, ESCAPER)
    node, escaped, _ = escaped_node(d)
    d.destroy_node(node)
    assert not alive(escaped)
    assert by_id(d)[node.id].state == NodeState.TERMINATED


def test_node_whose_command_dies_ends_whole_before_it_is_terminated(tmp_path, drivers):
    """The command (an EEAgent) is SIGKILLed: its init ends the rest of the node, and the
    node is TERMINATED only once nothing of it runs."""
    d = drivers(tmp_path, ESCAPER)
    node, escaped, main = escaped_node(d)
    os.kill(main, 9)
    assert wait_for(lambda: by_id(d)[node.id].state == NodeState.TERMINATED, timeout=10)
    assert not alive(escaped)
    assert by_id(d)[node.id].extra["exit_code"] == 128 + 9


def test_node_whose_init_is_killed_is_swept_by_its_marker(tmp_path, drivers):
    """Even the init SIGKILLed: the driver finds the node's processes by their marker."""
    d = drivers(tmp_path, ESCAPER)
    node, escaped, main = escaped_node(d)
    os.kill(node.extra["pid"], 9)
    assert wait_for(lambda: by_id(d)[node.id].state == NodeState.TERMINATED, timeout=10)
    assert not alive(escaped) and not alive(main)
