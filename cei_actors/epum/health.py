"""Pure health rules: what a heartbeat means, and what the doctor concludes from silence.

Health states: UNKNOWN, OK, OUT_OF_CONTACT, MISSING, ZOMBIE, MONITOR_ERROR, PROCESS_ERROR.
Times are EPUM's own clock (receipt time), never the agent's, so agent clock skew does not
matter. Every window is measured from no earlier than ``monitor_start`` (when this leader
began monitoring), because last-heard times are leader-local: a failover then causes no
false alarm, at the price of noticing a silent node up to one window later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .state import R_TERMINATING, Instance

HEALTH_STATES = (
    "UNKNOWN", "OK", "OUT_OF_CONTACT", "MISSING", "ZOMBIE", "MONITOR_ERROR", "PROCESS_ERROR",
)

#: The ``health`` config section and its defaults (the original's).
HEALTH_DEFAULTS: dict[str, Any] = {
    "monitor_health": False,
    "boot_timeout": 300.0,
    "missing_timeout": 120.0,
    "really_missing_timeout": 15.0,
    "zombie_seconds": 120.0,
}


def health_config(section: dict) -> dict[str, Any]:
    """The health section with defaults filled in."""
    return {**HEALTH_DEFAULTS, **section}


def check_health_config(section: dict) -> None:
    """Raise ValueError for unknown keys or bad values in a ``health`` section."""
    unknown = sorted(set(section) - set(HEALTH_DEFAULTS))
    if unknown:
        raise ValueError(f"health: unknown key(s) {', '.join(unknown)} (known: {', '.join(HEALTH_DEFAULTS)})")
    for key, value in section.items():
        if key == "monitor_health":
            if not isinstance(value, bool):
                raise ValueError("health.monitor_health: expected true or false")
        elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"health.{key}: expected a number >= 0, got {value!r}")


@dataclass(frozen=True)
class Verdict:
    """A health change (``health`` None: no change) and whether to probe the node."""

    health: str | None = None
    error: str | None = None
    failed_processes: list | None = None
    probe: bool = False


NO_CHANGE = Verdict()


def on_heartbeat(
    inst: Instance, hb_state: str, error: str | None, failed: list | None, now: float, conf: dict
) -> Verdict:
    """The health change a heartbeat received at ``now`` causes."""
    if inst.rank >= R_TERMINATING:
        if inst.health != "ZOMBIE" and now > inst.state_time + conf["zombie_seconds"]:
            return Verdict("ZOMBIE", inst.error, inst.failed_processes)
        return NO_CHANGE
    if hb_state == "OK":
        if inst.health in ("OK", "ZOMBIE"):
            return NO_CHANGE
        return Verdict("OK")
    if hb_state == "MONITOR_ERROR":
        if inst.health == "MONITOR_ERROR" and inst.error == error:
            return NO_CHANGE
        return Verdict("MONITOR_ERROR", error, None)
    failed = list(failed or [])
    if inst.health == "PROCESS_ERROR" and inst.failed_processes == failed:
        return NO_CHANGE
    return Verdict("PROCESS_ERROR", error, failed)


def doctor_check(
    inst: Instance,
    conf: dict,
    now: float,
    heard_at: float | None,
    probe_at: float | None,
    monitor_start: float,
) -> Verdict:
    """What the doctor concludes about one instance at ``now``."""
    if inst.rank >= R_TERMINATING:
        if inst.health == "ZOMBIE":
            quiet = now - max(heard_at or 0.0, monitor_start)
            if now - inst.state_time > conf["zombie_seconds"] and quiet > conf["zombie_seconds"]:
                return Verdict("UNKNOWN")
        return NO_CHANGE
    if inst.state != "RUNNING":
        return NO_CHANGE
    if inst.health == "OUT_OF_CONTACT":
        if probe_at is None:  # a new leader: probe again, measure from now
            return Verdict(probe=True)
        if now - max(probe_at, monitor_start) > conf["really_missing_timeout"]:
            return Verdict("MISSING")
        return NO_CHANGE
    if inst.health not in ("OK", "UNKNOWN"):
        return NO_CHANGE
    if inst.heard:
        if now - max(heard_at or 0.0, monitor_start) > conf["missing_timeout"]:
            return Verdict("OUT_OF_CONTACT", probe=True)
    elif now - max(inst.state_time, monitor_start) > conf["boot_timeout"]:
        return Verdict("OUT_OF_CONTACT", probe=True)
    return NO_CHANGE
