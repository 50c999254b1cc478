"""The HA service's events (stream ``ha``). Every decision is one; fields are plain data.

A copy is one process (``upid``, chosen by HA) of a group on one PD. Its life in HA:
``CopyScheduled`` (written before the PD is asked) -> optionally ``CopyTerminating`` (HA
decided to end it: surplus, group removed, its PD silent) -> ``CopyEnded`` (the PD reported
it past RUNNING or forgot it, or refused to schedule it). Observed process states are not
events: a new leader asks the PDs again.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..eventlog import EventRegistry

events = EventRegistry("ha")


@events.register("GroupCreated")
@dataclass(frozen=True, slots=True)
class GroupCreated:
    """A group: its policy and parameters, what each copy runs, on which PDs, its first target."""

    name: str
    policy: str
    parameters: dict
    process: dict  # ScheduleProcess fields (definition_id, command, ..., restart_mode)
    pds: list
    target: int
    at: float


@events.register("PolicyChanged")
@dataclass(frozen=True, slots=True)
class PolicyChanged:
    """``reconfigure``: the new policy and its whole parameters, the target they give; clears FAILED."""

    name: str
    policy: str
    parameters: dict
    target: int
    at: float


@events.register("TargetChanged")
@dataclass(frozen=True, slots=True)
class TargetChanged:
    """The sensor policy scaled: the new number of copies; no further scaling before ``cooldown_until``."""

    name: str
    target: int
    value: float | None
    cooldown_until: float
    at: float


@events.register("CopyScheduled")
@dataclass(frozen=True, slots=True)
class CopyScheduled:
    name: str
    upid: str
    pd: str
    at: float


@events.register("CopyTerminating")
@dataclass(frozen=True, slots=True)
class CopyTerminating:
    """HA ends these copies (no longer counted); ``KillProcess`` is sent until the PD confirms."""

    name: str
    upids: list
    reason: str
    at: float


@events.register("CopyEnded")
@dataclass(frozen=True, slots=True)
class CopyEnded:
    """The copy is gone: ``state`` is its last PD state (``UNKNOWN``: the PD has no such process,
    ``REFUSED``: the PD refused to schedule it)."""

    name: str
    upid: str
    state: str
    at: float


@events.register("GroupBackoff")
@dataclass(frozen=True, slots=True)
class GroupBackoff:
    """Copies of the group ended on their own soon after they were scheduled ``failures``
    times in a row (0: one lived long enough, the count starts again); no new copy is
    scheduled before ``retry_at`` (0: no wait)."""

    name: str
    failures: int
    retry_at: float
    at: float


@events.register("GroupFailed")
@dataclass(frozen=True, slots=True)
class GroupFailed:
    """Sticky until a ``reconfigure``: no new copies are scheduled."""

    name: str
    reason: str
    at: float


@events.register("GroupRemoveRequested")
@dataclass(frozen=True, slots=True)
class GroupRemoveRequested:
    name: str
    at: float


@events.register("GroupRemoved")
@dataclass(frozen=True, slots=True)
class GroupRemoved:
    """Every copy of the removed group is confirmed ended; the group is forgotten."""

    name: str
    at: float
