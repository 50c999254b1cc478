"""steady: a mixed workload (batch jobs, failing jobs, services) on an elastic pool, no faults.

Processes arrive for two virtual hours; then the run goes quiet and must converge: every batch
process finished, every service RUNNING once, the pool back to what the PD needs.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from cei_actors.sim.system import SystemConfig

from . import Clock, RunOptions, finish, scenario
from . import system as make_system


@scenario
def run(seed: int, report_dir: Path | None = None, options: RunOptions | None = None,
        arrivals: int = 600,
        check_every: int = 2000) -> dict[str, Any]:
    """Run the scenario; the summary says whether invariants held and the system converged."""
    wall = Clock()
    system = make_system(seed, SystemConfig(slots=4), options)
    rng = random.Random(seed)
    violations: list[str] = []
    system.run_for(10.0)
    for i in range(arrivals):
        kind = rng.random()
        duration = math.inf if kind < 0.05 else rng.uniform(30.0, 900.0)
        system.schedule(f"p{i:05d}", duration, fail_rounds=1 if kind > 0.9 else 0)
        violations += system.run_for(rng.expovariate(arrivals / 7200.0), check_every, replay=False)
    violations += system.run_for(3600.0, check_every, replay=False)
    violations += system.violations(replay=True)
    problems = system.convergence()
    return finish("steady", system, wall, report_dir, options,
                  violations=violations[:50],
                  convergence_problems=problems, converged=not problems)
