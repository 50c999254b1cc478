"""The whole system under the simulator: random operations and faults, invariants every step.

Two machines (cei_actors/sim/check.py, also run by ``cei sim check``) drive :class:`~cei_actors.sim.system.CEISystem`:

- ``HealingMachine``: faults the system is built to heal (VM kills and vanishings, cloud quota,
  create failures, lost create replies, Provisioner fail-over and crashes inside a message
  before its append, drops and duplicates on the EEAgent <-> PD links, latency); after the
  faults stop it must converge.
- ``ChaosMachine``: every fault, EPUM and PD fail-over, crashes between a message's append
  and its effects and drops on every link included; safety invariants must hold throughout,
  and after the faults stop it must converge too (tests/test_sim_findings.py holds the
  smallest runs of the gaps this machine found).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings

from cei_actors.sim.check import ChaosMachine, HealingMachine
from cei_actors.sim.system import CEISystem

logging.getLogger("cei_actors").setLevel(logging.ERROR)


_FAST = settings(max_examples=40, stateful_step_count=30, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
_SLOW = settings(max_examples=150, stateful_step_count=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TestHealing = HealingMachine.TestCase
TestHealing.settings = _FAST
TestChaos = ChaosMachine.TestCase
TestChaos.settings = _FAST


class _SlowHealing(HealingMachine):
    pass


class _SlowChaos(ChaosMachine):
    pass


@pytest.mark.slow
class TestHealingSlow(_SlowHealing.TestCase):
    settings = _SLOW


@pytest.mark.slow
class TestChaosSlow(_SlowChaos.TestCase):
    settings = _SLOW


# ---- scenarios: deterministic for a seed -----------------------------------------------------

_RUN = """
import json, sys
from sims import {name}
s = {name}.run({seed}, **{kw!r})
s.pop("wall_time_s"); s.pop("steps_per_s"); s.pop("cpu_time_s", None)
print(json.dumps(s, sort_keys=True))
"""


def _run_scenario(name: str, seed: int, hashseed: str, **kw) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run([sys.executable, "-c", _RUN.format(name=name, seed=seed, kw=kw)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


@pytest.mark.parametrize("name, kw", [("steady", {"arrivals": 80}), ("chaos", {"operations": 30}),
                                      ("ha", {"operations": 40})])
def test_same_seed_same_summary(name, kw):
    """Two runs in fresh interpreters (different hash seeds) give the same summary."""
    a = _run_scenario(name, 5, "1", **kw)
    b = _run_scenario(name, 5, "2", **kw)
    assert a == b
    assert '"violations": []' in a


def test_steady_converges():
    from sims import steady

    s = steady.run(3, arrivals=60)
    assert s["violations"] == [] and s["converged"], s["convergence_problems"]
    assert s["processes_finished"] > 0 and s["vms_started"] > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ha_keeps_n_copies_across_pds_through_kills_and_ha_crashes(seed):
    from sims import ha

    s = ha.run(seed, operations=80)
    assert s["violations"] == [], s["violations"]
    assert s["converged"], s["convergence_problems"]
    assert s["faults_injected"].get("crash_ha_mid_message", 0) + s["faults_injected"].get("crash_ha", 0) > 0
    assert s["faults_injected"].get("copy_killed", 0) > 0
    assert set(s["ha_copies"]) == {"web", "api"}
    assert {pd for by_pd in s["ha_copies"].values() for pd in by_pd} == {"pd", "pd2"}, s["ha_copies"]


def test_sim_invariant_catches_a_live_copy_ha_does_not_hold():
    from cei_actors.ha.events import CopyEnded
    from cei_actors.sim.system import CEISystem, SystemConfig

    system = CEISystem(7, SystemConfig(slots=3, pds=2, ha=True))
    system.run_for(10.0)
    system.create_group("web", 2)
    assert system.run_for(300.0, check_every=50) == []
    assert system.convergence() == []
    # HA "forgets" a running copy (its state only, as a bug would): the copy still runs
    node = system.sim.nodes["ha"]
    upid = next(iter(node.runner.state.groups["web"].copies))
    node.component.apply(node.runner.state, CopyEnded("web", upid, "UNKNOWN", 0.0))
    assert any(f"HA copy {upid} runs" in v for v in system.violations(replay=False))



def _short_run(seed: int, durations: list[float], seconds: float) -> CEISystem:
    """A two-slot system (PD retention 60 s) that ran processes ``p0``, ``p1``, ... of these
    durations for ``seconds`` with the invariants checked every 100 steps (none broken)."""
    from cei_actors.sim.system import SystemConfig

    system = CEISystem(seed, SystemConfig(slots=2, extra={"pd": {"retention": 60}}))
    system.run_for(10.0)
    for i, duration in enumerate(durations):
        system.schedule(f"p{i}", duration)
    assert system.run_for(seconds, check_every=100) == []
    return system


def test_replay_check_catches_a_live_state_that_differs_from_its_log():
    """The check folds each component's whole log (the reader's fast fold, with the node's own
    component and config) and compares it with the live state: equal after a run with
    finished, forgotten and running processes; a change to the live PD made without an event
    (as a bug would) is reported, and so is one to the Provisioner."""
    system = _short_run(3, [30.0] * 4 + [math.inf] * 2, 900.0)
    pd = system.sim.state("pd")
    assert pd.tombstones and any(p.state == "RUNNING" for p in pd.processes.values())
    assert system.violations(replay=True) == []
    proc = next(p for p in pd.processes.values() if p.state == "RUNNING")
    proc.round += 1
    assert "pd: state differs from the replay of its log" in system.violations(replay=True)
    proc.round -= 1
    assert system.violations(replay=True) == []
    node = next(iter(system.sim.state("provisioner").nodes.values()))
    node.state = "FAILED"
    assert "provisioner: state differs from the replay of its log" in system.sim.check()



def test_a_final_check_and_the_digest_make_one_snapshot_of_each_state():
    """The live state's snapshot form the replay check made is the one the summary's digest
    hashes (SIM12), while nothing happened since; after a step, or for a new runner, it is
    made again; and the digest is the one fresh snapshots give."""
    system = _short_run(5, [30.0] * 4, 600.0)
    made: dict[str, int] = {}
    for name in system.components:
        comp = system.sim.nodes[name].component
        comp.snapshot = counting(made, name, comp.snapshot)
    assert system.violations(replay=True) == []
    assert made == dict.fromkeys(system.components, 2)  # the live state's and the replay's
    digest = system.digest()
    assert made == dict.fromkeys(system.components, 2)  # none made again
    assert system.digest() == digest  # made afresh now: the same
    assert made == dict.fromkeys(system.components, 3)
    system.violations(replay=True)
    system.run_for(30.0)
    system.digest()
    assert made == dict.fromkeys(system.components, 6)  # the state moved on: made again
    system.violations(replay=True)
    system.restart("pd")
    system.digest()
    assert made["pd"] == 9 and made["epum"] == 8


def counting(made, name, snapshot):
    """``snapshot``, counting its calls in ``made[name]``."""
    def counted(state):
        made[name] = made.get(name, 0) + 1
        return snapshot(state)
    return counted



def test_violations_name_each_broken_rule_in_the_order_they_are_met():
    """The safety checks' verdicts, one planted fault at a time and two at once (SIM13: the
    set-based gates must send every broken rule to the exact, ordered report)."""
    system = _short_run(4, [30.0] * 2 + [math.inf] * 4, 900.0)
    pd = system.sim.state("pd")
    assert pd.tombstones and "p0" not in pd.processes
    running = [p for p in pd.processes.values() if p.state == "RUNNING"]
    a, b = running[0], running[1]
    key = (a.upid, a.round)

    system.scheduled["ghost"] = {"duration": 1.0, "fail_rounds": 0}
    assert system.violations(replay=False) == ["process ghost lost: not in the PD"]
    a.state = "BOGUS"
    assert system.violations(replay=False) == [
        f"process {a.upid} is BOGUS: neither queued, placed nor finished",
        "process ghost lost: not in the PD"]
    del system.scheduled["ghost"]
    a.state = "RUNNING"
    was, b.resource_id = b.resource_id, "nowhere"
    assert system.violations(replay=False) == [f"process {b.upid} RUNNING on unknown resource nowhere"]
    b.resource_id = was
    a.round -= 1
    assert system.violations(replay=False) == [
        f"agent {was_on(system, key)} runs {a.upid} round {key[1]}, which pd never placed"]
    a.round += 1
    owner = was_on(system, key)
    other = next(nid for nid in system.agents if nid != owner)
    system.agents[other].table.records[key] = system.agents[owner].table.records[key]
    assert system.violations(replay=False) == [
        f"process {a.upid} round {key[1]} live on 2 agents: {sorted([owner, other])}"]
    del system.agents[other].table.records[key]
    assert system.violations(replay=False) == []


def was_on(system, key):
    """The agent whose table has ``key`` live."""
    return next(nid for nid, agent in system.agents.items() if key in agent.live_keys())

def test_simulated_heartbeats_share_rows_the_pd_never_changes():
    """A simulated agent's heartbeat carries its table's own row dicts (no copy per heartbeat,
    SIM8): after a run with launches, ends, cleanups and VM kills, every agent's rows are
    still exactly what its records say, so nothing that read them changed them."""
    from cei_actors.sim.system import CEISystem, SystemConfig

    system = CEISystem(5, SystemConfig(slots=3))
    system.run_for(10.0)
    for i in range(12):
        system.schedule(f"p{i}", 40.0 + i, fail_rounds=int(i % 3 == 0))
    rows = 0
    for k in range(30):
        if k == 5:
            system.kill_vm(0)
        assert system.run_for(10.0, check_every=100) == []
        for agent in system.agents.values():
            assert agent.table.rows() == [r.row() for r in agent.table.sorted()]
            assert agent.table.dump() == agent.table.rows()
            rows += len(agent.table)
    assert rows > 50 and system.faults["vm_killed"] == 1


def test_the_vm_watcher_stops_the_agents_of_destroyed_and_killed_vms_only():
    """When the cloud counted only destroys since the last poll, the watcher looks at the VMs
    destroy_node was asked for (not at every VM): their agents stop at the next poll, the
    others keep running; a kill (counted otherwise) is found by looking at every VM."""
    from cei_actors.sim.system import CEISystem, SystemConfig

    system = CEISystem(4, SystemConfig(slots=1, agent_poll=1.0))
    system.run_for(10.0)
    system.add_domain("plain", 5)
    system.run_for(120.0)
    assert len(system.agents) == 5
    cloud = system.cloud
    vms = sorted((vm for vm in system.cloud_vms() if vm.status == "running"), key=lambda v: v.id)
    cloud.destroy_node(vms[0].id)
    cloud.destroy_node(vms[0].id)  # twice: one agent stopped once
    system.sim.run_for(1.5)  # the watcher only: EPUM's replacement is not running yet
    assert set(system.agents) == {vm.name for vm in vms[1:]}
    assert system.dead_agents == 1
    cloud.kill(vms[1].id)
    system.sim.run_for(1.5)
    assert set(system.agents) == {vm.name for vm in vms[2:]}
    assert system.dead_agents == 2


def test_cli_lists_and_refuses(capsys):
    import json

    from cei_actors.cli import main

    assert main(["--json", "sim", "list"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["scenario"] for r in rows} == {"steady", "chaos", "scale", "ha", "iteration", "big",
                                             "storm", "overflow"}
    assert main(["sim", "run", "nope"]) == 1
    assert "no scenario 'nope'" in capsys.readouterr().err


def test_sim_agent_runs_the_real_agent_rules():
    """The simulated agent keeps the real process table (eeagent/logic.py): the same slot
    limit, supersede and messages as the real supervisor."""
    from cei_actors.eeagent import states as ast
    from cei_actors.eeagent.messages import LaunchProcess
    from cei_actors.eeagent.state import ProcessTable
    from cei_actors.sim.system import CEISystem, SimAgent, SystemConfig, sim_command

    s = CEISystem(seed=1, config=SystemConfig(slots=1, terminate_grace=1.0))
    agent = SimAgent(s, "n-test")
    agent.boot()
    assert isinstance(agent.table, ProcessTable)
    forever = sim_command(math.inf)
    agent.receive(LaunchProcess("a", 0, forever), None)
    agent.receive(LaunchProcess("b", 0, forever), None)
    agent.receive(LaunchProcess("a", 1, forever), None)
    rows = {(r["upid"], r["round"]): (r["state"], r["msg"]) for r in agent.table.dump()}
    assert rows == {("a", 0): (ast.TERMINATING, ""), ("a", 1): (ast.PENDING, ""),
                    ("b", 0): (ast.REJECTED, "no free slot: 1 of 1 slots in use")}
    s.run_for(1.5)
    rows = {(r["upid"], r["round"]): (r["state"], r["msg"]) for r in agent.table.dump()}
    assert rows == {("a", 1): (ast.RUNNING, ""),
                    ("b", 0): (ast.REJECTED, "no free slot: 1 of 1 slots in use")}


def test_a_burst_of_schedules_is_one_mailbox_drain_with_the_same_run():
    """Decision SIM15: ``schedule_many`` hands the PD a burst as one batch (one append per
    ``max_batch`` messages, a refused one answered alone) and the run is the one that
    scheduling them one by one gives: same steps, same state digest."""
    from cei_actors.runtime.messages import ErrorReply
    from cei_actors.sim.system import CEISystem, SystemConfig

    def run(batched: bool) -> tuple[dict, int, list]:
        system = CEISystem(5, SystemConfig(slots=2))
        system.run_for(5.0)
        procs = [{"upid": f"p{i}", "duration": 20.0 + i, "fail_rounds": int(i % 4 == 0)} for i in range(12)]
        procs.insert(3, {"upid": "", "duration": 1.0})  # refused: an empty upid
        runner = system.sim.nodes["pd"].runner
        appends = runner.log_stats.appends
        if batched:
            replies = system.schedule_many(procs)
        else:
            replies = [system.schedule(p["upid"], p["duration"], p.get("fail_rounds", 0)) for p in procs]
        appends = runner.log_stats.appends - appends
        assert system.run_for(300.0, check_every=500) == []
        summary = system.summary()
        return {k: summary[k] for k in ("steps", "state_digest", "process_states", "log_heads")}, appends, replies

    one_by_one, appends_one, replies_one = run(False)
    batched, appends_batched, replies = run(True)
    assert batched == one_by_one and batched["process_states"] == {"EXITED": 12}
    assert replies == replies_one and isinstance(replies[3], ErrorReply)
    assert (appends_one, appends_batched) == (12, 1)


def test_the_largest_logs_replay_check_in_a_forked_child_says_what_it_found(monkeypatch):
    """Decision SIM16: with ``fork_check_events`` reached, the largest log (the PD's) is
    folded and compared in a forked child: the same verdicts as in process (equal; a change
    made without an event), and a child that fails or overruns its timeout is a violation
    that says so, never a hang or a pass."""
    import os
    import time

    from cei_actors.debug import reader
    from cei_actors.sim.system import CEISystem, SystemConfig

    system = CEISystem(3, SystemConfig(slots=2))
    system.run_for(10.0)
    for i in range(6):
        system.schedule(f"p{i}", 30.0 if i < 4 else math.inf)
    assert system.run_for(300.0, check_every=100) == []
    sim = system.sim
    sim.fork_check_events = 1
    forks = []
    real_fork = os.fork

    def fork():
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    assert sim.check() == [] and len(forks) == 1
    proc = next(p for p in sim.state("pd").processes.values() if p.state == "RUNNING")
    proc.round += 1
    assert sim.check()[-1] == "pd: state differs from the replay of its log" and len(forks) == 2
    proc.round -= 1
    node = next(iter(sim.state("provisioner").nodes.values()))
    was, node.state = node.state, "FAILED"  # checked in this process meanwhile
    assert sim.check()[-1] == "provisioner: state differs from the replay of its log" and len(forks) == 3
    node.state = was
    real_state = reader.Replay.state

    def broken(self, stream, *args, **kwargs):
        if stream == "pd" and os.getpid() != parent:
            raise RuntimeError("planted")
        return real_state(self, stream, *args, **kwargs)

    parent = os.getpid()
    monkeypatch.setattr(reader.Replay, "state", broken)
    assert sim.check() == ["pd: the replay check in a child failed: RuntimeError: planted"]

    def stuck(self, stream, *args, **kwargs):
        if stream == "pd" and os.getpid() != parent:
            time.sleep(60)
        return real_state(self, stream, *args, **kwargs)

    monkeypatch.setattr(reader.Replay, "state", stuck)
    sim.fork_check_timeout = 0.5
    started = time.monotonic()
    assert sim.check() == ["pd: the replay check in a child took more than 0.5 s; killed"]
    assert time.monotonic() - started < 30
    for pid in forks:  # every child was waited for
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    monkeypatch.setattr(reader.Replay, "state", real_state)
    sim.fork_check_events = None
    assert sim.check() == [] and len(forks) == 5


def _warm_run(seed: int = 3) -> CEISystem:
    """A short run whose mid-run checks (no replay) start the replay check folding ahead in
    a child (every log past ``fork_check_events``, the PD's the largest) and feed it."""
    from cei_actors.sim.system import SystemConfig

    system = CEISystem(seed, SystemConfig(slots=2))
    system.run_for(10.0)
    for i in range(6):
        system.schedule(f"p{i}", 30.0 if i < 4 else math.inf)
    system.run_for(30.0)  # the PD's log is the largest from here on
    system.sim.fork_check_events = 1
    assert system.run_for(30.0, check_every=100, replay=False) == []
    return system


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_the_pd_replay_check_folds_ahead_in_a_child_fed_as_the_log_grows(monkeypatch):
    """Decision SIM20: the first mid-run check past ``fork_check_events`` forks a child folding
    every log; later checks feed it what was appended since, and the final check takes its
    verdicts: those the in-process replay gives (equal; a change made without an event to the
    PD or the Provisioner found, none after a map's order changed, which alone is no
    difference), with the live snapshots' packings kept for the digest; no child left behind."""
    from cei_actors.sim import kernel

    sent, real_send = [], kernel._WarmReplay._send

    def send(self, kind, *args):
        sent.append(kind)
        return real_send(self, kind, *args)

    monkeypatch.setattr(kernel._WarmReplay, "_send", send)
    system = _warm_run()
    sim = system.sim
    warm = sim._warm
    assert warm is not None and warm.node.name == "pd"
    assert [n.name for n in warm.nodes] == ["pd", "provisioner", "epum"]  # every log, the largest first
    started = list(warm.heads)
    assert system.run_for(240.0, check_every=100, replay=False) == []
    heads = [n.log.head(n.component.stream) for n in warm.nodes]
    assert warm.heads == heads and heads[0] > started[0]  # fed: the batches appended after the fork
    pd = sim.state("pd")
    assert any(p.state == "EXITED" for p in pd.processes.values())
    assert any(p.state == "RUNNING" for p in pd.processes.values())
    assert sim.check() == [] and sim._warm is None and _gone(warm.pid)
    digest = system.digest()
    sim.fork_check_events = None
    assert sim.check() == [] and system.digest() == digest  # the same verdict and digest in process

    sim.fork_check_events = 1
    props = next(iter(pd.nodes.values())).properties
    items = list(props.items())
    props.clear()
    props.update(reversed(items))  # another order, the same map: another hash, equal unpacked
    sim.warm_replay()
    del sent[:]
    assert sim.check() == [] and sent == [b"V", b"P"]  # the packed forms compared
    props.clear()
    props.update(items)
    proc = next(p for p in pd.processes.values() if p.state == "RUNNING")
    proc.round += 1  # a change made without an event
    sim.warm_replay()
    warm = sim._warm
    assert sim.check()[-1] == "pd: state differs from the replay of its log" and _gone(warm.pid)
    proc.round -= 1
    node = next(iter(sim.state("provisioner").nodes.values()))
    was, node.state = node.state, "FAILED"
    sim.warm_replay()
    assert sim.check()[-1] == "provisioner: state differs from the replay of its log"
    node.state = was
    sim.warm_replay()
    warm = sim._warm
    sim.close()
    assert sim._warm is None and _gone(warm.pid)
    assert sim.check() == []  # no warm child: forked at the check, as before


def test_a_warm_replay_child_that_dies_errs_or_overruns_is_a_violation(monkeypatch):
    """The warm child killed mid-run, failing in its fold or stuck past ``fork_check_timeout``:
    each a violation that says so, never a pass or a hang; every child reaped."""
    import signal
    import time

    from cei_actors.debug import reader

    system = _warm_run(4)
    sim = system.sim
    warm = sim._warm
    name = warm.node.name
    os.kill(warm.pid, signal.SIGKILL)
    assert system.run_for(60.0, check_every=100, replay=False) == []  # fed on: nobody reads
    assert sim.check() == [f"{name}: the replay check in a child failed: killed by signal 9, no verdict"]
    assert _gone(warm.pid)

    parent, real_fold = os.getpid(), reader.Replay.fold

    def broken(self, stream, state, start, offset, settle=True):
        if os.getpid() != parent and start > 1:
            raise RuntimeError("planted")
        return real_fold(self, stream, state, start, offset, settle)

    monkeypatch.setattr(reader.Replay, "fold", broken)
    sim.warm_replay()
    name = sim._warm.node.name
    assert system.run_for(30.0, check_every=100, replay=False) == []
    assert sim.check() == [f"{name}: the replay check in a child failed: RuntimeError: planted"]

    def stuck(self, stream, state, start, offset, settle=True):
        if os.getpid() != parent:
            time.sleep(60)
        return real_fold(self, stream, state, start, offset, settle)

    monkeypatch.setattr(reader.Replay, "fold", stuck)
    sim.warm_replay()
    warm = sim._warm
    sim.fork_check_timeout = 0.5
    began = time.monotonic()
    assert sim.check() == [f"{warm.node.name}: the replay check in a child took more than 0.5 s; killed"]
    assert time.monotonic() - began < 30 and _gone(warm.pid)
