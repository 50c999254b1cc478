"""The decision engine API: an engine sees a read-only State and acts through a Control.

An engine class declares its config keys (``CONFIG``); EPUM validates a domain's
``engine_conf`` against them when the domain is added or reconfigured, so a bad config is a
clear error at the call, not a failure in the decider.

Lifecycle, per domain, on the decider leader:

- ``initialize(control, state, conf)`` once per engine object (a new domain, or a new leader);
  ``self.memory`` already holds what the engine persisted before.
- ``reconfigure(control, conf)`` when the domain's config changed since the engine last saw it.
- ``decide(control, state)`` on each pass where the domain changed or the engine asked to be
  woken (``control.wake_after``).
- ``dying(control)`` once, when a removed domain has drained.

**Persistence.** ``self.memory`` (a dict of plain data: str, int, float, bool, None, lists,
dicts) is the engine's only state that survives failover: after each call EPUM persists it
as an event if it changed. Anything else on the object is a cache. Engines must be
deterministic: time is ``control.now``, randomness ``control.rng``.

Every launch and destroy is an event written before the message to the Provisioner, so a
replayed EPUM never decides the same instance twice. An engine that raises affects only its
own domain: that pass's actions for the domain are dropped and the error is recorded.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from .._provisioner import RANK, STATE_NAMES

#: Instances that count against a target: not yet TERMINATING.
VALID_STATES = tuple(s for s in STATE_NAMES if RANK[s] < RANK["TERMINATING"])
#: Launched but not yet RUNNING (REQUESTED <= state < RUNNING) plus EPUM's REQUESTING.
PENDING_STATES = tuple(s for s in STATE_NAMES if RANK[s] < RANK["RUNNING"])
#: Health states under which an instance counts as healthy.
HEALTHY_HEALTH = frozenset({"OK", "UNKNOWN", "OUT_OF_CONTACT"})


class EngineConfigError(ValueError):
    """A domain's engine config is invalid (unknown or missing keys, bad values)."""


@dataclass(frozen=True)
class Key:
    """One engine config key: required or not, its check, and whether reconfigure may change it."""

    required: bool = False
    check: Callable[[Any], bool] | None = None
    expect: str = ""
    reconfigurable: bool = True
    doc: str = ""


def is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_nonneg_number(v: Any) -> bool:
    return is_number(v) and v >= 0


def is_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def is_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: Keys every engine accepts (consumed by EPUM itself).
COMMON_KEYS: dict[str, Key] = {
    "provisioner_vars": Key(check=lambda v: isinstance(v, dict), expect="a dict",
                            doc="merged over the service-wide provisioner vars"),
}

#: Keys of EPUM's sensor puller (see ``epum.sensors``), for engines that use sensors.
SENSOR_KEYS: dict[str, Key] = {
    "sensor_type": Key(check=is_str, expect="a sensor name or dotted path",
                       doc='"message" (pushed with SensorData), "simulated", or a dotted path'),
    "sample_period": Key(check=is_nonneg_number, expect="seconds >= 0",
                         doc="how often a pulled sensor is read (90)"),
    "sensor_config": Key(check=lambda v: isinstance(v, dict), expect="a dict",
                         doc="passed to a pulled sensor"),
}


class InstanceView:
    """A read-only view of one instance."""

    __slots__ = ("_i",)

    def __init__(self, inst: Any) -> None:
        self._i = inst

    instance_id = property(lambda self: self._i.instance_id)
    state = property(lambda self: self._i.state)
    state_time = property(lambda self: self._i.state_time)
    health = property(lambda self: self._i.health)
    site = property(lambda self: self._i.site)
    allocation = property(lambda self: self._i.allocation)
    deployable_type = property(lambda self: self._i.deployable_type)
    seq = property(lambda self: self._i.seq, doc="launch order (higher is newer)")
    unhealthy = property(lambda self: self._i.unhealthy)

    @property
    def extravars(self) -> dict:
        return dict(self._i.extravars)

    @property
    def properties(self) -> dict:
        return dict(self._i.properties)

    @property
    def valid(self) -> bool:
        return RANK[self._i.state] < RANK["TERMINATING"]

    @property
    def healthy(self) -> bool:
        return self._i.health in HEALTHY_HEALTH and RANK[self._i.state] < RANK["RUNNING_FAILED"]

    def __repr__(self) -> str:
        return f"<instance {self.instance_id} {self.state} {self.health}>"


class State:
    """What an engine may read about its domain (read-only; cheap: backed by indices)."""

    def __init__(self, domain: Any, instances: dict[str, Any], now: float) -> None:
        self._d = domain
        self._all = instances
        self.now = now

    @property
    def domain_id(self) -> str:
        return self._d.domain_id

    @property
    def owner(self) -> str:
        return self._d.owner

    def get_instance(self, instance_id: str) -> InstanceView | None:
        inst = self._all.get(instance_id) if instance_id in self._d.instances else None
        return InstanceView(inst) if inst is not None else None

    @property
    def instances(self) -> dict[str, InstanceView]:
        """Every instance record of the domain (O(instances): prefer the indexed queries)."""
        return {i: InstanceView(self._all[i]) for i in self._d.instances}

    def ids_in(self, states: Iterable[str]) -> Iterator[str]:
        """Ids of instances in any of ``states`` (from the per-state index)."""
        for s in states:
            yield from self._d.by_state.get(s, ())

    def count(self, states: Iterable[str]) -> int:
        return self._d.count(states)

    def get_instances_by_state(self, state: str, maxstate: str | None = None) -> list[InstanceView]:
        """Instances with ``state`` <= their state <= ``maxstate`` (just ``state`` if None)."""
        lo, hi = RANK[state], RANK[maxstate or state]
        names = [s for s in STATE_NAMES if lo <= RANK[s] <= hi]
        return [InstanceView(self._all[i]) for i in self.ids_in(names)]

    def valid_ids(self) -> list[str]:
        """Instances that count against a target (state below TERMINATING), launch order."""
        return self.in_launch_order(self.ids_in(VALID_STATES))

    def valid_id_set(self) -> set[str]:
        """The ids of :meth:`valid_ids`, unordered (no sort)."""
        by = self._d.by_state
        return set().union(*(by[s] for s in VALID_STATES if s in by))

    def in_launch_order(self, ids: Iterable[str]) -> list[str]:
        """``ids`` (of this domain's instances) in launch order."""
        every = self._all
        return [i for _, i in sorted((every[i].seq, i) for i in ids)]

    def count_valid(self) -> int:
        return self._d.count(VALID_STATES)

    def unhealthy_ids(self) -> list[str]:
        """RUNNING_FAILED, or health MISSING/MONITOR_ERROR/PROCESS_ERROR/ZOMBIE (even terminated)."""
        return sorted(self._d.unhealthy, key=lambda i: self._all[i].seq)

    def get_unhealthy_instances(self) -> list[InstanceView]:
        return [InstanceView(self._all[i]) for i in self.unhealthy_ids()]

    def get_healthy_instances(self) -> list[InstanceView]:
        return [v for v in map(InstanceView, (self._all[i] for i in self.valid_ids())) if v.healthy]

    def get_pending_instances(self) -> list[InstanceView]:
        return [InstanceView(self._all[i]) for i in self.ids_in(PENDING_STATES)]

    def failures(self, site: str | None = None) -> int:
        """How many instances of the domain ever ended FAILED (at ``site``, or anywhere)."""
        f = self._d.failures_by_site
        return f.get(site, 0) if site is not None else sum(f.values())

    @property
    def sensor_data(self) -> dict[str, dict]:
        """metric -> {"values": {instance_id: sample}, "domain": sample|None, "at": time}."""
        return copy.deepcopy(self._d.sensor_data)


class Control:
    """What an engine may do: launch and destroy instances, and ask to be woken later.

    Implemented by EPUM (``epum.logic``); this class documents the interface.
    """

    now: float
    rng: Any
    default_site: str
    default_deployable_type: str
    default_allocation: str | None

    def launch(
        self,
        deployable_type: str | None = None,
        site: str | None = None,
        allocation: str | None = None,
        extravars: dict | None = None,
    ) -> str | None:
        """Ask for one new instance; returns its id (it is REQUESTING until acknowledged), or
        None while launches at that site back off after failures (EPUM decides the domain
        again when they may go; decision OP2)."""
        raise NotImplementedError

    def destroy_instances(
        self, instance_ids: Iterable[str], reason: str = "engine", figures: dict | None = None
    ) -> list[str]:
        """Ask for these instances to be terminated; returns the ids newly asked for.

        ``reason`` names the rule, ``figures`` what it used (plain data); both are recorded
        with the decision, so ``cei log why`` can tell why a node went."""
        raise NotImplementedError

    def wake_after(self, seconds: float) -> None:
        """Decide again after ``seconds`` even if nothing changes (cooldowns, backoffs)."""
        raise NotImplementedError


class Engine:
    """Base class of decision engines. Subclasses set ``CONFIG`` and implement ``decide``."""

    #: config key -> spec; keys not listed here (or in COMMON_KEYS) are refused.
    CONFIG: ClassVar[dict[str, Key]] = {}
    documentation: ClassVar[str] = ""

    def __init__(self) -> None:
        self.memory: dict[str, Any] = {}
        self.conf: dict[str, Any] = {}

    # ---- config validation (class level, called by EPUM at add/reconfigure) ------------------

    @classmethod
    def config_keys(cls) -> dict[str, Key]:
        return {**COMMON_KEYS, **cls.CONFIG}

    @classmethod
    def validate_config(cls, conf: dict[str, Any]) -> None:
        """Raise :class:`EngineConfigError` for unknown or missing keys or bad values."""
        keys = cls.config_keys()
        unknown = sorted(set(conf) - set(keys))
        if unknown:
            raise EngineConfigError(
                f"engine_conf: unknown key(s) {', '.join(unknown)} for {cls.__name__} "
                f"(known: {', '.join(sorted(keys))})"
            )
        missing = sorted(k for k, spec in keys.items() if spec.required and k not in conf)
        if missing:
            raise EngineConfigError(f"engine_conf: missing required key(s) {', '.join(missing)} for {cls.__name__}")
        for k, v in conf.items():
            spec = keys[k]
            if spec.check is not None and not spec.check(v):
                raise EngineConfigError(f"engine_conf.{k}: expected {spec.expect or 'a valid value'}, got {v!r}")
        cls.check_config(conf)

    @classmethod
    def check_config(cls, conf: dict[str, Any]) -> None:
        """Rules across keys; raise :class:`EngineConfigError`."""

    @classmethod
    def validate_reconfigure(cls, old: dict[str, Any], changes: dict[str, Any]) -> None:
        """Refuse changes to keys that cannot be reconfigured."""
        keys = cls.config_keys()
        fixed = sorted(k for k, v in changes.items()
                       if k in keys and not keys[k].reconfigurable and old.get(k) != v)
        if fixed:
            raise EngineConfigError(f"engine_conf: {', '.join(fixed)} cannot be reconfigured for {cls.__name__}")

    # ---- the lifecycle ------------------------------------------------------------------------

    def initialize(self, control: Control, state: State, conf: dict[str, Any]) -> None:
        self.conf = dict(conf)

    def reconfigure(self, control: Control, conf: dict[str, Any]) -> None:
        self.conf = dict(conf)

    def decide(self, control: Control, state: State) -> None:
        raise NotImplementedError

    def dying(self, control: Control) -> None:
        """The domain has drained and is about to be forgotten."""

    # ---- helpers for engines ------------------------------------------------------------------

    def destroy_unhealthy(self, control: Control, state: State) -> list[str]:
        """Terminate unhealthy instances (RUNNING_FAILED, MISSING, errors, zombies)."""
        ids = state.unhealthy_ids()
        if not ids:
            return []
        figures = {"unhealthy": {i: _health(state, i) for i in ids}}
        return control.destroy_instances(ids, reason="unhealthy", figures=figures)


def _health(state: State, iid: str) -> str:
    inst = state.get_instance(iid)
    return "gone" if inst is None else f"{inst.state}/{inst.health}"


def pick_to_destroy(
    control: Control, state: State, candidates: list[str] | set[str], n: int, first: Iterable[str] = ()
) -> list[str]:
    """Choose ``n`` of ``candidates`` (in launch order, or a set: put in launch order only if
    the random pick needs it, decision RT5): ``first`` ones (in order) first, then at random."""
    if n <= 0:
        return []
    cand = candidates if isinstance(candidates, set) else set(candidates)
    chosen = [i for i in dict.fromkeys(first) if i in cand][:n]
    if len(chosen) < n:
        taken = set(chosen)
        ordered = state.in_launch_order(cand) if isinstance(candidates, set) else candidates
        rest = [i for i in ordered if i not in taken]
        chosen += control.rng.sample(rest, min(n - len(chosen), len(rest)))
    return chosen
