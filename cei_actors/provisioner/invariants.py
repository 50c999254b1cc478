"""What must hold of the Provisioner's state after every event (``cei log check``, simulations)."""

from __future__ import annotations

from .state import ProvisionerState
from .states import FINAL_STATES, InstanceState, rank

_KNOWN = {s.value for s in InstanceState}
_TERMINATING = rank("TERMINATING")


def broken(state: ProvisionerState) -> list[str]:
    """Descriptions of every invariant ``state`` breaks."""
    problems: list[str] = []
    vms: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for nid, node in state.nodes.items():
        if node.node_id != nid:
            problems.append(f"node {nid} is stored under another id ({node.node_id})")
        if node.state not in _KNOWN:
            problems.append(f"node {nid} has unknown state {node.state!r}")
            continue
        if node.iaas_id:
            other = vms.setdefault(node.iaas_id, nid)
            if other != nid:
                problems.append(f"VM {node.iaas_id} is claimed by nodes {other} and {nid}")
        if node.client_token:
            other = tokens.setdefault(node.client_token, nid)
            if other != nid:
                problems.append(f"client token {node.client_token} is shared by {other} and {nid}")
        ranks = [rank(step[0]) for step in node.state_changes if step and step[0] in _KNOWN]
        if any(b < a for a, b in zip(ranks, ranks[1:], strict=False)):
            problems.append(f"node {nid} moved backwards: {[s[0] for s in node.state_changes]}")
        if (nid in state.active) != (rank(node.state) < _TERMINATING):
            problems.append(f"node {nid} ({node.state}) is wrongly (un)indexed as active")
        if (nid in state.requested) != (node.state == "REQUESTED"):
            problems.append(f"node {nid} ({node.state}) is wrongly (un)indexed as requested")
        if (nid in state.terminating) != (node.state == "TERMINATING"):
            problems.append(f"node {nid} ({node.state}) is wrongly (un)indexed as terminating")
        if (nid in state.finished) != (node.state in FINAL_STATES):
            problems.append(f"node {nid} ({node.state}) is wrongly (un)indexed as finished")
    for index_name in ("active", "requested", "terminating", "finished"):
        for nid in getattr(state, index_name):
            if nid not in state.nodes:
                problems.append(f"index {index_name} names unknown node {nid}")
    for launch_id, launch in state.launches.items():
        for nid in launch.node_ids:
            node = state.nodes.get(nid)
            if node is not None and node.launch_id != launch_id:
                problems.append(f"launch {launch_id} lists node {nid} of launch {node.launch_id}")
    return problems
