"""iteration: the original iteration's scale test: 1,850 VMs requested at once across sites.

One EPUM domain (engine ``overflow``) asks for ``vms`` VMs at once over two sites, ``site-a``
(rank 1, up to ``site_a`` VMs) and ``site-b`` (rank 2, the rest); each cloud boots a VM in
``boot_delay`` seconds (uniform: the spread) and refuses a create with probability
``failure_rate`` (EPUM launches a replacement). Once every VM runs, the domain is released
(N = 0) and every VM must be gone. Invariants are checked all along (replay at the end).
The summary's ``all_running_after_s`` is the virtual time from the request to the last VM
RUNNING.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cei_actors.sim.system import SystemConfig

from . import Clock, RunOptions, finish, scenario
from . import system as make_system


@scenario
def run(seed: int, report_dir: Path | None = None, options: RunOptions | None = None,
        vms: int = 1850, site_a: int = 1000, boot_delay: tuple[float, float] = (30.0, 240.0),
        failure_rate: float = 0.02, check_every: int = 20_000) -> dict[str, Any]:
    """Run the scenario; the summary says how long until all ``vms`` ran."""
    wall = Clock()
    cloud = {"boot_delay": list(boot_delay), "create_failure_rate": failure_rate}
    cfg = SystemConfig(slots=4, create_concurrency=200, terminator_concurrency=200,
                       query_interval=30.0, decider_interval=5.0, agent_poll=2.0,
                       heartbeat_period=60.0, heartbeat_warning=180.0, heartbeat_missing=360.0,
                       leak_grace=900.0, monitor_interval=10.0, needs_refresh=300.0,
                       sites={"site-a": cloud, "site-b": cloud})
    system = make_system(seed, cfg, options)
    violations: list[str] = []
    system.run_for(10.0)
    clouds = [{"site_name": "site-a", "size": site_a, "rank": 1},
              {"site_name": "site-b", "size": max(vms - site_a, 0), "rank": 2}]
    asked = system.sim.clock.now()
    system.add_domain("iteration", vms, "overflow", {"clouds": clouds})
    all_running = None
    for _ in range(120):  # up to an hour, in 30 s steps
        violations += system.run_for(30.0, check_every, replay=False)
        dom = system.sim.state("epum").domain("default", "iteration")
        if dom is not None and dom.count(["RUNNING"]) >= vms:
            all_running = round(system.sim.clock.now() - asked, 3)
            break
    system.set_cloud(create_failure_rate=0.0)
    system.reconfigure_domain("iteration", 0)
    violations += system.run_for(900.0, check_every, replay=False)
    violations += system.violations(replay=True)
    problems = system.convergence()
    if all_running is None:
        problems.append(f"the {vms} VMs were not all RUNNING within an hour")
    return finish("iteration", system, wall, report_dir, options, violations=violations[:50],
                  convergence_problems=problems[:50], converged=not problems,
                  all_running_after_s=all_running)
