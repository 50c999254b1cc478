"""Node (instance) states, totally ordered, and the failure reasons the Provisioner writes.

The order is the original CEI's ``NNN-NAME`` order; a node's state only ever moves forward.
EPUM imports these names. States are plain strings on the wire and in events; compare them
with :func:`rank` (or as :class:`InstanceState` members, which compare by rank).
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "FINAL_STATES",
    "InstanceState",
    "Reason",
    "codes",
    "is_final",
    "rank",
    "reason_of",
]


class InstanceState(StrEnum):
    """A node's lifecycle state; members compare by lifecycle order, not alphabetically."""

    REQUESTING = "REQUESTING"  # EPUM only: asked for, not yet acknowledged by the Provisioner
    REQUESTED = "REQUESTED"
    ERROR_RETRYING = "ERROR_RETRYING"
    PENDING = "PENDING"
    STARTED = "STARTED"
    RUNNING = "RUNNING"
    RUNNING_FAILED = "RUNNING_FAILED"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def code(self) -> str:
        """The original's ordered spelling, e.g. ``"600-RUNNING"``."""
        return f"{_CODE[self]}-{self.value}"

    def __lt__(self, other: object) -> bool:
        return _RANK[self] < rank(other)  # type: ignore[arg-type]

    def __le__(self, other: object) -> bool:
        return _RANK[self] <= rank(other)  # type: ignore[arg-type]

    def __gt__(self, other: object) -> bool:
        return _RANK[self] > rank(other)  # type: ignore[arg-type]

    def __ge__(self, other: object) -> bool:
        return _RANK[self] >= rank(other)  # type: ignore[arg-type]

    __hash__ = str.__hash__


_CODE = {
    "REQUESTING": 100,
    "REQUESTED": 200,
    "ERROR_RETRYING": 300,
    "PENDING": 400,
    "STARTED": 500,
    "RUNNING": 600,
    "RUNNING_FAILED": 650,
    "TERMINATING": 700,
    "TERMINATED": 800,
    "FAILED": 900,
    "REJECTED": 950,
}
_RANK: dict[str, int] = dict(_CODE)

#: States a node never leaves (only the reaper removes such records).
FINAL_STATES = frozenset({"TERMINATED", "FAILED", "REJECTED"})


def rank(state: str) -> int:
    """The lifecycle rank of a state name; also accepts the ``"NNN-NAME"`` spelling."""
    r = _RANK.get(state)
    if r is None:
        if isinstance(state, str) and "-" in state:
            return rank(state.split("-", 1)[1])
        raise ValueError(f"unknown instance state {state!r}")
    return r


def is_final(state: str) -> bool:
    return state in FINAL_STATES


def codes() -> list[str]:
    """Every state name in lifecycle order."""
    return sorted(_RANK, key=_RANK.__getitem__)


class Reason:
    """Failure and end reasons: a node's ``state_desc`` is ``CODE`` or ``"CODE: detail"``."""

    IAAS_FULL = "IAAS_FULL"  # quota / instance limit / no capacity
    IAAS_TIMEOUT = "IAAS_TIMEOUT"
    IAAS_AUTH = "IAAS_AUTH"  # the cloud refused the credentials
    IAAS_PROBLEM = "IAAS_PROBLEM"  # any other cloud error
    IAAS_TERMINATED = "IAAS_TERMINATED"  # the cloud lists the VM as terminated
    DTRS_LOOKUP_FAILED = "DTRS_LOOKUP_FAILED"  # no mapping for the site, no credentials
    DTRS_VALIDATION_FAILED = "DTRS_VALIDATION_FAILED"  # e.g. a userdata ${var} is missing
    NODE_DISAPPEARED = "NODE_DISAPPEARED"  # gone from the listing past the grace window
    PROVISIONER_DISABLED = "PROVISIONER_DISABLED"  # provision during terminate_all
    TERMINATED_BEFORE_LAUNCH = "TERMINATED_BEFORE_LAUNCH"  # never created
    UNKNOWN_NODE = "UNKNOWN_NODE"  # terminate of a node id this provisioner never saw


def reason_of(state_desc: str | None) -> str | None:
    """The ``CODE`` part of a ``state_desc``."""
    if not state_desc:
        return None
    return state_desc.split(":", 1)[0]
