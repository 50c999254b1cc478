"""A small example component: named counters that refuse to go below zero.

It exists to prove the runtime (recovery by replay, fencing, snapshots, bad input) without
any CEI service in the way, and it is what the foundation demo runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..eventlog import EventRegistry
from .core import Component, Context, Decision, SetTimer, bad_request, not_found
from .messages import Message, Ok

events = EventRegistry("example")


@events.register("CounterAdded")
@dataclass(frozen=True, slots=True)
class CounterAdded:
    name: str
    amount: int
    at: float


@events.register("TickRecorded")
@dataclass(frozen=True, slots=True)
class TickRecorded:
    at: float


@dataclass(frozen=True)
class Add(Message):
    """Add ``amount`` (may be negative) to counter ``name``."""

    name: str
    amount: int

    def check(self) -> None:
        if not self.name:
            from .messages import InvalidMessage

            raise InvalidMessage("Add.name: must not be empty")


@dataclass(frozen=True)
class Get(Message):
    name: str


@dataclass(frozen=True)
class Dump(Message):
    pass


@dataclass(frozen=True)
class Tick(Message):
    """A timer message: counts how often the timer fired."""


@dataclass
class CounterState:
    counters: dict[str, int] = field(default_factory=dict)
    ticks: int = 0


class Counters(Component[CounterState]):
    """Counters that never go negative; a periodic timer counts ticks when ``tick`` > 0."""

    registry = events
    stream = "example"

    def __init__(self, tick: float = 0.0) -> None:
        self.tick = tick

    def initial_state(self) -> CounterState:
        return CounterState()

    def apply(self, state: CounterState, event: Any) -> CounterState:
        if isinstance(event, CounterAdded):
            state.counters[event.name] = state.counters.get(event.name, 0) + event.amount
        elif isinstance(event, TickRecorded):
            state.ticks += 1
        return state

    def decide(self, state: CounterState, message: Any, ctx: Context) -> Decision:
        if isinstance(message, Add):
            value = state.counters.get(message.name, 0) + message.amount
            if value < 0:
                raise bad_request(f"counter {message.name!r} would go below zero ({value})")
            return Decision(events=[CounterAdded(message.name, message.amount, ctx.now)], reply=Ok(value))
        if isinstance(message, Get):
            if message.name not in state.counters:
                raise not_found(f"no counter {message.name!r}")
            return Decision(reply=Ok(state.counters[message.name]))
        if isinstance(message, Dump):
            return Decision(reply=Ok({"counters": dict(state.counters), "ticks": state.ticks}))
        if isinstance(message, Tick):
            return Decision(events=[TickRecorded(ctx.now)], effects=self._timers())
        raise bad_request(f"unknown message {type(message).__name__}")

    def recovered(self, state: CounterState, ctx: Context) -> Decision:
        return Decision(effects=self._timers())

    def _timers(self) -> list[Any]:
        return [SetTimer("tick", self.tick, Tick())] if self.tick > 0 else []

    def snapshot(self, state: CounterState) -> Any:
        return {"counters": state.counters, "ticks": state.ticks}

    def restore(self, data: Any) -> CounterState:
        return CounterState(dict(data["counters"]), data["ticks"])
