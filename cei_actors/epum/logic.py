"""EPUM's pure core: domains, the decider, the doctor and the reaper.

Every decision is an event written before its message leaves: a launch is
``InstanceLaunchRequested`` before ``Provision``, a destroy ``InstanceDestroyRequested``
before ``TerminateNodes``, an engine's memory ``EngineStateChanged``. A recovered EPUM
therefore never decides the same instance twice; it resends what the Provisioner has not
acknowledged (at most once per ``resend_interval`` per instance) and asks it to re-send
the state of every live instance (``DumpState``).

The decider pass costs what changed: it decides only domains made dirty by an event (a
node update, a reconfiguration, new sensor data) or woken by their engine, and resends only
from the sets of unacknowledged launches and terminations.

Node states are level-based both ways: every ``refresh_interval`` the decider asks the
Provisioner again (``DumpState``) for the live instances it has heard nothing new of, and a
``SubscribeDomain`` (new or repeated) is answered with the domain's current node states.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from ..runtime.core import (
    SHELL_CONFIG_KEYS,
    Component,
    Context,
    Decision,
    Rejected,
    Send,
    SetTimer,
    Work,
    bad_request,
    conflict,
    not_found,
)
from ..runtime.messages import Ok
from ..runtime.tombstones import DEFAULT_LIMIT, DEFAULT_MAX_AGE, parse_tombstone_bounds
from . import invariants
from ._provisioner import RANK, DumpState, NodeStateChanged, Provision, Subscribe, TerminateNodes
from .engines import DEFAULT_ENGINE, Engine, EngineConfigError, load_engine
from .engines.base import VALID_STATES, Control, State
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
    events,
)
from .health import check_health_config, doctor_check, health_config, on_heartbeat
from .messages import (
    AddDomain,
    AddDomainDefinition,
    DeciderPass,
    DescribeDomain,
    DescribeDomainDefinition,
    DoctorPass,
    HealthProbe,
    ListDomainDefinitions,
    ListDomains,
    NodeHeartbeat,
    NodeState,
    ProvisionerLeads,
    ReapPass,
    ReconfigureDomain,
    RegisterNeed,
    RemoveDomain,
    RemoveDomainDefinition,
    SensorData,
    SensorReadings,
    SubscribeDomain,
    UnsubscribeDomain,
    UpdateDomainDefinition,
)
from .sensors import DEFAULT_SAMPLE_PERIOD, PUSHED, check_sensor_type
from .state import (
    R_RUNNING,
    R_TERMINATED,
    R_TERMINATING,
    SECTIONS,
    Domain,
    EPUMState,
    Instance,
    Volatile,
    apply,
    dkey,
    merge_config,
    restore,
    snapshot,
)

logger = logging.getLogger(__name__)

#: Keys of the ``general`` config section.
GENERAL_KEYS = ("engine_class", "chef_credential")
TERMINAL_STATES = ("TERMINATED", "FAILED", "REJECTED")
_BELOW_TERMINATED = tuple(s for s, r in RANK.items() if r < R_TERMINATED)
_NODE_PROPERTIES = ("iaas_id", "public_ip", "private_ip", "hostname", "state_desc")
_DUMP_CHUNK = 1000
_REAP_CHUNK = 500  # ids per InstancesReaped (no event outgrows a znode; decision P8)


def _from_record(record: dict[str, Any]) -> Instance:
    """An Instance standing in for a forgotten one, from its tombstone (for notifications)."""
    keys = ("hostname", "public_ip", "private_ip", "iaas_id")
    return Instance(record["instance_id"], record["owner"], record["domain_id"],
                    record["launch_id"], record["deployable_type"], record["site"],
                    record.get("allocation"), dict(record.get("extravars") or {}), {}, 0,
                    record["state"], record["state_time"],
                    properties={k: record.get(k) for k in keys})


@dataclass
class EPUMConfig:
    """EPUM's configuration (``make_component(config)`` takes these keys)."""

    decider_interval: float = 5.0
    doctor_interval: float = 10.0
    reaper_interval: float = 300.0
    record_reaping_max_age: float = 7200.0
    resend_interval: float = 5.0
    #: every this many seconds, ask the Provisioner (``DumpState``) for the state of every
    #: live instance whose state has not changed for as long (0: never); heals a lost
    #: ``NodeStateChanged``
    refresh_interval: float = 60.0
    provisioner: str = "provisioner"  # peer name
    self_name: str = "epum"  # our peer name: for Provisioner subscription and heartbeats
    default_user: str = "default"
    default_site: str = "local"
    default_deployable_type: str = "eeagent"
    default_allocation: str | None = None
    provisioner_vars: dict = field(default_factory=dict)
    #: launches of a domain that keep failing at a site back off (decision OP2): the first
    #: failure is retried at once, then after base, 2*base, ... seconds, at most max (base 0: off)
    launch_backoff_base: float = 2.0
    launch_backoff_max: float = 300.0
    initial_definitions: dict = field(default_factory=dict)  # id -> definition
    initial_domains: dict = field(default_factory=dict)  # id -> {definition, config}
    timers: bool = True  # False: passes only when sent explicitly (tests, simulator)
    #: forgotten instances and removed domains remembered (each), and for how long
    #: (seconds, or 'forever'); decision E5
    tombstone_limit: int = DEFAULT_LIMIT
    tombstone_max_age: float | str | None = DEFAULT_MAX_AGE

    def __post_init__(self) -> None:
        self.tombstone_limit, self.tombstone_max_age = parse_tombstone_bounds(
            "epum", self.tombstone_limit, self.tombstone_max_age)

    def tombstone_bounds(self, now: float) -> tuple[int, float | None]:
        """``(keep, before)`` for an event that forgets at ``now``."""
        age = self.tombstone_max_age
        return self.tombstone_limit, None if age is None else now - float(age)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EPUMConfig:
        data = {k: v for k, v in (data or {}).items() if k not in SHELL_CONFIG_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"epum config: unknown key(s) {', '.join(unknown)}")
        return cls(**data)


def engine_name(config: dict) -> str:
    general = config.get("general") or {}
    return general.get("engine_class") or DEFAULT_ENGINE


def _plain(data: Any, what: str) -> None:
    try:
        msgpack.packb(data, use_bin_type=True)
    except Exception as exc:
        raise bad_request(f"{what}: not plain data ({exc})") from None


class _Pass:
    """Events and effects collected during one decision over several domains."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.effects: list[Any] = []


class _Control(Control):
    """The Control given to one domain's engine during one pass."""

    def __init__(self, epum: EPUM, state: EPUMState, dom: Domain, ctx: Context, out: _Pass) -> None:
        self._epum, self._state, self._dom, self._ctx, self._out = epum, state, dom, ctx, out
        self.now = ctx.now
        self.rng = ctx.rng
        cfg = epum.config
        self.default_site = cfg.default_site
        self.default_deployable_type = cfg.default_deployable_type
        self.default_allocation = cfg.default_allocation
        self._destroyed: set[str] = set()
        self.launched: list[str] = []

    def launch(self, deployable_type: str | None = None, site: str | None = None,
               allocation: str | None = None, extravars: dict | None = None) -> str | None:
        epum, dom, ctx = self._epum, self._dom, self._ctx
        held = dom.backoff.get(site or self.default_site)
        if held is not None and (held.get("retry_at") or 0.0) > ctx.now:
            self.wake_after(held["retry_at"] - ctx.now)  # launches there back off (OP2)
            return None
        iid = ctx.new_id("i-")
        while iid in self._state.instances or iid in self._state.forgotten:  # never reuse an id
            iid = ctx.new_id("i-")
        launch_id = ctx.new_id("l-")
        dt = deployable_type or self.default_deployable_type
        site = site or self.default_site
        allocation = allocation or self.default_allocation
        extravars = dict(extravars or {})
        pvars = {
            **epum.config.provisioner_vars,
            **(dom.engine_conf.get("provisioner_vars") or {}),
            **extravars,
            "node_id": iid,
            "heartbeat_dest": epum.config.self_name,
            "domain_id": dom.domain_id,  # the Provisioner tags the VM with it (decision CL4)
        }
        chef = (dom.config.get("general") or {}).get("chef_credential")
        if chef is not None:
            pvars["chef_credential"] = chef
        ev = InstanceLaunchRequested(dom.owner, dom.domain_id, iid, launch_id, dt, site,
                                     allocation, extravars, pvars, ctx.now)
        self._out.events.append(ev)
        self._out.effects.append(Send(epum.config.provisioner, epum.provision_message(ev)))
        self._state.vol.sent_at[iid] = ctx.now
        self.launched.append(iid)
        return iid

    def destroy_instances(
        self, instance_ids: Iterable[str], reason: str = "engine", figures: dict | None = None
    ) -> list[str]:
        state, dom, vol, now = self._state, self._dom, self._state.vol, self._ctx.now
        new: list[str] = []
        again: list[str] = []
        for iid in instance_ids:
            if iid in self._destroyed:
                continue
            inst = state.instances.get(iid)
            if inst is None or inst.owner != dom.owner or inst.domain_id != dom.domain_id:
                continue
            self._destroyed.add(iid)
            if not inst.destroy_requested and inst.rank < R_TERMINATING:
                new.append(iid)
            elif inst.health == "ZOMBIE" and now - vol.sent_at.get(iid, float("-inf")) >= self._epum.config.resend_interval:
                again.append(iid)  # terminate a zombie again (no new decision)
        if new:
            decision = {"engine": engine_name(dom.config), "rule": reason, "figures": figures or {}}
            self._out.events.append(InstanceDestroyRequested(new, reason, now, decision))
            for iid in new:
                self._out.effects.extend(
                    self._epum.notifications(dom, state.instances[iid], "TERMINATING"))
        ids = new + again
        if ids:
            self._out.effects.append(Send(self._epum.config.provisioner,
                                          TerminateNodes(ids, self._epum.caller_for(dom.owner))))
            for iid in ids:
                vol.sent_at[iid] = now
        return new

    def wake_after(self, seconds: float) -> None:
        key, vol = self._dom.key, self._state.vol
        at = self.now + max(0.0, float(seconds))
        if at < vol.wake.get(key, float("inf")):
            vol.wake[key] = at


class EPUM(Component[EPUMState]):
    """The EPU Management Service core."""

    registry = events
    stream = "epum"

    def __init__(self, config: EPUMConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        if isinstance(config, EPUMConfig):
            self.config = config
        else:
            self.config = EPUMConfig.from_dict({**(config or {}), **kwargs})

    # ---- the component contract ---------------------------------------------------------------

    def initial_state(self) -> EPUMState:
        return EPUMState()

    def apply(self, state: EPUMState, event: Any) -> EPUMState:
        return apply(state, event)

    def snapshot(self, state: EPUMState) -> Any:
        return snapshot(state)

    def restore(self, data: Any) -> EPUMState:
        return restore(data)

    def invariants(self, state: EPUMState) -> list[str]:
        return invariants.broken(state)

    def recovered(self, state: EPUMState, ctx: Context) -> Decision:
        """Start afresh as leader: every domain dirty, health windows from now, ask the
        Provisioner for the truth of every live instance, run a decider pass at once.

        (The initial definitions and domains are created by that first pass, because events
        from ``recovered`` are persisted but not folded by the Runner.)
        """
        cfg = self.config
        state.vol = Volatile(dirty=set(state.domains), monitor_start=ctx.now,
                             refresh_at=ctx.now + cfg.refresh_interval / 4)
        for key, dom in state.domains.items():
            if self._pulled_sensor(dom):
                state.vol.sensor_next[key] = ctx.now
        effects: list[Any] = [Send(cfg.provisioner, Subscribe(cfg.self_name))]
        effects += self._ask_every_live(state, ctx.now)
        if cfg.timers:
            effects.append(SetTimer("decider", 0.0, DeciderPass()))
            effects += self._timers(doctor=True, reaper=True)
        return Decision(effects=effects)

    def _ask_every_live(self, state: EPUMState, now: float) -> list[Send]:
        """``DumpState`` for every live instance, as asked at ``now``.

        Not the open launches: their Provision is sent again, and a DumpState overtaking it
        would find no record and be answered UNKNOWN_NODE (TERMINATED)."""
        live = sorted(i.instance_id for i in state.instances.values()
                      if i.rank < R_TERMINATED and i.instance_id not in state.open_launches)
        state.vol.refreshed.update(dict.fromkeys(live, now))
        state.vol.asks.setdefault(now, set()).update(live)
        return [Send(self.config.provisioner, DumpState(live[k:k + _DUMP_CHUNK]))
                for k in range(0, len(live), _DUMP_CHUNK)]

    def _provisioner_leads(self, state: EPUMState, m: ProvisionerLeads, ctx: Context) -> Decision:
        """A new Provisioner leader: what its predecessor recorded but never told us is asked
        for now, not a refresh interval later (H4)."""
        return Decision(effects=self._ask_every_live(state, ctx.now))

    def _bootstrap(self, state: EPUMState, ctx: Context) -> list[Any]:
        """Events creating the configured initial definitions and domains that are missing."""
        cfg, out = self.config, []
        for def_id, definition in cfg.initial_definitions.items():
            if def_id not in state.definitions:
                try:
                    self._check_definition(definition)
                except Rejected as exc:
                    logger.error("epum config: initial definition %r skipped: %s", def_id, exc.message)
                    continue
                out.append(DefinitionAdded(def_id, copy.deepcopy(definition)))
        defs = {**state.definitions, **{e.definition_id: e.definition for e in out}}
        for domain_id, spec in cfg.initial_domains.items():
            if state.domain(cfg.default_user, domain_id) is None:
                definition = defs.get(spec.get("definition", ""))
                try:
                    if definition is None:
                        raise not_found(f"no definition {spec.get('definition')!r}")
                    merged = self._validated_new_config(definition, spec.get("config") or {})
                except Rejected as exc:
                    logger.error("epum config: initial domain %r skipped: %s", domain_id, exc.message)
                    continue
                out.append(DomainAdded(cfg.default_user, domain_id, spec["definition"], merged,
                                       list(spec.get("subscribers") or []), ctx.now))
        return out

    def decide(self, state: EPUMState, message: Any, ctx: Context) -> Decision:
        handler = self._handlers.get(type(message))
        if handler is None:
            raise bad_request(f"epum: unknown message {type(message).__name__}")
        return handler(self, state, message, ctx)

    # ---- helpers ------------------------------------------------------------------------------

    def _timers(self, decider: bool = False, doctor: bool = False, reaper: bool = False) -> list[Any]:
        if not self.config.timers:
            return []
        cfg, out = self.config, []
        if decider:
            out.append(SetTimer("decider", cfg.decider_interval, DeciderPass()))
        if doctor:
            out.append(SetTimer("doctor", cfg.doctor_interval, DoctorPass()))
        if reaper:
            out.append(SetTimer("reaper", cfg.reaper_interval, ReapPass()))
        return out

    def owner(self, caller: str | None) -> str:
        return caller or self.config.default_user

    def caller_for(self, owner: str) -> str | None:
        """The caller EPUM names to the Provisioner for a domain owner."""
        return None if owner == self.config.default_user else owner

    def _domain(self, state: EPUMState, domain_id: str, caller: str | None,
                removing_ok: bool = True) -> Domain:
        owner = self.owner(caller)
        dom = state.domain(owner, domain_id)
        if dom is None:
            stone = state.removed.get(dkey(owner, domain_id))
            if stone is not None:
                raise not_found(f"no domain {domain_id!r}: it was removed at {stone.forgotten_at:.3f}")
            raise not_found(f"no domain {domain_id!r}")
        if dom.removing and not removing_ok:
            raise conflict(f"domain {domain_id!r} is being removed")
        return dom

    def provision_message(self, ev: InstanceLaunchRequested | Instance) -> Provision:
        return Provision(ev.launch_id, ev.deployable_type, ev.site, [ev.instance_id],
                         dict(ev.vars), self.caller_for(ev.owner), ev.allocation)

    def notifications(self, dom: Domain, inst: Instance, new_state: str,
                      to: Iterable[str] | None = None) -> list[Send]:
        """``NodeState`` of ``inst`` to the domain's subscribers (or to ``to``)."""
        subscribers = list(dom.subscribers if to is None else to)
        if not subscribers:
            return []
        props = {k: inst.properties.get(k) for k in ("hostname", "public_ip", "private_ip", "iaas_id")}
        props.update(site=inst.site, launch_id=inst.launch_id,
                     deployable_type=inst.deployable_type, extravars=dict(inst.extravars))
        msg = NodeState(inst.instance_id, dom.domain_id, new_state, props)
        return [Send(s, msg) for s in subscribers]

    def current_states(self, state: EPUMState, dom: Domain, to: str,
                       known: list[str] | None) -> list[Send]:
        """The level-based answer to a ``SubscribeDomain``: ``NodeState`` RUNNING of every
        running instance ``known`` does not name (a subscriber holds those it names: SC3),
        and the loss of every instance past RUNNING that ``known`` names (``known`` None: of
        every one still on record)."""
        by, out = dom.by_state, []
        order = state.instances
        held = set(known or ())
        for iid in sorted(by.get("RUNNING", ()), key=lambda i: order[i].seq):
            if iid not in held:
                out += self.notifications(dom, order[iid], "RUNNING", [to])
        if known is None:
            past = [i for s, ids in by.items() if RANK[s] > R_RUNNING for i in ids]
        else:
            past = [i for i in dict.fromkeys(known) if i in order
                    and order[i].domain_key == dom.key and order[i].rank > R_RUNNING]
        for iid in sorted(past, key=lambda i: order[i].seq):
            inst = order[iid]
            out += self.notifications(dom, inst, inst.state, [to])
        for iid in dict.fromkeys(known or ()):  # forgotten ones the subscriber still holds
            stone = state.forgotten.get(iid) if iid not in order else None
            rec = stone.record if stone is not None else None
            if rec is not None and dkey(rec["owner"], rec["domain_id"]) == dom.key:
                out += self.notifications(dom, _from_record(rec), rec["state"], [to])
        return out

    @staticmethod
    def _pulled_sensor(dom: Domain) -> bool:
        st = dom.engine_conf.get("sensor_type")
        return bool(st) and st not in PUSHED

    def _check_definition(self, definition: dict) -> None:
        try:
            self._check_general(definition.get("general") or {})
            load_engine(engine_name(definition))
            check_health_config(definition.get("health") or {})
        except (EngineConfigError, ValueError) as exc:
            raise bad_request(str(exc)) from None
        _plain(definition, "definition")

    @staticmethod
    def _check_general(general: dict) -> None:
        unknown = sorted(set(general) - set(GENERAL_KEYS))
        if unknown:
            raise ValueError(f"general: unknown key(s) {', '.join(unknown)} (known: {', '.join(GENERAL_KEYS)})")

    def _validated_new_config(self, definition: dict, config: dict) -> dict:
        merged = merge_config(merge_config({}, definition), config)
        try:
            self._check_general(merged["general"])
            cls = load_engine(engine_name(merged))
            cls.validate_config(merged["engine_conf"])
            check_health_config(merged["health"])
            st = merged["engine_conf"].get("sensor_type")
            if st:
                check_sensor_type(st)
        except (EngineConfigError, ValueError) as exc:
            raise bad_request(str(exc)) from None
        _plain(merged, "config")
        return merged

    def describe(self, state: EPUMState, dom: Domain, instances: bool = True) -> dict[str, Any]:
        out = {
            "domain_id": dom.domain_id,
            "owner": dom.owner,
            "definition_id": dom.definition_id,
            "engine": engine_name(dom.config),
            "config": copy.deepcopy(dom.config),
            "config_version": dom.config_version,
            "removing": dom.removing,
            "subscribers": list(dom.subscribers),
            "engine_state": copy.deepcopy(dom.engine_state),
            "engine_error": dom.engine_error,
            "sensor_data": copy.deepcopy(dom.sensor_data),
            "counts": {s: len(ids) for s, ids in dom.by_state.items() if ids},
            "launch_backoff": [{"site": site, "failures": b["failures"], "retry_at": b["retry_at"],
                                "last_error": b["error"]} for site, b in sorted(dom.backoff.items())],
        }
        if instances:
            out["instances"] = [state.instances[i].describe() for i in dom.instances]
        return out

    # ---- definitions --------------------------------------------------------------------------

    def _add_definition(self, state: EPUMState, m: AddDomainDefinition, ctx: Context) -> Decision:
        if m.definition_id in state.definitions:
            raise conflict(f"definition {m.definition_id!r} already exists")
        self._check_definition(m.definition)
        return Decision([DefinitionAdded(m.definition_id, copy.deepcopy(m.definition))], reply=Ok(m.definition_id))

    def _update_definition(self, state: EPUMState, m: UpdateDomainDefinition, ctx: Context) -> Decision:
        if m.definition_id not in state.definitions:
            raise not_found(f"no definition {m.definition_id!r}")
        self._check_definition(m.definition)
        return Decision([DefinitionUpdated(m.definition_id, copy.deepcopy(m.definition))], reply=Ok(m.definition_id))

    def _remove_definition(self, state: EPUMState, m: RemoveDomainDefinition, ctx: Context) -> Decision:
        if m.definition_id not in state.definitions:
            raise not_found(f"no definition {m.definition_id!r}")
        return Decision([DefinitionRemoved(m.definition_id)], reply=Ok(m.definition_id))

    def _describe_definition(self, state: EPUMState, m: DescribeDomainDefinition, ctx: Context) -> Decision:
        definition = state.definitions.get(m.definition_id)
        if definition is None:
            raise not_found(f"no definition {m.definition_id!r}")
        try:
            doc = load_engine(engine_name(definition)).documentation
        except EngineConfigError as exc:
            doc = str(exc)
        return Decision(reply=Ok({"name": m.definition_id, "definition": copy.deepcopy(definition),
                                  "documentation": doc}))

    def _list_definitions(self, state: EPUMState, m: ListDomainDefinitions, ctx: Context) -> Decision:
        return Decision(reply=Ok(sorted(state.definitions)))

    # ---- domains ------------------------------------------------------------------------------

    def _add_domain(self, state: EPUMState, m: AddDomain, ctx: Context) -> Decision:
        owner = self.owner(m.caller)
        existing = state.domain(owner, m.domain_id)
        if existing is not None:
            raise conflict(f"domain {m.domain_id!r} already exists" + (" (being removed)" if existing.removing else ""))
        definition = state.definitions.get(m.definition_id)
        if definition is None:
            raise not_found(f"no definition {m.definition_id!r}")
        merged = self._validated_new_config(definition, m.config)
        subs = [m.subscriber] if m.subscriber else []
        ev = DomainAdded(owner, m.domain_id, m.definition_id, merged, subs, ctx.now)
        effects = []
        if self._pulled_sensor_conf(merged):
            state.vol.sensor_next[f"{owner}/{m.domain_id}"] = ctx.now
        return Decision([ev], effects, Ok({"domain_id": m.domain_id, "engine": engine_name(merged),
                                           "config": copy.deepcopy(merged)}))

    @staticmethod
    def _pulled_sensor_conf(config: dict) -> bool:
        st = config["engine_conf"].get("sensor_type")
        return bool(st) and st not in PUSHED

    def _reconfigure(self, state: EPUMState, m: ReconfigureDomain, ctx: Context) -> Decision:
        dom = self._domain(state, m.domain_id, m.caller, removing_ok=False)
        new_general = m.config.get("general") or {}
        if "engine_class" in new_general and new_general["engine_class"] != engine_name(dom.config):
            raise bad_request("general.engine_class cannot be changed after the domain is created")
        merged = merge_config(dom.config, m.config)
        try:
            self._check_general(merged["general"])
            cls = load_engine(engine_name(merged))
            cls.validate_config(merged["engine_conf"])
            cls.validate_reconfigure(dom.engine_conf, m.config.get("engine_conf") or {})
            check_health_config(merged["health"])
            st = merged["engine_conf"].get("sensor_type")
            if st:
                check_sensor_type(st)
        except (EngineConfigError, ValueError) as exc:
            raise bad_request(str(exc)) from None
        _plain(m.config, "config")
        if self._pulled_sensor_conf(merged):
            state.vol.sensor_next.setdefault(dom.key, ctx.now)
        else:
            state.vol.sensor_next.pop(dom.key, None)
        ev = DomainReconfigured(dom.owner, dom.domain_id, copy.deepcopy(m.config), ctx.now)
        return Decision([ev], reply=Ok({"domain_id": dom.domain_id, "config_version": dom.config_version + 1}))

    def _remove_domain(self, state: EPUMState, m: RemoveDomain, ctx: Context) -> Decision:
        dom = self._domain(state, m.domain_id, m.caller)
        if dom.removing:
            return Decision(reply=Ok({"domain_id": dom.domain_id, "removing": True}))
        return Decision([DomainRemoveRequested(dom.owner, dom.domain_id, ctx.now)],
                        reply=Ok({"domain_id": dom.domain_id, "removing": True}))

    def _describe_domain(self, state: EPUMState, m: DescribeDomain, ctx: Context) -> Decision:
        return Decision(reply=Ok(self.describe(state, self._domain(state, m.domain_id, m.caller))))

    def _list_domains(self, state: EPUMState, m: ListDomains, ctx: Context) -> Decision:
        owner = self.owner(m.caller)
        return Decision(reply=Ok(sorted(d.domain_id for d in state.domains.values() if d.owner == owner)))

    def _subscribe(self, state: EPUMState, m: SubscribeDomain, ctx: Context) -> Decision:
        dom = self._domain(state, m.domain_id, m.caller)
        effects = self.current_states(state, dom, m.subscriber, m.known)
        if m.subscriber in dom.subscribers:
            return Decision(effects=effects, reply=Ok(list(dom.subscribers)))
        return Decision([DomainSubscribed(dom.owner, dom.domain_id, m.subscriber)], effects,
                        reply=Ok([*dom.subscribers, m.subscriber]))

    def _unsubscribe(self, state: EPUMState, m: UnsubscribeDomain, ctx: Context) -> Decision:
        dom = self._domain(state, m.domain_id, m.caller)
        if m.subscriber not in dom.subscribers:
            return Decision(reply=Ok(list(dom.subscribers)))
        return Decision([DomainUnsubscribed(dom.owner, dom.domain_id, m.subscriber)],
                        reply=Ok([s for s in dom.subscribers if s != m.subscriber]))

    def _register_need(self, state: EPUMState, m: RegisterNeed, ctx: Context) -> Decision:
        dom = self._domain(state, m.domain_id, m.caller, removing_ok=False)
        conf = dom.engine_conf
        if conf.get("preserve_n") == m.count and list(conf.get("retirable_nodes") or []) == list(m.retirable_nodes):
            return Decision(reply=Ok({"domain_id": dom.domain_id, "count": m.count}))
        try:
            cls = load_engine(engine_name(dom.config))
            cls.validate_config({**conf, "preserve_n": m.count, "retirable_nodes": list(m.retirable_nodes)})
        except EngineConfigError as exc:
            raise bad_request(f"domain {dom.domain_id!r} does not take needs: {exc}") from None
        ev = NeedRegistered(dom.owner, dom.domain_id, m.count, list(m.retirable_nodes), ctx.now)
        return Decision([ev], reply=Ok({"domain_id": dom.domain_id, "count": m.count}))

    # ---- inputs: the Provisioner, heartbeats, sensors -----------------------------------------

    def _node_state(self, state: EPUMState, m: NodeStateChanged, ctx: Context) -> Decision:
        node = m.node
        node_id, new, counter = node.get("node_id"), node.get("state"), node.get("update_counter")
        if not isinstance(node_id, str) or new not in RANK or not isinstance(counter, int) or isinstance(counter, bool):
            logger.warning("epum: malformed node update dropped: %.200r", node)
            return Decision()
        inst = state.instances.get(node_id)
        if inst is None:
            stone = state.forgotten.get(node_id)
            if stone is not None:  # ended long ago: a late or reordered report, never revived
                logger.info("epum: update for forgotten instance %s (%s; it ended %s at %.3f) "
                            "dropped", node_id, new, stone.record["state"], stone.ended_at)
            else:
                logger.info("epum: update for unknown instance %s (%s) dropped", node_id, new)
            return Decision()
        r_new, r_old = RANK[new], inst.rank
        if r_new < r_old or (r_new == r_old and counter <= inst.update_counter):
            logger.debug("epum: stale update for %s dropped (%s/%s after %s/%s)",
                         node_id, new, counter, inst.state, inst.update_counter)
            return Decision()
        props = {k: node[k] for k in _NODE_PROPERTIES if k in node}
        ev = InstanceUpdated(node_id, new, counter, props, ctx.now)
        effects: list[Any] = []
        if new != inst.state and r_new >= R_RUNNING:
            dom = state.domains[inst.domain_key]
            shown = copy.copy(inst)
            shown.properties = {**inst.properties, **props}
            effects = self.notifications(dom, shown, new)
        backoff = self._launch_backoff(state, inst, new, props, ctx.now)
        return Decision([ev, *backoff], effects)

    def _launch_backoff(self, state: EPUMState, inst: Instance, new: str, props: dict,
                        now: float) -> list[LaunchBackoff]:
        """The backoff a node update starts, raises or ends (decision OP2): a launch that
        FAILED before it ran counts (once per round of launches), one that RUNS ends it."""
        cfg = self.config
        if new == inst.state or cfg.launch_backoff_base <= 0:
            return []
        dom = state.domains[inst.domain_key]
        held = dom.backoff.get(inst.site)
        if new == "RUNNING" and held is not None:
            return [LaunchBackoff(dom.owner, dom.domain_id, inst.site, 0, None, None, state.launch_seq, now)]
        if new != "FAILED" or inst.rank >= R_RUNNING or inst.destroy_requested or dom.removing:
            return []
        if held is not None and inst.seq <= held["seq"]:
            return []  # a launch of the round already counted
        failures = (held["failures"] if held else 0) + 1
        delay = 0.0 if failures == 1 else min(cfg.launch_backoff_max,
                                              cfg.launch_backoff_base * 2 ** (failures - 2))
        error = props.get("state_desc") or inst.properties.get("state_desc") or "launch failed"
        return [LaunchBackoff(dom.owner, dom.domain_id, inst.site, failures, now + delay,
                              str(error), state.launch_seq, now)]

    def _heartbeat(self, state: EPUMState, m: NodeHeartbeat, ctx: Context) -> Decision:
        inst = state.instances.get(m.node_id)
        if inst is None:
            stone = state.forgotten.get(m.node_id)
            if stone is not None:
                # a zombie past the ZOMBIE window: its record is final at the Provisioner (or
                # gone), whose listings destroy such a VM (decision P4); nothing to record
                logger.warning("epum: heartbeat from forgotten instance %s (it ended %s at "
                               "%.3f); dropped, the Provisioner's listing destroys its VM",
                               m.node_id, stone.record["state"], stone.ended_at)
            else:
                logger.info("epum: heartbeat from unknown node %s dropped", m.node_id)
            return Decision()
        dom = state.domains[inst.domain_key]
        conf = health_config(dom.health_conf)
        if not conf["monitor_health"]:
            return Decision()
        vol = state.vol
        vol.heard[m.node_id] = max(vol.heard.get(m.node_id, ctx.now), ctx.now)
        vol.probe_at.pop(m.node_id, None)
        if m.agent:
            vol.agents[m.node_id] = m.agent
        v = on_heartbeat(inst, m.state, m.error, m.failed_processes, ctx.now, conf)
        if v.health is None and (inst.heard or inst.rank >= R_TERMINATING):
            return Decision()
        health = v.health or inst.health
        ev = InstanceHealthChanged(m.node_id, health, v.error if v.health else inst.error,
                                   v.failed_processes if v.health else inst.failed_processes,
                                   True, ctx.now)
        return Decision([ev])

    def _sensor_data(self, state: EPUMState, m: SensorData, ctx: Context) -> Decision:
        dom = self._domain(state, m.domain_id, m.caller)
        ev = SensorDataRecorded(dom.owner, dom.domain_id, m.metric, dict(m.values), m.domain_value, ctx.now)
        return Decision([ev], reply=Ok(None))

    def _sensor_readings(self, state: EPUMState, m: SensorReadings, ctx: Context) -> Decision:
        dom = state.domain(m.owner, m.domain_id)
        if dom is None:
            return Decision()
        if m.error:
            logger.warning("epum: sensor for domain %s failed: %s", m.domain_id, m.error)
            return Decision()
        ev = SensorDataRecorded(dom.owner, dom.domain_id, m.metric, dict(m.values), m.domain_value, ctx.now)
        return Decision([ev])

    # ---- the decider --------------------------------------------------------------------------

    def _decider_pass(self, state: EPUMState, m: DeciderPass, ctx: Context) -> Decision:
        out = _Pass()
        if not state.vol.bootstrapped:
            state.vol.bootstrapped = True
            out.events += self._bootstrap(state, ctx)
        self._resend(state, ctx, out)
        self._refresh(state, ctx, out)
        self._pull_sensors(state, ctx, out)
        vol, now = state.vol, ctx.now
        due = vol.dirty
        vol.dirty = set()
        if vol.wake:
            woken = [k for k, t in vol.wake.items() if t <= now]
            for k in woken:
                del vol.wake[k]
            due.update(woken)
        for key in sorted(due):
            dom = state.domains.get(key)
            if dom is not None:
                self.decide_domain(state, dom, ctx, out)
        out.effects += self._timers(decider=True)
        return Decision(out.events, out.effects, Ok({"decided": len(due)}))

    def _resend(self, state: EPUMState, ctx: Context, out: _Pass) -> None:
        vol, now, gap = state.vol, ctx.now, self.config.resend_interval
        never = float("-inf")
        for iid in sorted(state.open_launches):
            if now - vol.sent_at.get(iid, never) >= gap:
                vol.sent_at[iid] = now
                out.effects.append(Send(self.config.provisioner, self.provision_message(state.instances[iid])))
        by_caller: dict[str | None, list[str]] = {}
        for iid in sorted(state.open_terminations):
            if now - vol.sent_at.get(iid, never) >= gap:
                vol.sent_at[iid] = now
                by_caller.setdefault(self.caller_for(state.instances[iid].owner), []).append(iid)
        for caller, ids in by_caller.items():
            out.effects.append(Send(self.config.provisioner, TerminateNodes(ids, caller)))

    def _refresh(self, state: EPUMState, ctx: Context, out: _Pass) -> None:
        """``DumpState`` for the live instances neither changed nor asked for during the last
        ``refresh_interval``, so a lost ``NodeStateChanged`` is answered again (the
        Provisioner's answers for unchanged nodes are stale updates: no events). Looks every
        quarter interval: an instance is asked for at most 1.25 intervals after its news.
        The live ones are found by set operations; the asks of the last interval (``vol.asks``)
        rule out most of them at once."""
        vol, now, gap = state.vol, ctx.now, self.config.refresh_interval
        if gap <= 0 or now < vol.refresh_at:
            return
        vol.refresh_at = now + gap / 4
        instances, asked, recent = state.instances, vol.refreshed, vol.asks
        live: set[str] = set()
        for dom in state.domains.values():
            by = dom.by_state
            for s in _BELOW_TERMINATED:
                ids = by.get(s)
                if ids:
                    live |= ids
        live -= state.open_launches
        gone = asked.keys() - live  # the asks of instances not live or opened are forgotten
        if gone:
            for i in gone:
                del asked[i]
            for group in recent.values():
                group -= gone
        for t in [t for t in recent if now - t >= gap]:
            del recent[t]
        # an instance asked for less than an interval ago is not stale, whatever its news: only
        # the others are looked at, each as before (RT3)
        stale: list[str] = []
        for i in live.difference(*recent.values()) if recent else live:
            at = asked.get(i)
            seen = instances[i].state_time
            if now - (seen if at is None or at < seen else at) >= gap:
                stale.append(i)
        stale.sort()
        for iid in stale:
            asked[iid] = now
        if stale:
            recent.setdefault(now, set()).update(stale)
        for k in range(0, len(stale), _DUMP_CHUNK):
            part = stale[k:k + _DUMP_CHUNK]  # with what we hold: only news come back (SC2)
            counters = [instances[i].update_counter for i in part]
            out.effects.append(Send(self.config.provisioner, DumpState(part, counters)))

    def _pull_sensors(self, state: EPUMState, ctx: Context, out: _Pass) -> None:
        vol, now = state.vol, ctx.now
        for key, at in sorted(vol.sensor_next.items()):
            if at > now:
                continue
            dom = state.domains.get(key)
            if dom is None or not self._pulled_sensor(dom):
                del vol.sensor_next[key]
                continue
            conf = dom.engine_conf
            vol.sensor_next[key] = now + float(conf.get("sample_period", DEFAULT_SAMPLE_PERIOD))
            instances = {}
            for iid in dom.instances:
                inst = state.instances[iid]
                if inst.rank < R_TERMINATING:
                    instances[iid] = {"site": inst.site, **{k: inst.properties.get(k) for k in _NODE_PROPERTIES[:4]}}
            out.effects.append(Work("sensor", {
                "owner": dom.owner, "domain_id": dom.domain_id, "sensor_type": conf["sensor_type"],
                "metric": conf.get("metric", ""), "config": conf.get("sensor_config") or {},
                "instances": instances, "now": now,
            }))

    def _engine(self, state: EPUMState, dom: Domain, control: _Control, view: State) -> tuple[Engine, bool]:
        vol = state.vol
        engine = vol.engines.get(dom.key)
        if engine is not None:
            return engine, False
        engine = load_engine(engine_name(dom.config))()
        engine.memory = copy.deepcopy(dom.engine_state)
        engine.initialize(control, view, copy.deepcopy(dom.engine_conf))
        vol.engines[dom.key] = engine
        return engine, True

    def decide_domain(self, state: EPUMState, dom: Domain, ctx: Context, out: _Pass) -> None:
        """Run one domain's engine (or its drain when removed); contained to the domain."""
        mine = _Pass()
        control = _Control(self, state, dom, ctx, mine)
        view = State(dom, state.instances, ctx.now)
        try:
            if dom.removing:
                self._drain(state, dom, control, view, mine, ctx)
            else:
                engine, fresh = self._engine(state, dom, control, view)
                if dom.applied_version < dom.config_version:
                    if not fresh:
                        engine.reconfigure(control, copy.deepcopy(dom.engine_conf))
                    mine.events.append(EngineConfigApplied(dom.owner, dom.domain_id, dom.config_version))
                engine.decide(control, view)
                if engine.memory != dom.engine_state:
                    _plain(engine.memory, "engine memory")
                    mine.events.append(EngineStateChanged(dom.owner, dom.domain_id, copy.deepcopy(engine.memory)))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("epum: engine of domain %s failed: %s", dom.domain_id, error)
            state.vol.engines.pop(dom.key, None)
            for iid in control.launched:
                state.vol.sent_at.pop(iid, None)
            state.vol.wake[dom.key] = ctx.now  # retry on the next pass
            if dom.engine_error != error:
                out.events.append(EngineFailed(dom.owner, dom.domain_id, error, ctx.now))
            return
        if dom.engine_error is not None and not dom.removing:
            mine.events.append(EngineFailed(dom.owner, dom.domain_id, None, ctx.now))
        out.events += mine.events
        out.effects += mine.effects

    def _drain(self, state: EPUMState, dom: Domain, control: _Control, view: State,
               out: _Pass, ctx: Context) -> None:
        live = list(view.ids_in(VALID_STATES))
        if live:
            control.destroy_instances(sorted(live, key=lambda i: state.instances[i].seq), reason="domain removed",
                                       figures={"live": len(live)})
            return
        if dom.count(_BELOW_TERMINATED) > 0:
            return  # wait for the Provisioner to confirm
        try:
            engine, _ = self._engine(state, dom, control, view)
            engine.dying(control)
        except Exception as exc:
            logger.warning("epum: engine of removed domain %s failed while dying: %s", dom.domain_id, exc)
        out.events.append(DomainRemoved(dom.owner, dom.domain_id, ctx.now,
                                        *self.config.tombstone_bounds(ctx.now)))

    # ---- the doctor and the reaper ------------------------------------------------------------

    def _doctor_pass(self, state: EPUMState, m: DoctorPass, ctx: Context) -> Decision:
        vol, now = state.vol, ctx.now
        if vol.monitor_start is None:
            vol.monitor_start = now
        evs: list[Any] = []
        probes: list[str] = []
        effects: list[Any] = []
        for dom in state.domains.values():
            conf = health_config(dom.health_conf)
            if not conf["monitor_health"]:
                continue
            ids = list(dom.by_state.get("RUNNING", ())) + [
                i for i in dom.unhealthy if state.instances[i].health == "ZOMBIE"]
            for iid in sorted(ids):
                inst = state.instances[iid]
                v = doctor_check(inst, conf, now, vol.heard.get(iid), vol.probe_at.get(iid), vol.monitor_start)
                if v.health is not None:
                    evs.append(InstanceHealthChanged(iid, v.health, None, None, False, now))
                    if v.health == "UNKNOWN":
                        vol.heard.pop(iid, None)
                if v.probe:
                    vol.probe_at[iid] = now
                    probes.append(iid)
                    agent = vol.agents.get(iid)
                    if agent:
                        effects.append(Send(agent, HealthProbe(iid, self.config.self_name)))
        if probes:
            effects.append(Send(self.config.provisioner, DumpState(probes)))
        effects += self._timers(doctor=True)
        return Decision(evs, effects)

    def _reap_pass(self, state: EPUMState, m: ReapPass, ctx: Context) -> Decision:
        cutoff = ctx.now - self.config.record_reaping_max_age
        old: list[str] = []
        for dom in state.domains.values():
            for s in TERMINAL_STATES:
                old += [i for i in dom.by_state.get(s, ()) if state.instances[i].state_time < cutoff
                        and state.instances[i].health != "ZOMBIE"]
        effects = self._timers(reaper=True)
        keep, before = self.config.tombstone_bounds(ctx.now)
        if not old and not state.forgotten.over(keep, before) and not state.removed.over(keep, before):
            return Decision([], effects)
        old.sort()
        evs = [InstancesReaped(old[k:k + _REAP_CHUNK], ctx.now, keep, before)
               for k in range(0, max(len(old), 1), _REAP_CHUNK)]
        return Decision(evs, effects)

    _handlers: dict[type, Any] = {
        AddDomainDefinition: _add_definition,
        UpdateDomainDefinition: _update_definition,
        RemoveDomainDefinition: _remove_definition,
        DescribeDomainDefinition: _describe_definition,
        ListDomainDefinitions: _list_definitions,
        AddDomain: _add_domain,
        ReconfigureDomain: _reconfigure,
        RemoveDomain: _remove_domain,
        DescribeDomain: _describe_domain,
        ListDomains: _list_domains,
        SubscribeDomain: _subscribe,
        UnsubscribeDomain: _unsubscribe,
        RegisterNeed: _register_need,
        NodeStateChanged: _node_state,
        NodeHeartbeat: _heartbeat,
        SensorData: _sensor_data,
        SensorReadings: _sensor_readings,
        DeciderPass: _decider_pass,
        DoctorPass: _doctor_pass,
        ReapPass: _reap_pass,
        ProvisionerLeads: _provisioner_leads,
    }


__all__ = ["EPUM", "EPUMConfig", "SECTIONS"]
