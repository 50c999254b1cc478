"""storm: a failure storm on a loaded system, then quiet and convergence.

``processes`` processes (a tenth of them services that run until killed) fill a pool of
about ``processes / slots`` VMs. At once: a third of the live VMs are killed, the PD crashes
inside a message (after its append), EPUM fails over, the cloud refuses half of the creates
and loses a fifth of the create replies, and the EEAgent <-> PD links drop a tenth of their
messages. Two minutes later a second wave kills another tenth of the VMs and the Provisioner
fails over. Then the faults stop (``quiet`` seconds: long enough for a process that failed
late to run its next round to the end); every process must finish or run again, the pool must
shrink back to what the PD needs. Invariants are checked all along.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from cei_actors.sim.check import agent_link
from cei_actors.sim.system import SystemConfig

from . import Clock, RunOptions, finish, scenario
from . import system as make_system


@scenario
def run(seed: int, report_dir: Path | None = None, options: RunOptions | None = None,
        processes: int = 1200, slots: int = 4, quiet: float = 5400.0,
        check_every: int = 5000) -> dict[str, Any]:
    """Run the scenario; the summary lists violations and what did not converge."""
    wall = Clock()
    cfg = SystemConfig(slots=slots, heartbeat_period=20.0, heartbeat_warning=60.0,
                       heartbeat_missing=120.0, create_concurrency=100, terminator_concurrency=50,
                       query_interval=20.0, leak_grace=600.0, monitor_interval=5.0,
                       dispatch_retry_seconds=30.0)
    system = make_system(seed, cfg, options)
    system.sim.faults.lossy = agent_link
    rng = random.Random(seed)
    violations: list[str] = []
    system.run_for(10.0)
    burst = []
    for i in range(processes):
        duration = math.inf if i % 10 == 0 else rng.uniform(900.0, 2400.0)
        burst.append({"upid": f"p{i:05d}", "duration": duration, "fail_rounds": int(rng.random() < 0.05)})
    system.schedule_many(burst)  # one instant: one mailbox drain (SIM15)
    violations += system.run_for(600.0, check_every, replay=False)
    live = sum(1 for vm in system.cloud_vms() if vm.status == "running")
    for _ in range(live // 3):
        system.kill_vm(rng.randrange(1 << 20))
    system.crash_mid_message("pd", persisted=True)
    system.restart("epum")
    system.set_cloud(create_failure_rate=0.5, lose_reply_rate=0.2)
    system.set_network(drop_rate=0.1)
    violations += system.run_for(120.0, check_every, replay=False)
    for _ in range(live // 10):
        system.kill_vm(rng.randrange(1 << 20))
    system.restart("provisioner")
    violations += system.run_for(300.0, check_every, replay=False)
    system.heal()
    violations += system.run_for(quiet, check_every, replay=False)
    violations += system.violations(replay=True)
    problems = system.convergence()
    return finish("storm", system, wall, report_dir, options, violations=violations[:50],
                  convergence_problems=problems[:50], converged=not problems)
