"""What must hold of EPUM's state after every event (``cei log check``, simulations)."""

from __future__ import annotations

from ..provisioner.states import InstanceState
from .state import EPUMState

_KNOWN = {s.value for s in InstanceState}


def broken(state: EPUMState) -> list[str]:
    """Descriptions of every invariant ``state`` breaks."""
    problems: list[str] = []
    for iid, inst in state.instances.items():
        if inst.instance_id != iid:
            problems.append(f"instance {iid} is stored under another id ({inst.instance_id})")
        if inst.state not in _KNOWN:
            problems.append(f"instance {iid} has unknown state {inst.state!r}")
        dom = state.domains.get(inst.domain_key)
        if dom is None:
            problems.append(f"instance {iid} belongs to unknown domain {inst.domain_key}")
            continue
        if iid not in dom.instances:
            problems.append(f"instance {iid} is missing from its domain {dom.key}")
        if iid not in dom.by_state.get(inst.state, ()):
            problems.append(f"instance {iid} ({inst.state}) is not indexed under its state")
    for key, dom in state.domains.items():
        if dom.key != key:
            problems.append(f"domain {dom.key} is stored under {key}")
        for iid in dom.instances:
            inst = state.instances.get(iid)
            if inst is None or inst.domain_key != key:
                problems.append(f"domain {key} lists instance {iid} that is not its own")
        for st, ids in dom.by_state.items():
            for iid in ids:
                inst = state.instances.get(iid)
                if inst is None or inst.state != st:
                    problems.append(f"domain {key} indexes {iid} under {st} wrongly")
    for iid in state.open_launches:
        if iid not in state.instances:
            problems.append(f"open launch of unknown instance {iid}")
    for iid in state.open_terminations:
        if iid not in state.instances:
            problems.append(f"open termination of unknown instance {iid}")
    for iid in state.forgotten:
        if iid in state.instances:
            problems.append(f"instance {iid} is both a live record and a tombstone")
    for key in state.removed:
        if key in state.domains:
            problems.append(f"domain {key} is both live and removed")
    return problems
