"""The messages EPUM receives, and the node notifications it sends to domain subscribers.

Requests (``AddDomain`` ...) get ``Ok(value)`` or ``ErrorReply``. Notifications
(``NodeHeartbeat``, ``SensorData``, the Provisioner's ``NodeStateChanged``) get no useful
reply. ``DeciderPass`` and ``DoctorPass`` are EPUM's own timers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..runtime.messages import InvalidMessage, Message

#: Health states a node's agent may report in a heartbeat.
HEARTBEAT_STATES = ("OK", "MONITOR_ERROR", "PROCESS_ERROR")


def _need(name: str, value: str) -> None:
    if not value:
        raise InvalidMessage(f"{name}: must not be empty")


def _check_domain_id(cls: str, domain_id: str) -> None:
    _need(f"{cls}.domain_id", domain_id)
    if "/" in domain_id:
        raise InvalidMessage(f"{cls}.domain_id: must not contain '/'")


def _check_sections(cls: str, config: dict) -> None:
    for key, value in config.items():
        if key not in ("general", "engine_conf", "health"):
            raise InvalidMessage(
                f"{cls}.config: unknown section {key!r} (general, engine_conf, health)"
            )
        if not isinstance(value, dict):
            raise InvalidMessage(f"{cls}.config.{key}: expected a dict")


# ---- domain definitions (templates) -----------------------------------------------------------


@dataclass(frozen=True)
class AddDomainDefinition(Message):
    """Store a template: ``definition`` has sections general, engine_conf and health."""

    definition_id: str
    definition: dict

    def check(self) -> None:
        _need("AddDomainDefinition.definition_id", self.definition_id)
        _check_sections("AddDomainDefinition", self.definition)


@dataclass(frozen=True)
class UpdateDomainDefinition(Message):
    """Replace a template; domains made from it keep their own copy."""

    definition_id: str
    definition: dict

    def check(self) -> None:
        _check_sections("UpdateDomainDefinition", self.definition)


@dataclass(frozen=True)
class RemoveDomainDefinition(Message):
    definition_id: str


@dataclass(frozen=True)
class DescribeDomainDefinition(Message):
    """Reply: ``{name, definition, documentation}`` (documentation from the engine)."""

    definition_id: str


@dataclass(frozen=True)
class ListDomainDefinitions(Message):
    pass


# ---- domains ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddDomain(Message):
    """Create a domain from a definition; each ``config`` section merges over the definition's."""

    domain_id: str
    definition_id: str
    config: dict
    caller: str | None = None
    subscriber: str | None = None

    def check(self) -> None:
        _check_domain_id("AddDomain", self.domain_id)
        _check_sections("AddDomain", self.config)


@dataclass(frozen=True)
class ReconfigureDomain(Message):
    """Merge ``config`` per section into the domain's config; the decider applies it."""

    domain_id: str
    config: dict
    caller: str | None = None

    def check(self) -> None:
        _check_sections("ReconfigureDomain", self.config)


@dataclass(frozen=True)
class RemoveDomain(Message):
    """Drain every instance of the domain, then forget it."""

    domain_id: str
    caller: str | None = None


@dataclass(frozen=True)
class DescribeDomain(Message):
    """Reply: ``{domain_id, definition_id, engine, config, instances, sensor_data, ...}``."""

    domain_id: str
    caller: str | None = None


@dataclass(frozen=True)
class ListDomains(Message):
    """Reply: the caller's domain ids."""

    caller: str | None = None


@dataclass(frozen=True)
class SubscribeDomain(Message):
    """Send ``NodeState`` notifications of the domain's nodes to peer ``subscriber``.

    Idempotent and level-based: every ``SubscribeDomain`` (a new one or a repeat) is answered
    with the current state of the domain's nodes: ``RUNNING`` for each running node that
    ``known`` does not name, and the loss of each node past RUNNING that ``known`` names
    (``known`` None: of every such node EPUM still has a record of). A subscriber that
    re-subscribes now and then with the node ids it holds thereby heals any ``NodeState`` it
    missed, and hears nothing of the running nodes it holds (decision SC3).
    """

    domain_id: str
    subscriber: str
    caller: str | None = None
    known: list[str] | None = None

    def check(self) -> None:
        _need("SubscribeDomain.subscriber", self.subscriber)


@dataclass(frozen=True)
class UnsubscribeDomain(Message):
    domain_id: str
    subscriber: str
    caller: str | None = None


@dataclass(frozen=True)
class RegisterNeed(Message):
    """Level-based need from the PD: the domain should have ``count`` nodes; retire these first."""

    domain_id: str
    count: int
    retirable_nodes: list[str]
    caller: str | None = None

    def check(self) -> None:
        if self.count < 0:
            raise InvalidMessage("RegisterNeed.count: must be >= 0")


# ---- inputs from nodes and sensors ------------------------------------------------------------


@dataclass(frozen=True)
class NodeHeartbeat(Message):
    """Health of a node from its agent. ``state`` is OK, MONITOR_ERROR or PROCESS_ERROR.

    ``agent`` is the peer name EPUM may probe (``HealthProbe``) before declaring the node
    MISSING; without it the probe goes to the Provisioner only.
    """

    node_id: str
    state: str
    timestamp: float
    error: str | None = None
    failed_processes: list[Any] | None = None
    agent: str | None = None

    def check(self) -> None:
        _need("NodeHeartbeat.node_id", self.node_id)
        if self.state not in HEARTBEAT_STATES:
            raise InvalidMessage(
                f"NodeHeartbeat.state: {self.state!r} is not one of {', '.join(HEARTBEAT_STATES)}"
            )


@dataclass(frozen=True)
class SensorData(Message):
    """Metrics pushed to EPUM for a domain (the ``message`` sensor).

    ``values`` maps instance ids to a sample; ``domain_value`` is a domain-wide sample.
    """

    domain_id: str
    metric: str
    values: dict[str, float]
    domain_value: float | None = None
    caller: str | None = None

    def check(self) -> None:
        _need("SensorData.metric", self.metric)


@dataclass(frozen=True)
class SensorReadings(Message):
    """The result of a pulled sensor (a ``Work("sensor", ...)`` run by the shell)."""

    owner: str
    domain_id: str
    metric: str
    values: dict[str, float]
    domain_value: float | None = None
    error: str | None = None


# ---- timers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeciderPass(Message):
    """Run the decider once (the periodic timer; tests send it explicitly)."""


@dataclass(frozen=True)
class DoctorPass(Message):
    """Run the health doctor once (the periodic timer; tests send it explicitly)."""


@dataclass(frozen=True)
class ProvisionerLeads(Message):
    """A Provisioner replica has just started leading (its ``Hello``): ask it at once for
    every live instance (``DumpState``), since its predecessor may have died between recording
    a change and telling us (decision H4)."""


@dataclass(frozen=True)
class ReapPass(Message):
    """Forget instance records long past TERMINATED/FAILED/REJECTED."""


# ---- outbound ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeState(Message):
    """To a domain's subscribers: the node is RUNNING, or lost (any state past RUNNING)."""

    node_id: str
    domain_id: str
    state: str
    properties: dict


@dataclass(frozen=True)
class HealthProbe(Message):
    """To a node's agent: answer with a ``NodeHeartbeat`` now (sent before MISSING)."""

    node_id: str
    reply_to: str = "epum"
