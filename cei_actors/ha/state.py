"""The HA service's state: the fold of its events, plus leader-local scratch (``vol``).

``Group.copies`` keeps insertion order, i.e. the order HA scheduled them: the oldest first.
What a PD reports about a copy (its state, round, node) is scratch: a new leader asks again.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass, field
from typing import Any

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
)


@dataclass
class Copy:
    upid: str
    pd: str
    at: float
    terminating: bool = False
    reason: str = ""


@dataclass
class Group:
    name: str
    policy: str
    parameters: dict
    process: dict
    pds: list
    target: int
    created_at: float
    copies: dict[str, Copy] = field(default_factory=dict)
    failed: str | None = None
    removing: bool = False
    cooldown_until: float = 0.0
    last_value: float | None = None
    failures: int = 0  # copies that ended on their own soon after scheduling, in a row
    retry_at: float = 0.0  # no new copy before (crash-loop backoff)

    def active(self) -> list[Copy]:
        """The copies that count (not being terminated), oldest first."""
        return [c for c in self.copies.values() if not c.terminating]

    def terminating(self) -> list[Copy]:
        return [c for c in self.copies.values() if c.terminating]


@dataclass
class Observed:
    """What a PD last said of a copy."""

    state: str
    round: int
    node_id: str | None = None


@dataclass
class Volatile:
    """The leader's scratch state: never persisted, rebuilt after a failover."""

    observed: dict[str, Observed] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)  # upids a PD has reported
    sent_at: dict[str, float] = field(default_factory=dict)  # last schedule/kill sent per upid
    heard: dict[str, float] = field(default_factory=dict)  # pd -> last Ok from it
    load: dict[str, int] = field(default_factory=dict)  # pd -> live processes (counts + ours since)
    asked: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # pd -> (tag, upids) of the last describe
    sensor: dict[str, dict] = field(default_factory=dict)  # group -> {"values": {...}, "domain": v}
    sensor_next: dict[str, float] = field(default_factory=dict)  # group -> next pulled read
    fresh: set[str] = field(default_factory=set)  # groups with a sample not yet acted on


class HAState:
    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.owner: dict[str, str] = {}  # upid -> group name
        self.vol = Volatile()
        self.pre: collections.deque[Any] = collections.deque()  # events decide applied already

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HAState) and self.groups == other.groups

    def copy_of(self, upid: str) -> tuple[Group, Copy] | None:
        name = self.owner.get(upid)
        if name is None:
            return None
        group = self.groups[name]
        return group, group.copies[upid]


def apply(state: HAState, event: Any) -> HAState:
    """Fold one event into ``state`` (in place)."""
    handler = _HANDLERS.get(type(event))
    if handler is not None:
        handler(state, event)
    return state


def _created(s: HAState, e: GroupCreated) -> None:
    s.groups[e.name] = Group(e.name, e.policy, copy.deepcopy(e.parameters), copy.deepcopy(e.process),
                             list(e.pds), e.target, e.at)


def _policy(s: HAState, e: PolicyChanged) -> None:
    g = s.groups[e.name]
    g.policy, g.parameters, g.target = e.policy, copy.deepcopy(e.parameters), e.target
    g.failed = None
    g.cooldown_until = 0.0
    g.failures, g.retry_at = 0, 0.0


def _target(s: HAState, e: TargetChanged) -> None:
    g = s.groups[e.name]
    g.target, g.cooldown_until, g.last_value = e.target, e.cooldown_until, e.value


def _scheduled(s: HAState, e: CopyScheduled) -> None:
    s.groups[e.name].copies[e.upid] = Copy(e.upid, e.pd, e.at)
    s.owner[e.upid] = e.name


def _terminating(s: HAState, e: CopyTerminating) -> None:
    g = s.groups[e.name]
    for upid in e.upids:
        c = g.copies.get(upid)
        if c is not None:
            c.terminating, c.reason = True, e.reason


def _ended(s: HAState, e: CopyEnded) -> None:
    g = s.groups[e.name]
    g.copies.pop(e.upid, None)
    s.owner.pop(e.upid, None)
    s.vol.observed.pop(e.upid, None)
    s.vol.acked.discard(e.upid)
    s.vol.sent_at.pop(e.upid, None)


def _backoff(s: HAState, e: GroupBackoff) -> None:
    g = s.groups[e.name]
    g.failures, g.retry_at = e.failures, e.retry_at


def _failed(s: HAState, e: GroupFailed) -> None:
    s.groups[e.name].failed = e.reason


def _remove_requested(s: HAState, e: GroupRemoveRequested) -> None:
    g = s.groups[e.name]
    g.removing, g.target = True, 0


def _removed(s: HAState, e: GroupRemoved) -> None:
    g = s.groups.pop(e.name)
    for upid in g.copies:
        s.owner.pop(upid, None)
    s.vol.sensor.pop(e.name, None)
    s.vol.sensor_next.pop(e.name, None)
    s.vol.fresh.discard(e.name)


_HANDLERS: dict[type, Any] = {
    GroupCreated: _created,
    PolicyChanged: _policy,
    TargetChanged: _target,
    CopyScheduled: _scheduled,
    CopyTerminating: _terminating,
    CopyEnded: _ended,
    GroupBackoff: _backoff,
    GroupFailed: _failed,
    GroupRemoveRequested: _remove_requested,
    GroupRemoved: _removed,
}


def snapshot(state: HAState) -> dict[str, Any]:
    return {
        "groups": [
            {
                "name": g.name, "policy": g.policy, "parameters": g.parameters, "process": g.process,
                "pds": g.pds, "target": g.target, "created_at": g.created_at, "failed": g.failed,
                "removing": g.removing, "cooldown_until": g.cooldown_until, "last_value": g.last_value,
                "failures": g.failures, "retry_at": g.retry_at,
                "copies": [[c.upid, c.pd, c.at, c.terminating, c.reason] for c in g.copies.values()],
            }
            for g in state.groups.values()
        ]
    }


def restore(data: dict[str, Any]) -> HAState:
    state = HAState()
    for d in data["groups"]:
        g = Group(d["name"], d["policy"], d["parameters"], d["process"], list(d["pds"]), d["target"],
                  d["created_at"], failed=d["failed"], removing=d["removing"],
                  cooldown_until=d["cooldown_until"], last_value=d["last_value"],
                  failures=d.get("failures", 0), retry_at=d.get("retry_at", 0.0))
        for upid, pd, at, terminating, reason in d["copies"]:
            g.copies[upid] = Copy(upid, pd, at, terminating, reason)
            state.owner[upid] = g.name
        state.groups[g.name] = g
    return state
