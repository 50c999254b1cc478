"""overflow: fill ranked sites in order, overflowing to the next when one is full or failing.

``clouds`` is a list of ``{site_name, size, rank}`` (ranks 1, 2, ... without gaps). The
target ``preserve_n`` is filled in rank order, each site up to its ``size`` or its detected
capacity. Scale-down takes from the highest rank first; lowering a site's size kills its
excess.

Per site, in engine memory (so it survives failover): each new FAILED instance doubles the
site's launch backoff (0, 1, 3, 7, ... seconds, capped at ``max_backoff``), and a RUNNING
count that grows resets it; while a site backs off it is counted at what it has, so the next
rank takes up the slack. Once ``capacity_failures`` failures pile up while the site's RUNNING
count stops growing, its capacity is taken to be that count (a reconfigure of ``clouds``
forgets detected capacities).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .base import (
    SENSOR_KEYS,
    Control,
    Engine,
    EngineConfigError,
    Key,
    State,
    is_count,
    is_nonneg_number,
    is_opt_str,
)


def _check_clouds(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(c, dict)
        and isinstance(c.get("site_name"), str)
        and is_count(c.get("size"))
        and is_count(c.get("rank"))
        and set(c) <= {"site_name", "size", "rank"}
        for c in v
    )


class OverflowEngine(Engine):
    documentation = __doc__ or ""
    CONFIG = {
        "clouds": Key(required=True, check=_check_clouds,
                      expect="a non-empty list of {site_name, size, rank}"),
        "preserve_n": Key(required=True, check=is_count, expect="an integer >= 0"),
        "deployable_type": Key(check=is_opt_str, expect="a deployable type"),
        "allocation": Key(check=is_opt_str, expect="an allocation"),
        "capacity_failures": Key(check=is_count, expect="an integer >= 0",
                                 doc="failures at a plateau that fix a site's capacity (32)"),
        "max_backoff": Key(check=is_nonneg_number, expect="seconds >= 0",
                           doc="cap of the per-site launch backoff (600)"),
        **SENSOR_KEYS,
    }

    @classmethod
    def check_config(cls, conf: dict[str, Any]) -> None:
        ranks = sorted(c["rank"] for c in conf["clouds"])
        if ranks != list(range(1, len(ranks) + 1)):
            raise EngineConfigError(f"engine_conf.clouds: ranks must be 1..{len(ranks)} without gaps, got {ranks}")
        names = [c["site_name"] for c in conf["clouds"]]
        if len(set(names)) != len(names):
            raise EngineConfigError("engine_conf.clouds: a site appears twice")

    def reconfigure(self, control: Control, conf: dict[str, Any]) -> None:
        if conf.get("clouds") != self.conf.get("clouds"):
            for site in self.memory.get("sites", {}).values():
                site["capacity"] = None
        super().reconfigure(control, conf)

    def _site_memory(self, site: str, failures: int) -> dict[str, Any]:
        sites = self.memory.setdefault("sites", {})
        if site not in sites:
            sites[site] = {"seen_failures": failures, "backoff": 0.0, "until": 0.0,
                           "capacity": None, "peak": 0, "plateau_failures": 0}
        return sites[site]

    def decide(self, control: Control, state: State) -> None:
        c, now = self.conf, control.now
        killed = set(self.destroy_unhealthy(control, state))
        clouds = sorted(c["clouds"], key=lambda x: x["rank"])
        by_site: dict[str, list[str]] = defaultdict(list)
        running: dict[str, int] = defaultdict(int)
        for iid in state.valid_ids():
            if iid in killed:
                continue
            inst = state.get_instance(iid)
            assert inst is not None
            by_site[inst.site].append(iid)
            if inst.state == "RUNNING":
                running[inst.site] += 1
        cap_failures = c.get("capacity_failures", 32)
        max_backoff = float(c.get("max_backoff", 600))
        backing_off: set[str] = set()
        limits: dict[str, int] = {}
        for cloud in clouds:
            site = cloud["site_name"]
            failures = state.failures(site)
            m = self._site_memory(site, failures)
            new_failures = failures - m["seen_failures"]
            if running[site] > m["peak"]:
                m["peak"], m["plateau_failures"] = running[site], 0
                m["backoff"], m["until"] = 0.0, 0.0
            if new_failures > 0:
                m["seen_failures"] = failures
                m["plateau_failures"] += new_failures
                m["backoff"] = min(2 * m["backoff"] + 1, max_backoff)
                m["until"] = now + m["backoff"]
                if m["capacity"] is None and cap_failures and m["plateau_failures"] >= cap_failures:
                    m["capacity"] = running[site]
            limit = cloud["size"] if m["capacity"] is None else min(cloud["size"], m["capacity"])
            if now < m["until"]:
                backing_off.add(site)
                control.wake_after(m["until"] - now)
                limit = min(limit, len(by_site[site]))
            limits[site] = limit
        remaining = c["preserve_n"]
        desired: dict[str, int] = {}
        for cloud in clouds:
            site = cloud["site_name"]
            desired[site] = min(limits[site], remaining)
            remaining -= desired[site]
        for cloud in reversed(clouds):  # scale down from the highest rank
            site = cloud["site_name"]
            have = by_site[site]
            if len(have) > desired[site]:
                excess = len(have) - desired[site]
                # newest (least likely running) first
                control.destroy_instances(sorted(have, key=lambda i: -state.get_instance(i).seq)[:excess],  # type: ignore[union-attr]
                                          reason="scale down",
                                          figures={"site": site, "have": len(have), "desired": desired[site],
                                                   "limit": limits[site], "preserve_n": c["preserve_n"]})
        for cloud in clouds:
            site = cloud["site_name"]
            if site in backing_off:
                continue
            for _ in range(desired[site] - len(by_site[site])):
                control.launch(site=site, deployable_type=c.get("deployable_type"),
                               allocation=c.get("allocation"))
