"""The HA service's pure core: keep groups of process copies alive across PDs.

Every decision is an event written before its message leaves: a copy is ``CopyScheduled``
(its upid chosen here) before the PD is asked to schedule it, ``CopyTerminating`` before it
is killed. The PD's schedule is idempotent per upid, so a new leader never doubles a copy:
it asks every PD for the state of the copies it holds (``DescribeProcesses``) and re-sends
a schedule only for a copy the PD answers it does not have and has never reported; a copy
being terminated is killed again on every pass until its PD reports it ended.

HA learns process states two ways, both from the PD: every copy is scheduled with HA as a
subscriber (``ProcessStateChanged`` on each change, so a dead copy is replaced at once), and
every ``poll_interval`` HA asks each PD for all its copies and for its load (level-based:
a lost notice is healed by the next answer). Requests to a PD carry an id naming the PD,
the kind and the copy (:func:`~.messages.request_id`); the actor shell hands the PD's
``Response`` back as a :class:`~.messages.PDReply`.

A copy counts until HA terminates it or its PD reports it past RUNNING (TERMINATED,
EXITED, FAILED, REJECTED; a copy the PD restarts itself, per its restart mode, stays), or
the PD says it no longer knows a copy it once reported. Then the policy tops the group up
on the least-loaded PD. Status: STEADY when the target is met with every copy RUNNING and
nothing is being terminated (or the target and the copies are 0), READY when at least one
copy runs, PENDING otherwise, FAILED (sticky until a ``reconfigure``) when a PD refused a
copy as invalid (an unknown definition, say): a FAILED group schedules nothing.

Config keys (:class:`HAConfig`)::

    pds: ["pd"]          # the PD peer names a group may use
    self_name: "ha"      # our peer name (the copies' subscriber)
    poll_interval: 5.0   # seconds between passes (ask the PDs, apply the policies)
    pd_timeout: 0        # seconds without an answer after which a PD's copies are
                         # replaced elsewhere (they are killed when it answers); 0: never
    timers: true         # false: passes only when sent (tests, simulator)
    min_lifetime: 5.0    # a copy that ends on its own sooner after it was scheduled is a
                         # quick failure; from the 2nd in a row new copies back off:
    backoff_base: 1.0    # wait 1, 2, 4 ... s (0: never back off)
    backoff_max: 60.0    # at most this long

Crash loops: a group whose copies keep failing at once is not replaced without limit. The
``GroupBackoff`` event counts quick failures in a row; from the second on, the next copy waits
``backoff_base * 2 ** (failures - 2)`` seconds (at most ``backoff_max``). A copy that lived
``min_lifetime`` resets the count; a ``reconfigure`` clears it. ``describe`` shows both.
"""

from __future__ import annotations

import collections
import copy
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from ..epum.messages import SensorData, SensorReadings
from ..pd import states as ps
from ..pd.messages import (
    DescribeProcesses,
    KillProcess,
    ProcessCounts,
    ProcessStateChanged,
    ScheduleProcess,
)
from ..runtime.control import Request
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
from ..runtime.messages import ErrorReply, Ok
from . import invariants, policies
from .events import (
    CopyEnded,
    CopyScheduled,
    CopyTerminating,
    GroupBackoff,
    GroupCreated,
    GroupFailed,
    GroupRemoved,
    GroupRemoveRequested,
    PolicyChanged,
    TargetChanged,
    events,
)
from .messages import (
    RID_SEP,
    CreateGroup,
    DescribeGroup,
    HAPass,
    ListGroups,
    PDReply,
    ReconfigureGroup,
    RemoveGroup,
    request_id,
)
from .state import Group, HAState, Observed, Volatile, apply, restore, snapshot

logger = logging.getLogger(__name__)

PENDING, READY, STEADY, FAILED = "PENDING", "READY", "STEADY", "FAILED"
STATUSES = (PENDING, READY, STEADY, FAILED)
#: PD refusals that mean the copy can never be scheduled as asked.
_INVALID = ("bad_request", "not_found", "conflict", "forbidden")


@dataclass
class HAConfig:
    """The HA service's configuration (``make_component(config)`` takes these keys)."""

    pds: list[str] = field(default_factory=lambda: ["pd"])
    self_name: str = "ha"
    poll_interval: float = 5.0
    pd_timeout: float = 0.0
    timers: bool = True
    min_lifetime: float = 5.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> HAConfig:
        data = {k: v for k, v in (data or {}).items() if k not in SHELL_CONFIG_KEYS}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ha config: unknown key(s) {', '.join(unknown)}")
        conf = cls(**data)
        if not isinstance(conf.pds, list) or not conf.pds or not all(
                isinstance(p, str) and p and RID_SEP not in p for p in conf.pds):
            raise ValueError(f"ha config: pds must be a non-empty list of peer names without {RID_SEP!r}")
        if not isinstance(conf.poll_interval, int | float) or conf.poll_interval <= 0:
            raise ValueError("ha config: poll_interval must be > 0")
        if not isinstance(conf.pd_timeout, int | float) or conf.pd_timeout < 0:
            raise ValueError("ha config: pd_timeout must be >= 0")
        for key in ("min_lifetime", "backoff_base", "backoff_max"):
            value = getattr(conf, key)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ha config: {key} must be a number >= 0")
        return conf


class _Tx:
    """One decision in the making: applies each event as it is emitted, collects effects."""

    def __init__(self, ha: HA, state: HAState, ctx: Context) -> None:
        self.ha, self.s, self.ctx, self.now = ha, state, ctx, ctx.now
        self.events: list[Any] = []
        self.effects: list[Any] = []

    def emit(self, event: Any) -> None:
        apply(self.s, event)
        self.s.pre.append(event)
        self.events.append(event)

    def send(self, pd: str, kind: str, arg: str, message: Any) -> None:
        self.effects.append(Send(pd, Request(request_id(pd, kind, arg), message)))


class HA(Component[HAState]):
    """The High Availability service core."""

    registry = events
    stream = "ha"

    def __init__(self, config: HAConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        if isinstance(config, HAConfig):
            self.config = config
        else:
            self.config = HAConfig.from_dict({**(config or {}), **kwargs})

    # ---- the component contract ---------------------------------------------------------------

    def initial_state(self) -> HAState:
        return HAState()

    def apply(self, state: HAState, event: Any) -> HAState:
        pre = state.pre
        if pre:
            if pre[0] is event:
                pre.popleft()
                return state
            pre.clear()  # left over from a decision whose events were not all returned
        return apply(state, event)

    def snapshot(self, state: HAState) -> Any:
        return snapshot(state)

    def restore(self, data: Any) -> HAState:
        return restore(data)

    def invariants(self, state: HAState) -> list[str]:
        return invariants.broken(state)

    def recovered(self, state: HAState, ctx: Context) -> Decision:
        """Start afresh as leader: every PD counts as heard now, pulled sensors are due, a pass
        runs at once (it asks the PDs for every copy HA holds)."""
        state.pre.clear()
        state.vol = Volatile(heard=dict.fromkeys(self.config.pds, ctx.now))
        for g in state.groups.values():
            if g.policy == "sensor" and policies.pulled(g.parameters):
                state.vol.sensor_next[g.name] = ctx.now
        effects: list[Any] = [SetTimer("pass", 0.0, HAPass())] if self.config.timers else []
        return Decision(effects=effects)

    def decide(self, state: HAState, message: Any, ctx: Context) -> Decision:
        state.pre.clear()
        handler = self._handlers.get(type(message))
        if handler is None:
            if isinstance(message, Ok | ErrorReply):
                return Decision()
            raise bad_request(f"ha: unknown message {type(message).__name__}")
        tx = _Tx(self, state, ctx)
        try:
            reply = handler(self, tx, message)
        except Rejected:
            if tx.events:  # handlers refuse before they emit; never drop applied events
                logger.error("ha: %s refused after emitting events", type(message).__name__)
                return Decision(tx.events, tx.effects, ErrorReply("internal", "refused late"))
            raise
        except Exception as exc:
            if not tx.events:
                raise
            logger.exception("ha: %s failed after emitting events", type(message).__name__)
            reply = ErrorReply("internal", f"{type(exc).__name__}: {exc}", type(message).__name__)
        return Decision(tx.events, tx.effects, reply)

    # ---- requests -----------------------------------------------------------------------------

    def _group(self, state: HAState, name: str) -> Group:
        g = state.groups.get(name)
        if g is None:
            raise not_found(f"no HA group {name!r}")
        return g

    @staticmethod
    def _check(policy: str, params: dict) -> None:
        try:
            policies.check_parameters(policy, params)
        except ValueError as exc:
            raise bad_request(str(exc)) from None

    def _create(self, tx: _Tx, m: CreateGroup) -> Any:
        pds = list(m.pds) if m.pds is not None else list(self.config.pds)
        unknown = [p for p in pds if p not in self.config.pds]
        if unknown:
            raise bad_request(f"unknown PD(s) {', '.join(unknown)} (HA uses {', '.join(self.config.pds)})")
        self._check(m.policy, m.parameters)
        g = tx.s.groups.get(m.name)
        if g is not None:
            if g.removing:
                raise conflict(f"HA group {m.name!r} is being removed")
            if (g.policy, g.parameters, g.process, g.pds) != (m.policy, m.parameters, m.process, pds):
                raise conflict(f"HA group {m.name!r} exists with other settings (reconfigure changes the policy)")
            return Ok(self.describe(tx.s, g))
        target = policies.initial_target(m.policy, m.parameters)
        tx.emit(GroupCreated(m.name, m.policy, copy.deepcopy(m.parameters), copy.deepcopy(m.process),
                             pds, target, tx.now))
        g = tx.s.groups[m.name]
        if m.policy == "sensor" and policies.pulled(m.parameters):
            tx.s.vol.sensor_next[m.name] = tx.now
        self._converge(tx, g)
        return Ok(self.describe(tx.s, g))

    def _reconfigure(self, tx: _Tx, m: ReconfigureGroup) -> Any:
        g = self._group(tx.s, m.name)
        if g.removing:
            raise conflict(f"HA group {m.name!r} is being removed")
        policy = m.policy or g.policy
        if policy == g.policy:
            params = {**g.parameters, **(m.parameters or {})}
        else:
            params = dict(m.parameters or {})
        self._check(policy, params)
        if policy == g.policy and params == g.parameters and g.failed is None \
                and not (g.failures or g.retry_at):
            return Ok(self.describe(tx.s, g))
        keep = g.target if policy == "sensor" else None  # within the new bounds
        target = policies.initial_target(policy, params, keep)
        self._terminate_surplus(tx, g, target)
        tx.emit(PolicyChanged(g.name, policy, copy.deepcopy(params), target, tx.now))
        if policy == "sensor" and policies.pulled(params):
            tx.s.vol.sensor_next[g.name] = tx.now
        else:
            tx.s.vol.sensor_next.pop(g.name, None)
        self._converge(tx, g)
        return Ok(self.describe(tx.s, g))

    def _remove(self, tx: _Tx, m: RemoveGroup) -> Any:
        g = self._group(tx.s, m.name)
        if not g.removing:
            self._terminate(tx, g, [c.upid for c in g.active()], "group removed")
            tx.emit(GroupRemoveRequested(g.name, tx.now))
            self._converge(tx, g)
        return Ok({"name": m.name, "removing": True, "copies": len(g.copies)})

    def _describe(self, tx: _Tx, m: DescribeGroup) -> Any:
        return Ok(self.describe(tx.s, self._group(tx.s, m.name)))

    def _list(self, tx: _Tx, m: ListGroups) -> Any:
        out = []
        for name in sorted(tx.s.groups):
            g = tx.s.groups[name]
            st, _ = self.status(tx.s, g)
            out.append({"name": name, "policy": g.policy, "status": st, "target": g.target,
                        "copies": len(g.active()), "removing": g.removing})
        return Ok(out)

    # ---- what the PDs say ---------------------------------------------------------------------

    def _pd_reply(self, tx: _Tx, m: PDReply) -> Any:
        s, vol = tx.s, tx.s.vol
        if m.ok:
            vol.heard[m.pd] = tx.now
        touched: set[str] = set()
        if m.kind == "describe":
            if not m.ok:
                return None
            procs = m.value if isinstance(m.value, list) else []
            seen = set()
            for p in procs:
                if isinstance(p, dict) and isinstance(p.get("upid"), str):
                    seen.add(p["upid"])
                    touched |= self._observe(tx, p)
            asked = vol.asked.get(m.pd)
            if asked is not None and asked[0] == m.arg:
                del vol.asked[m.pd]
                for upid in asked[1]:
                    if upid in seen:
                        continue
                    found = s.copy_of(upid)
                    if found is None or found[1].pd != m.pd:
                        continue
                    g, c = found
                    if c.terminating or upid in vol.acked:
                        self._ended(tx, g, upid, "UNKNOWN")
                        touched.add(g.name)
                    else:  # never reached the PD: ask again (idempotent per upid)
                        self._send_schedule(tx, g, upid, m.pd)
        elif m.kind == "counts":
            if m.ok and isinstance(m.value, dict):
                vol.load[m.pd] = sum(n for st, n in m.value.items()
                                     if st not in ps.TERMINAL and isinstance(n, int))
        elif m.kind in ("schedule", "kill"):
            found = s.copy_of(m.arg)
            if m.ok:
                if isinstance(m.value, dict):
                    touched |= self._observe(tx, m.value)
            elif found is not None:
                g, c = found
                if m.kind == "schedule" and m.code in _INVALID and not c.terminating:
                    logger.warning("ha: %s refused copy %s of group %s: %s", m.pd, m.arg, g.name, m.message)
                    tx.emit(CopyEnded(g.name, m.arg, "REFUSED", tx.now))
                    if g.failed is None:
                        tx.emit(GroupFailed(g.name, f"{m.pd} refused a copy: {m.code}: {m.message}", tx.now))
                    touched.add(g.name)
                elif m.kind == "kill" and m.code == "not_found":
                    tx.emit(CopyEnded(g.name, m.arg, "UNKNOWN", tx.now))
                    touched.add(g.name)
        for name in sorted(touched):
            g = s.groups.get(name)
            if g is not None:
                self._converge(tx, g)
        return None

    def _process_changed(self, tx: _Tx, m: ProcessStateChanged) -> Any:
        for name in sorted(self._observe(tx, m.process)):
            g = tx.s.groups.get(name)
            if g is not None:
                self._converge(tx, g)
        return None

    def _observe(self, tx: _Tx, p: dict) -> set[str]:
        """Record a PD's report of a copy; end it if it is past RUNNING. The groups touched."""
        upid, st, rnd = p.get("upid"), p.get("state"), p.get("round")
        if not isinstance(upid, str) or not isinstance(st, str) or not ps.is_state(st) \
                or not isinstance(rnd, int) or isinstance(rnd, bool):
            logger.warning("ha: malformed process report dropped: %.200r", p)
            return set()
        found = tx.s.copy_of(upid)
        if found is None:
            return set()
        g, _ = found
        vol = tx.s.vol
        old = vol.observed.get(upid)
        if old is not None and (rnd, ps.rank(st)) < (old.round, ps.rank(old.state)):
            return set()  # older news
        node = p.get("node_id")
        vol.observed[upid] = Observed(st, rnd, node if isinstance(node, str) else None)
        vol.acked.add(upid)
        if st in ps.TERMINAL:
            self._ended(tx, g, upid, st)
        return {g.name}

    def _ended(self, tx: _Tx, g: Group, upid: str, state: str) -> None:
        """The copy is gone; one that ended on its own soon after it was scheduled counts
        towards the group's crash-loop backoff, one that lived long enough resets it."""
        c = g.copies[upid]
        tx.emit(CopyEnded(g.name, upid, state, tx.now))
        if c.terminating or self.config.backoff_base <= 0:
            return
        if tx.now - c.at < self.config.min_lifetime:
            failures = g.failures + 1
            delay = 0.0 if failures < 2 else min(self.config.backoff_base * 2 ** (failures - 2),
                                                 self.config.backoff_max)
            tx.emit(GroupBackoff(g.name, failures, tx.now + delay if delay > 0 else 0.0, tx.now))
        elif g.failures or g.retry_at:
            tx.emit(GroupBackoff(g.name, 0, 0.0, tx.now))

    # ---- sensors ------------------------------------------------------------------------------

    def _sensor_data(self, tx: _Tx, m: SensorData) -> Any:
        g = self._group(tx.s, m.domain_id)
        self._record_sensor(tx, g, m.metric, m.values, m.domain_value)
        return Ok(None)

    def _sensor_readings(self, tx: _Tx, m: SensorReadings) -> Any:
        g = tx.s.groups.get(m.domain_id)
        if m.owner != "ha" or g is None:
            return None
        if m.error:
            logger.warning("ha: sensor of group %s failed: %s", g.name, m.error)
            return None
        self._record_sensor(tx, g, m.metric, m.values, m.domain_value)
        return None

    def _record_sensor(self, tx: _Tx, g: Group, metric: str, values: dict, domain: float | None) -> None:
        if g.policy != "sensor" or metric != g.parameters.get("metric"):
            return
        tx.s.vol.sensor[g.name] = {"values": dict(values), "domain": domain}
        tx.s.vol.fresh.add(g.name)
        self._converge(tx, g)

    # ---- the pass -----------------------------------------------------------------------------

    def _pass(self, tx: _Tx, m: HAPass) -> Any:
        s, vol, cfg, now = tx.s, tx.s.vol, self.config, tx.now
        by_pd: dict[str, list[str]] = collections.defaultdict(list)
        for g in s.groups.values():
            for c in g.copies.values():
                by_pd[c.pd].append(c.upid)
        for pd in cfg.pds:
            tx.send(pd, "counts", "", ProcessCounts())
            if by_pd.get(pd):
                tag = f"{now!r}"
                vol.asked[pd] = (tag, list(by_pd[pd]))
                tx.send(pd, "describe", tag, DescribeProcesses(list(by_pd[pd])))
        if cfg.pd_timeout > 0:
            silent = {pd for pd in cfg.pds if now - vol.heard.get(pd, now) > cfg.pd_timeout}
            for g in list(s.groups.values()):
                lost = [c.upid for c in g.active() if c.pd in silent]
                if lost:
                    self._terminate(tx, g, lost, "its PD is silent")
        for g in s.groups.values():
            for c in g.terminating():
                tx.send(c.pd, "kill", c.upid, KillProcess(c.upid))
        self._pull_sensors(tx)
        for name in sorted(s.groups):
            g = s.groups.get(name)
            if g is not None:
                self._converge(tx, g)
        if cfg.timers:
            tx.effects.append(SetTimer("pass", cfg.poll_interval, HAPass()))
        return Ok({"groups": len(s.groups)})

    def _pull_sensors(self, tx: _Tx) -> None:
        vol, now = tx.s.vol, tx.now
        for name, at in sorted(vol.sensor_next.items()):
            g = tx.s.groups.get(name)
            if g is None or g.policy != "sensor" or not policies.pulled(g.parameters):
                del vol.sensor_next[name]
                continue
            if at > now:
                continue
            params = g.parameters
            vol.sensor_next[name] = now + policies.sample_period(params)
            copies = {c.upid: {"pd": c.pd, "node_id": getattr(vol.observed.get(c.upid), "node_id", None)}
                      for c in g.active()}
            tx.effects.append(Work("sensor", {
                "owner": "ha", "domain_id": name, "sensor_type": params["sensor_type"],
                "metric": params["metric"], "config": params.get("sensor_config") or {},
                "instances": copies, "now": now,
            }))

    # ---- converging ---------------------------------------------------------------------------

    def _converge(self, tx: _Tx, g: Group) -> None:
        """Make the group's counted copies meet its target, after the sensor's say on a sample
        not yet used (one sample, at most one scaling; a sample that came during the cooldown
        is used when it ends)."""
        if g.removing:
            if not g.copies:
                tx.emit(GroupRemoved(g.name, tx.now))
            return
        fresh = tx.s.vol.fresh
        if g.policy == "sensor" and g.name in fresh and tx.now >= g.cooldown_until:
            fresh.discard(g.name)  # one sample scales at most once
            live = [c.upid for c in g.active()]
            target, value = policies.sensor_target(g.parameters, live, tx.s.vol.sensor.get(g.name))
            if target is not None and target != g.target:
                cooldown = float(g.parameters.get("cooldown_period", 0.0))
                self._terminate_surplus(tx, g, target)
                tx.emit(TargetChanged(g.name, target, value, tx.now + cooldown, tx.now))
        self._terminate_surplus(tx, g, g.target)
        if g.failed is None and len(g.active()) < g.target:
            if tx.now < g.retry_at:  # backing off a crash loop: come back when it is over
                if self.config.timers:
                    tx.effects.append(SetTimer(f"retry|{g.name}", g.retry_at - tx.now, HAPass()))
                return
            for _ in range(g.target - len(g.active())):
                if not self._schedule(tx, g):
                    break

    def _terminate_surplus(self, tx: _Tx, g: Group, target: int) -> None:
        active = g.active()
        if len(active) > target:
            self._terminate(tx, g, [c.upid for c in active[: len(active) - target]], "surplus")

    def _terminate(self, tx: _Tx, g: Group, upids: list[str], reason: str) -> None:
        if not upids:
            return
        tx.emit(CopyTerminating(g.name, list(upids), reason, tx.now))
        for upid in upids:
            c = g.copies[upid]
            tx.send(c.pd, "kill", upid, KillProcess(upid))
            tx.s.vol.sent_at[upid] = tx.now

    def _pick_pd(self, tx: _Tx, g: Group) -> str | None:
        """The least-loaded PD of the group (ties: the first listed) among those answering."""
        vol, timeout = tx.s.vol, self.config.pd_timeout
        usable = [pd for pd in g.pds
                  if timeout <= 0 or tx.now - vol.heard.get(pd, tx.now) <= timeout]
        if not usable:
            return None
        ours: dict[str, int] = collections.Counter(c.pd for c in g.active())
        return min(usable, key=lambda pd: (vol.load.get(pd, ours.get(pd, 0)), g.pds.index(pd)))

    def _schedule(self, tx: _Tx, g: Group) -> bool:
        pd = self._pick_pd(tx, g)
        if pd is None:
            return False
        upid = f"{g.name}-{tx.ctx.new_id()[:12]}"
        while upid in tx.s.owner:
            upid = f"{g.name}-{tx.ctx.new_id()[:12]}"
        tx.emit(CopyScheduled(g.name, upid, pd, tx.now))
        vol = tx.s.vol
        vol.load[pd] = vol.load.get(pd, 0) + 1
        self._send_schedule(tx, g, upid, pd)
        return True

    def _send_schedule(self, tx: _Tx, g: Group, upid: str, pd: str) -> None:
        tx.send(pd, "schedule", upid, self.schedule_message(g, upid))
        tx.s.vol.sent_at[upid] = tx.now

    def schedule_message(self, g: Group, upid: str) -> ScheduleProcess:
        """The PD request for copy ``upid`` (the same every time: the PD's schedule is
        idempotent per upid)."""
        return ScheduleProcess(upid, **copy.deepcopy(g.process), subscribers=[self.config.self_name])

    # ---- status and description ---------------------------------------------------------------

    def status(self, state: HAState, g: Group) -> tuple[str, str]:
        """``(status, why)`` of a group."""
        if g.failed is not None:
            return FAILED, f"failed: {g.failed}; reconfigure to retry"
        active, leaving = g.active(), g.terminating()
        running = sum(1 for c in active if getattr(state.vol.observed.get(c.upid), "state", None) == ps.RUNNING)
        if leaving:
            wait = f"; {len(leaving)} cop{'y' if len(leaving) == 1 else 'ies'} still terminating"
        else:
            wait = ""
        if not leaving and len(active) == g.target and running == g.target:
            return STEADY, f"{running} of {g.target} running, nothing to rebalance"
        if running:
            return READY, f"{running} of {g.target} running{wait}"
        return PENDING, f"none of {g.target} running yet{wait}"

    def wants(self, state: HAState, g: Group) -> str:
        """What the policy does next, in words."""
        active, leaving = g.active(), g.terminating()
        if g.removing:
            return f"wait for {len(g.copies)} cop{'y' if len(g.copies) == 1 else 'ies'} to end, then forget the group"
        if g.failed is not None:
            return "nothing until a reconfigure (FAILED)"
        parts = []
        if len(active) < g.target:
            if g.retry_at > 0 and g.retry_at > max((c.at for c in g.copies.values()), default=0.0):
                parts.append(f"back off ({g.failures} copies in a row ended within "
                             f"{self.config.min_lifetime:g}s), then schedule {g.target - len(active)} "
                             f"at {g.retry_at:.1f}")
            else:
                parts.append(f"schedule {g.target - len(active)} on the least-loaded PD")
        pending = [c for c in active
                   if getattr(state.vol.observed.get(c.upid), "state", None) != ps.RUNNING]
        if pending:
            parts.append(f"wait for {len(pending)} to run")
        if leaving:
            parts.append(f"wait for the PD to end {len(leaving)} terminated")
        if g.policy == "sensor":
            p = g.parameters
            cool = f", cooling down until {g.cooldown_until:.0f}" if g.cooldown_until > 0 else ""
            parts.append(f"scale on {p['metric']} (up above {p['scale_up_threshold']}, down below "
                         f"{p['scale_down_threshold']}) within [{p['minimum_processes']}, "
                         f"{p['maximum_processes']}]{cool}")
        return "; ".join(parts) or "nothing: steady"

    def describe(self, state: HAState, g: Group) -> dict[str, Any]:
        st, why = self.status(state, g)
        copies = []
        for c in g.copies.values():
            obs = state.vol.observed.get(c.upid)
            copies.append({
                "upid": c.upid, "pd": c.pd, "scheduled_at": c.at,
                "state": obs.state if obs else None, "round": obs.round if obs else None,
                "node_id": obs.node_id if obs else None,
                "terminating": c.terminating, "reason": c.reason or None,
            })
        return {
            "name": g.name, "policy": g.policy, "parameters": copy.deepcopy(g.parameters),
            "process": copy.deepcopy(g.process), "pds": list(g.pds), "target": g.target,
            "status": st, "why": why, "wants": self.wants(state, g), "failed": g.failed,
            "removing": g.removing, "copies": copies, "cooldown_until": g.cooldown_until,
            "last_value": g.last_value, "created_at": g.created_at,
            "backoff": {"failures": g.failures, "retry_at": g.retry_at},
        }

    _handlers: dict[type, Any] = {
        CreateGroup: _create,
        ReconfigureGroup: _reconfigure,
        RemoveGroup: _remove,
        DescribeGroup: _describe,
        ListGroups: _list,
        PDReply: _pd_reply,
        ProcessStateChanged: _process_changed,
        SensorData: _sensor_data,
        SensorReadings: _sensor_readings,
        HAPass: _pass,
    }


__all__ = ["FAILED", "HA", "PENDING", "READY", "STATUSES", "STEADY", "HAConfig"]
