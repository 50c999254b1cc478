"""What must hold of the PD's state after every event (``cei log check``, simulations)."""

from __future__ import annotations

from . import states as ps
from .state import PDState


def broken(state: PDState) -> list[str]:
    """Descriptions of every invariant ``state`` breaks."""
    problems: list[str] = []
    placed_on: dict[str, str] = {}
    for rid, res in state.resources.items():
        if res.resource_id != rid:
            problems.append(f"resource {rid} is stored under another id ({res.resource_id})")
        node = state.nodes.get(res.node_id)
        if node is None:
            problems.append(f"resource {rid} is on unknown node {res.node_id}")
        elif rid not in node.resources:
            problems.append(f"node {res.node_id} does not list its resource {rid}")
        if len(res.assigned) > res.slots:
            problems.append(f"resource {rid} holds {len(res.assigned)} processes for {res.slots} slots")
        for upid, rnd in res.assigned.items():
            other = placed_on.setdefault(upid, rid)
            if other != rid:
                problems.append(f"process {upid} is placed on both {other} and {rid}")
            proc = state.processes.get(upid)
            if proc is None:
                problems.append(f"resource {rid} holds unknown process {upid}")
            elif proc.round != rnd or proc.resource_id != rid or proc.state not in ps.PLACED:
                problems.append(
                    f"resource {rid} holds {upid} round {rnd}, but the process is "
                    f"{proc.state} round {proc.round} on {proc.resource_id}"
                )
    tags: dict[tuple[str, str], str] = {}
    for upid, proc in state.processes.items():
        if not ps.is_state(proc.state):
            problems.append(f"process {upid} has unknown state {proc.state!r}")
            continue
        if proc.state in ps.PLACED:
            if proc.resource_id is None or placed_on.get(upid) != proc.resource_id:
                problems.append(f"process {upid} is {proc.state} but not held by its resource {proc.resource_id}")
            res = state.resources.get(proc.resource_id or "")
            if proc.node_exclusive and res is not None:
                other = tags.setdefault((res.node_id, proc.node_exclusive), upid)
                if other != upid:
                    problems.append(
                        f"node {res.node_id} runs {other} and {upid}, both tagged {proc.node_exclusive!r}"
                    )
        elif proc.resource_id is not None and upid in placed_on:
            problems.append(f"process {upid} is {proc.state} yet still holds a slot on {proc.resource_id}")
    unwell = {rid for rid, res in state.resources.items() if res.state != ps.RESOURCE_OK}
    if unwell != state.unwell:
        problems.append(f"the unwell index holds {sorted(state.unwell)}, not {sorted(unwell)}")
    for nid, node in state.nodes.items():
        if (node.used == 0) != (nid in state.idle.get(node.engine, ())):
            problems.append(f"node {nid} uses {node.used} slots, but the idle index says otherwise")
    for engine, idle in state.idle.items():
        for nid in idle:
            if nid not in state.nodes or state.nodes[nid].engine != engine:
                problems.append(f"the idle index of engine {engine} holds node {nid}, not its node")
    for upid in state.tombstones:
        if upid in state.processes:
            problems.append(f"process {upid} is both a live record and a tombstone")
        stone = state.tombstones.get(upid)
        if stone is not None and stone.record.get("state") not in ps.TERMINAL:
            problems.append(f"process {upid} was forgotten while {stone.record.get('state')}")
    return problems
