"""Process states and their order, rounds, queueing and restart modes, resource states.

A process's position is the pair ``(round, state)``; it only ever moves forward. Within one
round the state only rises in the order below; any move "back" (a restart, a reschedule, a
system boot) increments the round. State names are the original's words without the ``NNN-``
prefix; compare them with :func:`rank`, never with ``<`` on the strings.
"""

from __future__ import annotations

# the states an EEAgent reports are the agent's wire names; the PD adds the ones before them
from ..eeagent.states import CODES as AGENT_CODES
from ..eeagent.states import (
    EXITED,
    FAILED,
    PENDING,
    REJECTED,
    RUNNING,
    TERMINATED,
    TERMINATING,
)

UNSCHEDULED = "UNSCHEDULED"
UNSCHEDULED_PENDING = "UNSCHEDULED_PENDING"
REQUESTED = "REQUESTED"
DIED_REQUESTED = "DIED_REQUESTED"
WAITING = "WAITING"
ASSIGNED = "ASSIGNED"

#: Every process state in lifecycle order.
ORDER: tuple[str, ...] = (
    UNSCHEDULED,
    UNSCHEDULED_PENDING,
    REQUESTED,
    DIED_REQUESTED,
    WAITING,
    ASSIGNED,
    PENDING,
    RUNNING,
    TERMINATING,
    TERMINATED,
    EXITED,
    FAILED,
    REJECTED,
)
#: The original's numeric codes (``"500-RUNNING"``).
CODES: dict[str, int] = {
    UNSCHEDULED: 100,
    UNSCHEDULED_PENDING: 150,
    REQUESTED: 200,
    DIED_REQUESTED: 250,
    WAITING: 300,
    ASSIGNED: 350,
    **AGENT_CODES,
}
_RANK = {name: i for i, name in enumerate(ORDER)}

#: Rest states: nothing runs and nothing is queued (UNSCHEDULED_PENDING waits for boot end).
REST: frozenset[str] = frozenset(
    {UNSCHEDULED, UNSCHEDULED_PENDING, TERMINATED, EXITED, FAILED, REJECTED}
)
#: Final outcomes of a round (a reschedule starts a new round from these).
TERMINAL: frozenset[str] = frozenset({TERMINATED, EXITED, FAILED, REJECTED})
#: In the matchmaker's queue.
QUEUED: frozenset[str] = frozenset({REQUESTED, DIED_REQUESTED, WAITING})
#: Queued and not yet looked at by the matchmaker in this round.
FRESH: frozenset[str] = frozenset({REQUESTED, DIED_REQUESTED})
#: Placed on a resource (holding a slot there).
PLACED: frozenset[str] = frozenset({ASSIGNED, PENDING, RUNNING, TERMINATING})
#: States an EEAgent reports.
AGENT_STATES: frozenset[str] = frozenset(
    {PENDING, RUNNING, TERMINATING, TERMINATED, EXITED, FAILED, REJECTED}
)
AGENT_LIVE: frozenset[str] = frozenset({PENDING, RUNNING, TERMINATING})


def rank(state: str) -> int:
    """Position of ``state`` in the lifecycle order; ``ValueError`` if unknown."""
    try:
        return _RANK[state]
    except KeyError:
        raise ValueError(f"unknown process state {state!r}") from None


def is_state(value: object) -> bool:
    return isinstance(value, str) and value in _RANK


def advances(old_round: int, old_state: str, new_round: int, new_state: str) -> bool:
    """True if ``(new_round, new_state)`` is strictly after ``(old_round, old_state)``."""
    return (new_round, _RANK[new_state]) > (old_round, _RANK[old_state])


def with_code(state: str) -> str:
    """The original's spelling, e.g. ``"500-RUNNING"``."""
    return f"{CODES[state]}-{state}"


# ---- modes ------------------------------------------------------------------------------------

QUEUE_NEVER = "NEVER"
QUEUE_ALWAYS = "ALWAYS"
QUEUE_START_ONLY = "START_ONLY"
QUEUE_RESTART_ONLY = "RESTART_ONLY"
QUEUEING_MODES: tuple[str, ...] = (QUEUE_NEVER, QUEUE_ALWAYS, QUEUE_START_ONLY, QUEUE_RESTART_ONLY)

RESTART_NEVER = "NEVER"
RESTART_ALWAYS = "ALWAYS"
RESTART_ABNORMAL = "ABNORMAL"
#: The ``status`` of a queued process waiting out a crash-loop backoff (decision OP3).
CRASH_LOOP = "CrashLoopBackOff"
RESTART_MODES: tuple[str, ...] = (RESTART_NEVER, RESTART_ALWAYS, RESTART_ABNORMAL)


def may_wait(queueing_mode: str, starts: int) -> bool:
    """May a process that found no slot wait in the queue (else it is REJECTED)?"""
    if queueing_mode == QUEUE_NEVER:
        return False
    if queueing_mode == QUEUE_START_ONLY:
        return starts == 0
    if queueing_mode == QUEUE_RESTART_ONLY:
        return starts > 0
    return True


def restarts_after_exit(restart_mode: str, reported: str) -> bool:
    """Does a process whose run ended in ``reported`` (agent state) get a new round?

    ABNORMAL restarts anything but a clean exit (EXITED); ALWAYS restarts everything; NEVER
    nothing. The PD itself asking for the end (TERMINATING) never restarts; callers check that.
    """
    if restart_mode == RESTART_ALWAYS:
        return True
    if restart_mode == RESTART_NEVER:
        return False
    return reported != EXITED


def restarts_after_loss(restart_mode: str) -> bool:
    """Does a process whose node or resource was lost get a new round elsewhere?"""
    return restart_mode != RESTART_NEVER


# ---- resources --------------------------------------------------------------------------------

RESOURCE_OK = "OK"
RESOURCE_WARNING = "WARNING"
RESOURCE_MISSING = "MISSING"
RESOURCE_DISABLED = "DISABLED"
RESOURCE_STATES: tuple[str, ...] = (
    RESOURCE_OK,
    RESOURCE_WARNING,
    RESOURCE_MISSING,
    RESOURCE_DISABLED,
)
