"""The example component as an actor, plus a little extra to exercise the shell.

:class:`ExampleCounters` is :class:`~cei_actors.runtime.example.Counters` with four more
messages: :class:`AddLater` (asks the shell for ``Work`` whose result is an ``Add``),
:class:`FailingWork` (work whose handler raises), :class:`Crash` (the core raises while
deciding) and :class:`Echo` (a ``Send`` of :class:`Echoed` to a peer by name). Config keys: ``tick`` (timer period in seconds, 0 = off), ``work_delay``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .core import Context, Decision, Send, Work
from .example import Add, Counters, CounterState
from .messages import Message, Ok
from .shell import EventSourcedActor


@dataclass(frozen=True)
class AddLater(Message):
    """Add ``amount`` to ``name`` after a round trip through the worker pool."""

    name: str
    amount: int


@dataclass(frozen=True)
class FailingWork(Message):
    """Start work whose handler raises (the shell logs it and carries on)."""


@dataclass(frozen=True)
class Crash(Message):
    """Make the core raise while deciding (the sender gets ``ErrorReply("internal")``)."""


@dataclass(frozen=True)
class Echo(Message):
    """Send ``Echoed(text)`` to the peer named ``to``."""

    to: str
    text: str


@dataclass(frozen=True)
class Echoed(Message):
    """What :class:`Echo` sends."""

    text: str


class ExampleCounters(Counters):
    """Counters with work and a deliberate crash."""

    def decide(self, state: CounterState, message: Any, ctx: Context) -> Decision:
        if isinstance(message, AddLater):
            return Decision(
                effects=[Work("add", {"name": message.name, "amount": message.amount})],
                reply=Ok("queued"),
            )
        if isinstance(message, FailingWork):
            return Decision(effects=[Work("fail", None)], reply=Ok("queued"))
        if isinstance(message, Echo):
            return Decision(effects=[Send(message.to, Echoed(message.text))], reply=Ok(None))
        if isinstance(message, Crash):
            raise RuntimeError("the example core crashed on purpose")
        return super().decide(state, message, ctx)


class ExampleActor(EventSourcedActor):
    """Runs :class:`ExampleCounters`; see the module docstring for its config."""

    def make_component(self, config: dict) -> ExampleCounters:
        return ExampleCounters(tick=float(config.get("tick", 0.0)))

    def setup(self, config: dict) -> None:
        self._work_delay = float(config.get("work_delay", 0.0))

    def work_handlers(self) -> dict[str, Callable[[Any], Message]]:
        return {"add": self._add_later, "fail": self._fail}

    def _add_later(self, payload: dict) -> Message:
        if self._work_delay:
            time.sleep(self._work_delay)
        return Add(payload["name"], payload["amount"])

    def _fail(self, payload: Any) -> Message:
        raise RuntimeError("the example work handler failed on purpose")


__all__ = ["AddLater", "Crash", "Echo", "Echoed", "ExampleActor", "ExampleCounters", "FailingWork"]
