"""chaos: random operations and every fault the simulator has, then quiet and convergence.

Faults: VMs killed or vanished out of band, crash and fail-over of each component (a new
runner recovers from the same log; crashes also inside a message, after or before its append
and before its effects), message drops, duplicates and latency, cloud quota
refusals, create failures and lost create replies. Safety invariants are checked every
``check_every`` steps (with the replay check); after an hour of quiet the summary reports
whether everything converged (the gaps in tests/test_sim_findings.py were found this way).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from cei_actors.sim.system import COMPONENTS, CEISystem, SystemConfig

from . import Clock, RunOptions, finish, scenario
from . import system as make_system


def chaos_step(system: CEISystem, rng: random.Random, counter: list[int]) -> None:
    """One random operation or fault."""
    op = rng.random()
    if op < 0.30:
        for _ in range(rng.randint(1, 6)):
            counter[0] += 1
            duration = rng.choice([5.0, 30.0, 120.0, 600.0, math.inf])
            system.schedule(f"p{counter[0]:05d}", duration, fail_rounds=rng.randint(0, 2))
    elif op < 0.38 and system.scheduled:
        system.kill_process(rng.choice(sorted(system.scheduled)))
    elif op < 0.50:
        system.kill_vm(rng.randrange(1 << 16), vanish=rng.random() < 0.3)
    elif op < 0.60:
        name = rng.choice(COMPONENTS)
        how = rng.random()
        if how < 0.3 and system.sim.nodes[name].up:
            system.crash(name)
        elif how < 0.6:
            system.crash_mid_message(name, persisted=rng.random() < 0.7)
        else:
            system.restart(name)
    elif op < 0.70:
        system.set_network(drop_rate=rng.choice([0.0, 0.02, 0.1]),
                           duplicate_rate=rng.choice([0.0, 0.05]),
                           latency=rng.choice([None, (0.001, 2.0)]))
    elif op < 0.80:
        system.set_cloud(max_instances=rng.choice([None, None, 3, 8]),
                         create_failure_rate=rng.choice([0.0, 0.2]),
                         lose_reply_rate=rng.choice([0.0, 0.2]))
    else:
        d = f"d{rng.randint(0, 2)}"
        which = rng.randrange(3)
        if which == 0:
            system.add_domain(d, rng.randint(0, 3))
        elif which == 1:
            system.reconfigure_domain(d, rng.randint(0, 3))
        else:
            system.remove_domain(d)


@scenario
def run(seed: int, report_dir: Path | None = None, options: RunOptions | None = None,
        operations: int = 300,
        check_every: int = 500) -> dict[str, Any]:
    """Run the scenario; the summary lists violations and what did not converge."""
    wall = Clock()
    system = make_system(seed, SystemConfig(slots=3), options)
    rng = random.Random(seed)
    counter = [0]
    violations: list[str] = []
    system.run_for(20.0)
    for _ in range(operations):
        chaos_step(system, rng, counter)
        violations += system.run_for(rng.choice([1.0, 5.0, 20.0, 60.0]), check_every)
    system.heal()
    violations += system.run_for(3600.0, check_every)
    problems = system.convergence()
    return finish("chaos", system, wall, report_dir, options,
                  violations=violations[:50],
                  convergence_problems=problems[:50], converged=not problems)
