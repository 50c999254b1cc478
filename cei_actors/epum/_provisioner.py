"""What EPUM uses of the Provisioner: its ordered instance states and its wire messages."""

from __future__ import annotations

from ..provisioner.messages import (
    DumpState,
    NodeStateChanged,
    Provision,
    Subscribe,
    TerminateNodes,
)
from ..provisioner.states import InstanceState, rank

#: Every instance state name, in lifecycle order.
STATE_NAMES: tuple[str, ...] = tuple(s.value for s in sorted(InstanceState, key=lambda s: s.rank))
#: State name -> lifecycle rank (only the order matters).
RANK: dict[str, int] = {name: rank(name) for name in STATE_NAMES}

__all__ = [
    "RANK",
    "STATE_NAMES",
    "DumpState",
    "NodeStateChanged",
    "Provision",
    "Subscribe",
    "TerminateNodes",
]
