"""The records the log stores: events on the way in and on the way out, and snapshots."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import InvalidStream

_STREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")


def check_stream(name: str) -> str:
    """Return ``name`` if it is a valid stream name, else raise :class:`InvalidStream`."""
    if not isinstance(name, str) or not _STREAM_NAME.match(name):
        raise InvalidStream(
            f"invalid stream name {name!r}: use 1-128 of a-z 0-9 _ . - starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event ready to append: its offset and epoch are assigned by the log."""

    type: str
    version: int
    timestamp: float
    body: dict[str, Any]
    #: The inputs decided since the last stored event, this event's message last (a runner
    #: with ``record_inputs``, docs/decisions.md DBG6); None: not recorded.
    input: Any = None
    #: The row as :meth:`~.codec.EventRegistry.to_checked` encoded and read back (without
    #: ``input``): what is stored, not encoded again (decision SIM8); None: encoded when stored.
    row: bytes | None = field(default=None, compare=False, repr=False)


class Record(NamedTuple):
    """An event as stored: dense ``offset`` from 1 within its ``stream`` (a tuple: cheap to make)."""

    stream: str
    offset: int
    type: str
    version: int
    timestamp: float
    epoch: int
    body: dict[str, Any]
    #: The recorded inputs this event's decision came from (see :class:`PendingEvent`).
    input: Any = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A component's state as of ``offset`` (every event up to and including it applied)."""

    stream: str
    offset: int
    timestamp: float
    version: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Fence:
    """The right to append to ``stream`` while its stored epoch still equals ``epoch``."""

    stream: str
    epoch: int
