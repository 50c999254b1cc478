"""The contract of a pure event-sourced component, and the effects it may ask for.

``decide(state, message, ctx)`` validates a message against the state and returns a
:class:`Decision`: events to persist, effects to perform after they are persisted, and a
reply. ``apply(state, event)`` folds one event into the state. Neither does I/O; time, ids
and randomness come from the :class:`Context`.
"""

from __future__ import annotations

import random
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..eventlog import EventRegistry

#: Component config keys that tune the actor shell (``runtime.shell.EventSourcedActor``), not the
#: component; every component's config check accepts them.
SHELL_CONFIG_KEYS = frozenset({"workers", "group_commit", "group_commit_delay", "max_batch", "standby",
                               "record_inputs", "crash_at"})  # crash_at: runtime/faults.py, tests only

S = TypeVar("S")


class Rejected(Exception):  # noqa: N818 - it is a domain outcome, not a crash
    """Raised by ``decide`` to refuse a message; becomes an ErrorReply, nothing is written."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bad_request(message: str) -> Rejected:
    return Rejected("bad_request", message)


def not_found(message: str) -> Rejected:
    return Rejected("not_found", message)


def conflict(message: str) -> Rejected:
    return Rejected("conflict", message)


def forbidden(message: str) -> Rejected:
    return Rejected("forbidden", message)


# ---- effects: performed by the shell only after the decision's events are persisted ----------


@dataclass(frozen=True)
class Send:
    """Send ``message`` to the peer registered under ``to`` (a role or a node's agent id)."""

    to: str
    message: Any


@dataclass(frozen=True)
class SetTimer:
    """Deliver ``message`` to this component after ``delay`` seconds; same ``key`` replaces."""

    key: str
    delay: float
    message: Any


@dataclass(frozen=True)
class Work:
    """Blocking work (a cloud call, a process launch) for the shell's worker pool.

    The shell runs it with the component's work handler for ``kind`` and feeds the returned
    message back into ``decide`` like any other message.
    """

    kind: str
    payload: Any


@dataclass
class Decision:
    """The outcome of one ``decide`` call."""

    events: list[Any] = field(default_factory=list)
    effects: list[Any] = field(default_factory=list)
    reply: Any = None


class Context:
    """What ``decide`` may know besides state and message: the time, ids and randomness."""

    def __init__(self, now: float, rng: random.Random | None = None, *, seed: int | None = None) -> None:
        self.now = now
        self._rng = rng
        #: Given without ``rng``: the randomness is ``random.Random(seed)``, made on first use
        #: (a recorded decision is re-run with the same seed, docs/decisions.md DBG6).
        self.seed = seed

    @property
    def rng(self) -> random.Random:
        if self._rng is None:
            self._rng = random.Random(self.seed) if self.seed is not None else random.Random()
        return self._rng

    @rng.setter
    def rng(self, value: random.Random) -> None:
        self._rng = value

    def new_id(self, prefix: str = "") -> str:
        """A fresh unique id drawn from the injected randomness."""
        value = uuid.UUID(int=self.rng.getrandbits(128), version=4).hex
        return f"{prefix}{value}"


class Component(ABC, Generic[S]):
    """A pure event-sourced core. Subclasses hold configuration, never runtime state."""

    #: The events this component writes.
    registry: EventRegistry
    #: Default stream name.
    stream: str = ""
    #: Bump when the snapshot format changes; older snapshots are then ignored (full replay).
    snapshot_version: int = 1
    #: True if ``decide`` applies its events to the state itself (the PD, docs/decisions.md
    #: PD1): a decision refused after ``decide`` (an event that cannot be stored) then makes
    #: the runner rebuild the state from the log.
    applies_in_decide: bool = False

    @abstractmethod
    def initial_state(self) -> S:
        """The state before any event."""

    @abstractmethod
    def apply(self, state: S, event: Any) -> S:
        """Fold one event into ``state`` (may update it in place); total and pure."""

    @abstractmethod
    def decide(self, state: S, message: Any, ctx: Context) -> Decision:
        """Events, effects and reply for ``message``; raise :class:`Rejected` to refuse it."""

    def recovered(self, state: S, ctx: Context) -> Decision:
        """Called once the state is rebuilt: re-drive open intents, start timers."""
        return Decision()

    def body_appliers(self, state: S) -> dict[tuple[str, int], Any]:
        """For a fold of stored events into ``state`` (a replay): ``(type, version) -> fn``
        where ``fn(state, **body)`` returns what ``apply(state, cls(**body))`` would, for
        the types this component folds straight from a stored body (a body that does not
        fit raises TypeError). Empty (the default): every event is built, then applied."""
        return {}

    @classmethod
    def for_replay(cls) -> Component[Any]:
        """An instance able to fold this component's events without the plan that wrote them
        (folding does not depend on the configuration; a component that cannot be built
        without one says what to build it with)."""
        return cls()

    def shared_fields(self) -> dict[str, tuple[str, ...]]:
        """Per event type of :meth:`body_appliers`, the body fields whose values repeat across
        events and that the fold only reads: a replay decodes each repeated value once and
        shares it (decision RS5). Empty (the default): nothing is shared."""
        return {}

    def snapshot(self, state: S) -> Any:
        """The state as msgpack-able plain data; None means this component takes no snapshots."""
        return None

    def restore(self, data: Any) -> S:
        """The inverse of :meth:`snapshot`."""
        raise NotImplementedError

    def invariants(self, state: S) -> list[str]:
        """Descriptions of every invariant ``state`` breaks (empty when sound).

        ``cei log check`` replays a stream and reports the first event after which this list
        is not empty; simulations check it after every step.
        """
        return []
