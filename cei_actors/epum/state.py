"""EPUM's state: the fold of its events, with the indices that keep every pass cheap.

Indices: instance -> domain (``Instance.owner/domain_id``), per domain instances by state
and the set of unhealthy ones, and the global sets of launches and terminations the
Provisioner has not acknowledged yet.

``EPUMState.vol`` is the leader's scratch (dirty domains, wake-up times, last heartbeat
times, last resend times). It is not persisted, not compared and not in snapshots; a
recovered leader starts it afresh with every domain dirty, and health windows measured
from its own start (see ``health.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..runtime.tombstones import DEFAULT_LIMIT, Tombstones
from ._provisioner import RANK
from .events import (
    DefinitionAdded,
    DefinitionRemoved,
    DefinitionUpdated,
    DomainAdded,
    DomainReconfigured,
    DomainRemoved,
    DomainRemoveRequested,
    DomainSubscribed,
    DomainUnsubscribed,
    EngineConfigApplied,
    EngineFailed,
    EngineStateChanged,
    InstanceDestroyRequested,
    InstanceHealthChanged,
    InstanceLaunchRequested,
    InstancesReaped,
    InstanceUpdated,
    LaunchBackoff,
    NeedRegistered,
    SensorDataRecorded,
)

SECTIONS = ("general", "engine_conf", "health")
R_RUNNING = RANK["RUNNING"]
R_TERMINATING = RANK["TERMINATING"]
R_TERMINATED = RANK["TERMINATED"]
#: Health states that make an instance unhealthy (engines destroy and replace it).
UNHEALTHY_HEALTH = frozenset({"MISSING", "MONITOR_ERROR", "PROCESS_ERROR", "ZOMBIE"})


def dkey(owner: str, domain_id: str) -> str:
    """The key of a domain; unambiguous because domain ids contain no '/'."""
    return f"{owner}/{domain_id}"


def merge_config(base: dict, changes: dict) -> dict:
    """``base`` with each section of ``changes`` merged over the matching section."""
    out = {s: dict(base.get(s) or {}) for s in SECTIONS}
    for section, values in changes.items():
        out.setdefault(section, {}).update(copy.deepcopy(values))
    return out


@dataclass
class Instance:
    instance_id: str
    owner: str
    domain_id: str
    launch_id: str
    deployable_type: str
    site: str
    allocation: str | None
    extravars: dict
    vars: dict
    seq: int
    state: str = "REQUESTING"
    state_time: float = 0.0
    update_counter: int = -1
    properties: dict = field(default_factory=dict)
    health: str = "UNKNOWN"
    error: str | None = None
    failed_processes: list | None = None
    heard: bool = False
    acked: bool = False  # the Provisioner has reported on it
    destroy_requested: bool = False

    @property
    def domain_key(self) -> str:
        return dkey(self.owner, self.domain_id)

    @property
    def rank(self) -> int:
        return RANK[self.state]

    @property
    def unhealthy(self) -> bool:
        return self.state == "RUNNING_FAILED" or self.health in UNHEALTHY_HEALTH

    def describe(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "node_id": self.instance_id,
            "domain_id": self.domain_id,
            "launch_id": self.launch_id,
            "state": self.state,
            "state_time": self.state_time,
            "health": self.health,
            "error": self.error,
            "failed_processes": self.failed_processes,
            "site": self.site,
            "allocation": self.allocation,
            "deployable_type": self.deployable_type,
            "extravars": dict(self.extravars),
            "update_counter": self.update_counter,
            **self.properties,
        }


@dataclass
class Domain:
    owner: str
    domain_id: str
    definition_id: str
    config: dict
    subscribers: list[str]
    created: float
    config_version: int = 1
    applied_version: int = 0
    removing: bool = False
    engine_state: dict = field(default_factory=dict)
    engine_error: str | None = None
    sensor_data: dict = field(default_factory=dict)
    instances: dict[str, None] = field(default_factory=dict)  # ordered set, launch order
    by_state: dict[str, set[str]] = field(default_factory=dict)
    unhealthy: set[str] = field(default_factory=set)
    failures_by_site: dict[str, int] = field(default_factory=dict)
    #: site -> {failures, retry_at, error, seq}: launches there back off (decision OP2)
    backoff: dict[str, dict] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return dkey(self.owner, self.domain_id)

    @property
    def engine_conf(self) -> dict:
        return self.config["engine_conf"]

    @property
    def health_conf(self) -> dict:
        return self.config["health"]

    def count(self, states: Any) -> int:
        by = self.by_state
        return sum(len(by.get(s, ())) for s in states)


@dataclass
class Volatile:
    """Leader-local scheduling state; rebuilt on recovery, never persisted or compared."""

    dirty: set[str] = field(default_factory=set)
    wake: dict[str, float] = field(default_factory=dict)
    heard: dict[str, float] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    probe_at: dict[str, float] = field(default_factory=dict)
    agents: dict[str, str] = field(default_factory=dict)
    sensor_next: dict[str, float] = field(default_factory=dict)
    monitor_start: float | None = None
    refresh_at: float = 0.0  # next look for instances unchanged for refresh_interval
    refreshed: dict[str, float] = field(default_factory=dict)  # live instance -> last DumpState
    #: the ids of ``refreshed`` by the time they were asked at, for the asks less than a
    #: refresh interval old (decision RT3)
    asks: dict[float, set[str]] = field(default_factory=dict)
    bootstrapped: bool = False  # initial definitions/domains checked (first decider pass)
    engines: dict[str, Any] = field(default_factory=dict)


@dataclass
class EPUMState:
    definitions: dict[str, dict] = field(default_factory=dict)
    domains: dict[str, Domain] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)
    open_launches: set[str] = field(default_factory=set)
    open_terminations: set[str] = field(default_factory=set)
    launch_seq: int = 0
    #: forgotten instances (reaped, or of a removed domain): their last record (decision E5)
    forgotten: Tombstones = field(default_factory=Tombstones)
    #: removed domains, by domain key
    removed: Tombstones = field(default_factory=Tombstones)
    vol: Volatile = field(default_factory=Volatile, compare=False, repr=False)

    def domain(self, owner: str, domain_id: str) -> Domain | None:
        return self.domains.get(dkey(owner, domain_id))


# ---- the fold ---------------------------------------------------------------------------------


def _set_state(dom: Domain, inst: Instance, new: str, at: float) -> None:
    if new == inst.state:
        return
    old_set = dom.by_state.get(inst.state)
    if old_set is not None:
        old_set.discard(inst.instance_id)
        if not old_set:
            del dom.by_state[inst.state]
    dom.by_state.setdefault(new, set()).add(inst.instance_id)
    if new == "FAILED" and inst.state != "FAILED":
        dom.failures_by_site[inst.site] = dom.failures_by_site.get(inst.site, 0) + 1
    inst.state = new
    inst.state_time = at
    if RANK[new] >= R_TERMINATING and inst.health != "ZOMBIE":
        inst.health, inst.error, inst.failed_processes = "UNKNOWN", None, None


def _reindex_health(dom: Domain, inst: Instance) -> None:
    if inst.unhealthy:
        dom.unhealthy.add(inst.instance_id)
    else:
        dom.unhealthy.discard(inst.instance_id)


def _bury(state: EPUMState, iid: str, at: float | None) -> None:
    """Forget instance ``iid`` for a tombstone holding its last record."""
    inst = state.instances.get(iid)
    if inst is None:
        return
    record = {**inst.describe(), "owner": inst.owner}
    state.forgotten.bury(iid, record, inst.state_time, inst.state_time if at is None else at)
    _forget_instance(state, iid)


def _bound(state: EPUMState, keep: int | None, before: float | None) -> None:
    keep = DEFAULT_LIMIT if keep is None else keep
    state.forgotten.bound(keep, before)
    state.removed.bound(keep, before)


def _forget_instance(state: EPUMState, iid: str) -> None:
    inst = state.instances.pop(iid, None)
    if inst is None:
        return
    dom = state.domains.get(inst.domain_key)
    if dom is not None:
        dom.instances.pop(iid, None)
        s = dom.by_state.get(inst.state)
        if s is not None:
            s.discard(iid)
            if not s:
                del dom.by_state[inst.state]
        dom.unhealthy.discard(iid)
    state.open_launches.discard(iid)
    state.open_terminations.discard(iid)
    vol = state.vol
    for d in (vol.heard, vol.sent_at, vol.probe_at, vol.agents):
        d.pop(iid, None)


def apply(state: EPUMState, event: Any) -> EPUMState:
    """Fold one event into ``state`` (in place); marks touched domains dirty."""
    vol = state.vol
    t = type(event)
    if t is InstanceUpdated:
        inst = state.instances.get(event.instance_id)
        if inst is None:
            return state
        dom = state.domains[inst.domain_key]
        _set_state(dom, inst, event.state, event.at)
        inst.update_counter = event.update_counter
        inst.properties.update(event.properties)
        inst.acked = True
        if inst.instance_id in state.open_launches:
            state.open_launches.discard(inst.instance_id)
            if not state.open_launches:  # a drained set keeps its capacity: iterating it
                state.open_launches = set()  # would cost its peak size
        if inst.destroy_requested and RANK[event.state] >= R_TERMINATING and inst.instance_id in state.open_terminations:
            state.open_terminations.discard(inst.instance_id)
            if not state.open_terminations:
                state.open_terminations = set()
        _reindex_health(dom, inst)
        vol.dirty.add(dom.key)
    elif t is InstanceHealthChanged:
        inst = state.instances.get(event.instance_id)
        if inst is None:
            return state
        dom = state.domains[inst.domain_key]
        inst.health, inst.error = event.health, event.error
        inst.failed_processes = event.failed_processes
        inst.heard = inst.heard or event.heard
        _reindex_health(dom, inst)
        vol.dirty.add(dom.key)
    elif t is InstanceLaunchRequested:
        dom = state.domains[dkey(event.owner, event.domain_id)]
        state.launch_seq += 1
        inst = Instance(
            event.instance_id, event.owner, event.domain_id, event.launch_id,
            event.deployable_type, event.site, event.allocation, dict(event.extravars),
            dict(event.vars), state.launch_seq, "REQUESTING", event.at,
        )
        state.instances[inst.instance_id] = inst
        state.forgotten.remove(inst.instance_id)
        dom.instances[inst.instance_id] = None
        dom.by_state.setdefault("REQUESTING", set()).add(inst.instance_id)
        state.open_launches.add(inst.instance_id)
    elif t is InstanceDestroyRequested:
        for iid in event.instance_ids:
            inst = state.instances.get(iid)
            if inst is None:
                continue
            dom = state.domains[inst.domain_key]
            inst.destroy_requested = True
            state.open_launches.discard(iid)
            if inst.rank < R_TERMINATING:
                _set_state(dom, inst, "TERMINATING", event.at)
                state.open_terminations.add(iid)
            _reindex_health(dom, inst)
    elif t is EngineStateChanged:
        state.domains[dkey(event.owner, event.domain_id)].engine_state = copy.deepcopy(event.data)
    elif t is EngineConfigApplied:
        state.domains[dkey(event.owner, event.domain_id)].applied_version = event.version
    elif t is EngineFailed:
        state.domains[dkey(event.owner, event.domain_id)].engine_error = event.error
    elif t is SensorDataRecorded:
        dom = state.domains[dkey(event.owner, event.domain_id)]
        dom.sensor_data[event.metric] = {
            "values": dict(event.values), "domain": event.domain_value, "at": event.at,
        }
        vol.dirty.add(dom.key)
    elif t is NeedRegistered:
        dom = state.domains[dkey(event.owner, event.domain_id)]
        dom.engine_conf["preserve_n"] = event.count
        dom.engine_conf["retirable_nodes"] = list(event.retirable_nodes)
        dom.config_version += 1
        vol.dirty.add(dom.key)
    elif t is LaunchBackoff:
        dom = state.domains.get(dkey(event.owner, event.domain_id))
        if dom is None:
            return state
        if event.failures:
            dom.backoff[event.site] = {"failures": event.failures, "retry_at": event.retry_at,
                                       "error": event.error, "seq": event.seq}
        else:
            dom.backoff.pop(event.site, None)
        vol.dirty.add(dom.key)
    elif t is DomainReconfigured:
        dom = state.domains[dkey(event.owner, event.domain_id)]
        dom.backoff = {}  # the operator changed something: try again at once
        dom.config = merge_config(dom.config, event.changes)
        dom.config_version += 1
        vol.dirty.add(dom.key)
    elif t is DomainAdded:
        dom = Domain(
            event.owner, event.domain_id, event.definition_id,
            merge_config({}, event.config), list(event.subscribers), event.at,
        )
        state.domains[dom.key] = dom
        state.removed.remove(dom.key)
        vol.dirty.add(dom.key)
    elif t is DomainRemoveRequested:
        dom = state.domains[dkey(event.owner, event.domain_id)]
        dom.removing = True
        vol.dirty.add(dom.key)
    elif t is DomainRemoved:
        key = dkey(event.owner, event.domain_id)
        dom = state.domains.get(key)
        if dom is not None:
            for iid in list(dom.instances):
                _bury(state, iid, event.at)
            del state.domains[key]
            state.removed.bury(key, {"domain_id": dom.domain_id, "owner": dom.owner,
                                     "definition_id": dom.definition_id,
                                     "created": dom.created}, event.at, event.at)
            _bound(state, event.keep, event.before)
        vol.dirty.discard(key)
        vol.wake.pop(key, None)
        vol.sensor_next.pop(key, None)
        vol.engines.pop(key, None)
    elif t is DomainSubscribed:
        dom = state.domains[dkey(event.owner, event.domain_id)]
        if event.subscriber not in dom.subscribers:
            dom.subscribers.append(event.subscriber)
    elif t is DomainUnsubscribed:
        dom = state.domains[dkey(event.owner, event.domain_id)]
        if event.subscriber in dom.subscribers:
            dom.subscribers.remove(event.subscriber)
    elif t is InstancesReaped:
        for iid in event.instance_ids:
            _bury(state, iid, event.at)
        _bound(state, event.keep, event.before)
    elif t is DefinitionAdded or t is DefinitionUpdated:
        state.definitions[event.definition_id] = copy.deepcopy(event.definition)
    elif t is DefinitionRemoved:
        state.definitions.pop(event.definition_id, None)
    else:
        raise TypeError(f"epum: no fold for event {t.__name__}")
    return state


# ---- snapshots --------------------------------------------------------------------------------

_INSTANCE_FIELDS = (
    "instance_id", "owner", "domain_id", "launch_id", "deployable_type", "site", "allocation",
    "extravars", "vars", "seq", "state", "state_time", "update_counter", "properties", "health",
    "error", "failed_processes", "heard", "acked", "destroy_requested",
)
_DOMAIN_FIELDS = (
    "owner", "domain_id", "definition_id", "config", "subscribers", "created", "config_version",
    "applied_version", "removing", "engine_state", "engine_error", "sensor_data",
    "failures_by_site", "backoff",
)


def snapshot(state: EPUMState) -> dict[str, Any]:
    """The state as plain data (indices are rebuilt on restore)."""
    return {
        "definitions": state.definitions,
        "launch_seq": state.launch_seq,
        "domains": [
            {**{f: getattr(d, f) for f in _DOMAIN_FIELDS}, "instances": list(d.instances)}
            for d in state.domains.values()
        ],
        "instances": [[getattr(i, f) for f in _INSTANCE_FIELDS] for i in state.instances.values()],
        "open_launches": sorted(state.open_launches),
        "open_terminations": sorted(state.open_terminations),
        "forgotten": state.forgotten.to_data(),
        "removed_domains": state.removed.to_data(),
    }


def restore(data: dict[str, Any]) -> EPUMState:
    """The inverse of :func:`snapshot`."""
    state = EPUMState(definitions=dict(data["definitions"]), launch_seq=data["launch_seq"])
    for raw in data["instances"]:
        inst = Instance(**dict(zip(_INSTANCE_FIELDS, raw, strict=True)))
        state.instances[inst.instance_id] = inst
    for raw in data["domains"]:
        ids = raw.pop("instances")
        dom = Domain(**raw)
        for iid in ids:
            inst = state.instances[iid]
            dom.instances[iid] = None
            dom.by_state.setdefault(inst.state, set()).add(iid)
            if inst.unhealthy:
                dom.unhealthy.add(iid)
        state.domains[dom.key] = dom
    state.open_launches = set(data["open_launches"])
    state.open_terminations = set(data["open_terminations"])
    state.forgotten = Tombstones.from_data(data.get("forgotten"))  # none before E5
    state.removed = Tombstones.from_data(data.get("removed_domains"))
    return state
