"""The Provisioner's decisions: a pure :class:`~cei_actors.runtime.core.Component`.

Every cloud call is a :class:`Work` effect (``create``, ``destroy``, ``list``) whose result
comes back as a message and is recorded as an event. The order that makes it safe:

- A provision writes ``LaunchRequested`` before any create. Each create carries a client
  token derived from the launch and node id, so a create re-driven after a crash (from
  :meth:`Provisioner.recovered`) returns the VM the first one made: never two VMs per node.
- Creates and destroys are bounded (``create_concurrency``, ``terminator_concurrency``);
  the rest wait in the state. A node terminated before its create was issued never gets
  one; one terminated while its create runs has its VM destroyed when the result arrives.
- ``terminate_all`` disables provisioning, waits until no create is in flight, then marks
  every node below TERMINATING; it reports done once no node is below TERMINATED.
- A periodic listing of every cloud account reconciles: PENDING nodes become RUNNING,
  nodes missing longer than ``disappear_grace`` become TERMINATED (``NODE_DISAPPEARED``),
  and live VMs carrying our client-token prefix that belong to no live node (zombies,
  orphans of failed or terminated nodes) are destroyed. VMs without the prefix are left
  alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any

from ..runtime.core import (
    Component,
    Context,
    Decision,
    Rejected,
    Send,
    SetTimer,
    Work,
    bad_request,
    conflict,
    forbidden,
    not_found,
)
from ..runtime.messages import Ok
from ..runtime.tombstones import DEFAULT_LIMIT, DEFAULT_MAX_AGE, parse_tombstone_bounds
from . import events as ev
from . import invariants
from . import messages as m
from . import registry as dtrs
from .contextualization import for_node
from .sealing import CredentialsKey, entry_from_event, entry_view, redact_entry, upgrade_entry
from .state import (
    _NODE_EVENTS,
    UNKNOWN_LAUNCH,
    Launch,
    Node,
    PreviewView,
    ProvisionerState,
    account_key,
    apply_event,
    apply_nodes,
    public_node,
)
from .states import FINAL_STATES, Reason, codes, rank

__all__ = ["CONFIG_KEYS", "Provisioner", "client_token"]

_TERMINATING = rank("TERMINATING")
#: At most this many ids (or updates) per event, so no event grows past a znode's limit.
EVENT_CHUNK = 500
#: At most this many VMs asked about per boot query (EC2 takes up to 1,000 instance ids).
BOOT_QUERY_MAX = 500
MAX_CLIENT_TOKEN = 64  # EC2's limit

#: Configuration keys accepted by :meth:`Provisioner.from_config`, with their defaults.
CONFIG_KEYS: dict[str, Any] = {
    "query_interval": 10.0,  # seconds between listings of every cloud account
    "boot_query_interval": 2.0,  # seconds between listings of accounts with booting VMs
    "disappear_grace": 60.0,  # a VM missing from listings this long is NODE_DISAPPEARED
    "create_concurrency": 20,  # creates in flight at most
    "terminator_concurrency": 10,  # destroys in flight at most
    "destroy_retry_delay": 5.0,  # seconds before a failed destroy is retried
    "reaper_interval": 300.0,  # seconds between reaper runs
    "record_max_age": 7200.0,  # finished node records older than this are removed
    "tombstone_limit": DEFAULT_LIMIT,  # removed records remembered (last public record)
    "tombstone_max_age": DEFAULT_MAX_AGE,  # seconds they are remembered ('forever': no limit)
    "client_token_prefix": "cei-",  # marks our VMs; zombies carry it
    "default_user": None,  # the caller assumed when a request names none
    "subscribers": [],  # peer names notified of every node change (besides Subscribe)
    "destroy_zombies": True,  # destroy VMs with our prefix that no live node owns
}


def client_token(prefix: str, launch_id: str, node_id: str) -> str:
    """The idempotency token of a node's create: stable, and at most 64 characters."""
    digest = hashlib.sha256(f"{launch_id}\0{node_id}".encode()).hexdigest()
    return f"{prefix}{digest[: MAX_CLIENT_TOKEN - len(prefix)][:40]}"


def _chunks(items: list[Any], size: int = EVENT_CHUNK) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


class _Txn:
    """One decision in the making: its events, effects, and a preview of its nodes."""

    def __init__(self, state: ProvisionerState, ctx: Context) -> None:
        self.state = state
        self.now = ctx.now
        self.view = PreviewView(state)
        self.events: list[Any] = []
        self.effects: list[Any] = []
        self.touched: dict[str, None] = {}
        self.disabled = state.disabled
        self.launches: dict[str, Launch] = {}

    def emit(self, event: Any) -> None:
        self.events.append(event)
        kind = type(event)
        if kind in _NODE_EVENTS:
            for nid in apply_nodes(self.view, event):
                self.touched[nid] = None
            if kind is ev.LaunchRequested:
                self.launches[event.launch_id] = Launch(
                    event.launch_id, event.caller, event.deployable_type, event.site, [],
                    event.at, (event.spec or {}).get("userdata"),
                    (event.spec or {}).get("domain"),
                )
        elif kind is ev.ProvisionerDisabled:
            self.disabled = True
        elif kind is ev.ProvisionerEnabled:
            self.disabled = False

    def node(self, node_id: str) -> Node | None:
        return self.view.peek(node_id)

    def entered(self, state: str) -> list[str]:
        return [nid for nid, s in self.view.entered.items() if s == state]


class Provisioner(Component[ProvisionerState]):
    """Nodes, launches and the deployable type registry; see the module docstring.

    Configuration: the keys of :data:`CONFIG_KEYS`, plus ``site_validator`` and
    ``credentials_validator`` (callables; the actor passes the drivers' validators, the
    default checks only that a site has a ``type``) and ``credentials_key`` (the operator's
    :class:`~.sealing.CredentialsKey`; without one, credentials are refused, never stored in
    clear).
    """

    registry = ev.events
    stream = "provisioner"

    def __init__(
        self,
        *,
        query_interval: float = 10.0,
        boot_query_interval: float = 2.0,
        disappear_grace: float = 60.0,
        create_concurrency: int = 20,
        terminator_concurrency: int = 10,
        destroy_retry_delay: float = 5.0,
        reaper_interval: float = 300.0,
        record_max_age: float = 7200.0,
        tombstone_limit: int = DEFAULT_LIMIT,
        tombstone_max_age: float | str | None = DEFAULT_MAX_AGE,
        client_token_prefix: str = "cei-",
        default_user: str | None = None,
        subscribers: list[str] | tuple[str, ...] = (),
        destroy_zombies: bool = True,
        site_validator: dtrs.SiteValidator | None = None,
        credentials_validator: dtrs.CredentialsValidator | None = None,
        credentials_key: CredentialsKey | None = None,
    ) -> None:
        if not client_token_prefix or len(client_token_prefix) > 24:
            raise ValueError("client_token_prefix must be 1-24 characters")
        if create_concurrency < 1 or terminator_concurrency < 1:
            raise ValueError("create_concurrency and terminator_concurrency must be >= 1")
        for name, value in (("query_interval", query_interval),
                            ("boot_query_interval", boot_query_interval),
                            ("reaper_interval", reaper_interval),
                            ("disappear_grace", disappear_grace),
                            ("destroy_retry_delay", destroy_retry_delay),
                            ("record_max_age", record_max_age)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0")
        self.query_interval = float(query_interval)
        self.boot_query_interval = float(boot_query_interval)
        self.disappear_grace = float(disappear_grace)
        self.create_concurrency = int(create_concurrency)
        self.terminator_concurrency = int(terminator_concurrency)
        self.destroy_retry_delay = float(destroy_retry_delay)
        self.reaper_interval = float(reaper_interval)
        self.record_max_age = float(record_max_age)
        self.tombstones = parse_tombstone_bounds("provisioner", tombstone_limit,
                                                 tombstone_max_age)
        self.prefix = client_token_prefix
        self.default_user = default_user
        self.subscribers = tuple(subscribers)
        self.destroy_zombies = bool(destroy_zombies)
        self.site_validator = site_validator
        self.credentials_validator = credentials_validator
        self.credentials_key = credentials_key
        self._handlers: dict[type, Callable[[ProvisionerState, Any, _Txn], Any]] = {
            m.Provision: self._provision,
            m.TerminateNodes: self._terminate_nodes,
            m.TerminateAll: self._terminate_all,
            m.Enable: self._enable,
            m.DescribeNodes: self._describe_nodes,
            m.DumpState: self._dump_state,
            m.Subscribe: self._subscribe,
            m.Unsubscribe: self._unsubscribe,
            m.DescribeProvisioner: self._status,
            m.AddSite: self._add_site,
            m.UpdateSite: self._update_site,
            m.RemoveSite: self._remove_site,
            m.DescribeSite: self._describe_site,
            m.ListSites: self._list_sites,
            m.AddDeployableType: self._add_dt,
            m.UpdateDeployableType: self._update_dt,
            m.RemoveDeployableType: self._remove_dt,
            m.DescribeDeployableType: self._describe_dt,
            m.ListDeployableTypes: self._list_dts,
            m.AddCredentials: self._add_credentials,
            m.UpdateCredentials: self._update_credentials,
            m.RemoveCredentials: self._remove_credentials,
            m.DescribeCredentials: self._describe_credentials,
            m.ListCredentials: self._list_credentials,
            m.Lookup: self._lookup,
            m.QuerySites: self._query_sites,
            m.ReapRecords: self._reap,
            m.RetryWork: lambda state, msg, txn: None,
            m.CreateResult: self._create_result,
            m.DestroyResult: self._destroy_result,
            m.ListResult: self._list_result,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **injected: Any) -> Provisioner:
        """Build from plain configuration (keys of :data:`CONFIG_KEYS`); unknown keys are refused."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"unknown provisioner config key(s): {', '.join(unknown)} "
                f"(known: {', '.join(CONFIG_KEYS)})"
            )
        return cls(**config, **injected)

    # ------------------------------------------------------------------ component contract

    def initial_state(self) -> ProvisionerState:
        return ProvisionerState()

    def apply(self, state: ProvisionerState, event: Any) -> ProvisionerState:
        return apply_event(state, event)

    def snapshot(self, state: ProvisionerState) -> Any:
        return state.to_data()

    def restore(self, data: Any) -> ProvisionerState:
        return ProvisionerState.from_data(data)

    def invariants(self, state: ProvisionerState) -> list[str]:
        return invariants.broken(state)

    # ---- what `cei log` shows: never a credential (for `show`, `state` and `diff`)

    @staticmethod
    def redact_event(type_name: str, body: dict[str, Any]) -> dict[str, Any]:
        """An event body as displayed: credentials masked, the sealed token left out."""
        if type_name != "CredentialsSaved":
            return body
        entry = redact_entry(entry_from_event(body["credentials"], body.get("sealed")))
        return {**body, "credentials": entry["view"],
                "sealed": {"key_id": entry["key_id"]} if "key_id" in entry else None}

    @staticmethod
    def redact_snapshot(data: Any) -> Any:
        """A snapshot (``snapshot(state)``) as displayed: each credentials entry redacted."""
        creds = data["registry"]["credentials"]
        redacted = {o: {k: redact_entry(upgrade_entry(v)) for k, v in items.items()}
                    for o, items in creds.items()}
        return {**data, "registry": {**data["registry"], "credentials": redacted}}

    def decide(self, state: ProvisionerState, message: Any, ctx: Context) -> Decision:
        handler = self._handlers.get(type(message))
        if handler is None:
            raise bad_request(f"the provisioner does not handle {type(message).__name__}")
        txn = _Txn(state, ctx)
        reply = handler(state, message, txn)
        self._pump(state, txn)
        return self._finish(state, txn, reply)

    def recovered(self, state: ProvisionerState, ctx: Context) -> Decision:
        v = state.volatile
        v.recovered = True
        # A previous leader may have issued these creates (or made these VMs): re-drive
        # the creates with the same tokens, and let a listing settle the terminating ones.
        v.maybe_created = set(state.requested)
        for nid in state.terminating:
            if state.nodes[nid].iaas_id is None:
                v.uncertain[nid] = 0
        txn = _Txn(state, ctx)
        # Issue what needs no event now; anything that writes (terminate_all's second
        # phase, a node whose site vanished) waits for the first pump message.
        self._pump(state, txn, write=False)
        assert not txn.events
        txn.effects.append(SetTimer("retry", 0.0, m.RetryWork()))
        txn.effects.append(SetTimer("query", 0.0, m.QuerySites()))
        if self.reaper_interval > 0:
            txn.effects.append(SetTimer("reap", self.reaper_interval, m.ReapRecords()))
        return self._finish(state, txn, None)

    def _finish(self, state: ProvisionerState, txn: _Txn, reply: Any) -> Decision:
        subs = self._subscribers(state)
        if subs and txn.touched:
            for nid in txn.touched:
                node = txn.node(nid)
                stone = state.reaped.get(nid) if node is None else None
                record = public_node(node) if node is not None else (
                    stone.record if stone is not None else None)
                if record is not None:
                    notice = m.NodeStateChanged(dict(record))
                    txn.effects.extend(Send(sub, notice) for sub in subs)
        return Decision(events=txn.events, effects=txn.effects, reply=reply)

    def _subscribers(self, state: ProvisionerState) -> list[str]:
        if not self.subscribers:
            return state.subscribers
        return list(dict.fromkeys(chain(self.subscribers, state.subscribers)))

    # ------------------------------------------------------------------ helpers

    def _caller(self, caller: str | None) -> str | None:
        return caller if caller is not None else self.default_user

    @staticmethod
    def _may(caller: str | None, owner: str | None) -> bool:
        return caller is None or caller == owner

    def _account_spec(
        self, state: ProvisionerState, account: str
    ) -> tuple[str, dict[str, Any], dict[str, Any] | None] | None:
        """``(site name, site definition, credentials)`` of a cloud account, or None."""
        site_owner, site, creds_owner = json.loads(account)
        site_def = state.registry.sites.get(site_owner, {}).get(site)
        if site_def is None:
            return None
        creds = None
        if creds_owner is not None:
            creds = state.registry.credentials.get(creds_owner, {}).get(
                dtrs.credential_key(site)
            )
            if creds is None:
                return None
        return site, site_def, creds

    def _accounts(self, state: ProvisionerState) -> list[str]:
        """Every cloud account to list: each registered site with each usable credential."""
        reg = state.registry
        accounts: dict[str, None] = {}
        for owner, sites in reg.sites.items():
            for name, site_def in sites.items():
                if not dtrs.needs_credentials(site_def):
                    accounts[account_key(owner, name, None)] = None
                    continue
                key = dtrs.credential_key(name)
                holders = [owner] if owner != dtrs.COMMON else list(reg.credentials)
                for holder in holders:
                    if key not in reg.credentials.get(holder, {}):
                        continue
                    if owner == dtrs.COMMON and name in reg.sites.get(holder, {}) and holder:
                        continue  # the holder's own site of that name shadows the common one
                    accounts[account_key(owner, name, holder)] = None
        for account in state.by_account:
            accounts[account] = None
        return list(accounts)

    def _work(self, kind: str, spec: tuple[str, dict[str, Any], dict[str, Any] | None],
              account: str, **payload: Any) -> Work:
        site, site_def, creds = spec
        return Work(kind, {"account": account, "site": site, "definition": site_def,
                           "credentials": creds, "system": self.prefix, **payload})

    def _launch(self, state: ProvisionerState, txn: _Txn, launch_id: str) -> Launch | None:
        return txn.launches.get(launch_id) or state.launches.get(launch_id)

    # ------------------------------------------------------------------ the pump

    def _pump(self, state: ProvisionerState, txn: _Txn, write: bool = True) -> None:
        """Issue the creates and destroys that fit, and run terminate_all's second phase.

        With ``write=False`` it issues only what needs no event."""
        v = state.volatile
        if txn.disabled and not v.creating and write:
            self._terminate_everything(state, txn)
        free = self.create_concurrency - len(v.creating)
        if free > 0 and not txn.disabled:
            for nid in chain(state.requested, txn.entered("REQUESTED")):
                if nid in v.creating:
                    continue
                node = txn.node(nid)
                if node is None or node.state != "REQUESTED":
                    continue
                if not write and (node.account is None
                                  or self._account_spec(state, node.account) is None
                                  or self._launch(state, txn, node.launch_id) is None):
                    continue
                self._issue_create(state, txn, node)
                free -= 1
                if free <= 0:
                    break
        free = self.terminator_concurrency - len(v.destroying)
        if free > 0:
            for nid in chain(state.terminating, txn.entered("TERMINATING")):
                if nid in v.destroying:
                    continue
                node = txn.node(nid)
                if node is None or node.state != "TERMINATING" or node.iaas_id is None:
                    continue
                if v.retry_at.get(nid, 0.0) > txn.now:
                    continue
                self._issue_destroy(state, txn, node)
                free -= 1
                if free <= 0:
                    break

    def _issue_create(self, state: ProvisionerState, txn: _Txn, node: Node) -> None:
        v = state.volatile
        spec = self._account_spec(state, node.account) if node.account else None
        launch = self._launch(state, txn, node.launch_id)
        if spec is None or launch is None:
            txn.emit(ev.NodeLaunchFailed(
                node.node_id, "FAILED",
                f"{Reason.DTRS_LOOKUP_FAILED}: the site or credentials of this node were removed",
                txn.now,
            ))
            return
        v.creating.add(node.node_id)
        txn.effects.append(self._work(
            "create", spec, node.account,
            node_id=node.node_id,
            launch_id=node.launch_id,
            client_token=node.client_token,
            image=node.iaas_image,
            size=node.iaas_allocation,
            keyname=node.iaas_sshkeyname,
            userdata=for_node(launch.userdata, node.node_id),
            caller=launch.caller,
            deployable_type=launch.deployable_type,
            domain=launch.domain,
        ))

    def _issue_destroy(self, state: ProvisionerState, txn: _Txn, node: Node) -> None:
        v = state.volatile
        spec = self._account_spec(state, node.account) if node.account else None
        if spec is None:  # cannot reach the cloud: retry later (site was re-added?)
            self._retry(state, txn, node.node_id)
            return
        v.destroying.add(node.node_id)
        txn.effects.append(self._work("destroy", spec, node.account,
                                      iaas_id=node.iaas_id, node_id=node.node_id))

    def _destroy_vm(self, state: ProvisionerState, txn: _Txn, account: str, iaas_id: str) -> None:
        """Destroy a VM no live node owns (a zombie or an orphan)."""
        v = state.volatile
        if not self.destroy_zombies or iaas_id in v.destroying_vms:
            return
        spec = self._account_spec(state, account)
        if spec is None:
            return
        v.destroying_vms.add(iaas_id)
        v.zombies_destroyed += 1
        txn.effects.append(self._work("destroy", spec, account, iaas_id=iaas_id, node_id=None))

    def _retry(self, state: ProvisionerState, txn: _Txn, node_id: str) -> None:
        state.volatile.retry_at[node_id] = txn.now + self.destroy_retry_delay
        txn.effects.append(SetTimer("retry", self.destroy_retry_delay, m.RetryWork()))

    def _list(self, state: ProvisionerState, txn: _Txn, account: str) -> None:
        v = state.volatile
        if account in v.listing:
            return
        spec = self._account_spec(state, account)
        if spec is None:
            return
        v.list_seq += 1
        v.listing[account] = v.list_seq
        txn.effects.append(self._work("list", spec, account, seq=v.list_seq))

    def _terminate_everything(self, state: ProvisionerState, txn: _Txn) -> None:
        ids = [nid for nid in chain(state.active, txn.view.entered)
               if (n := txn.node(nid)) is not None and rank(n.state) < _TERMINATING]
        if ids:
            self._terminate(state, txn, list(dict.fromkeys(ids)), [], None, everything=True)

    def _terminate(self, state: ProvisionerState, txn: _Txn, ids: list[str], unknown: list[str],
                   caller: str | None, everything: bool = False) -> None:
        v = state.volatile
        terminating, terminated = [], []
        for nid in ids:
            node = txn.node(nid)
            if node is None or rank(node.state) >= _TERMINATING:
                continue
            if node.iaas_id is not None or nid in v.creating or nid in v.maybe_created:
                terminating.append(nid)
                if node.iaas_id is None and nid not in v.creating:
                    v.uncertain[nid] = v.list_seq  # a listing must tell whether a VM exists
            else:
                terminated.append(nid)
        for part in range(0, max(len(terminating), len(terminated), len(unknown), 1), EVENT_CHUNK):
            a = terminating[part : part + EVENT_CHUNK]
            b = terminated[part : part + EVENT_CHUNK]
            c = unknown[part : part + EVENT_CHUNK]
            if a or b or c:
                txn.emit(ev.TerminateRequested(caller, a, b, c, everything, txn.now))
        for nid in terminating:
            node = txn.node(nid)
            if nid in v.uncertain and node is not None and node.account:
                self._list(state, txn, node.account)

    # ------------------------------------------------------------------ node operations

    def _provision(self, state: ProvisionerState, msg: m.Provision, txn: _Txn) -> Any:
        caller = self._caller(msg.caller)
        launch = state.launches.get(msg.launch_id)
        if launch is not None:
            if not self._may(caller, launch.caller):
                raise forbidden(f"launch {msg.launch_id!r} belongs to another caller")
            extra = [nid for nid in msg.node_ids if nid not in launch.node_ids]
            if extra:
                raise bad_request(
                    f"launch {msg.launch_id!r} exists with other node ids (not {extra[0]!r})"
                )
            # A repeat: nothing new; re-send the current records (level-based).
            for nid in launch.node_ids:
                txn.touched[nid] = None
            return Ok(self._launch_reply(msg.launch_id, msg.node_ids, txn))
        absorbed = []
        for nid in msg.node_ids:
            node = state.nodes.get(nid)
            if node is None:
                continue
            if node.launch_id != UNKNOWN_LAUNCH:
                raise bad_request(f"node {nid!r} already belongs to launch {node.launch_id!r}")
            if not self._may(caller, node.caller):
                raise forbidden(f"node {nid!r} belongs to another caller")
            absorbed.append(nid)
        fresh = [nid for nid in msg.node_ids if nid not in absorbed]
        reg = state.registry
        if dtrs.resolve_dt(reg, caller, msg.deployable_type) is None:
            raise bad_request(f"unknown deployable type {msg.deployable_type!r}")
        found = dtrs.resolve_site(reg, caller, msg.site)
        if found is None:
            raise bad_request(f"unknown site {msg.site!r}")
        spec: dict[str, Any] | None = None
        state_name, desc = "REQUESTED", None
        if txn.disabled:
            state_name, desc = "REJECTED", Reason.PROVISIONER_DISABLED
        else:
            try:
                looked = dtrs.lookup(reg, caller, msg.deployable_type, msg.site,
                                     msg.allocation, msg.vars)
            except dtrs.LookupFailed as exc:
                state_name, desc = "FAILED", exc.state_desc
            else:
                spec = {
                    "account": account_key(looked["site_owner"], _bare(msg.site),
                                           looked["credentials_owner"]),
                    "iaas_image": looked["iaas_image"],
                    "iaas_allocation": looked["iaas_allocation"],
                    "iaas_sshkeyname": looked["iaas_sshkeyname"],
                    "userdata": looked["userdata"],
                }
                domain = (msg.vars or {}).get("domain_id")
                if isinstance(domain, str) and domain:
                    spec["domain"] = domain
        nodes = [
            {
                "node_id": nid,
                "state": state_name,
                "state_desc": desc,
                "client_token": client_token(self.prefix, msg.launch_id, nid) if spec else None,
            }
            for nid in fresh
        ]
        txn.emit(ev.LaunchRequested(msg.launch_id, caller, msg.deployable_type, msg.site,
                                    msg.allocation, spec, nodes, absorbed, txn.now))
        return Ok(self._launch_reply(msg.launch_id, msg.node_ids, txn))

    def _launch_reply(self, launch_id: str, ids: list[str], txn: _Txn) -> dict[str, Any]:
        nodes = [public_node(n) for nid in ids if (n := txn.node(nid)) is not None]
        return {"launch_id": launch_id, "nodes": nodes}

    def _terminate_nodes(self, state: ProvisionerState, msg: m.TerminateNodes, txn: _Txn) -> Any:
        caller = self._caller(msg.caller)
        unknown = []
        ids = list(dict.fromkeys(msg.node_ids))
        for nid in ids:
            node = state.nodes.get(nid)
            if node is None:
                unknown.append(nid)
            elif not self._may(caller, node.caller):
                raise forbidden(f"node {nid!r} belongs to another caller")
        known = [nid for nid in ids if nid not in unknown]
        self._terminate(state, txn, known, unknown, caller)
        return Ok([public_node(n) for nid in ids if (n := txn.node(nid)) is not None])

    def _terminate_all(self, state: ProvisionerState, msg: m.TerminateAll, txn: _Txn) -> Any:
        if not txn.disabled:
            txn.emit(ev.ProvisionerDisabled(txn.now))
        return Ok(not state.active and not state.terminating)

    def _enable(self, state: ProvisionerState, msg: m.Enable, txn: _Txn) -> Any:
        if txn.disabled:
            txn.emit(ev.ProvisionerEnabled(txn.now))
        return Ok(None)

    def _describe_nodes(self, state: ProvisionerState, msg: m.DescribeNodes, txn: _Txn) -> Any:
        caller = self._caller(msg.caller)
        if msg.node_ids is None:
            return Ok([public_node(n, full=True) for n in state.nodes.values()
                       if self._may(caller, n.caller)])
        out = []
        for nid in msg.node_ids:
            node = state.nodes.get(nid)
            if node is None or not self._may(caller, node.caller):
                raise not_found(f"unknown node {nid!r}")
            out.append(public_node(node, full=True))
        return Ok(out)

    def _dump_state(self, state: ProvisionerState, msg: m.DumpState, txn: _Txn) -> Any:
        """Re-send the listed records: a reaped one is answered with its last record; an id
        with neither (never had, or forgotten past the tombstones) becomes a TERMINATED
        ``UNKNOWN_NODE`` stub, as with a terminate, so a subscriber asking after it stops
        counting it as live and a provision of it that arrives later makes no VM. A record
        at the counter the asker holds is not sent (SC2): most refreshes find nothing new."""
        held = dict(zip(msg.node_ids, msg.counters, strict=True)) if msg.counters is not None else {}
        unknown = []
        for nid in dict.fromkeys(msg.node_ids):
            node = state.nodes.get(nid)
            if node is not None:
                if held.get(nid) != node.update_counter:
                    txn.touched[nid] = None
            elif nid in state.reaped:
                stone = state.reaped.get(nid)
                if stone is None or held.get(nid) != stone.record.get("update_counter"):
                    txn.touched[nid] = None
            else:
                unknown.append(nid)
        for k in range(0, len(unknown), EVENT_CHUNK):
            txn.emit(ev.UnknownNodesAnswered(unknown[k : k + EVENT_CHUNK], txn.now))
        return Ok(len(txn.touched))

    def _subscribe(self, state: ProvisionerState, msg: m.Subscribe, txn: _Txn) -> Any:
        if msg.name not in state.subscribers:
            txn.emit(ev.SubscriberAdded(msg.name))
        return Ok(None)

    def _unsubscribe(self, state: ProvisionerState, msg: m.Unsubscribe, txn: _Txn) -> Any:
        if msg.name in state.subscribers:
            txn.emit(ev.SubscriberRemoved(msg.name))
        return Ok(None)

    def _status(self, state: ProvisionerState, msg: m.DescribeProvisioner, txn: _Txn) -> Any:
        counts = dict.fromkeys(codes(), 0)
        for node in state.nodes.values():
            counts[node.state] += 1
        v = state.volatile
        return Ok({
            "nodes": {k: c for k, c in counts.items() if c},
            "launches": len(state.launches),
            "disabled": state.disabled,
            "subscribers": self._subscribers(state),
            "in_flight": {"creates": len(v.creating), "destroys": len(v.destroying),
                          "zombie_destroys": len(v.destroying_vms),
                          "listings": len(v.listing)},
            "zombies_destroyed": v.zombies_destroyed,
            "listing_errors": dict(v.list_errors),
            "sites": sum(len(s) for s in state.registry.sites.values()),
            "deployable_types": sum(len(d) for d in state.registry.dts.values()),
        })

    # ------------------------------------------------------------------ registry (DTRS)

    def _refuse(self, exc: dtrs.RegistryError) -> Rejected:
        return bad_request(str(exc))

    def _add_site(self, state: ProvisionerState, msg: m.AddSite, txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        if msg.name in state.registry.sites.get(owner, {}):
            raise conflict(f"site {msg.name!r} already exists")
        return self._save_site(owner, msg, txn)

    def _update_site(self, state: ProvisionerState, msg: m.UpdateSite, txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        if msg.name not in state.registry.sites.get(owner, {}):
            raise not_found(f"unknown site {msg.name!r}")
        return self._save_site(owner, msg, txn)

    def _save_site(self, owner: str, msg: m.AddSite | m.UpdateSite, txn: _Txn) -> Any:
        try:
            definition = dtrs.validate_site(msg.name, msg.definition, self.site_validator)
        except dtrs.RegistryError as exc:
            raise self._refuse(exc) from None
        txn.emit(ev.SiteSaved(owner, msg.name, definition, txn.now))
        return Ok(definition)

    def _remove_site(self, state: ProvisionerState, msg: m.RemoveSite, txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        if msg.name not in state.registry.sites.get(owner, {}):
            raise not_found(f"unknown site {msg.name!r}")
        for account in state.by_account:
            site_owner, site, _ = json.loads(account)
            if (site_owner, site) == (owner, msg.name):
                raise conflict(f"site {msg.name!r} still has live nodes")
        txn.emit(ev.SiteRemoved(owner, msg.name, txn.now))
        return Ok(None)

    def _describe_site(self, state: ProvisionerState, msg: m.DescribeSite, txn: _Txn) -> Any:
        found = dtrs.resolve_site(state.registry, msg.caller, msg.name)
        if found is None:
            raise not_found(f"unknown site {msg.name!r}")
        return Ok(dict(found[1]))

    def _list_sites(self, state: ProvisionerState, msg: m.ListSites, txn: _Txn) -> Any:
        names = set(state.registry.sites.get(dtrs.COMMON, {}))
        if msg.caller is not None:
            names |= set(state.registry.sites.get(msg.caller, {}))
        return Ok(sorted(names))

    def _add_dt(self, state: ProvisionerState, msg: m.AddDeployableType, txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        if msg.name in state.registry.dts.get(owner, {}):
            raise conflict(f"deployable type {msg.name!r} already exists")
        return self._save_dt(owner, msg, txn)

    def _update_dt(self, state: ProvisionerState, msg: m.UpdateDeployableType, txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        if msg.name not in state.registry.dts.get(owner, {}):
            raise not_found(f"unknown deployable type {msg.name!r}")
        return self._save_dt(owner, msg, txn)

    def _save_dt(self, owner: str, msg: m.AddDeployableType | m.UpdateDeployableType,
                 txn: _Txn) -> Any:
        try:
            definition = dtrs.validate_dt(msg.name, msg.definition)
        except dtrs.RegistryError as exc:
            raise self._refuse(exc) from None
        txn.emit(ev.DeployableTypeSaved(owner, msg.name, definition, txn.now))
        return Ok(definition)

    def _remove_dt(self, state: ProvisionerState, msg: m.RemoveDeployableType, txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        if msg.name not in state.registry.dts.get(owner, {}):
            raise not_found(f"unknown deployable type {msg.name!r}")
        txn.emit(ev.DeployableTypeRemoved(owner, msg.name, txn.now))
        return Ok(None)

    def _describe_dt(self, state: ProvisionerState, msg: m.DescribeDeployableType,
                     txn: _Txn) -> Any:
        found = dtrs.resolve_dt(state.registry, msg.caller, msg.name)
        if found is None:
            raise not_found(f"unknown deployable type {msg.name!r}")
        return Ok(dict(found[1]))

    def _list_dts(self, state: ProvisionerState, msg: m.ListDeployableTypes, txn: _Txn) -> Any:
        names = set(state.registry.dts.get(dtrs.COMMON, {}))
        if msg.caller is not None:
            names |= set(state.registry.dts.get(msg.caller, {}))
        return Ok(sorted(names))

    def _credentials_site(self, state: ProvisionerState, caller: str | None,
                          site: str) -> dict[str, Any]:
        found = dtrs.resolve_site(state.registry, caller, site)
        if found is None:
            raise not_found(f"unknown site {site!r}")
        return found[1]

    def _add_credentials(self, state: ProvisionerState, msg: m.AddCredentials, txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        site_def = self._credentials_site(state, msg.caller, msg.site)
        if dtrs.credential_key(msg.site, msg.credential_type) in state.registry.credentials.get(
            owner, {}
        ):
            raise conflict(f"credentials for site {msg.site!r} already exist")
        return self._save_credentials(owner, site_def, msg, txn)

    def _update_credentials(self, state: ProvisionerState, msg: m.UpdateCredentials,
                            txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        site_def = self._credentials_site(state, msg.caller, msg.site)
        if dtrs.credential_key(msg.site, msg.credential_type) not in (
            state.registry.credentials.get(owner, {})
        ):
            raise not_found(f"no credentials for site {msg.site!r}")
        return self._save_credentials(owner, site_def, msg, txn)

    def _save_credentials(self, owner: str, site_def: dict[str, Any],
                          msg: m.AddCredentials | m.UpdateCredentials, txn: _Txn) -> Any:
        if msg.site.startswith(dtrs.COMMON_PREFIX):
            raise bad_request("name the site without the common:: prefix")
        try:
            creds = dtrs.validate_credentials(msg.site, site_def, msg.credentials,
                                              msg.credential_type, self.credentials_validator)
        except dtrs.RegistryError as exc:
            raise self._refuse(exc) from None
        key = self.credentials_key
        if key is None:
            raise bad_request("this Provisioner has no credentials key (credentials_key_file), "
                              "and credentials are never stored in clear")
        current = txn.state.registry.credentials.get(owner, {}).get(
            dtrs.credential_key(msg.site, msg.credential_type))
        if current is not None and key.same(current, creds):
            return Ok(None)  # already sealed with these values: nothing to write
        view, sealed = key.seal(creds, txn.now)
        txn.emit(ev.CredentialsSaved(owner, msg.site, msg.credential_type, view, txn.now, sealed))
        return Ok(None)

    def _remove_credentials(self, state: ProvisionerState, msg: m.RemoveCredentials,
                            txn: _Txn) -> Any:
        owner = dtrs.owner_key(msg.caller)
        if dtrs.credential_key(msg.site, msg.credential_type) not in (
            state.registry.credentials.get(owner, {})
        ):
            raise not_found(f"no credentials for site {msg.site!r}")
        for account in state.by_account:
            _, site, creds_owner = json.loads(account)
            if (site, creds_owner) == (msg.site, owner):
                raise conflict(f"credentials for site {msg.site!r} are in use by live nodes")
        txn.emit(ev.CredentialsRemoved(owner, msg.site, msg.credential_type, txn.now))
        return Ok(None)

    def _describe_credentials(self, state: ProvisionerState, msg: m.DescribeCredentials,
                              txn: _Txn) -> Any:
        creds = state.registry.credentials.get(dtrs.owner_key(msg.caller), {}).get(
            dtrs.credential_key(msg.site, msg.credential_type)
        )
        if creds is None:
            raise not_found(f"no credentials for site {msg.site!r}")
        return Ok(entry_view(creds))

    def _list_credentials(self, state: ProvisionerState, msg: m.ListCredentials,
                          txn: _Txn) -> Any:
        prefix = dtrs.credential_key("", msg.credential_type)
        keys = state.registry.credentials.get(dtrs.owner_key(msg.caller), {})
        return Ok(sorted(k[len(prefix):] for k in keys if k.startswith(prefix)))

    def _lookup(self, state: ProvisionerState, msg: m.Lookup, txn: _Txn) -> Any:
        caller = self._caller(msg.caller)
        try:
            node = dtrs.lookup(state.registry, caller, msg.deployable_type, msg.site,
                               msg.allocation, msg.vars)
        except dtrs.LookupFailed as exc:
            if exc.reason == Reason.DTRS_VALIDATION_FAILED:
                raise bad_request(exc.state_desc) from None
            raise not_found(exc.state_desc) from None
        return Ok({"node": node})

    # ------------------------------------------------------------------ timers

    def _query_sites(self, state: ProvisionerState, msg: m.QuerySites, txn: _Txn) -> Any:
        if msg.booting:
            state.volatile.boot_timer = False
            for account in list(state.volatile.booting):
                self._boot_query(state, txn, account)
            return None
        for account in self._accounts(state):
            self._list(state, txn, account)
        if self.query_interval > 0:
            txn.effects.append(SetTimer("query", self.query_interval, m.QuerySites()))
        return None

    def _watch_boot(self, state: ProvisionerState, txn: _Txn, account: str, node_id: str) -> None:
        """Ask about a launched node every ``boot_query_interval`` until it runs."""
        v = state.volatile
        if self.boot_query_interval <= 0:
            return
        v.booting.setdefault(account, {})[node_id] = None
        if not v.boot_timer:
            v.boot_timer = True
            txn.effects.append(SetTimer("boot", self.boot_query_interval, m.QuerySites(True)))

    def _boot_query(self, state: ProvisionerState, txn: _Txn, account: str) -> None:
        """A listing of only the account's booting VMs (cheap; it never judges absence)."""
        v = state.volatile
        members = v.booting.get(account, {})
        ids = []
        for nid in list(members):
            node = state.nodes.get(nid)
            if node is None or node.iaas_id is None or rank(node.state) >= rank("RUNNING"):
                del members[nid]
            elif len(ids) < BOOT_QUERY_MAX:
                ids.append(node.iaas_id)
        if not members:
            v.booting.pop(account, None)
            return
        spec = self._account_spec(state, account)
        if spec is None or account in v.boot_listing:
            self._watch_boot(state, txn, account, next(iter(members)))  # try again later
            return
        v.boot_listing.add(account)
        txn.effects.append(self._work("list", spec, account, seq=0, node_ids=ids))

    def _reap(self, state: ProvisionerState, msg: m.ReapRecords, txn: _Txn) -> Any:
        cutoff = txn.now - self.record_max_age
        old = []
        for nid, at in state.finished.items():
            if at > cutoff:
                break
            old.append(nid)
        keep, max_age = self.tombstones
        before = None if max_age is None else txn.now - max_age
        if old or state.reaped.over(keep, before):
            for part in _chunks(old):
                txn.emit(ev.NodesReaped(part, txn.now, keep, before))
        if self.reaper_interval > 0:
            txn.effects.append(SetTimer("reap", self.reaper_interval, m.ReapRecords()))
        return None

    # ------------------------------------------------------------------ cloud results

    def _create_result(self, state: ProvisionerState, msg: m.CreateResult, txn: _Txn) -> Any:
        v = state.volatile
        nid = msg.node_id
        v.creating.discard(nid)
        v.maybe_created.discard(nid)
        node = state.nodes.get(nid)
        if node is None or node.client_token != msg.client_token:
            return None  # not ours (any VM it made is a zombie for the next listing)
        if msg.error_kind is None and msg.iaas_id:
            if node.iaas_id is not None and node.iaas_id != msg.iaas_id and node.account:
                self._destroy_vm(state, txn, node.account, msg.iaas_id)
            elif node.state == "REQUESTED" or (
                node.state == "TERMINATING" and node.iaas_id is None
            ):
                v.uncertain.pop(nid, None)
                txn.emit(ev.NodeLaunched(nid, msg.iaas_id, msg.public_ip, msg.private_ip,
                                         msg.hostname, txn.now))
                if node.state == "REQUESTED" and node.account:
                    self._watch_boot(state, txn, node.account, nid)
            elif node.state in FINAL_STATES and node.account:
                self._destroy_vm(state, txn, node.account, msg.iaas_id)  # an orphan
            return None
        desc = _failure(msg.error_kind, msg.error)
        timed_out = msg.error_kind == "timeout"
        if node.state == "REQUESTED":
            txn.emit(ev.NodeLaunchFailed(nid, "FAILED", desc, txn.now))
        elif node.state == "TERMINATING" and node.iaas_id is None:
            if timed_out:  # the VM may exist anyway: let a listing tell
                v.uncertain[nid] = v.list_seq
            else:
                txn.emit(ev.NodeLaunchFailed(nid, "TERMINATED",
                                             Reason.TERMINATED_BEFORE_LAUNCH, txn.now))
        if timed_out and node.account:  # a lost reply leaves a VM: find it soon
            self._list(state, txn, node.account)
        return None

    def _destroy_result(self, state: ProvisionerState, msg: m.DestroyResult, txn: _Txn) -> Any:
        v = state.volatile
        if msg.node_id is None:
            v.destroying_vms.discard(msg.iaas_id)
            return None
        nid = msg.node_id
        v.destroying.discard(nid)
        node = state.nodes.get(nid)
        if node is None or node.state != "TERMINATING" or node.iaas_id != msg.iaas_id:
            return None
        if msg.error_kind is None or msg.error_kind == "not_found":
            v.retry_at.pop(nid, None)
            v.missing_since.pop(nid, None)
            txn.emit(ev.NodeTerminated(nid, None, txn.now))
        else:
            self._retry(state, txn, nid)
        return None

    def _list_result(self, state: ProvisionerState, msg: m.ListResult, txn: _Txn) -> Any:
        v = state.volatile
        if msg.partial:
            v.boot_listing.discard(msg.account)
        elif v.listing.get(msg.account) == msg.seq:
            del v.listing[msg.account]
        if msg.error_kind is not None:
            v.list_errors[msg.account] = _failure(msg.error_kind, msg.error)
            if msg.partial and msg.account in v.booting:
                # e.g. one id unknown to the cloud: a full listing settles it; ask again later
                self._list(state, txn, msg.account)
                self._watch_boot(state, txn, msg.account, next(iter(v.booting[msg.account])))
            return None
        v.list_errors.pop(msg.account, None)
        if msg.partial:
            return self._boot_result(state, msg, txn)
        now, account = txn.now, msg.account
        members = state.by_account.get(account, {})
        seen: set[str] = set()
        updates: list[dict[str, Any]] = []
        # the per-VM pass, with its lookups bound once (a listing holds every VM of the account)
        token_of, node_of, observe = state.by_token.get, state.nodes.get, self._observe
        unmiss, unsure, mark = v.missing_since.pop, v.uncertain.pop, seen.add
        for vm in msg.vms:
            iaas_id, vm_state, token = vm["iaas_id"], vm.get("state"), vm.get("client_token")
            live = vm_state != "TERMINATED"
            nid = token_of(token) if token else None
            node = node_of(nid) if nid is not None else None
            if node is None:
                if live and token and token.startswith(self.prefix):
                    self._destroy_vm(state, txn, account, iaas_id)  # a zombie
                continue
            if node.account != account:
                continue  # the same cloud seen through another account: not ours to judge
            if node.state in FINAL_STATES or (node.iaas_id not in (None, iaas_id)):
                if live:
                    self._destroy_vm(state, txn, account, iaas_id)  # an orphan or a double
                continue
            nid = node.node_id
            mark(nid)
            unmiss(nid, None)
            unsure(nid, None)
            update = observe(node, vm, live)
            if update:
                updates.append(update)
                if update.get("state", node.state) in ("PENDING", "STARTED"):
                    self._watch_boot(state, txn, account, nid)
            elif node.state in ("PENDING", "STARTED"):
                self._watch_boot(state, txn, account, nid)
        for nid in members:
            if nid in seen:
                continue
            node = state.nodes[nid]
            if node.iaas_id is None:
                if (node.state == "TERMINATING" and nid not in v.creating
                        and msg.seq > v.uncertain.get(nid, -1)):
                    v.uncertain.pop(nid, None)
                    updates.append({"node_id": nid, "state": "TERMINATED",
                                    "state_desc": Reason.TERMINATED_BEFORE_LAUNCH})
                continue
            if node.state == "TERMINATING":
                continue  # the terminator's destroy settles it
            first = v.missing_since.setdefault(nid, now)
            if now - first >= self.disappear_grace:
                del v.missing_since[nid]
                updates.append({"node_id": nid, "state": "TERMINATED",
                                "state_desc": Reason.NODE_DISAPPEARED})
        for part in _chunks(updates):
            if part:
                txn.emit(ev.NodesObserved(account, part, now))
        return None

    def _boot_result(self, state: ProvisionerState, msg: m.ListResult, txn: _Txn) -> Any:
        v = state.volatile
        members = v.booting.get(msg.account, {})
        updates = []
        for vm in msg.vms:
            token = vm.get("client_token")
            nid = state.by_token.get(token) if token else None
            node = state.nodes.get(nid) if nid is not None else None
            if node is None or node.account != msg.account or node.iaas_id != vm["iaas_id"]:
                continue
            if node.state in FINAL_STATES or node.state == "REQUESTED":
                continue
            update = self._observe(node, vm, vm.get("state") != "TERMINATED")
            if update:
                updates.append(update)
            if update.get("state", node.state) not in ("PENDING", "STARTED"):
                members.pop(node.node_id, None)
        for part in _chunks(updates):
            if part:
                txn.emit(ev.NodesObserved(msg.account, part, txn.now))
        if members:
            self._watch_boot(state, txn, msg.account, next(iter(members)))
        else:
            v.booting.pop(msg.account, None)
        return None

    @staticmethod
    def _observe(node: Node, vm: dict[str, Any], live: bool) -> dict[str, Any]:
        """The update a listed VM implies for its node (empty: nothing new)."""
        update: dict[str, Any] = {}
        if node.state == "REQUESTED":
            return update  # its create (in flight or re-driven) records it
        if node.iaas_id is None:
            update["iaas_id"] = vm["iaas_id"]
        value = vm.get("public_ip")
        if value is not None and value != node.public_ip:
            update["public_ip"] = value
        value = vm.get("private_ip")
        if value is not None and value != node.private_ip:
            update["private_ip"] = value
        value = vm.get("hostname")
        if value is not None and value != node.hostname:
            update["hostname"] = value
        vm_state = vm.get("state")
        if not live:
            update["state"] = "TERMINATED"
            if node.state != "TERMINATING":
                update["state_desc"] = Reason.IAAS_TERMINATED
        elif vm_state in ("STARTED", "RUNNING") and rank(node.state) < rank("RUNNING"):
            update["state"] = "RUNNING"  # no context broker: a booted VM is running
        if update:
            update["node_id"] = node.node_id
        return update


def _bare(site: str) -> str:
    return site[len(dtrs.COMMON_PREFIX):] if site.startswith(dtrs.COMMON_PREFIX) else site


_FAILURE_REASON = {
    "timeout": Reason.IAAS_TIMEOUT,
    "quota": Reason.IAAS_FULL,
    "auth": Reason.IAAS_AUTH,
}


def _failure(kind: str | None, error: str | None) -> str:
    reason = _FAILURE_REASON.get(kind or "", Reason.IAAS_PROBLEM)
    text = (error or "").strip().replace("\n", " ")
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{reason}: {text}" if text else reason
