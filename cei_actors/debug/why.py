"""``why`` and ``trace``: what happened to one process, node, domain or HA group, and why.

``why(replay, entity, at)`` folds every stream of the log to one point (an offset of the home
stream, ``pd`` by default, or a time, which cuts every stream there), names the entity's kind,
lists every event that touched it with its time, and explains its state:

- a process not running: what holds it back as a whole (system boot, throttled, rejected,
  no node of its engine yet and the need EPUM holds for it, the engine at its cap), and for
  every node a verdict from :meth:`cei_actors.pd.matchmaker.Matchmaker.verdict`, the same
  checks placement makes, run on the replayed state;
- a node: where it stands in each component, and for one that was destroyed the decision
  that did it (EPUM's engine, rule and figures, from ``InstanceDestroyRequested.decision``);
- a domain or an HA group: its state in its component.

``trace(replay, entity)`` is one timeline over every stream, following the ids the events
carry: a process's resources and nodes, a node's launch, and the need registered for its
domain just before EPUM launched it (decision DBG3).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..launch.components import COMPONENTS
from ..pd import matchmaker as mm
from ..pd import states as ps
from ..plaindata import plain as convert
from .entities import only_entity
from .reader import Replay, human_time, parse_at


class UnknownEntity(LookupError):
    """No stream of the log knows the id."""


def plain(value: Any) -> Any:
    """``value`` as JSON-able data."""
    return convert(value, as_text=False)


def mentions(value: Any, ids: set[str] | frozenset[str]) -> bool:
    """Does ``value`` (an event body: plain data) hold one of ``ids``, as a value or a key?"""
    t = type(value)
    if t is str:
        return value in ids
    if t is dict:
        for k, v in value.items():  # a loop, not any(): history walks thousands of bodies
            tv = type(v)
            if (type(k) is str and k in ids) or (v in ids if tv is str else tv in _NESTED and mentions(v, ids)):
                return True
        return False
    if t in _NESTED:
        for v in value:
            if v in ids if type(v) is str else type(v) in _NESTED and mentions(v, ids):
                return True
        return False
    if isinstance(value, str | dict | list | tuple):  # a subclass: read as its base
        return mentions(str(value) if isinstance(value, str) else
                        dict(value) if isinstance(value, dict) else list(value), ids)
    return False


_NESTED = (dict, list, tuple)


def _row(r: Any) -> dict[str, Any]:
    return {"stream": r.stream, "offset": r.offset, "time": r.timestamp,
            "when": human_time(r.timestamp), "type": r.type, "body": plain(r.body)}


class Cut:
    """Every stream's state at one point: ``offsets[stream]`` and the time of that point."""

    def __init__(self, replay: Replay, at: str | int | None, home: str | None = None,
                 snapshots: bool = True) -> None:
        self.replay = replay
        self.snapshots = snapshots
        streams = [s for s in replay.streams() if s.split(".", 1)[0] in COMPONENTS]
        self.home = home or ("pd" if "pd" in streams else (streams[0] if streams else None))
        if self.home is None:
            raise UnknownEntity("the log holds no component's stream")
        if home is not None and home not in streams:
            raise UnknownEntity(f"the log has no stream {home!r} (streams: {', '.join(streams)})")
        kind, value = parse_at(at, replay.now)
        self.offsets: dict[str, int] = {}
        if kind == "head":
            self.offsets = {s: replay.head(s) for s in streams}
            self.time = max((replay.time_of(s, o) or 0.0 for s, o in self.offsets.items()), default=None)
        else:
            if kind == "offset":
                self.offsets[self.home] = replay.resolve(self.home, at)
                self.time = replay.time_of(self.home, self.offsets[self.home])
            else:
                self.time = value
            for s in streams:
                if s not in self.offsets:
                    self.offsets[s] = replay.offset_at_time(s, self.time) if self.time is not None else 0
        self._states: dict[str, Any] = {}

    def state(self, stream: str) -> Any | None:
        if stream not in self.offsets:
            return None
        if stream not in self._states:
            self._states[stream] = self.replay.state(stream, self.offsets[stream], self.snapshots)
        return self._states[stream]

    def where(self) -> dict[str, Any]:
        return {"offsets": dict(self.offsets), "time": self.time, "when": human_time(self.time)}


def history(cut: Cut, ids: Iterable[str], since: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Every event up to the cut that names one of ``ids``, over all streams, in time order
    (``since``: the first offset worth reading per stream)."""
    wanted = frozenset(ids)
    rows = []
    for stream, upto in cut.offsets.items():
        start = (since or {}).get(stream, 1)
        for r in cut.replay.records(stream, start, upto):
            if mentions(r.body, wanted):
                rows.append(_row(r))
    rows.sort(key=lambda x: (x["time"], x["stream"], x["offset"]))
    return rows


# ---- which entity -------------------------------------------------------------------------------


def kind_of(cut: Cut, entity: str) -> str:
    """``process``, ``node``, ``domain`` or ``group``: what ``entity`` names at the cut."""
    pd = cut.state("pd")
    if pd is not None and (entity in pd.processes or pd.tombstones.get(entity) is not None):
        return "process"
    epum = cut.state("epum")
    if pd is not None and entity in pd.nodes:
        return "node"
    if epum is not None and (entity in epum.instances or epum.forgotten.get(entity) is not None):
        return "node"
    if epum is not None and any(d.domain_id == entity for d in epum.domains.values()):
        return "domain"
    ha = cut.state("ha")
    if ha is not None and entity in ha.groups:
        return "group"
    # gone by the cut (or not yet there): the fields that named it
    for stream in cut.offsets:
        for r in cut.replay.records(stream, 1, cut.replay.head(stream)):
            for field, kind in (("upid", "process"), ("node_id", "node"), ("instance_id", "node"),
                                ("domain_id", "domain"), ("name", "group")):
                value = r.body.get(field)
                if value == entity or (isinstance(value, list) and entity in value):
                    return kind
            if mentions(r.body.get("instance_ids"), {entity}) or mentions(r.body.get("node_ids"), {entity}):
                return "node"
    raise UnknownEntity(f"no stream of the log names {entity!r}")


def _snap(cut: Cut, stream: str) -> Any:
    return plain(cut.replay.component(stream).snapshot(cut.state(stream)))


# ---- why ------------------------------------------------------------------------------------------


def why(
    replay: Replay, entity: str, at: str | int | None = None, home: str | None = None,
    snapshots: bool = True,
) -> dict[str, Any]:
    """The entity's kind, its history up to the point and why it stands as it does there
    (states folded from the newest snapshot below the point unless not ``snapshots``)."""
    cut = Cut(replay, at, home, snapshots)
    kind = kind_of(cut, entity)
    out: dict[str, Any] = {"entity": entity, "kind": kind, "at": cut.where()}
    since: dict[str, int] = {}
    if kind == "process":
        out.update(_why_process(cut, entity))
        p = cut.state("pd").processes.get(entity)
        if p is not None and "pd" in cut.offsets:  # nothing names it before it was created
            since["pd"] = max(replay.offset_at_time("pd", p.created_at - 1.0), 1)
    elif kind == "node":
        out.update(_why_node(cut, entity))
    elif kind == "domain":
        out.update(_why_domain(cut, entity))
    else:
        out["state"] = only_entity(_snap(cut, "ha"), entity) if cut.state("ha") is not None else {}
    ids = {entity}
    if kind == "node" and cut.state("pd") is not None:
        ids |= _resources_of(cut, entity)
    out["history"] = history(cut, ids, since)
    return out


def _resources_of(cut: Cut, node_id: str) -> set[str]:
    pd = cut.state("pd")
    node = pd.nodes.get(node_id)
    found = set(node.resources) if node is not None else set()
    if node is None:  # removed: its agents named it when they joined
        for r in cut.replay.records("pd", 1, cut.offsets["pd"]):
            if r.type == "ResourceAdded" and r.body.get("node_id") == node_id:
                found.add(r.body["resource_id"])
    return found


def _why_process(cut: Cut, upid: str) -> dict[str, Any]:
    pd = cut.state("pd")
    p = pd.processes.get(upid)
    if p is None:
        stone = pd.tombstones.get(upid)
        if stone is None:
            return {"state": None, "nodes": [], "blockers": [
                {"reason": "not_yet", "text": "the PD does not know it at this point (not created yet)"}]}
        return {"state": "FORGOTTEN", "nodes": [], "blockers": [
            {"reason": "forgotten", "last": plain(stone.describe()),
             "text": "finished and forgotten after the retention; its last record is kept"}]}
    out: dict[str, Any] = {"state": p.state, "round": p.round, "since": human_time(p.state_at),
                           "msg": p.msg, "engine": p.engine, "constraints": plain(p.constraints)}
    if p.state in ps.PLACED:
        out["node_id"], out["resource_id"] = p.node_id, p.resource_id
        out["blockers"], out["nodes"] = [], []
        return out
    blockers: list[dict[str, Any]] = []
    now = cut.time if cut.time is not None else p.state_at
    if p.state == ps.UNSCHEDULED_PENDING:
        blockers.append({"reason": "system_boot", "system_boot": pd.system_boot,
                         "text": "parked by a system boot" + (" still on" if pd.system_boot else
                                                              "; requeued when the boot ended")})
    elif p.state == ps.UNSCHEDULED:
        blockers.append({"reason": "unscheduled", "text": "created but never scheduled"})
    elif p.state in ps.TERMINAL:
        blockers.append({"reason": "ended", "state": p.state, "text": p.msg or f"ended {p.state}"})
    until = pd.mm.throttled_set.get(upid)
    if until is not None and until > now:
        blockers.append({"reason": "throttled", "until": until, "until_when": human_time(until),
                         "dispatches": p.dispatches, "last_dispatch": p.last_dispatch,
                         "text": f"throttled until {human_time(until)} (dispatched {p.dispatches} times, "
                                 f"last at {human_time(p.last_dispatch)})"})
    verdicts = [pd.mm.verdict(p, node) for node in sorted(pd.nodes.values(), key=lambda n: n.seq)]
    for v in verdicts:
        v["text"] = verdict_text(v)
    mine = [v for v in verdicts if v["reason"] != mm.ENGINE]
    if not mine and p.state in ps.QUEUED | {ps.REJECTED}:
        blockers.append(_no_node(cut, p.engine, [v["had"] for v in verdicts]))
    elif mine and all(v["reason"] == mm.NO_FREE_SLOT for v in mine):
        capped = _engine_capacity(cut, p.engine)
        if capped is not None:
            blockers.append(capped)
    if p.state == ps.REJECTED:
        blockers.append({"reason": "rejected", "queueing_mode": p.queueing_mode,
                         "text": p.msg or f"rejected (queueing mode {p.queueing_mode})"})
    out["blockers"] = blockers
    out["nodes"] = verdicts
    return out


def verdict_text(v: dict[str, Any]) -> str:
    """One line for a node verdict of :meth:`Matchmaker.verdict`."""
    r = v["reason"]
    if r == mm.ENGINE:
        return f"engine: wants {v['wanted']!r}, the node runs {v['had']!r}"
    if r == mm.CONSTRAINT:
        return f"constraint {v['key']}: wanted {plain(v['wanted'])!r}, had {plain(v['had'])!r}"
    if r == mm.RETIRING:
        return "retiring (offered to EPUM for scale-down)"
    if r == mm.NO_AGENT:
        return "no EEAgent has reported from it yet"
    if r == mm.AGENT_STATE:
        return "agent not OK: " + ", ".join(f"{k} {s}" for k, s in v["states"].items())
    if r == mm.NO_FREE_SLOT:
        return (f"no free slot: {v['slots']} slots, {v['assigned']} assigned, "
                f"{v['foreign']} held by others")
    if r == mm.NODE_EXCLUSIVE:
        return f"node_exclusive {v['tag']!r} taken by {v['held_by']}"
    return "a slot fits: the next matchmaking pass places it here"


def _domains_for(cut: Cut, engine: str) -> list[Any]:
    epum = cut.state("epum")
    if epum is None:
        return []
    pd = cut.state("pd")
    named = {n.domain_id for n in pd.nodes.values() if n.engine == engine} if pd is not None else set()
    return [d for d in epum.domains.values()
            if d.domain_id in named or d.domain_id == f"pd_domain_{engine}"]


def _need(dom: Any) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for state, ids in dom.by_state.items():
        counts[state] = len(ids)
    conf = dom.engine_conf
    return {"domain_id": dom.domain_id, "need": conf.get("preserve_n"),
            "maximum_vms": conf.get("maximum_vms"), "instances": counts,
            "removing": dom.removing}


def _no_node(cut: Cut, engine: str, other_engines: list[str]) -> dict[str, Any]:
    doms = _domains_for(cut, engine)
    if not doms:
        others = sorted(set(other_engines))
        return {"reason": "engine_missing", "engine": engine, "other_engines": others,
                "text": f"no node runs engine {engine!r} and no EPUM domain launches one"
                        + (f" (nodes run {', '.join(others)})" if others else "")}
    need = _need(doms[0])
    capped = _capped(need)
    if capped:
        return {**capped, "text": f"no node of engine {engine!r}: " + capped["text"]}
    return {"reason": "no_node", "engine": engine, **need,
            "text": f"no node of engine {engine!r} yet: need {need['need']} registered with "
                    f"{need['domain_id']}, instances {need['instances'] or 'none'}"}


def _capped(need: dict[str, Any]) -> dict[str, Any] | None:
    cap = need.get("maximum_vms")
    if cap is None or (need.get("need") or 0) < cap:
        return None
    return {"reason": "engine_at_capacity", **need,
            "text": f"engine at capacity: need {need['need']} reaches maximum_vms {cap} "
                    f"({need['domain_id']})"}


def _engine_capacity(cut: Cut, engine: str) -> dict[str, Any] | None:
    doms = _domains_for(cut, engine)
    return _capped(_need(doms[0])) if doms else None


def _why_node(cut: Cut, node_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"state": {}}
    for stream in cut.offsets:
        if cut.state(stream) is not None and stream in ("pd", "epum", "provisioner"):
            found = only_entity(_snap(cut, stream), node_id)
            if found:
                out["state"][stream] = found
    destroyed = []
    if "epum" in cut.offsets:
        for r in cut.replay.records("epum", 1, cut.offsets["epum"]):
            if r.type == "InstanceDestroyRequested" and node_id in (r.body.get("instance_ids") or ()):
                decision = r.body.get("decision")
                d = {"offset": r.offset, "when": human_time(r.timestamp), "time": r.timestamp,
                     "reason": r.body.get("reason"), "decision": plain(decision)}
                if decision:
                    figures = ", ".join(f"{k}={plain(v)}" for k, v in (decision.get("figures") or {}).items())
                    d["text"] = (f"destroyed by engine {decision.get('engine')} rule "
                                 f"{decision.get('rule')!r} ({figures})")
                else:
                    d["text"] = f"destroyed: {r.body.get('reason')} (figures not recorded in this log)"
                destroyed.append(d)
    out["destroyed"] = destroyed
    return out


def _why_domain(cut: Cut, domain_id: str) -> dict[str, Any]:
    epum = cut.state("epum")
    if epum is None:  # named by the PD's nodes only: a log without EPUM's stream
        return {"state": only_entity(_snap(cut, "pd"), domain_id) if cut.state("pd") is not None else {}}
    doms = [d for d in epum.domains.values() if d.domain_id == domain_id]
    out: dict[str, Any] = {"state": only_entity(_snap(cut, "epum"), domain_id)}
    if doms:
        out["need"] = _need(doms[0])
        out["engine"] = (doms[0].config.get("general") or {}).get("engine_class")
    return out


# ---- trace ----------------------------------------------------------------------------------------

#: (record type, field): ids a matching record adds to the trace
_LINKS: dict[str, tuple[str, ...]] = {
    "ProcessAssigned": ("resource_id",),
    "ResourceAdded": ("node_id",),
    "InstanceLaunchRequested": ("instance_id", "launch_id"),
    "LaunchRequested": ("launch_id",),
    "NodeLaunched": ("node_id",),
}


def trace(replay: Replay, entity: str) -> list[dict[str, Any]]:
    """One timeline over every stream for ``entity`` and the ids its events lead to: a
    process's resources and nodes, a node's launch, and the need that preceded the launch."""
    streams = [s for s in replay.streams() if s.split(".", 1)[0] in COMPONENTS]
    records = [r for s in streams for r in replay.records(s, 1, replay.head(s))]
    ids = {entity}
    while True:  # follow the links until no new id turns up
        grown = set(ids)
        for r in records:
            links = _LINKS.get(r.type)
            if links and mentions(r.body, ids):
                grown |= {r.body[f] for f in links if isinstance(r.body.get(f), str)}
        if grown == ids:
            break
        ids = grown
    if len(ids) == 1 and not any(mentions(r.body, ids) for r in records):
        raise UnknownEntity(f"no stream of the log names {entity!r}")
    # another process's events name the trace's resources too: they are not part of it
    chosen = [r for r in records if mentions(r.body, ids)
              and not (isinstance(r.body.get("upid"), str) and r.body["upid"] != entity
                       and r.type.startswith("Process"))]
    # the need registered for the domain just before each launch in the trace
    for launch in [r for r in chosen if r.type == "InstanceLaunchRequested"]:
        needs = [r for r in records if r.type == "NeedRegistered" and r.stream == launch.stream
                 and r.body.get("domain_id") == launch.body.get("domain_id") and r.offset < launch.offset]
        if needs and needs[-1] not in chosen:
            chosen.append(needs[-1])
    chosen.sort(key=lambda r: (r.timestamp, r.stream, r.offset))
    return [_row(r) for r in chosen]
