"""Process states on the wire between the EEAgent and the Process Dispatcher.

States are plain upper-case strings (the original's words without the ``NNN-`` prefix). Their
lifecycle order is the original's total order::

    PENDING < RUNNING < TERMINATING < TERMINATED < EXITED < FAILED < REJECTED

Lexical order of the names is NOT lifecycle order: compare with :func:`rank` (or
:func:`is_after`), never with ``<`` on the strings.
"""

from __future__ import annotations

PENDING = "PENDING"
RUNNING = "RUNNING"
TERMINATING = "TERMINATING"
TERMINATED = "TERMINATED"
EXITED = "EXITED"
FAILED = "FAILED"
REJECTED = "REJECTED"

#: All agent-side states in lifecycle order.
ORDER: tuple[str, ...] = (PENDING, RUNNING, TERMINATING, TERMINATED, EXITED, FAILED, REJECTED)

#: The original's numeric codes (``"500-RUNNING"``); kept for readers of old logs and for
#: :func:`normalize`.
CODES: dict[str, int] = {
    PENDING: 400,
    RUNNING: 500,
    TERMINATING: 600,
    TERMINATED: 700,
    EXITED: 800,
    FAILED: 850,
    REJECTED: 900,
}

#: States in which the process may still run and holds a slot.
LIVE_STATES: frozenset[str] = frozenset({PENDING, RUNNING, TERMINATING})
#: States in which nothing runs any more; such a record waits for ``cleanup``.
TERMINAL_STATES: frozenset[str] = frozenset({TERMINATED, EXITED, FAILED, REJECTED})

#: The ``cause`` of an end the process did not come to on its own: the agent stopped it
#: because its node is going away (the agent or its reaper got SIGTERM, ``AgentStop``). The
#: agent's report carries it (``"cause": "node"``); the PD restarts such a process as after a
#: node loss and does not count it as a crash (decision OP7).
CAUSE_NODE = "node"

_RANK = {name: i for i, name in enumerate(ORDER)}


def rank(state: str) -> int:
    """Position of ``state`` in the lifecycle order; ``ValueError`` for an unknown state."""
    try:
        return _RANK[state]
    except KeyError:
        raise ValueError(f"unknown process state {state!r}") from None


def is_after(a: str, b: str) -> bool:
    """True if state ``a`` comes strictly later in the lifecycle than state ``b``."""
    return rank(a) > rank(b)


def is_terminal(state: str) -> bool:
    """True for TERMINATED, EXITED, FAILED and REJECTED."""
    rank(state)
    return state in TERMINAL_STATES


def is_live(state: str) -> bool:
    """True for PENDING, RUNNING and TERMINATING (the states that hold a slot); ``ValueError``
    for an unknown state."""
    if state in LIVE_STATES:
        return True
    rank(state)
    return False


def with_code(state: str) -> str:
    """The original's wire spelling, e.g. ``"500-RUNNING"``."""
    rank(state)
    return f"{CODES[state]}-{state}"


def normalize(value: object) -> str:
    """Accept ``"RUNNING"``, ``"500-RUNNING"`` or ``("500", "RUNNING")``; return ``"RUNNING"``."""
    if type(value) is str and value in _RANK:  # already a name: the common case, no parsing
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value = f"{value[0]}-{value[1]}"
    if not isinstance(value, str):
        raise ValueError(f"not a process state: {value!r}")
    name = value.rsplit("-", 1)[-1].upper() if "-" in value else value.upper()
    rank(name)
    return name
