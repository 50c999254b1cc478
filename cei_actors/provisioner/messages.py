"""Messages the Provisioner receives (and ``NodeStateChanged``, which it sends).

Requests (reply ``Ok(value)`` or ``ErrorReply``): node operations, the registry operations
(the original's DTRS) and a few for operators. Internal messages (timers and the results of
cloud work) are at the end; only the Provisioner sends those to itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..runtime.messages import InvalidMessage, Message

__all__ = [
    "AddCredentials",
    "AddDeployableType",
    "AddSite",
    "CreateResult",
    "DescribeCredentials",
    "DescribeDeployableType",
    "DescribeNodes",
    "DescribeProvisioner",
    "DescribeSite",
    "DestroyResult",
    "DumpState",
    "ERROR_KINDS",
    "MAX_LAUNCH_NODES",
    "Enable",
    "ListCredentials",
    "ListDeployableTypes",
    "ListResult",
    "ListSites",
    "Lookup",
    "NodeStateChanged",
    "Provision",
    "QuerySites",
    "ReapRecords",
    "RemoveCredentials",
    "RemoveDeployableType",
    "RemoveSite",
    "RetryWork",
    "Subscribe",
    "TerminateAll",
    "TerminateNodes",
    "Unsubscribe",
    "UpdateCredentials",
    "UpdateDeployableType",
    "UpdateSite",
]


#: Most nodes in one launch (a launch is one event).
MAX_LAUNCH_NODES = 500


def _nonempty(cls: str, name: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise InvalidMessage(f"{cls}.{name}: must not be empty")


def _ids(cls: str, name: str, ids: list[str], allow_empty: bool = False) -> None:
    if not ids and not allow_empty:
        raise InvalidMessage(f"{cls}.{name}: give at least one node id")
    seen: set[str] = set()
    for nid in ids:
        if not nid.strip():
            raise InvalidMessage(f"{cls}.{name}: node ids must not be empty")
        if nid in seen:
            raise InvalidMessage(f"{cls}.{name}: node id {nid!r} is given twice")
        seen.add(nid)


def _keys(cls: str, name: str, d: dict[str, Any]) -> None:
    for key in d:
        if not isinstance(key, str):
            raise InvalidMessage(f"{cls}.{name}: keys must be strings, got {key!r}")


# ---- nodes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provision(Message):
    """Launch ``node_ids`` of ``deployable_type`` at ``site`` for ``caller``.

    Idempotent: the same launch again changes nothing and makes no second VM. Replies
    ``Ok({"launch_id", "nodes": [node, ...]})``; nodes that cannot be launched are FAILED
    (registry lookup) or REJECTED (provisioner disabled) with a reason in ``state_desc``.
    """

    launch_id: str
    deployable_type: str
    site: str
    node_ids: list[str]
    vars: dict[str, Any] = field(default_factory=dict)
    caller: str | None = None
    allocation: str | None = None

    def check(self) -> None:
        for name in ("launch_id", "deployable_type", "site", "caller", "allocation"):
            _nonempty("Provision", name, getattr(self, name))
        _ids("Provision", "node_ids", self.node_ids)
        if len(self.node_ids) > MAX_LAUNCH_NODES:
            raise InvalidMessage(
                f"Provision.node_ids: at most {MAX_LAUNCH_NODES} nodes per launch"
            )
        _keys("Provision", "vars", self.vars)


@dataclass(frozen=True)
class TerminateNodes(Message):
    """Terminate nodes (level-based; repeat freely). An unknown id is recorded TERMINATED,
    so a later provision of it makes no VM. Replies ``Ok([node, ...])``."""

    node_ids: list[str]
    caller: str | None = None

    def check(self) -> None:
        _nonempty("TerminateNodes", "caller", self.caller)
        if not self.node_ids:
            raise InvalidMessage("TerminateNodes.node_ids: give at least one node id")
        if not all(nid.strip() for nid in self.node_ids):
            raise InvalidMessage("TerminateNodes.node_ids: node ids must not be empty")


@dataclass(frozen=True)
class TerminateAll(Message):
    """Disable provisioning and terminate every node. Replies ``Ok(done)``: True once no
    node is below TERMINATED; repeat until then (provisions meanwhile are REJECTED)."""


@dataclass(frozen=True)
class Enable(Message):
    """Clear the disabled flag set by :class:`TerminateAll`. Replies ``Ok(None)``."""


@dataclass(frozen=True)
class DescribeNodes(Message):
    """``Ok([node, ...])`` for the given ids (all of the caller's if None); a node the caller
    may not see is not found."""

    node_ids: list[str] | None = None
    caller: str | None = None

    def check(self) -> None:
        _nonempty("DescribeNodes", "caller", self.caller)
        if self.node_ids is not None:
            _ids("DescribeNodes", "node_ids", self.node_ids, allow_empty=True)


@dataclass(frozen=True)
class DumpState(Message):
    """Re-send the listed nodes' current records to the subscribers (empty: nothing); an id
    with no record is recorded TERMINATED ``UNKNOWN_NODE`` (as by a terminate) and that is
    sent. With ``counters`` (the ``update_counter`` the asker holds of each listed node, in
    the same order), a record still at that counter is not sent again: the asker has it
    (decision SC2). Replies the count sent."""

    node_ids: list[str]
    counters: list[int] | None = None

    def check(self) -> None:
        if not all(nid.strip() for nid in self.node_ids):
            raise InvalidMessage("DumpState.node_ids: node ids must not be empty")
        if self.counters is not None and len(self.counters) != len(self.node_ids):
            raise InvalidMessage(
                f"DumpState.counters: one per node id ({len(self.node_ids)}), "
                f"got {len(self.counters)}"
            )


@dataclass(frozen=True)
class Subscribe(Message):
    """Send every node state change to the peer ``name`` (e.g. ``"epum"``)."""

    name: str

    def check(self) -> None:
        _nonempty("Subscribe", "name", self.name)


@dataclass(frozen=True)
class Unsubscribe(Message):
    name: str


@dataclass(frozen=True)
class DescribeProvisioner(Message):
    """``Ok({...})``: node counts by state, disabled flag, work in flight, registry sizes."""


@dataclass(frozen=True)
class NodeStateChanged(Message):
    """Outbound to subscribers: a node's whole current record (level-based).

    Keys: node_id, launch_id, state, state_desc, site, caller, update_counter, iaas_id,
    public_ip, private_ip, hostname, deployable_type. ``update_counter`` grows with every
    change, so a receiver can drop stale or duplicate notices.
    """

    node: dict[str, Any]


# ---- registry (DTRS) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AddSite(Message):
    """Add a site; ``caller=None`` adds a common site."""

    name: str
    definition: dict[str, Any]
    caller: str | None = None


@dataclass(frozen=True)
class UpdateSite(Message):
    name: str
    definition: dict[str, Any]
    caller: str | None = None


@dataclass(frozen=True)
class RemoveSite(Message):
    name: str
    caller: str | None = None


@dataclass(frozen=True)
class DescribeSite(Message):
    """The caller's site ``name``, else the common one."""

    name: str
    caller: str | None = None


@dataclass(frozen=True)
class ListSites(Message):
    """Names of the sites the caller sees (its own and the common ones)."""

    caller: str | None = None


@dataclass(frozen=True)
class AddDeployableType(Message):
    name: str
    definition: dict[str, Any]
    caller: str | None = None


@dataclass(frozen=True)
class UpdateDeployableType(Message):
    name: str
    definition: dict[str, Any]
    caller: str | None = None


@dataclass(frozen=True)
class RemoveDeployableType(Message):
    name: str
    caller: str | None = None


@dataclass(frozen=True)
class DescribeDeployableType(Message):
    name: str
    caller: str | None = None


@dataclass(frozen=True)
class ListDeployableTypes(Message):
    caller: str | None = None


@dataclass(frozen=True)
class AddCredentials(Message):
    """Credentials of ``caller`` for ``site`` (the site must exist for the caller)."""

    recordable = False  # clear credentials: never in a recorded input (DBG6)

    site: str
    credentials: dict[str, Any]
    caller: str | None = None
    credential_type: str = "site"


@dataclass(frozen=True)
class UpdateCredentials(Message):
    recordable = False  # clear credentials: never in a recorded input (DBG6)

    site: str
    credentials: dict[str, Any]
    caller: str | None = None
    credential_type: str = "site"


@dataclass(frozen=True)
class RemoveCredentials(Message):
    site: str
    caller: str | None = None
    credential_type: str = "site"


@dataclass(frozen=True)
class DescribeCredentials(Message):
    """Answered with the credentials masked (secret values as ``****`` + a fingerprint)."""

    site: str
    caller: str | None = None
    credential_type: str = "site"


@dataclass(frozen=True)
class ListCredentials(Message):
    caller: str | None = None
    credential_type: str = "site"


@dataclass(frozen=True)
class Lookup(Message):
    """What a provision would launch: ``Ok({"node": {...}})`` or a not_found /
    bad_request error carrying the DTRS reason."""

    deployable_type: str
    site: str
    caller: str | None = None
    allocation: str | None = None
    vars: dict[str, Any] = field(default_factory=dict)


# ---- internal: timers and cloud work results ----------------------------------------------------

#: ``error_kind`` values of the work results.
ERROR_KINDS = ("timeout", "quota", "auth", "not_found", "other")


@dataclass(frozen=True)
class QuerySites(Message):
    """Timer: list every cloud account and reconcile (``booting``: only ask about the
    VMs still booting)."""

    booting: bool = False


@dataclass(frozen=True)
class ReapRecords(Message):
    """Timer: remove old records of finished nodes."""


@dataclass(frozen=True)
class RetryWork(Message):
    """Timer: issue destroys whose retry delay has passed."""


@dataclass(frozen=True)
class CreateResult(Message):
    """A create finished: the VM (``iaas_id`` ...), or ``error_kind``/``error``."""

    node_id: str
    client_token: str
    iaas_id: str | None = None
    public_ip: str | None = None
    private_ip: str | None = None
    hostname: str | None = None
    error_kind: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class DestroyResult(Message):
    """A destroy finished; ``node_id`` None for a zombie. ``error_kind="not_found"`` means
    the VM was already gone."""

    iaas_id: str
    account: str
    node_id: str | None = None
    error_kind: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ListResult(Message):
    """A listing of one account: each VM ``{iaas_id, state, client_token, public_ip,
    private_ip, hostname}`` with ``state`` an instance state name; or an error.
    ``partial``: only some VMs were asked about (a boot query), so absence means nothing."""

    max_bytes = None  # a cloud listing, sized by the cloud (decisions M2)

    account: str
    seq: int
    vms: list = field(default_factory=list)  # of dicts, checked for the keys the core reads
    error_kind: str | None = None
    error: str | None = None
    partial: bool = False

    def check(self) -> None:
        for i, vm in enumerate(self.vms):
            if not isinstance(vm, dict) or not isinstance(vm.get("iaas_id"), str):
                raise InvalidMessage(f"ListResult.vms[{i}]: expected a mapping with a string iaas_id")
            for key in ("state", "client_token", "public_ip", "private_ip", "hostname"):
                if not isinstance(vm.get(key), str | None):
                    raise InvalidMessage(f"ListResult.vms[{i}].{key}: expected a string or nothing")
