"""overflow: a site runs out of capacity and its domain overflows to a second site.

Three sites: ``home`` (the PD's workers, which run a small workload throughout), ``site-a``
with a quota of ``quota`` live VMs, and ``site-b``. One EPUM domain (engine ``overflow``)
wants ``want`` VMs (growing in six steps, five minutes apart), ``site-a`` first (rank 1, size ``want``), then ``site-b`` (rank 2). The
creates past the quota fail (``InstanceLimitExceeded``); EPUM backs off, takes ``site-a``'s
capacity to be what it reached, and launches the rest on ``site-b``. Converges with the domain
at ``want`` RUNNING, split ``quota`` / ``want - quota`` (``vms_by_site`` in the summary).
(Asked for all at once, the engine sees the quota failures while nothing runs yet, takes
``site-a``'s capacity to be 0 and releases its pending VMs: everything lands on ``site-b``.)
"""

from __future__ import annotations

import collections
import random
from pathlib import Path
from typing import Any

from cei_actors.sim.system import SystemConfig

from . import Clock, RunOptions, finish, scenario
from . import system as make_system


@scenario
def run(seed: int, report_dir: Path | None = None, options: RunOptions | None = None,
        want: int = 120, quota: int = 60, processes: int = 40,
        check_every: int = 5000) -> dict[str, Any]:
    """Run the scenario; the summary gives the live VMs per site."""
    wall = Clock()
    cfg = SystemConfig(slots=4, sites={"home": {}, "site-a": {"max_instances": quota}, "site-b": {}},
                       query_interval=20.0, heartbeat_period=30.0, heartbeat_warning=90.0,
                       heartbeat_missing=180.0, leak_grace=600.0, monitor_interval=5.0)
    system = make_system(seed, cfg, options)
    rng = random.Random(seed)
    violations: list[str] = []
    system.run_for(10.0)
    system.schedule_many([{"upid": f"p{i:04d}", "duration": rng.uniform(600.0, 1800.0)}
                          for i in range(processes)])  # one instant: one mailbox drain (SIM15)
    clouds = [{"site_name": "site-a", "size": want, "rank": 1},
              {"site_name": "site-b", "size": want, "rank": 2}]
    step = max(want // 6, 1)
    system.add_domain("burst", min(step, want), "overflow", {"clouds": clouds, "capacity_failures": 5,
                                                             "max_backoff": 60.0})
    for n in range(2 * step, want + step, step):  # demand grows every 5 minutes
        violations += system.run_for(300.0, check_every, replay=False)
        system.reconfigure_domain("burst", min(n, want))
    violations += system.run_for(1800.0, check_every, replay=False)
    violations += system.violations(replay=True)
    problems = system.convergence()
    epum = system.sim.state("epum")
    dom = epum.domain("default", "burst")
    by_site = collections.Counter(epum.instances[i].site for i in dom.by_state.get("RUNNING", ()))
    if by_site.get("site-a", 0) != quota or by_site.get("site-b", 0) != want - quota:
        problems.append(f"no overflow: RUNNING by site {dict(by_site)}")
    return finish("overflow", system, wall, report_dir, options, violations=violations[:50],
                  convergence_problems=problems[:50], converged=not problems,
                  vms_by_site=dict(sorted(by_site.items())))
