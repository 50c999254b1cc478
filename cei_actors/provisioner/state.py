"""The Provisioner's state: the fold of its events (nodes, launches, registry, flags, indexes).

``apply_event`` is total and pure. The node-level part of the fold runs against a
:class:`NodeView`, so the decision code can preview what its own events will do to a node
(for notifications and for the work it issues) with exactly the code that ``apply`` runs.

``ProvisionerState.volatile`` is the leader's view of work in flight (creates, destroys,
listings handed to workers). It is not part of the fold: replay starts it empty, and
recovery re-drives what may have been lost. State equality ignores it.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..runtime.tombstones import DEFAULT_LIMIT, Tombstones
from . import events as ev
from .registry import Registry, credential_key
from .sealing import entry_from_event
from .states import FINAL_STATES, rank

__all__ = [
    "UNKNOWN_LAUNCH",
    "Launch",
    "Node",
    "NodeView",
    "ProvisionerState",
    "Volatile",
    "account_key",
    "apply_event",
    "public_node",
]

#: Launch id of the stub records that a terminate of an unknown node id leaves behind.
UNKNOWN_LAUNCH = "provisioner-unknown-launch"

_TERMINATING = rank("TERMINATING")


def account_key(site_owner: str, site: str, credentials_owner: str | None) -> str:
    """The cloud account a node lives in: one listing per account."""
    return json.dumps([site_owner, site, credentials_owner], separators=(",", ":"))


@dataclass(slots=True)
class Node:
    node_id: str
    launch_id: str
    caller: str | None
    state: str
    state_desc: str | None = None
    update_counter: int = 0
    site: str | None = None
    deployable_type: str | None = None
    allocation: str | None = None
    account: str | None = None
    client_token: str | None = None
    iaas_id: str | None = None
    public_ip: str | None = None
    private_ip: str | None = None
    hostname: str | None = None
    iaas_image: str | None = None
    iaas_allocation: str | None = None
    iaas_sshkeyname: str | None = None
    requested_at: float = 0.0
    changed_at: float = 0.0
    state_changes: list[list[Any]] = field(default_factory=list)


_node_values = operator.attrgetter(*(f.name for f in dataclasses.fields(Node)))


def copy_node(node: Node) -> Node:
    """A copy of ``node`` with its own ``state_changes`` list (the other fields are shared:
    strings, numbers, None). Built by the constructor from every field, as ``copy.copy``
    would set them (RT12: ``copy.copy`` of a slotted dataclass goes through ``__reduce_ex__``)."""
    copied = Node(*_node_values(node))
    copied.state_changes = list(node.state_changes)
    return copied


@dataclass(slots=True)
class Launch:
    launch_id: str
    caller: str | None
    deployable_type: str
    site: str
    node_ids: list[str]
    at: float
    userdata: str | None = None
    domain: str | None = None  # the EPUM domain its vars name (``domain_id``), for VM tags


@dataclass
class Volatile:
    """Work in flight in this leader (not persisted; empty after recovery)."""

    creating: set[str] = field(default_factory=set)
    destroying: set[str] = field(default_factory=set)
    destroying_vms: set[str] = field(default_factory=set)  # zombie / orphan iaas ids
    retry_at: dict[str, float] = field(default_factory=dict)
    missing_since: dict[str, float] = field(default_factory=dict)
    listing: dict[str, int] = field(default_factory=dict)  # account -> listing seq in flight
    list_seq: int = 0
    #: REQUESTED nodes whose VM a previous leader may have made (set at recovery).
    maybe_created: set[str] = field(default_factory=set)
    #: TERMINATING nodes without iaas_id that wait for a listing with seq > value.
    uncertain: dict[str, int] = field(default_factory=dict)
    recovered: bool = False
    zombies_destroyed: int = 0
    #: account -> launched nodes not yet seen running (asked about every boot_query_interval)
    booting: dict[str, dict[str, None]] = field(default_factory=dict)
    boot_listing: set[str] = field(default_factory=set)  # accounts with a boot query in flight
    boot_timer: bool = False
    #: account -> the error of its last listing, while listings fail (for operators)
    list_errors: dict[str, str] = field(default_factory=dict)


@dataclass
class ProvisionerState:
    nodes: dict[str, Node] = field(default_factory=dict)
    launches: dict[str, Launch] = field(default_factory=dict)
    registry: Registry = field(default_factory=Registry)
    subscribers: list[str] = field(default_factory=list)
    disabled: bool = False
    # ---- indexes, derived from nodes (rebuilt on restore)
    by_token: dict[str, str] = field(default_factory=dict)
    requested: dict[str, None] = field(default_factory=dict)  # REQUESTED, in request order
    terminating: dict[str, None] = field(default_factory=dict)  # TERMINATING, in order
    active: dict[str, None] = field(default_factory=dict)  # below TERMINATING
    by_account: dict[str, dict[str, None]] = field(default_factory=dict)  # not final
    finished: dict[str, float] = field(default_factory=dict)  # final, in order reached
    #: reaped records' last public form, oldest first: what a late DumpState is answered
    reaped: Tombstones = field(default_factory=Tombstones)
    volatile: Volatile = field(default_factory=Volatile, compare=False, repr=False)

    # ---- index maintenance

    def _index(self, node: Node, old_state: str | None) -> None:
        nid, new = node.node_id, node.state
        if old_state == new:
            return
        if old_state is not None:
            if old_state == "REQUESTED":
                self.requested.pop(nid, None)
            elif old_state == "TERMINATING":
                self.terminating.pop(nid, None)
            if rank(old_state) < _TERMINATING and rank(new) >= _TERMINATING:
                self.active.pop(nid, None)
        else:
            if node.client_token:
                self.by_token[node.client_token] = nid
            if rank(new) < _TERMINATING:
                self.active[nid] = None
            if new not in FINAL_STATES and node.account is not None:
                self.by_account.setdefault(node.account, {})[nid] = None
        if new == "REQUESTED":
            self.requested[nid] = None
        elif new == "TERMINATING":
            self.terminating[nid] = None
        if new in FINAL_STATES and (old_state is None or old_state not in FINAL_STATES):
            self.finished[nid] = node.changed_at
            if node.account is not None:
                members = self.by_account.get(node.account)
                if members is not None:
                    members.pop(nid, None)
                    if not members:
                        del self.by_account[node.account]

    def _unindex(self, node: Node) -> None:
        nid = node.node_id
        for index in (self.requested, self.terminating, self.active, self.finished):
            index.pop(nid, None)
        if node.client_token and self.by_token.get(node.client_token) == nid:
            del self.by_token[node.client_token]
        if node.account is not None:
            members = self.by_account.get(node.account)
            if members is not None:
                members.pop(nid, None)
                if not members:
                    del self.by_account[node.account]

    def reindex(self) -> None:
        """Rebuild every index from ``nodes``."""
        for index in (self.by_token, self.requested, self.terminating, self.active,
                      self.by_account, self.finished):
            index.clear()
        for node in self.nodes.values():
            self._index(node, None)
        final = sorted(self.finished, key=lambda nid: self.nodes[nid].changed_at)
        self.finished = {nid: self.nodes[nid].changed_at for nid in final}

    # ---- snapshot form

    def to_data(self) -> dict[str, Any]:
        """Plain data for a snapshot (shares lists with the state: pack it at once)."""
        return {
            "nodes": [[getattr(n, f) for f in _NODE_FIELDS] for n in self.nodes.values()],
            "launches": [[getattr(x, f) for f in _LAUNCH_FIELDS] for x in self.launches.values()],
            "registry": self.registry.to_data(),
            "subscribers": list(self.subscribers),
            "disabled": self.disabled,
            "tombstones": self.reaped.to_data(),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> ProvisionerState:
        state = cls(
            registry=Registry.from_data(data["registry"]),
            subscribers=list(data["subscribers"]),
            disabled=bool(data["disabled"]),
        )
        for row in data["nodes"]:
            node = Node(*row)
            node.state_changes = [list(c) for c in node.state_changes]
            state.nodes[node.node_id] = node
        for row in data["launches"]:
            launch = Launch(*row)
            launch.node_ids = list(launch.node_ids)
            state.launches[launch.launch_id] = launch
        if "tombstones" in data:
            state.reaped = Tombstones.from_data(data["tombstones"])
        else:  # older snapshots: bare records (times unknown: 0.0), or none at all
            for record in data.get("reaped", ()):
                state.reaped.bury(record["node_id"], dict(record), 0.0, 0.0)
        state.reindex()
        return state

    def bury(self, node: Node, at: float) -> None:
        """Keep a reaped node's last public record (``bound`` trims the tombstones)."""
        self.reaped.bury(node.node_id, public_node(node), node.changed_at, at)


#: Tombstones kept when a ``NodesReaped`` event names no bound (written before bounds were
#: config): the bound the fold applied then.
MAX_TOMBSTONES = DEFAULT_LIMIT

_NODE_FIELDS = tuple(f.name for f in dataclasses.fields(Node))
_LAUNCH_FIELDS = tuple(f.name for f in dataclasses.fields(Launch))


def unknown_node(node_id: str, caller: str | None, at: float) -> Node:
    """The record that answers for a node id this Provisioner never had (or has forgotten):
    TERMINATED, ``UNKNOWN_NODE``, so whoever counts it as live stops doing so."""
    return Node(
        node_id=node_id,
        launch_id=UNKNOWN_LAUNCH,
        caller=caller,
        state="TERMINATED",
        state_desc="UNKNOWN_NODE",
        update_counter=1,
        requested_at=at,
        changed_at=at,
        state_changes=[["TERMINATED", at]],
    )


def public_node(node: Node, full: bool = False) -> dict[str, Any]:
    """A node as subscribers and callers see it (never userdata or credentials)."""
    out: dict[str, Any] = {
        "node_id": node.node_id,
        "launch_id": node.launch_id,
        "state": node.state,
        "state_desc": node.state_desc,
        "site": node.site,
        "caller": node.caller,
        "update_counter": node.update_counter,
        "iaas_id": node.iaas_id,
        "public_ip": node.public_ip,
        "private_ip": node.private_ip,
        "hostname": node.hostname,
        "deployable_type": node.deployable_type,
    }
    if full:
        out.update(
            allocation=node.allocation,
            iaas_image=node.iaas_image,
            iaas_allocation=node.iaas_allocation,
            iaas_sshkeyname=node.iaas_sshkeyname,
            client_token=node.client_token,
            requested_at=node.requested_at,
            changed_at=node.changed_at,
            state_changes=[list(c) for c in node.state_changes],
        )
    return out


# ---------------------------------------------------------------------- the node-level fold


class NodeView:
    """Node access for the fold. The real view writes the state and its indexes."""

    real = True

    def __init__(self, state: ProvisionerState) -> None:
        self.state = state

    def get(self, node_id: str) -> Node | None:
        return self.state.nodes.get(node_id)

    def add(self, node: Node) -> None:
        self.state.nodes[node.node_id] = node
        self.state._index(node, None)

    def changed(self, node: Node, old_state: str) -> None:
        self.state._index(node, old_state)

    def remove(self, node_id: str, at: float) -> None:
        node = self.state.nodes.pop(node_id, None)
        if node is not None:
            self.state._unindex(node)
            self.state.bury(node, at)


def _set_state(node: Node, new: str, desc: str | None, at: float) -> bool:
    """Move ``node`` forward to ``new``; final states never change. True if it moved."""
    old = node.state
    if old in FINAL_STATES or rank(new) <= rank(old):
        return False
    node.state = new
    node.state_desc = desc
    node.changed_at = at
    node.state_changes.append([new, at])
    node.update_counter += 1
    return True


def _move(view: NodeView, node: Node, new: str, desc: str | None, at: float) -> None:
    old = node.state
    if _set_state(node, new, desc, at):
        view.changed(node, old)


def _fill(node: Node, update: dict[str, Any]) -> bool:
    touched = False
    for key in ("iaas_id", "public_ip", "private_ip", "hostname"):
        if key in update and update[key] is not None and getattr(node, key) != update[key]:
            setattr(node, key, update[key])
            touched = True
    return touched


def _new_node(e: ev.LaunchRequested, spec: dict[str, Any]) -> Node:
    state = spec["state"]
    shared = e.spec or {}
    return Node(
        node_id=spec["node_id"],
        launch_id=e.launch_id,
        caller=e.caller,
        state=state,
        state_desc=spec.get("state_desc"),
        update_counter=1,
        site=e.site,
        deployable_type=e.deployable_type,
        allocation=e.allocation,
        account=shared.get("account"),
        client_token=spec.get("client_token"),
        iaas_image=shared.get("iaas_image"),
        iaas_allocation=shared.get("iaas_allocation"),
        iaas_sshkeyname=shared.get("iaas_sshkeyname"),
        requested_at=e.at,
        changed_at=e.at,
        state_changes=[[state, e.at]],
    )


def apply_nodes(view: NodeView, e: Any) -> Iterable[str]:
    """Apply the node-level part of event ``e``; returns the ids of nodes it touched."""
    touched: list[str] = []
    if isinstance(e, ev.LaunchRequested):
        for spec in e.nodes:
            view.add(_new_node(e, spec))
            touched.append(spec["node_id"])
        for nid in e.absorbed:
            node = view.get(nid)
            if node is not None and node.launch_id != e.launch_id:
                node.launch_id = e.launch_id
                node.update_counter += 1
                touched.append(nid)
    elif isinstance(e, ev.NodeLaunched):
        node = view.get(e.node_id)
        if node is not None:
            changed = _fill(node, {"iaas_id": e.iaas_id, "public_ip": e.public_ip,
                                   "private_ip": e.private_ip, "hostname": e.hostname})
            old = node.state
            if old == "REQUESTED" and _set_state(node, "PENDING", None, e.at):
                view.changed(node, old)
            elif changed:
                node.update_counter += 1
            touched.append(e.node_id)
    elif isinstance(e, ev.NodeLaunchFailed):
        node = view.get(e.node_id)
        if node is not None:
            _move(view, node, e.state, e.state_desc, e.at)
            touched.append(e.node_id)
    elif isinstance(e, ev.TerminateRequested):
        for nid in e.terminating:
            node = view.get(nid)
            if node is not None:
                _move(view, node, "TERMINATING", None, e.at)
                touched.append(nid)
        for nid in e.terminated:
            node = view.get(nid)
            if node is not None:
                _move(view, node, "TERMINATED", "TERMINATED_BEFORE_LAUNCH", e.at)
                touched.append(nid)
        for nid in e.unknown:
            if view.get(nid) is None:
                view.add(unknown_node(nid, e.caller, e.at))
                touched.append(nid)
    elif isinstance(e, ev.NodeTerminated):
        node = view.get(e.node_id)
        if node is not None:
            _move(view, node, "TERMINATED", e.state_desc, e.at)
            touched.append(e.node_id)
    elif isinstance(e, ev.NodesObserved):
        for update in e.updates:
            node = view.get(update["node_id"])
            if node is None:
                continue
            counter = node.update_counter
            filled = _fill(node, update)
            new = update.get("state")
            old = node.state
            if new is not None and _set_state(node, new, update.get("state_desc"), e.at):
                view.changed(node, old)
            elif filled:
                node.update_counter += 1
            if node.update_counter != counter:
                touched.append(node.node_id)
    elif isinstance(e, ev.UnknownNodesAnswered):
        for nid in e.node_ids:
            if view.get(nid) is None:
                view.add(unknown_node(nid, None, e.at))
                touched.append(nid)
    elif isinstance(e, ev.NodesReaped):
        for nid in e.node_ids:
            view.remove(nid, e.at)
    return touched


# ---------------------------------------------------------------------- the whole fold


def apply_event(state: ProvisionerState, e: Any) -> ProvisionerState:
    """Fold one event into ``state`` (in place) and return it."""
    kind = type(e)
    if kind in _NODE_EVENTS:
        if kind is ev.LaunchRequested:
            ids = [spec["node_id"] for spec in e.nodes] + list(e.absorbed)
            state.launches[e.launch_id] = Launch(
                e.launch_id, e.caller, e.deployable_type, e.site, ids, e.at,
                (e.spec or {}).get("userdata"), (e.spec or {}).get("domain"),
            )
        elif kind is ev.NodesReaped:
            for nid in e.node_ids:
                node = state.nodes.get(nid)
                launch = state.launches.get(node.launch_id) if node is not None else None
                if launch is not None:
                    launch.node_ids = [i for i in launch.node_ids if i != nid]
                    if not launch.node_ids:
                        del state.launches[launch.launch_id]
        apply_nodes(NodeView(state), e)
        if kind is ev.NodesReaped:
            state.reaped.bound(MAX_TOMBSTONES if e.keep is None else e.keep, e.before)
    elif kind is ev.ProvisionerDisabled:
        state.disabled = True
    elif kind is ev.ProvisionerEnabled:
        state.disabled = False
    elif kind is ev.SubscriberAdded:
        if e.name not in state.subscribers:
            state.subscribers.append(e.name)
    elif kind is ev.SubscriberRemoved:
        if e.name in state.subscribers:
            state.subscribers.remove(e.name)
    elif kind is ev.SiteSaved:
        state.registry.sites.setdefault(e.owner, {})[e.name] = dict(e.definition)
    elif kind is ev.SiteRemoved:
        _drop(state.registry.sites, e.owner, e.name)
    elif kind is ev.DeployableTypeSaved:
        state.registry.dts.setdefault(e.owner, {})[e.name] = dict(e.definition)
    elif kind is ev.DeployableTypeRemoved:
        _drop(state.registry.dts, e.owner, e.name)
    elif kind is ev.CredentialsSaved:
        key = credential_key(e.site, e.credential_type)
        state.registry.credentials.setdefault(e.owner, {})[key] = entry_from_event(
            e.credentials, e.sealed)
    elif kind is ev.CredentialsRemoved:
        _drop(state.registry.credentials, e.owner, credential_key(e.site, e.credential_type))
    return state


def _drop(table: dict[str, dict[str, Any]], owner: str, name: str) -> None:
    items = table.get(owner)
    if items is not None:
        items.pop(name, None)
        if not items:
            del table[owner]


_NODE_EVENTS = frozenset(
    {
        ev.LaunchRequested,
        ev.NodeLaunched,
        ev.NodeLaunchFailed,
        ev.TerminateRequested,
        ev.NodeTerminated,
        ev.NodesObserved,
        ev.NodesReaped,
        ev.UnknownNodesAnswered,
    }
)


class PreviewView(NodeView):
    """A copy-on-write view over a state: what this decision's events will do to nodes."""

    real = False

    def __init__(self, state: ProvisionerState) -> None:
        super().__init__(state)
        self.nodes: dict[str, Node | None] = {}
        self.entered: dict[str, str] = {}  # node id -> a state it entered in this preview

    def get(self, node_id: str) -> Node | None:
        if node_id in self.nodes:
            return self.nodes[node_id]
        node = self.state.nodes.get(node_id)
        if node is not None:
            node = copy_node(node)
            self.nodes[node_id] = node
        return node

    def peek(self, node_id: str) -> Node | None:
        """The node as this decision leaves it, without copying."""
        if node_id in self.nodes:
            return self.nodes[node_id]
        return self.state.nodes.get(node_id)

    def add(self, node: Node) -> None:
        self.nodes[node.node_id] = node
        self.entered[node.node_id] = node.state

    def changed(self, node: Node, old_state: str) -> None:
        self.entered[node.node_id] = node.state

    def remove(self, node_id: str, at: float) -> None:
        self.nodes[node_id] = None
