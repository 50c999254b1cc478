"""The Process Dispatcher's events (stream ``pd``). Fields are msgpack-native plain data."""

from __future__ import annotations

from dataclasses import dataclass

from ..eventlog import EventRegistry

events = EventRegistry("pd")


@events.register("DefinitionSet")
@dataclass(frozen=True, slots=True)
class DefinitionSet:
    """A process definition was created or replaced."""

    definition_id: str
    definition_type: str
    executable: dict
    name: str | None
    description: str | None
    at: float


@events.register("DefinitionRemoved")
@dataclass(frozen=True, slots=True)
class DefinitionRemoved:
    definition_id: str
    at: float


@events.register("ProcessCreated")
@dataclass(frozen=True, slots=True)
class ProcessCreated:
    """``create_process``: a new process, UNSCHEDULED at ``round`` (0, or one past the last
    round of a forgotten process of the same upid)."""

    upid: str
    definition_id: str
    name: str | None
    at: float
    round: int = 0


@events.register("ProcessScheduled")
@dataclass(frozen=True, slots=True)
class ProcessScheduled:
    """The process (new or at rest) is REQUESTED at ``round`` with ``spec``, and queued.

    ``spec`` keys: definition_id, name, command, env, cwd, configuration, subscribers,
    constraints (``engine`` included), engine, queueing_mode, restart_mode, node_exclusive,
    min_start_interval, omit_from_system_restart.
    """

    upid: str
    round: int
    spec: dict
    at: float


@events.register("ProcessMoved")
@dataclass(frozen=True, slots=True)
class ProcessMoved:
    """The process is now ``(round, state)``; what that means for queue and slot is the fold's.

    Into REQUESTED/DIED_REQUESTED: leaves its resource, joins the queue's tail. WAITING: stays
    queued. PENDING/RUNNING/TERMINATING: stays on its resource (RUNNING counts a start). Any
    rest state: leaves the queue and its resource.
    """

    upid: str
    round: int
    state: str
    at: float
    msg: str = ""


@events.register("ProcessBackoff")
@dataclass(frozen=True, slots=True)
class ProcessBackoff:
    """A crash loop: the process ended on its own ``failures`` times in a row, each soon after
    it started; its next start waits until ``retry_at`` (0.0: no wait). ``failures`` 0 ends
    the backoff (an operator's restart). Decision OP3."""

    upid: str
    failures: int
    retry_at: float
    at: float


@events.register("ProcessAssigned")
@dataclass(frozen=True, slots=True)
class ProcessAssigned:
    """The process is ASSIGNED at ``round`` to ``resource_id`` and its launch is sent.

    From the queue (a placement), or in place on its own resource with a new round
    (``restart_process``).
    """

    upid: str
    round: int
    resource_id: str
    at: float


@events.register("NodeAdded")
@dataclass(frozen=True, slots=True)
class NodeAdded:
    node_id: str
    domain_id: str
    engine: str
    properties: dict
    at: float


@events.register("NodeRemoved")
@dataclass(frozen=True, slots=True)
class NodeRemoved:
    """The node and its resources are gone (their processes were moved by earlier events)."""

    node_id: str
    state: str
    at: float


@events.register("NodeRetiring")
@dataclass(frozen=True, slots=True)
class NodeRetiring:
    """The node is offered to EPUM for retirement (nothing new is placed on it), or not."""

    node_id: str
    retiring: bool
    at: float


@events.register("ResourceAdded")
@dataclass(frozen=True, slots=True)
class ResourceAdded:
    """An EEAgent's first heartbeat from a known node; slots come from the engine config."""

    resource_id: str
    node_id: str
    slots: int
    at: float


@events.register("ResourceStateChanged")
@dataclass(frozen=True, slots=True)
class ResourceStateChanged:
    resource_id: str
    state: str
    at: float


@events.register("ResourceOccupancy")
@dataclass(frozen=True, slots=True)
class ResourceOccupancy:
    """Live processes on the agent that are not this PD's placements there (stale copies,
    unknown upids) occupy ``foreign`` slots."""

    resource_id: str
    foreign: int
    at: float


@events.register("ProcessesForgotten")
@dataclass(frozen=True, slots=True)
class ProcessesForgotten:
    """Finished processes (TERMINATED, EXITED, FAILED, REJECTED) past the retention leave the
    state, each for a tombstone (its last record, round and a digest of its parameters). A
    process that is not finished when this applies stays (nothing live is forgotten). Then
    tombstones forgotten before ``before`` go, and the oldest beyond ``keep``."""

    upids: list[str]
    at: float
    keep: int | None = None
    before: float | None = None


@events.register("SystemBootSet")
@dataclass(frozen=True, slots=True)
class SystemBootSet:
    on: bool
    at: float


ProcessEvent = (
    ProcessCreated | ProcessScheduled | ProcessMoved | ProcessAssigned | ProcessesForgotten
)
