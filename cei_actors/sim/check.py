"""Property-based runs of the whole system: hypothesis state machines over :class:`CEISystem`.

:class:`SystemMachine` drives a simulated system with outside operations (schedule, kill,
EPUM domains, time passing) and faults; the safety invariants are checked after every step
(with the replay check) and, once the faults stop, the system must converge. Which faults
run is a class attribute; :func:`machine` makes a machine for a set of fault kinds
(:data:`FAULTS`), and :data:`HealingMachine` / :data:`ChaosMachine` are the two the tests
and ``cei sim check`` use by default.

:func:`run_check` runs a machine for N examples from a seed (``cei sim check``). A failing
run is shrunk by hypothesis; the smallest failing run is replayed last, and its components'
logs are saved as SQLite files (:func:`~cei_actors.sim.savelog.save_logs`) that
``cei log check`` opens.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    get_state_machine_test,
    initialize,
    invariant,
    precondition,
    rule,
)

from .system import COMPONENTS, CEISystem, SystemConfig

__all__ = ["FAULTS", "ChaosMachine", "CheckResult", "HealingMachine", "SystemMachine",
           "agent_link", "machine", "run_check"]

DURATIONS = st.sampled_from([2.0, 20.0, 90.0, math.inf])

#: Fault kinds ``cei sim check --faults`` takes.
FAULTS: dict[str, str] = {
    "vm": "VMs killed or vanished out of band",
    "crash": "component crashes and fail-overs, also inside a message",
    "network": "message drops, duplicates and latency",
    "cloud": "cloud quota, create failures, lost create replies",
}


def agent_link(sender: str | None, to: str) -> bool:
    """Links whose messages are level-based and retried: EEAgent <-> PD."""
    return (sender or "").startswith("eeagent:") or to.startswith("eeagent:")


class SystemMachine(RuleBasedStateMachine):
    """Operations and faults; invariants after every step, convergence at the end."""

    faults: frozenset[str] = frozenset(FAULTS)
    crashable: tuple[str, ...] = ("provisioner",)
    #: "mid": a crash after a message's append, before its effects (see test_sim_findings)
    crash_modes: tuple[str, ...] = ("restart", "crash", "mid-before")
    lossy: Callable[[str | None, str], bool] | None = staticmethod(agent_link)
    #: the newest machine set up (``run_check`` saves its logs when a run fails)
    last: SystemMachine | None = None

    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed: int) -> None:
        self.s = CEISystem(seed, SystemConfig(slots=2, boot_delay=(2.0, 10.0)))
        self.s.sim.faults.lossy = self.lossy
        self.s.sim.validate_own = True  # small systems: every message validated, as the shell does
        self.n = 0
        self.s.run_for(5.0)
        SystemMachine.last = self

    # ---- operations

    @rule(count=st.integers(1, 4), duration=DURATIONS, fail_rounds=st.integers(0, 2))
    def schedule(self, count: int, duration: float, fail_rounds: int) -> None:
        for _ in range(count):
            self.n += 1
            self.s.schedule(f"p{self.n}", duration, fail_rounds)

    @precondition(lambda self: self.s.scheduled)
    @rule(i=st.integers(0, 1000))
    def kill_process(self, i: int) -> None:
        self.s.kill_process(sorted(self.s.scheduled)[i % len(self.s.scheduled)])

    @rule(i=st.integers(0, 1), n=st.integers(0, 2), op=st.sampled_from(["add", "reconfigure", "remove"]))
    def domain(self, i: int, n: int, op: str) -> None:
        if op == "add":
            self.s.add_domain(f"d{i}", n)
        elif op == "reconfigure":
            self.s.reconfigure_domain(f"d{i}", n)
        else:
            self.s.remove_domain(f"d{i}")

    @rule(dt=st.sampled_from([1.0, 5.0, 20.0, 60.0]))
    def advance(self, dt: float) -> None:
        problems = self.s.run_for(dt, check_every=200, replay=False)
        assert problems == [], problems

    # ---- faults

    @precondition(lambda self: "vm" in self.faults)
    @rule(i=st.integers(0, 1000), vanish=st.booleans())
    def kill_vm(self, i: int, vanish: bool) -> None:
        self.s.kill_vm(i, vanish)

    @precondition(lambda self: "crash" in self.faults)
    @rule(i=st.integers(0, 2), j=st.integers(0, 3))
    def crash(self, i: int, j: int) -> None:
        name = self.crashable[i % len(self.crashable)]
        how = self.crash_modes[j % len(self.crash_modes)]
        if how == "restart" or not self.s.sim.nodes[name].up:
            self.s.restart(name)
        elif how == "crash":
            self.s.crash(name)
        else:
            self.s.crash_mid_message(name, persisted=how == "mid")

    @precondition(lambda self: "network" in self.faults)
    @rule(drop=st.sampled_from([0.0, 0.1, 0.3]), dup=st.sampled_from([0.0, 0.1]),
          slow=st.booleans())
    def network(self, drop: float, dup: float, slow: bool) -> None:
        self.s.set_network(drop, dup, latency=(0.001, 3.0) if slow else None)

    @precondition(lambda self: "cloud" in self.faults)
    @rule(quota=st.sampled_from([None, 0, 2, 5]), fail=st.sampled_from([0.0, 0.3]),
          lose=st.sampled_from([0.0, 0.3]))
    def cloud(self, quota: int | None, fail: float, lose: float) -> None:
        self.s.set_cloud(max_instances=quota, create_failure_rate=fail, lose_reply_rate=lose)

    # ---- invariants

    @invariant()
    def safe(self) -> None:
        problems = self.s.violations(replay=True)
        assert problems == [], problems

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        self.s.heal()
        problems = self.s.run_for(1200.0, check_every=2000)
        assert problems == [], problems
        problems = self.s.convergence()
        assert problems == [], f"not converged: {problems}"


class HealingMachine(SystemMachine):
    """Faults the system is built to heal: VM kills and vanishings, cloud quota, create
    failures, lost create replies, Provisioner fail-over and crashes inside a message before
    its append, drops and duplicates on the EEAgent <-> PD links, latency."""


class ChaosMachine(SystemMachine):
    """Every fault: EPUM and PD fail-over, crashes between a message's append and its effects
    and drops on every link included."""

    crashable = COMPONENTS
    crash_modes = ("restart", "crash", "mid", "mid-before")
    lossy = None


def machine(faults: Iterable[str], chaos: bool = True) -> type[SystemMachine]:
    """A machine with only the fault kinds ``faults`` (names from :data:`FAULTS`)."""
    chosen = frozenset(faults)
    unknown = chosen - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault kind(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(FAULTS)})")
    base = ChaosMachine if chaos else HealingMachine
    return type(f"{base.__name__}_{'_'.join(sorted(chosen)) or 'none'}", (base,), {"faults": chosen})


@dataclass
class CheckResult:
    """What :func:`run_check` found."""

    passed: bool
    examples: int
    seed: int
    faults: list[str]
    error: str = ""  # the failure, with hypothesis' smallest failing steps
    saved: dict[str, str] = field(default_factory=dict)  # component -> sqlite log URL
    commands: list[str] = field(default_factory=list)  # commands that open the saved logs

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "examples": self.examples, "seed": self.seed,
                "faults": self.faults, "error": self.error, "saved_logs": self.saved,
                "commands": self.commands}


def run_check(machine_class: type[SystemMachine], examples: int = 20, seed: int = 0,
              steps: int = 30, save_dir: Path | None = None) -> CheckResult:
    """Run ``machine_class`` for ``examples`` examples from ``seed`` (same seed, same runs);
    a failure is shrunk and its smallest run's logs saved under ``save_dir``."""
    from .savelog import save_logs

    logging.getLogger("cei_actors").setLevel(logging.ERROR)
    test = get_state_machine_test(machine_class, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        phases=(Phase.generate, Phase.shrink), print_blob=False,
        suppress_health_check=list(HealthCheck)))
    test = hypothesis_seed(seed)(test)
    SystemMachine.last = None
    faults = sorted(machine_class.faults)
    try:
        test()
    except Exception as exc:  # the smallest failing run was the last one replayed
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        notes = getattr(exc, "__notes__", [])
        error = "\n".join([text, *notes])
        result = CheckResult(False, examples, seed, faults, error=error)
        failing = SystemMachine.last
        if save_dir is not None and failing is not None and hasattr(failing, "s"):
            result.saved = save_logs(failing.s, Path(save_dir))
            result.commands = [f"cei --log {url} log check {stream}"
                               for stream, url in _streams(failing.s, result.saved)]
        return result
    return CheckResult(True, examples, seed, faults)


def _streams(system: CEISystem, saved: dict[str, str]) -> list[tuple[str, str]]:
    """(stream, URL) of every saved component log."""
    return [(system.sim.nodes[name].component.stream, url) for name, url in saved.items()]
