"""How many nodes each engine needs, and which idle nodes it can give back (reference §4.4).

``need = max(base_need, occupied nodes, ceil((live processes + spare_slots) / (slots *
replicas)))``, capped at ``maximum_vms``. Live processes are the queued, placed and
UNSCHEDULED_PENDING ones (each upid once). On scale-down the nodes to retire are the
unoccupied ones, as many as there are nodes beyond the need: first those whose agents are all
MISSING (so a broken node is replaced, not a healthy idle one), then the newest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineSpec:
    """An execution engine's sizing (the PD config ``engines[id]``)."""

    engine_id: str
    slots: int
    replicas: int = 1
    spare_slots: int = 0
    base_need: int = 0
    maximum_vms: int | None = None
    heartbeat_period: float = 30.0
    heartbeat_warning: float | None = None
    heartbeat_missing: float | None = None
    iaas_allocation: str | None = None
    config: Mapping[str, Any] | None = None

    @classmethod
    def from_config(cls, engine_id: str, conf: Mapping[str, Any]) -> EngineSpec:
        """Validate one ``engines`` entry; ``ValueError`` with a clear message if wrong."""
        if not isinstance(conf, Mapping):
            raise ValueError(f"engine {engine_id!r}: expected a mapping")
        known = {f for f in cls.__dataclass_fields__ if f != "engine_id"}
        unknown = set(conf) - known
        if unknown:
            raise ValueError(f"engine {engine_id!r}: unknown keys {sorted(unknown)}")
        if "slots" not in conf:
            raise ValueError(f"engine {engine_id!r}: 'slots' is required")
        spec = cls(engine_id, **conf)
        for name in ("slots", "replicas"):
            v = getattr(spec, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"engine {engine_id!r}: {name} must be an int >= 1, got {v!r}")
        for name in ("spare_slots", "base_need"):
            v = getattr(spec, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"engine {engine_id!r}: {name} must be an int >= 0, got {v!r}")
        mv = spec.maximum_vms
        if mv is not None and (isinstance(mv, bool) or not isinstance(mv, int) or mv < 0):
            raise ValueError(f"engine {engine_id!r}: maximum_vms must be an int >= 0 or None")
        w, m = spec.heartbeat_warning, spec.heartbeat_missing
        if (w is None) != (m is None):
            raise ValueError(
                f"engine {engine_id!r}: heartbeat_warning and heartbeat_missing go together"
            )
        if w is not None and m is not None and not (0 < spec.heartbeat_period < w < m):
            raise ValueError(
                f"engine {engine_id!r}: need heartbeat_period < heartbeat_warning < "
                f"heartbeat_missing, got {spec.heartbeat_period}, {w}, {m}"
            )
        return spec

    @property
    def monitored(self) -> bool:
        return self.heartbeat_warning is not None and self.heartbeat_missing is not None


def need(spec: EngineSpec, live_processes: int, occupied_nodes: int) -> int:
    """The node count ``spec``'s engine needs (the reference §4.4 formula)."""
    per_node = spec.slots * spec.replicas
    by_slots = math.ceil((max(0, live_processes) + spec.spare_slots) / per_node)
    n = max(spec.base_need, occupied_nodes, by_slots)
    if spec.maximum_vms is not None:
        n = min(n, spec.maximum_vms)
    return n


def retirable(
    nodes_newest_first: Iterable[tuple[str, bool, bool]], node_count: int, needed: int
) -> list[str]:
    """Nodes to give back: ``node_count - needed`` at most, never an occupied one.

    ``nodes_newest_first`` yields ``(node_id, occupied, broken)``; broken nodes (every agent
    MISSING) go first, then idle ones, newest first.
    """
    excess = node_count - needed
    if excess <= 0:
        return []
    broken: list[str] = []
    idle: list[str] = []
    for node_id, occupied, is_broken in nodes_newest_first:
        if occupied:
            continue
        (broken if is_broken else idle).append(node_id)
        if len(broken) >= excess:
            break
    return (broken + idle)[:excess]
