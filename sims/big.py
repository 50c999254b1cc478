"""big: ``vms`` VMs and ``vms * per_vm`` processes through their whole lifecycle, with node
failures (default 10,000 VMs and 100,000 processes).

The processes arrive in ten bursts during the first five virtual minutes (``per_vm`` slots per
VM, so the PD needs ``vms`` VMs), run 30-60 minutes (2 % fail their first round and run
again); 1 % of the VMs are killed out of band while the pool is full and the PD fails over
once. Then the pool drains back to nothing. Timings are those of a large deployment:
heartbeats every two minutes, the PD's monitor every 30 s, the Provisioner's cloud query
every minute. Invariants are checked every ``check_every`` steps (the replay check at the
end).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from cei_actors.sim.system import SystemConfig

from . import Clock, RunOptions, finish, scenario
from . import system as make_system


def config(per_vm: int = 10, processes: int = 0) -> SystemConfig:
    """The system of a large deployment. The PD keeps a tombstone of every finished process
    (``tombstone_limit`` at least ``2 * processes``): past its default 20,000 the oldest are
    dropped and a process forgotten that way cannot be told from a lost one."""
    return SystemConfig(slots=per_vm, heartbeat_period=120.0, heartbeat_warning=360.0,
                        heartbeat_missing=720.0, agent_poll=10.0, create_concurrency=500,
                        terminator_concurrency=500, dispatch_retry_seconds=120.0,
                        decider_interval=10.0, query_interval=60.0, leak_grace=1200.0,
                        monitor_interval=30.0, needs_refresh=600.0, boot_delay=(30.0, 120.0),
                        extra=tombstones(processes))


def tombstones(processes: int) -> dict[str, Any]:
    """PD settings keeping a tombstone of each of ``processes`` finished processes."""
    return {"pd": {"tombstone_limit": max(20_000, 2 * processes)}}


@scenario
def run(seed: int, report_dir: Path | None = None, options: RunOptions | None = None,
        vms: int = 10_000, per_vm: int = 10, check_every: int = 200_000,
        system_config: SystemConfig | None = None) -> dict[str, Any]:
    """Run the scenario (on ``system_config`` if given); the summary includes wall and CPU
    time and steps per second."""
    wall = Clock()
    system = make_system(seed, system_config or config(per_vm, vms * per_vm), options)
    rng = random.Random(seed)
    violations: list[str] = []
    system.run_for(10.0)
    processes = vms * per_vm
    bursts, n = 10, 0
    for b in range(bursts):
        burst = []
        for _ in range(processes // bursts if b < bursts - 1 else processes - n):
            burst.append({"upid": f"p{n:06d}", "duration": rng.uniform(1800.0, 3600.0),
                          "fail_rounds": int(rng.random() < 0.02)})
            n += 1
        system.schedule_many(burst)  # one instant: one mailbox drain (SIM15)
        violations += system.run_for(30.0, check_every, replay=False)
    violations += system.run_for(900.0, check_every, replay=False)
    for _ in range(max(vms // 100, 1)):
        system.kill_vm(rng.randrange(1 << 30))
    violations += system.run_for(60.0, check_every, replay=False)
    system.restart("pd")
    violations += system.run_for(9000.0, check_every, replay=False)
    violations += system.violations(replay=True)
    problems = system.convergence()
    return finish("big", system, wall, report_dir, options, violations=violations[:50],
                  convergence_problems=problems[:50], converged=not problems,
                  vms_requested=vms, processes_per_vm=per_vm)
