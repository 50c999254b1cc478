"""The fault suite's VM check (harness.live_vms) sees every VM of its system's local driver that
has a live process, including the ones ``nodes.json`` does not show as live: a VM the table
does not record (a create that died before its record) and one whose init was killed while
its command lives on. It looks only at that driver's node directories."""

from __future__ import annotations

import json
import os
import signal

from harness import live_vms
from waiting import wait_for

from cei_actors.provisioner.drivers import LocalProcessDriver
from cei_actors.provisioner.drivers.local import marked_processes

SLEEP = ["sleep", "300"]


def test_live_vms_counts_the_marked_processes_of_its_own_driver_only(tmp_path):
    mine = LocalProcessDriver(tmp_path / "home" / "nodes", SLEEP, grace_period=1.0)
    other = LocalProcessDriver(tmp_path / "other" / "nodes", SLEEP, grace_period=1.0)
    try:
        recorded = mine.create_node("recorded", None, None)
        orphaned = mine.create_node("orphaned", None, None)  # its init will be killed
        lost = mine.create_node("lost", None, None, ex_clienttoken="tok")  # its record will be lost
        elsewhere = other.create_node("elsewhere", None, None)
        lost_dir, orphan_dir = lost.extra["node_dir"], orphaned.extra["node_dir"]
        wait_for(lambda: len(marked_processes(lost_dir)) == 2, timeout=20, what="the lost VM's init and command")

        table_path = mine.state_dir / "nodes.json"
        table = json.loads(table_path.read_text())
        del table["nodes"][lost.id]  # as if the Provisioner died between the spawn and the record
        table_path.write_text(json.dumps(table))
        os.kill(orphaned.extra["pid"], signal.SIGKILL)  # the init; its command is left running
        wait_for(lambda: marked_processes(orphan_dir) and orphaned.extra["pid"] not in marked_processes(orphan_dir),
                 timeout=20, what="the orphaned VM's init to be gone")

        vms = live_vms(mine.state_dir)
        assert set(vms) == {recorded.id, orphaned.id, f"unrecorded {lost_dir}"}, vms
        assert elsewhere.extra["node_dir"] not in {r["node_dir"] for r in vms.values()}
        assert [r["node_dir"] for r in live_vms(other.state_dir).values()] == [elsewhere.extra["node_dir"]]

        mine.kill_unrecorded()
        mine.destroy_node(orphaned.id)  # stops the marked command too
        assert set(live_vms(mine.state_dir)) == {recorded.id}
    finally:
        for d in (mine, other):
            d.kill_unrecorded()
            for node in d.list_nodes():
                d.destroy_node(node)
    assert not live_vms(mine.state_dir) and not live_vms(other.state_dir)
