"""Map libcloud node states to the Provisioner's instance state names."""

from __future__ import annotations

from libcloud.compute.types import NodeState

__all__ = ["NODE_STATE_TO_INSTANCE_STATE", "instance_state_for"]

#: libcloud ``NodeState`` -> Provisioner state name (without the ``NNN-`` order prefix).
#: The first five follow the original CEI; STARTING is a booting VM, and STOPPED counts as
#: gone, as the task asks. Every other state (STOPPING, SUSPENDED, ERROR, ...) is "we do not
#: know" and maps to ERROR_RETRYING, which sorts below PENDING, so a forward-only
#: Provisioner never moves a node backwards because of it.
NODE_STATE_TO_INSTANCE_STATE: dict[str, str] = {
    NodeState.RUNNING: "STARTED",
    NodeState.REBOOTING: "STARTED",
    NodeState.PENDING: "PENDING",
    NodeState.STARTING: "PENDING",
    NodeState.TERMINATED: "TERMINATED",
    NodeState.STOPPED: "TERMINATED",
    NodeState.UNKNOWN: "ERROR_RETRYING",
}


def instance_state_for(state: NodeState | str) -> str:
    """The Provisioner state name for a libcloud node state ("ERROR_RETRYING" if unmapped)."""
    found = _BY_MEMBER.get(id(state))  # every VM of every listing: no str() nor hash() of
    if found is not None:  # the enum (libcloud's compute both through a property)
        return found
    return NODE_STATE_TO_INSTANCE_STATE.get(str(state).lower(), "ERROR_RETRYING")


#: id of each ``NodeState`` member (a singleton) -> its state name
_BY_MEMBER: dict[int, str] = {
    id(member): NODE_STATE_TO_INSTANCE_STATE.get(str(member).lower(), "ERROR_RETRYING")
    for member in NodeState
}
