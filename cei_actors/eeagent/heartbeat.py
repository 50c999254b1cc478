"""The EEAgent's level-based heartbeat: pure message building and send timing.

A heartbeat carries every process the agent knows (``upid``, ``round``, ``state``, ``msg``), so
a lost or duplicated heartbeat is healed by the next one. The agent sends one every
``interval`` seconds (the original's ``eeagent.heartbeat``, 30 s) and immediately whenever a
process changes state.

How the actor wrapper is meant to use this module (nothing here does I/O or reads a clock)::

    sched = HeartbeatScheduler(interval=30.0)
    # ProcessSupervisor(on_change=...) runs on the watcher thread: hand the snapshot to the
    # actor as a message to itself; on receiving it:
    msg = build_heartbeat(agent_id, node_id, snapshot, now)
    send(pd, msg); sched.sent(now)
    # on start, and on every wake-up timer:
    if sched.due(now):
        send(pd, build_heartbeat(agent_id, node_id, supervisor.dump(), now)); sched.sent(now)
    wakeup_after(sched.delay(now))

``timestamp`` is the sender's clock in seconds since the epoch (a float), the value the actor's
injected clock gives; the PD clamps a timestamp from the future (original §4.6).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cei_actors.eeagent import states as st


def heartbeat_processes(dump: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``processes`` list of a heartbeat: ``{upid, round, state, msg}`` per entry (and
    ``cause`` where the entry has one: an end the process did not come to on its own), sorted."""
    out = []
    for p in dump:
        entry = {
            "upid": str(p["upid"]),
            "round": int(p["round"]),
            "state": st.normalize(p["state"]),
            "msg": str(p.get("msg") or ""),
        }
        if p.get("cause"):
            entry["cause"] = str(p["cause"])
        out.append(entry)
    out.sort(key=lambda p: (p["upid"], p["round"]))
    return out


def build_heartbeat(
    eeagent_id: str,
    node_id: str | None,
    dump: Iterable[Mapping[str, Any]],
    timestamp: float,
) -> dict[str, Any]:
    """``{eeagent_id, node_id, timestamp, processes: [{upid, round, state, msg}]}``.

    ``dump`` is :meth:`ProcessSupervisor.dump` (or an ``on_change`` snapshot); extra keys in
    its entries (``exit_code``, ``pid``) are left out of the wire message.
    """
    return {
        "eeagent_id": eeagent_id,
        "node_id": node_id,
        "timestamp": float(timestamp),
        "processes": heartbeat_processes(dump),
    }


@dataclass
class HeartbeatScheduler:
    """When to send the periodic heartbeat. Pure: every method takes ``now``.

    A heartbeat sent for a state change also counts as the periodic one, so the next periodic
    heartbeat comes ``interval`` seconds after the most recent send of either kind.
    """

    interval: float = 30.0
    last_sent: float | None = None

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("interval must be > 0")

    def due(self, now: float) -> bool:
        """True if a periodic heartbeat should go out at ``now``."""
        return self.last_sent is None or now - self.last_sent >= self.interval

    def delay(self, now: float) -> float:
        """Seconds from ``now`` until the next periodic heartbeat is due (0 if due already)."""
        if self.last_sent is None:
            return 0.0
        return max(0.0, self.last_sent + self.interval - now)

    def sent(self, now: float) -> None:
        """Record that a heartbeat (periodic or on change) went out at ``now``."""
        if self.last_sent is None or now > self.last_sent:
            self.last_sent = now
