"""Control messages of the runtime shell: start, peers, status, stop, and request envelopes.

A component actor (:class:`~cei_actors.runtime.shell.EventSourcedActor`) does nothing until it
gets :class:`Start`; it answers :class:`Started` once it leads its stream and has recovered.
:class:`Request` / :class:`Response` wrap a message with a request id so that a client can tell
the reply to its request from anything else it receives (thespian's ``ask`` returns the next
message from anyone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .messages import InvalidMessage, Message

#: Leadership choices accepted by :class:`Start` (besides ``flock:DIR`` and ``zk://...``).
LEADERSHIP_KINDS = ("auto", "always", "flock", "zk")


@dataclass(frozen=True)
class Start(Message):
    """Open the log at ``log_url``, lead ``stream`` (default: the component's), recover, serve.

    ``config`` goes to the actor's ``setup``/``make_component``; ``peers`` maps peer names to
    actor addresses; ``replicas`` maps peer names to the addresses of all their replicas (each
    is told when this actor starts leading, so a standby that leads later knows it);
    ``leadership`` is ``auto`` (from the log URL: memory -> always,
    sqlite -> a file lock next to the file, zk -> a ZooKeeper election), ``always``, ``flock``,
    ``flock:DIR`` (lock file ``DIR/<stream>.lock``), ``zk`` (the log URL's servers) or
    ``zk://HOST:PORT[,...]/PATH[?timeout=SECONDS]``.
    """

    plain_data = False  # holds actor addresses or a message; never stored
    max_bytes = None

    log_url: str
    stream: str | None = None
    config: dict = field(default_factory=dict)
    peers: dict = field(default_factory=dict)
    leadership: str = "auto"
    snapshot_every: int = 10_000
    replicas: dict = field(default_factory=dict)

    def check(self) -> None:
        if not all(isinstance(k, str) and k and isinstance(v, list) for k, v in self.replicas.items()):
            raise InvalidMessage("Start.replicas: expected {peer name: [address, ...]}")
        if "://" not in self.log_url:
            raise InvalidMessage(f"Start.log_url: not a log URL: {self.log_url!r}")
        if self.snapshot_every < 1:
            raise InvalidMessage("Start.snapshot_every: must be at least 1")
        kind = self.leadership
        if not (kind in LEADERSHIP_KINDS or kind.startswith(("flock:", "zk://"))):
            raise InvalidMessage(
                f"Start.leadership: {kind!r} is none of auto, always, flock[:PATH], zk[://HOSTS/PATH]"
            )
        if not all(isinstance(k, str) and k for k in self.peers):
            raise InvalidMessage("Start.peers: names must be non-empty strings")


@dataclass(frozen=True)
class Started(Message):
    """Reply to :class:`Start`: the actor leads ``stream`` at ``epoch`` and has replayed to ``head``."""

    stream: str
    epoch: int
    head: int


@dataclass(frozen=True)
class Hello(Message):
    """Introduce the sender as peer ``name`` (e.g. ``eeagent:<id>``); the reply is ``Ok(name)``."""

    name: str

    def check(self) -> None:
        if not self.name:
            raise InvalidMessage("Hello.name: must not be empty")


@dataclass(frozen=True)
class SetPeers(Message):
    """Add or replace peers by name; a value of None removes that peer. ``replicas`` replaces
    the list of every replica of a peer (as ``Start.replicas``: told when this actor leads),
    e.g. those of a component on another actor system; a leader tells them at once. Reply:
    ``Ok(names)``."""

    plain_data = False  # holds actor addresses or a message; never stored
    max_bytes = None

    peers: dict
    replicas: dict = field(default_factory=dict)

    def check(self) -> None:
        if not all(isinstance(k, str) and k for k in self.peers):
            raise InvalidMessage("SetPeers.peers: names must be non-empty strings")
        if not all(isinstance(k, str) and k and isinstance(v, list) for k, v in self.replicas.items()):
            raise InvalidMessage("SetPeers.replicas: expected {peer name: [address, ...]}")


@dataclass(frozen=True)
class PeerAddress(Message):
    """Ask for the address of peer ``name`` (e.g. ``eeagent:<id>``, to reach a node's agent);
    the reply is ``Ok(address)``, or ``not_found`` if this actor knows no such peer."""

    name: str

    def check(self) -> None:
        if not self.name:
            raise InvalidMessage("PeerAddress.name: must not be empty")


@dataclass(frozen=True)
class Status(Message):
    """Ask for the actor's status; the reply is ``Ok(dict)`` (see ``EventSourcedActor.status``).

    ``state``: also include, under ``"state"``, the component's snapshot data of the state this
    replica holds (a leader's, or a hot standby's followed state; None without one or when the
    component takes no snapshots). It can be large: for tests and debugging.
    """

    state: bool = False


@dataclass(frozen=True)
class Stop(Message):
    """Stop serving, release the log, leadership and workers, and exit. Reply: ``Ok(None)``."""


@dataclass(frozen=True)
class Request(Message):
    """``message`` sent with request id ``rid``; the reply comes back as ``Response(rid, ...)``.

    An empty ``rid`` means no reply is wanted (a ``tell``).
    """

    plain_data = False  # holds actor addresses or a message; never stored
    max_bytes = None

    rid: str
    message: Any


@dataclass(frozen=True)
class Response(Message):
    """The reply (an ``Ok`` or ``ErrorReply``) to the :class:`Request` with id ``rid``."""

    plain_data = False  # holds actor addresses or a message; never stored
    max_bytes = None

    rid: str
    reply: Any


__all__ = [
    "LEADERSHIP_KINDS",
    "Hello",
    "PeerAddress",
    "Request",
    "Response",
    "SetPeers",
    "Start",
    "Started",
    "Status",
    "Stop",
]
