"""ha: HA groups kept alive across two PDs while copies, VMs and the HA leader are killed.

Two PDs (``pd``, ``pd2``, each with its own EPUM domain) and the HA service over both; two
``npreserving`` groups. Random operations: a copy's process dies, a VM is killed, the HA
leader crashes (also inside a message, after or before its append) or any other component
fails over, N is raised or lowered, a group is removed and created again. The safety
invariants (every live copy is one HA holds, on the PD it placed it with; HA never counts
more copies than N; every component's state is the replay of its log) are checked every
``check_every`` steps. After the faults stop, each group must be STEADY with exactly N copies
RUNNING, and the copies spread over both PDs (each copy goes to the least-loaded PD, so a
group's copies may all be on one PD while another group's are on the other).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from cei_actors.sim.system import CEISystem, SystemConfig

from . import Clock, RunOptions, finish, scenario
from . import system as make_system

GROUPS = ("web", "api")


def ha_step(system: CEISystem, rng: random.Random) -> None:
    """One random operation or fault."""
    op = rng.random()
    if op < 0.30:
        system.kill_copy(rng.randrange(1 << 16))
    elif op < 0.45:
        system.kill_vm(rng.randrange(1 << 16))
    elif op < 0.65:
        how = rng.random()
        if how < 0.4:
            system.crash_mid_message("ha", persisted=rng.random() < 0.7)
        else:
            system.restart("ha")
    elif op < 0.72:
        system.restart(rng.choice([n for n in system.components if n != "ha"]))
    elif op < 0.92:
        name = rng.choice(GROUPS)
        if name in system.groups:
            system.reconfigure_group(name, rng.randint(0, 4))
    else:
        name = rng.choice(GROUPS)
        if name in system.groups:
            system.remove_group(name)
        else:
            system.create_group(name, rng.randint(1, 3))


@scenario
def run(seed: int, report_dir: Path | None = None, options: RunOptions | None = None,
        operations: int = 120,
        check_every: int = 200) -> dict[str, Any]:
    """Run the scenario; the summary lists violations and what did not converge."""
    wall = Clock()
    system = make_system(seed, SystemConfig(slots=3, pds=2, ha=True, ha_poll=5.0), options)
    rng = random.Random(seed)
    violations: list[str] = []
    system.run_for(10.0)
    system.create_group("web", 2)
    system.create_group("api", 3)
    violations += system.run_for(120.0, check_every)
    for _ in range(operations):
        ha_step(system, rng)
        violations += system.run_for(rng.choice([1.0, 5.0, 20.0, 60.0]), check_every)
    system.heal()
    violations += system.run_for(60.0, check_every)
    for name in GROUPS:  # end with both groups, big enough to need both PDs
        if name not in system.groups:
            reply = system.create_group(name, 2)
        else:
            reply = system.reconfigure_group(name, max(2, system.groups[name]))
        if name not in system.groups or system.groups[name] < 2:
            problems_before = f"HA group {name} could not be set up after the faults: {reply}"
            violations.append(problems_before)
    violations += system.run_for(1800.0, check_every)
    violations += system.violations(replay=True)
    problems = system.convergence()
    spread = system.ha_spread()
    used = {pd for by_pd in spread.values() for pd in by_pd}
    if used != set(system.pd_names):  # placement is by PD load, over all groups
        problems.append(f"HA copies not across both PDs: {spread}")
    return finish("ha", system, wall, report_dir, options,
                  violations=violations[:50],
                  convergence_problems=problems, converged=not problems)
