"""The Provisioner's events. Field values are msgpack-native plain data.

A launch is written (``LaunchRequested``) *before* any cloud call; each create carries a
client token derived from the launch and node id, so re-driving an open create after a crash
returns the same VM. Cloud results come back as messages and are recorded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..eventlog import EventRegistry

events = EventRegistry("provisioner")


# ---- nodes ------------------------------------------------------------------------------------


@events.register("LaunchRequested")
@dataclass(frozen=True, slots=True)
class LaunchRequested:
    """A provision accepted, written before any cloud call.

    ``nodes``: one dict per new node: ``node_id``, ``state`` (REQUESTED, FAILED or
    REJECTED), ``state_desc``, ``client_token``. ``spec``: what the registry lookup gave,
    shared by the nodes (``account``, ``iaas_image``, ``iaas_allocation``,
    ``iaas_sshkeyname``, ``userdata``, and ``domain`` when the vars name a ``domain_id``), or
    None when the lookup failed. ``absorbed``: ids
    that already existed as terminated stubs; they join the launch and stay terminated."""

    launch_id: str
    caller: str | None
    deployable_type: str
    site: str
    allocation: str | None
    spec: dict[str, Any] | None
    nodes: list[dict[str, Any]]
    absorbed: list[str]
    at: float


@events.register("NodeLaunched")
@dataclass(frozen=True, slots=True)
class NodeLaunched:
    """The cloud made the node's VM. A REQUESTED node becomes PENDING; a node terminated
    meanwhile keeps its state and only learns its ``iaas_id`` (its VM is destroyed next)."""

    node_id: str
    iaas_id: str
    public_ip: str | None
    private_ip: str | None
    hostname: str | None
    at: float


@events.register("NodeLaunchFailed")
@dataclass(frozen=True, slots=True)
class NodeLaunchFailed:
    """The create failed: ``state`` is FAILED (or TERMINATED if terminated meanwhile)."""

    node_id: str
    state: str
    state_desc: str
    at: float


@events.register("TerminateRequested")
@dataclass(frozen=True, slots=True)
class TerminateRequested:
    """Nodes to terminate: ``terminating`` have (or may get) a VM to destroy;
    ``terminated`` were never created and end at once; ``unknown`` ids become TERMINATED
    stubs owned by ``caller`` (so a later provision of them never makes a VM).
    ``everything`` marks the second phase of terminate_all."""

    caller: str | None
    terminating: list[str]
    terminated: list[str]
    unknown: list[str]
    everything: bool
    at: float


@events.register("NodeTerminated")
@dataclass(frozen=True, slots=True)
class NodeTerminated:
    """A TERMINATING node's VM is gone (destroyed, or not found)."""

    node_id: str
    state_desc: str | None
    at: float


@events.register("UnknownNodesAnswered")
@dataclass(frozen=True, slots=True)
class UnknownNodesAnswered:
    """Ids asked after (``DumpState``) that no record or tombstone had: they become
    TERMINATED ``UNKNOWN_NODE`` stubs, as with a terminate, so a provision of them that
    arrives later makes no VM."""

    node_ids: list[str]
    at: float


@events.register("NodesObserved")
@dataclass(frozen=True, slots=True)
class NodesObserved:
    """What a site listing showed. Each update: ``node_id`` and any of ``state``,
    ``state_desc``, ``iaas_id``, ``public_ip``, ``private_ip``, ``hostname``."""

    account: str
    updates: list[dict[str, Any]]
    at: float


@events.register("NodesReaped")
@dataclass(frozen=True, slots=True)
class NodesReaped:
    """Old records in a final state, removed (with launches left empty); each leaves a
    tombstone. Then tombstones buried before ``before`` go, and the oldest beyond ``keep``
    (None: 20,000, the bound before it was config; events written then name none)."""

    node_ids: list[str]
    at: float
    keep: int | None = None
    before: float | None = None


@events.register("ProvisionerDisabled")
@dataclass(frozen=True, slots=True)
class ProvisionerDisabled:
    at: float


@events.register("ProvisionerEnabled")
@dataclass(frozen=True, slots=True)
class ProvisionerEnabled:
    at: float


@events.register("SubscriberAdded")
@dataclass(frozen=True, slots=True)
class SubscriberAdded:
    name: str


@events.register("SubscriberRemoved")
@dataclass(frozen=True, slots=True)
class SubscriberRemoved:
    name: str


# ---- registry (the original's DTRS) -------------------------------------------------------------


@events.register("SiteSaved")
@dataclass(frozen=True, slots=True)
class SiteSaved:
    owner: str  # "" = common
    name: str
    definition: dict[str, Any]
    at: float


@events.register("SiteRemoved")
@dataclass(frozen=True, slots=True)
class SiteRemoved:
    owner: str
    name: str
    at: float


@events.register("DeployableTypeSaved")
@dataclass(frozen=True, slots=True)
class DeployableTypeSaved:
    owner: str
    name: str
    definition: dict[str, Any]
    at: float


@events.register("DeployableTypeRemoved")
@dataclass(frozen=True, slots=True)
class DeployableTypeRemoved:
    owner: str
    name: str
    at: float


@events.register("CredentialsSaved", version=2)
@dataclass(frozen=True, slots=True)
class CredentialsSaved:
    """Credentials of ``owner`` for ``site``. Version 2: ``credentials`` is the masked view
    (no secret value) and ``sealed`` the Fernet token, key id and digest (see ``sealing``).
    Version 1 (older logs) held the clear credentials and no ``sealed``."""

    owner: str
    site: str
    credential_type: str
    credentials: dict[str, Any]
    at: float
    sealed: dict[str, Any] | None = None


@events.upcaster("CredentialsSaved", from_version=1)
def _clear_credentials(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "sealed": None}


@events.register("CredentialsRemoved")
@dataclass(frozen=True, slots=True)
class CredentialsRemoved:
    owner: str
    site: str
    credential_type: str
    at: float
