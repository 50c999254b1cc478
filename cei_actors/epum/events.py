"""EPUM's events. Every decision EPUM takes (a launch, a destroy, an engine's memory) is one.

Domains are keyed by ``(owner, domain_id)``; instance events name only the instance (the
state keeps an index from instance to domain).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..eventlog import EventRegistry

events = EventRegistry("epum")


@events.register("DefinitionAdded")
@dataclass(frozen=True, slots=True)
class DefinitionAdded:
    definition_id: str
    definition: dict


@events.register("DefinitionUpdated")
@dataclass(frozen=True, slots=True)
class DefinitionUpdated:
    definition_id: str
    definition: dict


@events.register("DefinitionRemoved")
@dataclass(frozen=True, slots=True)
class DefinitionRemoved:
    definition_id: str


@events.register("DomainAdded")
@dataclass(frozen=True, slots=True)
class DomainAdded:
    owner: str
    domain_id: str
    definition_id: str
    config: dict  # merged: {general, engine_conf, health}
    subscribers: list
    at: float


@events.register("DomainReconfigured")
@dataclass(frozen=True, slots=True)
class DomainReconfigured:
    owner: str
    domain_id: str
    changes: dict  # per section, merged over the stored config
    at: float


@events.register("NeedRegistered")
@dataclass(frozen=True, slots=True)
class NeedRegistered:
    owner: str
    domain_id: str
    count: int
    retirable_nodes: list
    at: float


@events.register("DomainSubscribed")
@dataclass(frozen=True, slots=True)
class DomainSubscribed:
    owner: str
    domain_id: str
    subscriber: str


@events.register("DomainUnsubscribed")
@dataclass(frozen=True, slots=True)
class DomainUnsubscribed:
    owner: str
    domain_id: str
    subscriber: str


@events.register("DomainRemoveRequested")
@dataclass(frozen=True, slots=True)
class DomainRemoveRequested:
    owner: str
    domain_id: str
    at: float


@events.register("DomainRemoved")
@dataclass(frozen=True, slots=True)
class DomainRemoved:
    """Every instance drained; the domain and its instance records are forgotten, each for a
    tombstone. Then both tombstone maps are bounded: ``before`` (tombstones forgotten before
    it go) and ``keep`` (at most this many; None: the default)."""

    owner: str
    domain_id: str
    at: float
    keep: int | None = None
    before: float | None = None


@events.register("EngineConfigApplied")
@dataclass(frozen=True, slots=True)
class EngineConfigApplied:
    """The engine has seen config ``version`` (its ``reconfigure`` ran)."""

    owner: str
    domain_id: str
    version: int


@events.register("EngineStateChanged")
@dataclass(frozen=True, slots=True)
class EngineStateChanged:
    """The engine's persistent memory (cooldowns, backoffs, capacities), whole."""

    owner: str
    domain_id: str
    data: dict


@events.register("EngineFailed")
@dataclass(frozen=True, slots=True)
class EngineFailed:
    """The engine raised; ``error`` None means it works again. Written only on change."""

    owner: str
    domain_id: str
    error: str | None
    at: float


@events.register("LaunchBackoff")
@dataclass(frozen=True, slots=True)
class LaunchBackoff:
    """Launches of a domain at ``site`` keep failing: none goes before ``retry_at``.

    ``failures`` in a row (0: a launch there reached RUNNING, the backoff ends); ``error`` is
    the last failure's reason; ``seq`` the launch sequence when counted (a failure of a launch
    requested before it is the same round and counts once). Decision OP2."""

    owner: str
    domain_id: str
    site: str
    failures: int
    retry_at: float | None
    error: str | None
    seq: int
    at: float


@events.register("SensorDataRecorded")
@dataclass(frozen=True, slots=True)
class SensorDataRecorded:
    owner: str
    domain_id: str
    metric: str
    values: dict  # instance id -> sample
    domain_value: float | None
    at: float


@events.register("InstanceLaunchRequested")
@dataclass(frozen=True, slots=True)
class InstanceLaunchRequested:
    owner: str
    domain_id: str
    instance_id: str
    launch_id: str
    deployable_type: str
    site: str
    allocation: str | None
    extravars: dict
    vars: dict  # what is sent to the Provisioner (resends use the same)
    at: float


@events.register("InstanceDestroyRequested")
@dataclass(frozen=True, slots=True)
class InstanceDestroyRequested:
    """EPUM asked for ``instance_ids`` to go. ``decision``: the engine, the rule and the
    figures it used (absent in logs written before; decision DBG2)."""

    instance_ids: list
    reason: str
    at: float
    decision: dict | None = None


@events.register("InstanceUpdated")
@dataclass(frozen=True, slots=True)
class InstanceUpdated:
    """An accepted Provisioner notification (newer state, or same state and newer counter)."""

    instance_id: str
    state: str
    update_counter: int
    properties: dict  # iaas_id, public_ip, private_ip, hostname, state_desc
    at: float


@events.register("InstanceHealthChanged")
@dataclass(frozen=True, slots=True)
class InstanceHealthChanged:
    instance_id: str
    health: str
    error: str | None
    failed_processes: list | None
    heard: bool  # a heartbeat has been received from it
    at: float


@events.register("InstancesReaped")
@dataclass(frozen=True, slots=True)
class InstancesReaped:
    """Old finished instances, forgotten, each for a tombstone; then both tombstone maps are
    bounded as by ``DomainRemoved`` (events written before tombstones have no ``at``)."""

    instance_ids: list
    at: float | None = None
    keep: int | None = None
    before: float | None = None
