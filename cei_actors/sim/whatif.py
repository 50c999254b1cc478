"""What-if: re-simulate the workload recorded in a log under another engine or parameters.

:func:`open_logs` opens a recorded log read-only (a directory of ``cei sim run --save-log``
files, an SQLite file or a log URL); :func:`extract` takes from its PD and EPUM streams the
inputs from outside the components, with their times: processes scheduled (constraints,
modes), how long each round ran and how many failed, kills, user domains added, changed and
removed, VM boot times (launch -> RUNNING), launches that failed, and VMs lost (ended
without a destroy asked). :func:`simulate` feeds them, at their times, to the simulator (the
real Provisioner, EPUM and PD cores on virtual time) under the recorded policy or another;
:func:`outcome` folds a run's EPUM and PD records (the recorded log's too, with the same
:func:`~.report.fold`) into the figures compared; :func:`compare` does all of it and
:func:`write_report` writes JSON, markdown and plots. Whatever the log lacks is assumed
and said (:attr:`Workload.assumptions`). Decisions WI1-WI3.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..debug.reader import Replay
from ..epum.client import dotted_config
from ..epum.engines import EngineConfigError, load_engine
from ..epum.messages import ReconfigureDomain
from ..eventlog import CorruptLog, EventLogError, Record
from ..pd import states as ps
from ..runtime.messages import Ok
from .report import _percentile, fold
from .system import PD_DOMAIN, CEISystem, SystemConfig

__all__ = ["Outcome", "ProcessInput", "WhatIfError", "Workload", "compare", "extract", "open_logs",
           "outcome", "simulate", "write_report"]

#: a process whose length the log does not show runs this long (unless others' are known)
DEFAULT_DURATION = 60.0
#: boot time (launch -> RUNNING node) assumed when the log shows none
DEFAULT_BOOT = 30.0
#: the longest a what-if goes on past the log's end (a week of virtual time)
MAX_EXTEND = 7 * 86400.0
_ENDED = ("TERMINATED", "FAILED", "REJECTED")
_PD_CONF_KEYS = ("preserve_n", "retirable_nodes", "provisioner_vars")  # set by the PD itself


class WhatIfError(ValueError):
    """A log (or a request) that cannot be re-simulated; the message is one line."""


@dataclass
class ProcessInput:
    """A process as a client asked for it, and how its rounds ran (seconds from the start)."""

    upid: str
    at: float
    duration: float  # one round's run time (inf: ran until killed or past the log's end)
    fail_rounds: int = 0  # rounds that ended FAILED (the first ones, in the simulation)
    killed_at: float | None = None
    restart_mode: str | None = None
    queueing_mode: str | None = None
    constraints: dict[str, Any] | None = None
    node_exclusive: str | None = None


@dataclass
class DomainInput:
    """A user's domain added, resized or removed (preserve_n engines only)."""

    at: float
    op: str  # add, reconfigure, remove
    domain_id: str
    preserve_n: int = 0


@dataclass
class Workload:
    """The outside inputs of a recorded run, times in seconds from its first event."""

    t0: float
    span: float
    processes: list[ProcessInput] = field(default_factory=list)
    domains: list[DomainInput] = field(default_factory=list)
    boot_times: list[float] = field(default_factory=list)
    launches: int = 0
    launch_failures: int = 0
    node_losses: list[tuple[float, bool]] = field(default_factory=list)  # (time, had processes)
    engine: str = "needy"  # the PD domain's engine as recorded
    engine_conf: dict[str, Any] = field(default_factory=dict)  # its settings (needs excluded)
    slots: int | None = None
    heartbeat: float | None = None
    peak_pd_vms: int = 0  # most instances of the PD's domain alive at once
    busy_lost: set[str] = field(default_factory=set)  # nodes whose end moved processes (PD)
    assumptions: list[str] = field(default_factory=list)


# ---- reading a recorded log -------------------------------------------------------------------


def open_logs(source: str) -> dict[str, Replay]:
    """Stream -> the read-only :class:`Replay` holding it, for a directory of SQLite logs
    (``cei sim run --save-log DIR``), one SQLite file or a log URL."""
    from ..launch.plan import absolute_log_url

    path = Path(source)
    if "://" in source:
        urls = [absolute_log_url(source)]
    elif path.is_dir():
        urls = [f"sqlite:///{p.resolve()}" for p in sorted(path.glob("*.sqlite"))]
        if not urls:
            raise WhatIfError(f"{source}: no *.sqlite logs in the directory")
    elif path.is_file():
        urls = [f"sqlite:///{path.resolve()}"]
    else:
        raise WhatIfError(f"{source}: no such file or directory (give a log URL, an SQLite file "
                          "or a directory of saved logs)")
    out: dict[str, Replay] = {}
    try:
        for url in urls:
            r = Replay(url)
            for stream in r.streams():
                out.setdefault(stream, r)
    except BaseException:
        for r in set(out.values()):
            r.close()
        raise
    return out


def _events(replay: Replay, stream: str) -> Iterator[tuple[Record, Any]]:
    """The stream's records with their typed events; a body that does not fit its type is a
    :class:`CorruptLog` at its offset."""
    decode = replay.component(stream).registry.from_record
    for record in replay.records(stream):
        try:
            yield record, decode(record)
        except EventLogError:
            raise
        except Exception as exc:  # noqa: BLE001 - a foreign body
            raise CorruptLog(stream, record.offset,
                             f"{record.type} does not read: {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def _fits(stream: str, record: Record) -> Iterator[None]:
    """A body whose fields are not what its type says is a :class:`CorruptLog` at its offset."""
    try:
        yield
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise CorruptLog(stream, record.offset,
                         f"{record.type} does not fit: {type(exc).__name__}: {exc}") from None


def _is_pd_domain(domain_id: str, subscribers: list[Any]) -> bool:
    return domain_id.startswith("pd_domain_") or any(str(s).split(":")[0].startswith("pd") for s in subscribers)


def extract(logs: Mapping[str, Replay]) -> Workload:
    """The outside inputs recorded in the ``pd`` and ``epum`` streams of ``logs``."""
    if "pd" not in logs:
        known = ", ".join(sorted(logs)) or "none"
        raise WhatIfError(f"no pd stream in the log (streams: {known}): nothing to re-simulate")
    pd_events = list(_events(logs["pd"], "pd"))
    epum_events = list(_events(logs["epum"], "epum")) if "epum" in logs else []
    if not pd_events:
        raise WhatIfError("the log's pd stream is empty (offset 0): nothing to re-simulate")
    stamps = [r.timestamp for r, _ in pd_events + epum_events]
    t0, t1 = min(stamps), max(stamps)
    w = Workload(t0=t0, span=t1 - t0)
    if "epum" not in logs:
        w.assumptions.append("no epum stream: the PD's domain assumed needy, no boot times or VM losses")
    for stream, evs in (("pd", pd_events), ("epum", epum_events)):
        if evs and evs[0][0].offset > 1:
            w.assumptions.append(f"the {stream} stream's history starts at offset {evs[0][0].offset} "
                                 "(its archive is not there): what came before is not re-simulated")
    _extract_processes(w, pd_events)
    _extract_epum(w, epum_events)
    return w


def _extract_processes(w: Workload, events: list[tuple[Record, Any]]) -> None:
    t0 = w.t0
    procs: dict[str, ProcessInput] = {}
    started: dict[tuple[str, int], float] = {}
    ran: dict[str, list[float]] = {}  # upid -> run times of the rounds that ended by themselves
    running_at_end: set[str] = set()
    never: dict[str, Any] = {}  # upid -> spec, for processes that never ran
    for rec, ev in events:
        with _fits("pd", rec):
            name = type(ev).__name__
            if name == "ProcessScheduled":
                if ev.upid not in procs:
                    spec = ev.spec
                    constraints = dict(spec.get("constraints") or {})
                    constraints.pop("engine", None)  # the what-if system has one engine
                    procs[ev.upid] = ProcessInput(
                        ev.upid, ev.at - t0, math.inf, restart_mode=spec.get("restart_mode"),
                        queueing_mode=spec.get("queueing_mode"), constraints=constraints or None,
                        node_exclusive=spec.get("node_exclusive"))
                    never[ev.upid] = spec
            elif name == "ProcessMoved" and ev.upid in procs:
                p, key = procs[ev.upid], (ev.upid, ev.round)
                if ev.state == ps.RUNNING:
                    started.setdefault(key, ev.at)
                    never.pop(ev.upid, None)
                    running_at_end.add(ev.upid)
                elif ev.state in (ps.EXITED, ps.FAILED) and key in started:
                    ran.setdefault(ev.upid, []).append(ev.at - started[key])
                    p.fail_rounds += ev.state == ps.FAILED
                    running_at_end.discard(ev.upid)
                elif ev.state in ps.QUEUED and _failed_exit(ev.msg) and (ev.upid, ev.round - 1) in started:
                    # the previous round exited non-zero and the PD restarts it
                    ran.setdefault(ev.upid, []).append(ev.at - started[(ev.upid, ev.round - 1)])
                    p.fail_rounds += 1
                    running_at_end.discard(ev.upid)
                elif ev.state in (ps.TERMINATING, ps.TERMINATED) and p.killed_at is None:
                    p.killed_at = ev.at - t0
                    running_at_end.discard(ev.upid)
                elif ev.state not in ps.PLACED:
                    running_at_end.discard(ev.upid)
                if ev.state in ps.QUEUED and ev.msg.startswith("node "):
                    w.busy_lost.add(ev.msg.split()[1])  # "node ID TERMINATED": its processes move
    known = [d for ds in ran.values() for d in ds]
    default = statistics.median(known) if known else DEFAULT_DURATION
    guessed = 0
    for upid, p in procs.items():
        if upid in ran:
            p.duration = max(ran[upid])
        elif upid in never and p.killed_at is None:
            p.duration = _sim_duration(never[upid].get("command")) or default
            guessed += 1
    if guessed:
        w.assumptions.append(f"{guessed} process(es) never ran to an end in the log: each assumed "
                             f"to run {default:.0f} s (the median of the recorded run times)"
                             if known else f"{guessed} process(es) never ran to an end in the log and "
                             f"no run time was recorded: each assumed to run {DEFAULT_DURATION:.0f} s")
    still = sorted(u for u in running_at_end if u not in ran)
    if still:
        w.assumptions.append(f"{len(still)} process(es) still running at the log's end: assumed "
                             "to run past it")
    w.processes = sorted(procs.values(), key=lambda p: (p.at, p.upid))


def _sim_duration(command: Any) -> float | None:
    """A simulated command's run time (``["sim", DURATION, FAIL_ROUNDS]``), else None."""
    if isinstance(command, list | tuple) and len(command) == 3 and command[0] == "sim":
        try:
            return float(command[1])
        except (TypeError, ValueError):
            return None
    return None


def _extract_epum(w: Workload, events: list[tuple[Record, Any]]) -> None:
    t0 = w.t0
    launched: dict[str, float] = {}
    up: set[str] = set()
    destroy_asked: set[str] = set()
    pd_domains: set[str] = set()
    pd_live: set[str] = set()
    ended: set[str] = set()
    skipped: set[str] = set()
    for rec, ev in events:
        with _fits("epum", rec):
            name = type(ev).__name__
            if name == "DomainAdded":
                conf = ev.config.get("engine_conf") or {}
                engine = (ev.config.get("general") or {}).get("engine_class") or "preserve_n"
                if _is_pd_domain(ev.domain_id, ev.subscribers):
                    if not pd_domains:
                        w.engine = engine
                        w.engine_conf = {k: v for k, v in conf.items() if k not in _PD_CONF_KEYS}
                        pv = conf.get("provisioner_vars") or {}
                        w.slots = pv.get("slots") if isinstance(pv.get("slots"), int) else None
                        w.heartbeat = pv.get("heartbeat") if isinstance(pv.get("heartbeat"), int | float) else None
                    pd_domains.add(ev.domain_id)
                elif engine in ("preserve_n", "simplest"):
                    w.domains.append(DomainInput(ev.at - t0, "add", ev.domain_id, int(conf.get("preserve_n", 0))))
                else:
                    skipped.add(f"{ev.domain_id} ({engine})")
            elif name == "DomainReconfigured" and not _is_pd_domain(ev.domain_id, []):
                n = (ev.changes.get("engine_conf") or {}).get("preserve_n")
                if isinstance(n, int) and any(d.domain_id == ev.domain_id for d in w.domains):
                    w.domains.append(DomainInput(ev.at - t0, "reconfigure", ev.domain_id, n))
            elif name == "DomainRemoveRequested" and any(d.domain_id == ev.domain_id for d in w.domains):
                w.domains.append(DomainInput(ev.at - t0, "remove", ev.domain_id))
            elif name == "InstanceLaunchRequested":
                launched[ev.instance_id] = ev.at
                w.launches += 1
                if ev.domain_id in pd_domains:
                    pd_live.add(ev.instance_id)
                    w.peak_pd_vms = max(w.peak_pd_vms, len(pd_live))
            elif name == "InstanceDestroyRequested":
                destroy_asked.update(ev.instance_ids)
            elif name == "InstanceUpdated":
                iid = ev.instance_id
                if ev.state == "RUNNING" and iid in launched and iid not in up:
                    up.add(iid)
                    w.boot_times.append(ev.at - launched[iid])
                elif ev.state in _ENDED and iid not in ended:
                    ended.add(iid)
                    pd_live.discard(iid)
                    if iid in destroy_asked:
                        continue
                    if iid in up:
                        w.node_losses.append((ev.at - t0, iid in w.busy_lost))
                    elif iid in launched:
                        w.launch_failures += 1
    if skipped:
        w.assumptions.append(f"domains not re-simulated (not preserve_n): {', '.join(sorted(skipped))}")
    if not w.boot_times:
        w.assumptions.append(f"no boot times recorded: assumed {DEFAULT_BOOT:.0f} s")
    if w.slots is None:
        w.assumptions.append("no slots per node recorded: assumed 4")


# ---- re-simulating ----------------------------------------------------------------------------


@dataclass
class Run:
    """One simulated run: what it was asked, its system, and its notes."""

    label: str
    engine: str
    settings: dict[str, Any]
    system: CEISystem
    notes: list[str] = field(default_factory=list)


def _boot_range(w: Workload) -> tuple[float, float]:
    """The simulated cloud's boot delay: uniform between the 10th and 90th percentile of the
    recorded launch -> RUNNING times (decision WI2)."""
    if not w.boot_times:
        return DEFAULT_BOOT, DEFAULT_BOOT
    xs = sorted(w.boot_times)
    lo, hi = _percentile(xs, 0.1), _percentile(xs, 0.9)
    assert lo is not None and hi is not None
    return lo, hi


def _checked_settings(engine: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (``--set`` KEY=VALUE, dotted as ``cei domain add`` takes them) as a
    sectioned config the engine takes, checked before anything runs."""
    try:
        cls = load_engine(engine)
    except EngineConfigError as exc:
        raise WhatIfError(str(exc)) from None
    config = dotted_config(dict(settings))
    unknown = sorted(set(config) - {"engine_conf", "general", "health"})
    if unknown:
        raise WhatIfError(f"--set: unknown section(s) {', '.join(unknown)} (engine_conf keys are "
                          "plain, others general.KEY or health.KEY)")
    if "engine_class" in config.get("general", {}):
        raise WhatIfError("--set general.engine_class: use --engine")
    conf = {"preserve_n": 0, "provisioner_vars": {}, **config.get("engine_conf", {})}
    try:
        cls.validate_config(conf)
    except EngineConfigError as exc:
        raise WhatIfError(f"engine {engine} does not take the PD's domain (preserve_n, "
                          f"provisioner_vars and the --set keys): {exc}") from None
    return config


def simulate(w: Workload, engine: str | None = None, settings: Mapping[str, Any] | None = None,
             seed: int = 0, label: str = "simulated") -> Run:
    """Feed ``w``'s inputs at their times to a simulated system whose PD domain runs
    ``engine`` (default: the recorded one) with ``settings`` applied to it once the PD made
    it (as ``cei domain reconfigure --set``); runs ``w.span`` virtual seconds."""
    engine = engine or w.engine
    settings = dict(settings or {})
    notes: list[str] = []
    if engine in ("preserve_n", "simplest") and "preserve_n" not in settings:
        settings["preserve_n"] = max(w.peak_pd_vms, 1)
        notes.append(f"preserve_n not given: the PD domain's recorded peak, {settings['preserve_n']} VMs")
    config = _checked_settings(engine, settings)
    cfg = SystemConfig(slots=w.slots or 4, pd_definition={
        "general": {"engine_class": engine}, "engine_conf": {}, "health": {}})
    if w.heartbeat:
        cfg.heartbeat_period = float(w.heartbeat)
        cfg.heartbeat_warning, cfg.heartbeat_missing = 4 * cfg.heartbeat_period, 8 * cfg.heartbeat_period
    cap = w.engine_conf.get("maximum_vms")
    if isinstance(cap, int):
        if "maximum_vms" in load_engine(engine).config_keys():
            cfg.maximum_vms = cap
        else:
            notes.append(f"the recorded cap maximum_vms={cap} does not apply to engine {engine}")
    failure_rate = w.launch_failures / w.launches if w.launches else 0.0
    cfg.sites = {"local": {"boot_delay": list(_boot_range(w)),
                           "create_failure_rate": round(failure_rate, 6)}}
    logging.getLogger("cei_actors").setLevel(logging.ERROR)  # quiet, as the scenarios run (sims.system)
    system = CEISystem(seed, cfg)
    run = Run(label, engine, settings, system, notes)
    start, rng = system.start, random.Random(seed)
    inputs: list[tuple[float, int, Any]] = []
    if config:
        inputs.append((0.0, 0, ("configure", config)))
    inputs += [(p.at, 1, ("schedule", p)) for p in w.processes]
    inputs += [(p.killed_at, 2, ("kill", p.upid)) for p in w.processes if p.killed_at is not None]
    inputs += [(d.at, 1, ("domain", d)) for d in w.domains]
    inputs += [(t, 3, ("loss", busy)) for t, busy in w.node_losses]
    inputs.sort(key=lambda x: (x[0], x[1]))
    lost_none = 0
    for at, _, (kind, item) in inputs:
        if at > system.sim.clock.now() - start:
            system.run_for(at - (system.sim.clock.now() - start))
        if kind == "configure":
            _configure(system, item, run)
        elif kind == "schedule":
            reply = system.schedule(item.upid, item.duration, item.fail_rounds, item.restart_mode,
                                    item.queueing_mode, item.constraints, item.node_exclusive)
            if not isinstance(reply, Ok):
                notes.append(f"process {item.upid} refused: {reply}")
        elif kind == "kill":
            system.kill_process(item)
        elif kind == "domain":
            if item.op == "add":
                system.add_domain(item.domain_id, item.preserve_n)
            elif item.op == "reconfigure":
                system.reconfigure_domain(item.domain_id, item.preserve_n)
            else:
                system.remove_domain(item.domain_id)
        elif not _lose_vm(system, rng, busy=item):
            lost_none += 1
    if lost_none:
        notes.append(f"{lost_none} recorded VM loss(es) found no live VM to take")
    system.run_for(max(0.0, w.span - (system.sim.clock.now() - start)))
    return run


def _lose_vm(system: CEISystem, rng: random.Random, busy: bool) -> bool:
    """Kill a live VM drawn by ``rng``: one running processes if ``busy`` (the recorded
    node had some), else an idle one, else any; False if none is live."""
    live = [vm for vm in system.cloud_vms() if vm.status in ("pending", "running")]
    if not live:
        return False
    working = {nid for nid, agent in system.agents.items() if agent.live_keys()}
    fits = [i for i, vm in enumerate(live) if (vm.name in working) == busy]
    system.kill_vm(rng.choice(fits) if fits else rng.randrange(len(live)))
    return True


def _configure(system: CEISystem, config: dict[str, Any], run: Run) -> None:
    """Apply ``--set`` to the PD's domain as soon as the PD has made it."""
    for _ in range(600):
        epum = system.sim.state("epum")
        if epum is not None and epum.domain("default", PD_DOMAIN) is not None:
            break
        system.run_for(0.1)
    else:
        raise WhatIfError(f"engine {run.engine}: the PD's domain was not made in 60 s")
    reply = system.sim.call("epum", ReconfigureDomain(PD_DOMAIN, config))
    if not isinstance(reply, Ok):
        raise WhatIfError(f"--set refused by EPUM for engine {run.engine}: {getattr(reply, 'message', reply)}")


# ---- figures ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """A run's figures over the recorded span, and its series for the plots."""

    vm_hours: float
    idle_vm_hours: float
    peak_vms: int
    processes_failed: int
    processes_finished: int
    processes_unfinished: int
    restarts: int  # rounds after a process's first (failures, lost nodes, reschedules)
    queue_wait_s: dict[str, float | None]
    need_to_running_s: dict[str, float | None]
    launches: int
    terminations: int
    series: dict[str, Any] = field(repr=False, default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "series"}


def _spread(xs: list[float]) -> dict[str, float | None]:
    return {"median": statistics.median(xs) if xs else None, "p95": _percentile(xs, 0.95),
            "max": xs[-1] if xs else None, "count": len(xs)}


def outcome(epum_records: Any, pd_records: Any, t0: float, span: float, points: int = 200) -> Outcome:
    """The figures of the run whose EPUM and PD records these are, over ``t0 .. t0 + span``."""
    tl = fold(epum_records, pd_records, t0, t0 + span, points)
    states = tl["process_states"]
    failed = states.get(ps.FAILED, 0) + states.get(ps.REJECTED, 0)
    finished = states.get(ps.EXITED, 0) + states.get(ps.TERMINATED, 0)
    return Outcome(
        vm_hours=round(tl["vm_seconds"] / 3600, 4),
        idle_vm_hours=round(max(0.0, tl["vm_seconds"] - tl["busy_node_seconds"]) / 3600, 4),
        peak_vms=max(tl["live_vms"], default=0),
        processes_failed=failed, processes_finished=finished,
        processes_unfinished=sum(states.values()) - failed - finished,
        restarts=tl["restarts"],
        queue_wait_s=_spread(tl["queue_wait_s"]),
        need_to_running_s=_spread(tl["request_to_running_s"]),
        launches=tl["launches"], terminations=tl["destroyed"],
        series={"t": tl["t"], "vms": tl["live_vms"], "queue": tl["queue"]},
    )


def _sim_outcome(run: Run, span: float) -> Outcome:
    sim = run.system.sim
    epum, pd = sim.nodes["epum"], sim.nodes["pd"]
    return outcome(epum.log.read(epum.component.stream), pd.log.read(pd.component.stream),
                   run.system.start, span)


def compare(logs: Mapping[str, Replay], engine: str | None = None,
            settings: Mapping[str, Any] | None = None, seed: int = 0,
            extend: float = 0.0) -> dict[str, Any]:
    """The recorded run, its re-simulation under the recorded policy and (when ``engine`` or
    ``settings`` ask for a change) under the other one: figures side by side over the
    recorded span plus ``extend`` seconds, the inputs' counts and every assumption made."""
    if not 0.0 <= extend <= MAX_EXTEND:
        raise WhatIfError(f"--extend {extend:g}: expected seconds from 0 to {MAX_EXTEND:g}")
    w = extract(logs)
    w.span += extend
    if extend:
        w.assumptions.append(f"the runs go on {extend:g} s past the log's end; what was live at "
                             "its end stays live in the recorded figures")
    if engine is not None or settings:
        _checked_settings(engine or w.engine, settings or {})  # a bad request fails before any run
    epum_records = logs["epum"].records("epum") if "epum" in logs else []
    recorded = outcome(epum_records, logs["pd"].records("pd"), w.t0, w.span)
    runs = {"recorded": recorded}
    policies = {"recorded": {"engine": w.engine, "settings": {}}}
    base = simulate(w, seed=seed, label="simulated")
    runs["simulated"] = _sim_outcome(base, w.span)
    policies["simulated"] = {"engine": base.engine, "settings": base.settings}
    notes = list(base.notes)
    if engine is not None or settings:
        other = simulate(w, engine, settings, seed=seed, label="what-if")
        runs["what-if"] = _sim_outcome(other, w.span)
        policies["what-if"] = {"engine": other.engine, "settings": other.settings}
        notes += [f"what-if: {n}" for n in other.notes]
    return {
        "span_s": round(w.span - extend, 3),
        "extend_s": extend,
        "seed": seed,
        "inputs": {"processes": len(w.processes), "kills": sum(p.killed_at is not None for p in w.processes),
                   "domain_changes": len(w.domains), "boot_times": len(w.boot_times),
                   "launches": w.launches, "launch_failures": w.launch_failures,
                   "node_losses": len(w.node_losses), "engine": w.engine, "slots": w.slots or 4},
        "policies": policies,
        "runs": {k: o.figures() for k, o in runs.items()},
        "series": {k: o.series for k, o in runs.items()},
        "assumptions": w.assumptions + notes,
    }


#: (label, how to read it from a run's figures) for the table, in order.
ROWS: tuple[tuple[str, Any], ...] = (
    ("VM-hours", lambda f: f["vm_hours"]),
    ("idle VM-hours", lambda f: f["idle_vm_hours"]),
    ("peak VMs", lambda f: f["peak_vms"]),
    ("processes finished", lambda f: f["processes_finished"]),
    ("processes failed", lambda f: f["processes_failed"]),
    ("processes unfinished", lambda f: f["processes_unfinished"]),
    ("process restarts", lambda f: f["restarts"]),
    ("queue wait median s", lambda f: f["queue_wait_s"]["median"]),
    ("queue wait p95 s", lambda f: f["queue_wait_s"]["p95"]),
    ("queue wait max s", lambda f: f["queue_wait_s"]["max"]),
    ("need -> running node median s", lambda f: f["need_to_running_s"]["median"]),
    ("need -> running node p95 s", lambda f: f["need_to_running_s"]["p95"]),
    ("need -> running node max s", lambda f: f["need_to_running_s"]["max"]),
    ("launches", lambda f: f["launches"]),
    ("terminations", lambda f: f["terminations"]),
)


def table(result: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (one per figure, a column per run) and the column names."""
    names = list(result["runs"])
    rows = []
    for label, get in ROWS:
        row: dict[str, Any] = {"figure": label}
        for name in names:
            value = get(result["runs"][name])
            row[name] = "-" if value is None else round(value, 3) if isinstance(value, float) else value
        rows.append(row)
    return rows, ["figure", *names]


def write_report(report_dir: Path, result: Mapping[str, Any], source: str = "") -> list[Path]:
    """``whatif.json``, ``whatif.md`` and two PNG plots (VMs and queue length over time, every
    run on one chart) in ``report_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    made = [report_dir / "whatif.json", report_dir / "whatif.md"]
    (made[0]).write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    plots = []
    for key, ylabel, title in (("vms", "live VMs", "VMs over time"),
                               ("queue", "queued processes", "Queue length over time")):
        fig, ax = plt.subplots(figsize=(8, 4))
        for name, series in result["series"].items():
            ax.plot(series["t"], series[key], label=f"{name} ({_policy(result['policies'][name])})")
        ax.set(xlabel="seconds from the log's start", ylabel=ylabel, title=title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = report_dir / f"whatif-{key}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        plots.append((title, path.name))
        made.append(path)
    rows, columns = table(result)
    lines = [f"# What-if of `{source}`" if source else "# What-if", "",
             f"{result['span_s']:.0f} s recorded (+{result['extend_s']:g} s); inputs: "
             + ", ".join(f"{k} {v}" for k, v in result["inputs"].items()), "",
             "| " + " | ".join(f"{c} ({_policy(result['policies'][c])})" if c in result["policies"] else c
                               for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    lines += ["", "## Assumptions", ""]
    lines += [f"- {a}" for a in result["assumptions"]] or ["- none"]
    lines.append("")
    for title, name in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    made[1].write_text("\n".join(lines))
    return made


def _policy(p: Mapping[str, Any]) -> str:
    sets = ", ".join(f"{k}={v}" for k, v in sorted(p["settings"].items()))
    return p["engine"] + (f" {sets}" if sets else "")





def _failed_exit(msg: str) -> bool:
    """Whether a PD move's message says the round's command exited non-zero."""
    word, _, code = msg.partition("exit code ")
    return not word and code.strip().lstrip("-").isdigit() and int(code) != 0
