"""scale: 10,000 processes on 2,000 VMs (5 slots each), with VM kills and a PD failover.

The processes arrive in ten bursts during the first five virtual minutes and run 30-60
minutes; 50 VMs are killed out of band and the PD fails over once while the pool is full
(``vms_peak`` in the summary is the most VMs live at once). Invariants
are checked every ``check_every`` steps (replay only at the end: it re-folds whole logs).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from cei_actors.sim.system import SystemConfig

from . import Clock, RunOptions, finish, scenario
from . import system as make_system


@scenario
def run(seed: int, report_dir: Path | None = None, options: RunOptions | None = None,
        processes: int = 10_000, slots: int = 5,
        check_every: int = 50_000) -> dict[str, Any]:
    """Run the scenario; the summary includes wall time and steps per second."""
    wall = Clock()
    cfg = SystemConfig(slots=slots, heartbeat_period=30.0, heartbeat_warning=90.0,
                       heartbeat_missing=180.0, agent_poll=5.0, create_concurrency=100,
                       terminator_concurrency=50, dispatch_retry_seconds=60.0,
                       decider_interval=10.0, leak_grace=600.0)
    system = make_system(seed, cfg, options)
    rng = random.Random(seed)
    violations: list[str] = []
    system.run_for(10.0)
    bursts = 10
    per_burst = processes // bursts
    n = 0
    for b in range(bursts):
        burst = []
        for _ in range(per_burst if b < bursts - 1 else processes - n):
            burst.append({"upid": f"p{n:06d}", "duration": rng.uniform(1800.0, 3600.0),
                          "fail_rounds": int(rng.random() < 0.05)})
            n += 1
        system.schedule_many(burst)  # one instant: one mailbox drain (SIM15)
        violations += system.run_for(30.0, check_every, replay=False)
    violations += system.run_for(600.0, check_every, replay=False)
    for _ in range(50):
        system.kill_vm(rng.randrange(1 << 20))
        violations += system.run_for(2.0, check_every, replay=False)
    system.restart("pd")
    violations += system.run_for(9000.0, check_every, replay=False)
    violations += system.violations(replay=True)
    problems = system.convergence()
    return finish("scale", system, wall, report_dir, options,
                  violations=violations[:50],
                  convergence_problems=problems[:50], converged=not problems)
