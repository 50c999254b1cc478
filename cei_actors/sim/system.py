"""The whole CEI in one simulation: the real Provisioner, EPUM, PD, HA and EEAgent cores.

:class:`CEISystem` puts the three event-sourced cores on one :class:`~.kernel.Simulation`
(peer names ``provisioner``, ``epum``, ``pd``). The Provisioner's cloud work runs through its
own :class:`~cei_actors.provisioner.cloud.CloudWorker` over a
:class:`~cei_actors.provisioner.drivers.SimulatedCloudDriver` on the simulation's clock and a
seeded rng. The PD's engine ``default`` gets its nodes from EPUM (domain ``pd_domain_default``,
engine ``needy``), exactly as in the real system.

``SystemConfig(sites={...})`` gives several cloud sites, each its own simulated cloud (the
first is EPUM's default site, where the PD's nodes go; an ``overflow`` domain spreads over
them in rank order). The VM watcher polls every ``agent_poll`` seconds but looks only at what
changed: new VMs, VMs whose boot time passed, and the running ones after the cloud counted a
destroy, kill or vanish.

The EEAgent (:class:`SimAgent`) keeps the real agent's process table and rules
(:mod:`cei_actors.eeagent.logic`) and simulates only the unix processes: one agent per VM,
started when the simulated cloud's VM is RUNNING, reachable as ``eeagent:<node id>``,
heartbeating level-based to the PD, and gone with its VM. A process's behaviour is its
command, ``["sim", DURATION, FAIL_ROUNDS]``: it runs DURATION virtual seconds (``inf``: until
terminated) and exits 1 while its round is below FAIL_ROUNDS, else 0.

With ``SystemConfig(pds=2, ha=True)`` a second PD (``pd2``, its own EPUM domain
``pd2_domain_default``) and the HA service (``ha``, over both PDs) run too; each agent reports
to the PD whose domain its VM belongs to. HA's requests to a PD are ``Request``s whose
``Response`` comes back to it as a ``PDReply``, as in the actor shell.

:meth:`CEISystem.violations` checks the safety invariants (no VM doubled or leaked, no process
lost, at most one live copy of a process round, no live HA copy that HA does not hold (so
never more than N once its terminations are confirmed), every component's invariants and its
state equal to the replay of its log); :meth:`CEISystem.convergence` checks, after
:meth:`CEISystem.heal` and some quiet time, that everything settled.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import math
import random
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..eeagent import logic as core
from ..eeagent import states as ast
from ..eeagent.messages import (
    AgentHeartbeat,
    AgentRequests,
    CleanupProcess,
    DumpAgentState,
    LaunchProcess,
    TerminateProcess,
)
from ..eeagent.state import ProcessTable, Record
from ..epum.logic import EPUM
from ..epum.messages import AddDomain, AddDomainDefinition, ReconfigureDomain, RemoveDomain
from ..ha.actor import pd_reply
from ..ha.logic import HA
from ..ha.messages import CreateGroup, ReconfigureGroup, RemoveGroup
from ..pd import states as ps
from ..pd.logic import ProcessDispatcher
from ..pd.messages import KillProcess, ScheduleProcess
from ..pd.needs import need
from ..provisioner.cloud import CloudWorker
from ..provisioner.drivers import (
    SimulatedCloudDriver,
    driver_for_site,
    validate_credentials,
    validate_site,
)
from ..provisioner.logic import Provisioner
from ..provisioner.messages import AddDeployableType, AddSite
from ..provisioner.states import FINAL_STATES
from ..runtime.messages import ErrorReply, Ok
from .kernel import Faults, Simulation

__all__ = ["COMPONENTS", "ENGINE", "PD_DOMAIN", "CEISystem", "SimAgent", "SystemConfig", "sim_command"]

ENGINE = "default"
PD_DOMAIN = f"pd_domain_{ENGINE}"
COMPONENTS = ("provisioner", "epum", "pd")
_LIVE_VM = ("pending", "running")
_ACCOUNTED = ps.QUEUED | ps.PLACED | ps.TERMINAL
#: A simulated agent's SIGTERM-to-SIGKILL grace, in terminate_graces (commands obey SIGTERM).
KILL_GRACE_FACTOR = 10.0


def sim_command(duration: float, fail_rounds: int = 0) -> list[str]:
    """The command of a simulated process: runs ``duration`` s, fails its first rounds."""
    return ["sim", "inf" if math.isinf(duration) else repr(float(duration)), str(fail_rounds)]


@dataclass
class SystemConfig:
    """Sizes and timings of a simulated system (virtual seconds)."""

    slots: int = 4
    heartbeat_period: float = 5.0
    heartbeat_warning: float = 20.0
    heartbeat_missing: float = 40.0
    boot_delay: tuple[float, float] = (5.0, 20.0)
    terminate_grace: float = 1.0  # agent: TERMINATING -> TERMINATED
    agent_poll: float = 1.0  # how often VMs are looked at for boots and deaths
    maximum_vms: int | None = None
    query_interval: float = 10.0
    disappear_grace: float = 30.0
    create_concurrency: int = 20
    terminator_concurrency: int = 10
    dispatch_retry_seconds: float = 10.0
    min_time_between_starts: float = 1.0
    decider_interval: float = 5.0
    needs_interval: float = 1.0
    work_latency: tuple[float, float] = (0.01, 0.5)
    latency: tuple[float, float] = (0.001, 0.05)
    leak_grace: float = 120.0  # a live VM this old must be owned (when the Provisioner was up)
    pds: int = 1  # PDs: "pd", then "pd2", "pd3" ... each with its own EPUM domain
    ha: bool = False  # run the HA service over every PD
    ha_poll: float = 5.0  # HA's poll_interval
    #: cloud sites: name -> simulated cloud options (``boot_delay``, ``max_instances``,
    #: ``create_failure_rate``...); None: one site ``local`` booting in ``boot_delay``
    sites: dict[str, dict[str, Any]] | None = None
    monitor_interval: float | None = None  # the PD's heartbeat monitor (None: its default)
    needs_refresh: float | None = None  # the PD's unconditional need refresh (None: default)
    extra: dict[str, Any] = field(default_factory=dict)  # per-component config overrides
    #: the EPUM definition the PDs' domains are made from (None: engine ``needy``)
    pd_definition: dict[str, Any] | None = None


class SimAgent:
    """An EEAgent on virtual time: the real agent's process table and rules
    (:mod:`cei_actors.eeagent.logic`), simulated commands instead of unix processes,
    level-based heartbeats to the PD, nothing left when its VM dies.

    A started command gets a simulated pid (the system's launch count). SIGTERM ends it
    ``terminate_grace`` later (as a death by SIGTERM), SIGKILL at once; the agent's own
    SIGTERM-to-SIGKILL grace is longer, so simulated commands always obey SIGTERM."""

    def __init__(self, system: CEISystem, node_id: str) -> None:
        self.system = system
        self.sim = system.sim
        self.node_id = node_id
        self.agent_id = node_id
        self.name = f"eeagent:{node_id}"
        self.slots = system.config.slots
        self.period = system.config.heartbeat_period
        self.grace = system.config.terminate_grace  # SIGTERM to the command's end
        self.kill_grace = KILL_GRACE_FACTOR * self.grace  # the agent's SIGTERM-to-SIGKILL grace
        self.table = ProcessTable()
        self.alive = False
        self.last_sent = -math.inf
        self.pd = system.pd_of(node_id)  # the PD it reports to
        self.lane = self.sim.lane()  # its ticks and its commands' ends
        self.clock = self.sim.clock  # read as ``clock.t``: no call per look (SIM22)

    @property
    def records(self) -> dict[tuple[str, int], Record]:
        """The process table's records by (upid, round)."""
        return self.table.records

    # ---- lifecycle

    def boot(self) -> None:
        self.alive = True
        self.sim.add_peer(self.name, self.receive)
        self.heartbeat()
        self._tick()

    def die(self) -> None:
        """The VM is gone: so are the agent and every process it ran."""
        self.alive = False
        self.table = ProcessTable()
        self.sim.remove_peer(self.name)

    def _tick(self) -> None:
        if not self.alive:
            return
        now = self.clock.t
        if now - self.last_sent >= self.period:
            self.heartbeat()
        self.lane.schedule(max(0.0, self.last_sent + self.period - now), self._tick)

    # ---- messages

    def receive(self, message: Any, sender: str | None) -> None:
        if not self.alive or isinstance(message, Ok | ErrorReply):
            return
        requests = message.requests if isinstance(message, AgentRequests) else [message]
        now = self.clock.t
        changed = False
        for req in requests:
            if isinstance(req, LaunchProcess):
                launched = core.launch(
                    self.table, req.upid, req.round, list(req.command), req.env, req.cwd,
                    slots=self.slots, grace=self.kill_grace, now=now, stamp=now,
                )
                self._apply(launched.actions)
                changed |= launched.new
            elif isinstance(req, TerminateProcess):
                _, done, actions = core.terminate(
                    self.table, (req.upid, req.round), self.kill_grace, now=now, stamp=now
                )
                self._apply(actions)
                changed |= done
            elif isinstance(req, CleanupProcess):
                core.cleanup(self.table, (req.upid, req.round))
            elif isinstance(req, DumpAgentState):
                changed = True
        if changed:
            self.heartbeat()

    def heartbeat(self) -> None:
        now = self.clock.t
        self.last_sent = now
        procs = self.table.rows()  # the table's own rows: the PD only reads them (SIM8)
        self.sim.tell(self.pd, AgentHeartbeat(self.agent_id, self.node_id, now, procs),
                      sender=self.name, trusted=True)

    # ---- the core's actions on virtual time

    def _apply(self, actions: list[core.Action]) -> None:
        for action in actions:
            rec = action.record
            if isinstance(action, core.Start):
                self._start(rec)
            elif isinstance(action, core.Signal):
                delay = self.grace if action.sig == signal.SIGTERM else 0.0
                self._end_after(delay, rec.key, rec.pid, -int(action.sig))

    def _start(self, rec: Record) -> None:
        now = self.clock.t
        if not _valid(rec.command):
            core.start_failed(self.table, rec, "not a simulated command", now)
            return
        self.system.launches += 1
        core.started(self.table, rec, self.system.launches, None, now)
        duration = float(rec.command[1])
        if math.isfinite(duration):
            self._end_after(duration, rec.key, rec.pid, 1 if rec.round < int(rec.command[2]) else 0)

    def _end_after(self, delay: float, key: tuple[str, int], pid: int | None, code: int) -> None:
        def end() -> None:
            if self.alive:
                self.exited(key, pid, code)

        self.lane.schedule(delay, end)

    def exited(self, key: tuple[str, int], pid: int | None, code: int) -> bool:
        """Process ``pid`` of ``key`` ended with ``code`` (an exit of no live record is
        ignored); True if it settled a record (a heartbeat went out)."""
        rec, actions = core.exited(self.table, key, pid, code, self.clock.t)
        if rec is None:
            return False
        self._apply(actions)
        self.heartbeat()
        return True

    def live_keys(self) -> list[tuple[str, int]]:
        """The keys of the live records (PENDING, RUNNING, TERMINATING), in table order;
        ``ValueError`` for a record in an unknown state."""
        is_live = ast.is_live
        return [k for k, r in self.table.records.items() if is_live(r.state)]


class _NoProcesses:
    processes: dict[str, Any] = {}


ps_empty = _NoProcesses()


def _valid(command: tuple[str, ...]) -> bool:
    if len(command) != 3 or command[0] != "sim":
        return False
    try:
        float(command[1])
        int(command[2])
    except ValueError:
        return False
    return True


class CEISystem:
    """Provisioner, EPUM, PD and simulated EEAgents on one deterministic simulation."""

    def __init__(self, seed: int = 0, config: SystemConfig | None = None,
                 faults: Faults | None = None) -> None:
        self.seed = seed
        self.config = cfg = config or SystemConfig()
        self.sim = Simulation(seed, faults or Faults(latency=cfg.latency, work_latency=cfg.work_latency))
        self.start = self.sim.clock.now()
        self.cloud: SimulatedCloudDriver | None = None  # the first site's cloud
        self.clouds: dict[str, SimulatedCloudDriver] = {}  # site -> its cloud, once used
        self._cloud_marks: dict[str, tuple[int, int, int, int]] = {}  # death counters seen
        self._boot_heap: list[tuple[float, int, str, Any]] = []  # (boot_at, n, site, VM)
        self._vm_seen_by: dict[str, int] = {}
        #: called every ``progress_every`` steps of :meth:`run_for` (e.g. a progress bar)
        self.progress: Callable[[CEISystem], None] | None = None
        self.progress_every = 2000
        self.cloud_settings: dict[str, dict[str, Any]] = {}  # site -> settings
        self.worker = CloudWorker(clock=self.sim.clock, rng=random.Random(seed * 7919 + 1),
                                  driver_factory=self._make_driver)
        self.agents: dict[str, SimAgent] = {}
        self.dead_agents = 0
        self.launches = 0  # processes started on agents (every round)
        self.peak_vms = 0  # most live VMs seen at once (sampled every ``agent_poll``)
        self._seq_boot = 0
        self._running: dict[str, tuple[str, Any]] = {}  # node id -> (site, VM) of its agent
        self.up_since: dict[str, float] = {}
        self.faults: collections.Counter[str] = collections.Counter()
        self.checks = 0
        # what clients were told
        self.scheduled: dict[str, dict[str, Any]] = {}  # upid -> {duration, fail_rounds}
        self.killed: set[str] = set()
        self.domains: dict[str, int] = {}  # extra preserve_n domains -> target
        self.removed: set[str] = set()
        self.pd_names = ["pd", *(f"pd{i}" for i in range(2, cfg.pds + 1))]
        self.components = (*COMPONENTS, *self.pd_names[1:], *(("ha",) if cfg.ha else ()))
        self._node_pd: dict[str, str] = {}  # node id -> its PD (from EPUM's instances)
        self.groups: dict[str, int] = {}  # HA groups -> target, as clients asked
        self.removed_groups: set[str] = set()
        self._build()

    # ---- set-up

    def _make_driver(self, definition: Mapping[str, Any], creds: Mapping[str, Any] | None) -> Any:
        site = str(definition.get("region", "local"))
        n = list(self.site_names).index(site) if site in self.site_names else 0
        driver = driver_for_site(definition, creds, clock=self.sim.clock,
                                 rng=random.Random(self.seed * 104729 + 3 + 7 * n))
        assert isinstance(driver, SimulatedCloudDriver)
        for key, value in self.cloud_settings.get(site, {}).items():
            setattr(driver, key, value)
        driver.destroy_requests = []  # noted for the VM watcher (see _watch)
        self.clouds[site] = driver
        if n == 0:
            self.cloud = driver
        return driver

    @property
    def site_names(self) -> list[str]:
        """The cloud sites, the default (PD) site first."""
        return list(self.config.sites or {"local": {}})

    def _build(self) -> None:
        cfg, sim, extra = self.config, self.sim, self.config.extra
        prov = Provisioner.from_config(
            {"query_interval": cfg.query_interval, "disappear_grace": cfg.disappear_grace,
             "create_concurrency": cfg.create_concurrency,
             "terminator_concurrency": cfg.terminator_concurrency, "subscribers": ["epum"],
             **extra.get("provisioner", {})},
            site_validator=validate_site, credentials_validator=validate_credentials,
        )
        sim.add("provisioner", prov, self.worker.handlers())
        for i, (site, options) in enumerate((cfg.sites or {"local": {}}).items()):
            self._ok("provisioner", AddSite(site, {
                "type": "sim", "seed": self.seed, "boot_delay": list(cfg.boot_delay),
                "terminated_linger": 60.0, **options, "region": site,
                "id_prefix": f"i-{i}" if i else "i-"}))
        self._ok("provisioner", AddDeployableType("eeagent", {
            "mappings": {site: {"iaas_image": "ami-sim-eeagent", "iaas_allocation": "t1.micro"}
                         for site in self.site_names},
            "contextualization": {"method": "userdata", "userdata": "cei node"}}))
        sim.add("epum", EPUM({"decider_interval": cfg.decider_interval,
                              "default_site": self.site_names[0], **extra.get("epum", {})}))
        self._ok("epum", AddDomainDefinition("pd_default", cfg.pd_definition or {
            "general": {"engine_class": "needy"}, "engine_conf": {}, "health": {}}))
        self._ok("epum", AddDomainDefinition("plain", {
            "general": {"engine_class": "preserve_n"}, "engine_conf": {"preserve_n": 0},
            "health": {}}))
        self._ok("epum", AddDomainDefinition("overflow", {
            "general": {"engine_class": "overflow"},
            "engine_conf": {"preserve_n": 0, "clouds": [
                {"site_name": site, "size": 0, "rank": i + 1}
                for i, site in enumerate(self.site_names)]},
            "health": {}}))
        engine: dict[str, Any] = {
            "slots": cfg.slots, "heartbeat_period": cfg.heartbeat_period,
            "heartbeat_warning": cfg.heartbeat_warning, "heartbeat_missing": cfg.heartbeat_missing,
        }
        if cfg.maximum_vms is not None:
            engine["maximum_vms"] = cfg.maximum_vms
        for name in self.pd_names:
            sim.add(name, ProcessDispatcher({
                "engines": {ENGINE: engine},
                "dispatch_retry_seconds": cfg.dispatch_retry_seconds,
                "restart_throttling_config": {"minimum_time_between_starts": cfg.min_time_between_starts},
                "needs_interval": cfg.needs_interval, "self_name": name,
                **({"monitor_interval": cfg.monitor_interval} if cfg.monitor_interval else {}),
                **({"needs_refresh": cfg.needs_refresh} if cfg.needs_refresh is not None else {}),
                "domain_prefix": f"{name}_domain_", **extra.get("pd", {}), **extra.get(name, {}),
            }))
        if cfg.ha:
            sim.add("ha", HA({"pds": list(self.pd_names), "poll_interval": cfg.ha_poll,
                              **extra.get("ha", {})}), peer_response=pd_reply)
        now = sim.clock.now()
        self.up_since = dict.fromkeys(self.components, now)
        sim.schedule(0.0, self._watch)

    def _ok(self, name: str, message: Any) -> Any:
        reply = self.sim.call(name, message)
        if not isinstance(reply, Ok):
            raise RuntimeError(f"{name} refused {type(message).__name__}: {reply}")
        return reply.value

    # ---- the VM watcher: boots and kills agents

    def _watch(self) -> None:
        """Boot an agent on each VM that came up, stop the agent of each VM that went.

        Cheap per poll: new VMs are taken from where the last poll stopped, booting VMs wait
        in a heap ordered by boot time, and the running ones are looked at only when the
        cloud counted a destroy, kill or vanish since the last poll."""
        now = self.sim.clock.now()
        live = 0
        for site, cloud in self.clouds.items():
            with cloud._lock:  # the simulator's view of the cloud's insides, not an API call
                cloud._advance(now)
                vms = cloud._vms
                seen = self._vm_seen_by.get(site, 0)
                if len(vms) > seen:
                    for vm in list(vms.values())[seen:]:
                        self._seq_boot += 1
                        heapq.heappush(self._boot_heap, (vm.boot_at, self._seq_boot, site, vm))
                    self._vm_seen_by[site] = len(vms)
                live += cloud._live
                mark = (cloud._vms_destroyed, cloud._destroys_attempted, cloud._killed,
                        cloud._vanished)
                old = self._cloud_marks.get(site)
                asked = cloud.destroy_requests if cloud.destroy_requests is not None else []
                if mark != old:
                    self._cloud_marks[site] = mark
                    if old is not None and mark[2:] == old[2:]:  # destroys only: of those asked
                        self._reap_agents(site, [cloud._vms.get(node_id) for node_id in asked])
                    else:
                        self._reap_agents(site)
                asked.clear()
        heap = self._boot_heap
        while heap and heap[0][0] <= now:
            _, _, site, vm = heapq.heappop(heap)
            if vm.status == "running" and self._running.get(vm.name, ("", None))[1] is not vm:
                self._boot_agent(vm, site)
        self.peak_vms = max(self.peak_vms, live)
        self.sim.schedule(self.config.agent_poll, self._watch)

    def _reap_agents(self, site: str, vms: list[Any] | None = None) -> None:
        """Stop the agent of each VM of ``site`` that no longer runs: of every VM with an
        agent, or only of ``vms`` (those asked to be destroyed since the last poll, when the
        cloud counted nothing else: no other VM can have stopped running)."""
        if vms is None:
            entries = list(self._running.items())
        else:
            entries = [(vm.name, self._running[vm.name]) for vm in vms
                       if vm is not None and self._running.get(vm.name, ("", None))[1] is vm]
        for nid, (vm_site, vm) in entries:
            if vm_site == site and vm.status != "running" and nid in self._running:
                del self._running[nid]
                agent = self.agents.pop(nid, None)
                if agent is not None:
                    agent.die()
                    self.dead_agents += 1

    def pd_of(self, node_id: str) -> str:
        """The PD a node belongs to: the owner of its EPUM domain (``<pd>_domain_<engine>``)."""
        pd = self._node_pd.get(node_id)
        if pd is None:
            epum = self.sim.state("epum")
            inst = epum.instances.get(node_id) if epum is not None else None
            if inst is not None:
                pd = next((n for n in self.pd_names if inst.domain_id.startswith(f"{n}_domain_")), "pd")
                self._node_pd[node_id] = pd
        return pd or "pd"

    def _boot_agent(self, vm: Any, site: str) -> None:
        nid = vm.name
        old = self.agents.pop(nid, None)
        if old is not None:  # a second VM for one node: the invariant reports it
            old.die()
        agent = SimAgent(self, nid)
        self.agents[nid] = agent
        self._running[nid] = (site, vm)
        agent.boot()

    # ---- client operations (each returns the reply)

    def schedule(self, upid: str, duration: float, fail_rounds: int = 0,
                 restart_mode: str | None = None, queueing_mode: str | None = None,
                 constraints: dict[str, Any] | None = None, node_exclusive: str | None = None) -> Any:
        return self.schedule_many([{
            "upid": upid, "duration": duration, "fail_rounds": fail_rounds,
            "restart_mode": restart_mode, "queueing_mode": queueing_mode,
            "constraints": constraints, "node_exclusive": node_exclusive}])[0]

    def schedule_many(self, processes: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Schedule processes that clients ask for at the same instant (each a mapping of
        :meth:`schedule`'s arguments): the PD takes them as one mailbox drain
        (:meth:`~.kernel.Simulation.call_many`, decision SIM15); the replies, in order."""
        msgs = [ScheduleProcess(p["upid"], command=sim_command(p["duration"], p.get("fail_rounds", 0)),
                                restart_mode=p.get("restart_mode"), queueing_mode=p.get("queueing_mode"),
                                constraints=p.get("constraints"), node_exclusive=p.get("node_exclusive"))
                for p in processes]
        replies = self.sim.call_many("pd", msgs)
        for p, reply in zip(processes, replies, strict=True):
            if isinstance(reply, Ok):
                self.scheduled[p["upid"]] = {"duration": p["duration"], "fail_rounds": p.get("fail_rounds", 0)}
                self.killed.discard(p["upid"])
        return replies

    def kill_process(self, upid: str) -> Any:
        reply = self.sim.call("pd", KillProcess(upid))
        if isinstance(reply, Ok):
            self.killed.add(upid)
        return reply

    def add_domain(self, domain_id: str, n: int, definition: str = "plain",
                   engine_conf: Mapping[str, Any] | None = None) -> Any:
        """An EPUM domain keeping ``n`` VMs (definition ``plain``: preserve_n on the first
        site; ``overflow``: the sites in rank order, ``engine_conf`` may give ``clouds``)."""
        conf = {**(engine_conf or {}), "preserve_n": n}
        reply = self.sim.call("epum", AddDomain(domain_id, definition, {"engine_conf": conf}))
        if isinstance(reply, Ok):
            self.domains[domain_id] = n
            self.removed.discard(domain_id)
        return reply

    def reconfigure_domain(self, domain_id: str, n: int) -> Any:
        reply = self.sim.call("epum", ReconfigureDomain(domain_id, {"engine_conf": {"preserve_n": n}}))
        if isinstance(reply, Ok) and domain_id in self.domains:
            self.domains[domain_id] = n
        return reply

    def remove_domain(self, domain_id: str) -> Any:
        reply = self.sim.call("epum", RemoveDomain(domain_id))
        if isinstance(reply, Ok):
            self.domains.pop(domain_id, None)
            self.removed.add(domain_id)
        return reply

    def create_group(self, name: str, n: int, duration: float = math.inf, fail_rounds: int = 0) -> Any:
        """An HA group keeping ``n`` copies of a simulated process (never restarted by the PD)."""
        reply = self.sim.call("ha", CreateGroup(name, "npreserving", {"preserve_n": n}, {
            "command": sim_command(duration, fail_rounds), "restart_mode": "never"}))
        if isinstance(reply, Ok):
            self.groups[name] = n
            self.removed_groups.discard(name)
        return reply

    def reconfigure_group(self, name: str, n: int) -> Any:
        reply = self.sim.call("ha", ReconfigureGroup(name, parameters={"preserve_n": n}))
        if isinstance(reply, Ok):
            self.groups[name] = n
        return reply

    def remove_group(self, name: str) -> Any:
        reply = self.sim.call("ha", RemoveGroup(name))
        if isinstance(reply, Ok):
            self.groups.pop(name, None)
            self.removed_groups.add(name)
        return reply

    def kill_copy(self, index: int) -> str | None:
        """A live HA copy's process dies on its agent (exit 1); its upid."""
        live = sorted((u, r, nid) for nid, a in self.agents.items() for (u, r) in a.live_keys()
                      if any(u.startswith(f"{g}-") for g in self.groups))
        if not live:
            return None
        upid, rnd, nid = live[index % len(live)]
        agent = self.agents[nid]
        rec = agent.records[(upid, rnd)]
        if rec.state == ast.RUNNING and agent.exited((upid, rnd), rec.pid, -signal.SIGKILL):
            self.faults["copy_killed"] += 1
        return upid

    # ---- faults

    def kill_vm(self, index: int, vanish: bool = False) -> str | None:
        """Kill (or make vanish) the ``index``-th live VM, out of band; its node id."""
        live = [vm for vm in self.cloud_vms() if vm.status in _LIVE_VM]
        if not live:
            return None
        vm = live[index % len(live)]
        cloud = self._cloud_of(vm)
        if vanish:
            cloud.vanish(vm.id)
            self.faults["vm_vanished"] += 1
        else:
            cloud.kill(vm.id)
            self.faults["vm_killed"] += 1
        return str(vm.name)

    def crash(self, name: str) -> None:
        if self.sim.nodes[name].up:
            self.sim.crash(name)
            self.faults[f"crash_{name}"] += 1

    def crash_mid_message(self, name: str, persisted: bool = True) -> None:
        """Crash ``name`` inside its next message (after or before its append, before its
        effects): the window a real leader can die in."""
        self.sim.crash_on_next(name, persisted)
        self.faults[f"crash_{name}_mid_message"] += 1

    def restart(self, name: str) -> None:
        """Fail over: a new runner recovers from the component's log."""
        if self.sim.nodes[name].up:
            self.sim.crash(name)
            self.faults[f"crash_{name}"] += 1
        self.sim.restart(name)
        self.up_since[name] = self.sim.clock.now()

    def _cloud_of(self, vm: Any) -> SimulatedCloudDriver:
        return next(c for c in self.clouds.values() if c._vms.get(vm.id) is vm)

    def set_cloud(self, site: str | None = None, **settings: Any) -> None:
        """Cloud faults at ``site`` (None: every site): ``max_instances``,
        ``create_failure_rate``, ``lose_reply_rate``..."""
        for name in ([site] if site is not None else self.site_names):
            self.cloud_settings.setdefault(name, {}).update(settings)
            cloud = self.clouds.get(name)
            if cloud is not None:
                for key, value in settings.items():
                    setattr(cloud, key, value)
        for key, value in settings.items():
            if value:
                self.faults[f"cloud_{key}"] += 1

    def set_network(self, drop_rate: float = 0.0, duplicate_rate: float = 0.0,
                    latency: tuple[float, float] | None = None) -> None:
        f = self.sim.faults
        f.drop_rate, f.duplicate_rate = drop_rate, duplicate_rate
        f.latency = latency or self.config.latency
        if drop_rate or duplicate_rate:
            self.faults["network"] += 1

    def heal(self) -> None:
        """Stop every fault: network clean, cloud without failures or quota (beyond a site's
        configured one), all components up."""
        self.set_network()
        for site in self.site_names:
            quota = (self.config.sites or {}).get(site, {}).get("max_instances")
            self.set_cloud(site, max_instances=quota, create_failure_rate=0.0,
                           lose_reply_rate=0.0, timeout_rate=0.0, kill_rate=0.0, vanish_rate=0.0)
        self.sim.disarm()
        for name in self.components:
            if not self.sim.nodes[name].up:
                self.restart(name)

    # ---- driving

    def run_for(self, seconds: float, check_every: int = 0, replay: bool = True) -> list[str]:
        """Run ``seconds`` of virtual time; with ``check_every`` > 0, check the invariants
        every that many steps (and at the end); returns the first violations found."""
        sim, end = self.sim, self.sim.clock.now() + seconds
        n = 0
        every = [k for k in (self.progress_every if self.progress is not None else 0, check_every) if k > 0]
        while True:
            chunk = min(k - n % k for k in every) if every else 1 << 62
            done = sim.run_steps(end, chunk)
            n += done
            if done < chunk:
                break
            if self.progress is not None and n % self.progress_every == 0:
                self.progress(self)
            if check_every and n % check_every == 0:
                if not replay:  # the final check's replay folds ahead meanwhile (SIM20)
                    sim.warm_replay()
                problems = self.violations(replay=replay)
                if problems:
                    return problems
        sim.clock.t = max(sim.clock.t, end)
        if check_every and not replay:
            sim.warm_replay()
        return self.violations(replay=replay) if check_every else []

    # ---- views

    def cloud_vms(self) -> list[Any]:
        out: list[Any] = []
        for cloud in self.clouds.values():
            with cloud._lock:
                cloud._advance(self.sim.clock.now())
                out += cloud._vms.values()
        return out

    def _steady(self, *names: str) -> bool:
        """Every named component is up and has been for ``leak_grace`` seconds."""
        now, grace = self.sim.clock.now(), self.config.leak_grace
        return all(self.sim.nodes[n].up and now - self.up_since[n] >= grace for n in names)

    # ---- invariants

    def violations(self, replay: bool = True) -> list[str]:
        """Every safety invariant broken now (empty: sound)."""
        self.checks += 1
        out: list[str] = []
        now, grace = self.sim.clock.now(), self.config.leak_grace
        vms = self.cloud_vms()
        per_node = collections.Counter(vm.name for vm in vms if vm.status in _LIVE_VM)
        out += [f"node {n} has {c} live VMs" for n, c in per_node.items() if c > 1]
        prov, epum, pd = (self.sim.state(n) for n in COMPONENTS)
        if prov is not None and self._steady("provisioner"):
            for vm in vms:
                if vm.status not in _LIVE_VM or now - vm.created_at < grace:
                    continue
                nid = prov.by_token.get(vm.client_token)
                node = prov.nodes.get(nid) if nid else None
                if node is None or node.state in FINAL_STATES or node.iaas_id != vm.id:
                    out.append(f"VM {vm.id} (node {vm.name}) leaked: "
                               f"{'unknown' if node is None else node.state} to the provisioner")
                elif (epum is not None and self._steady("provisioner", "epum")
                      and node.state != "TERMINATING"):
                    inst = epum.instances.get(nid)
                    if inst is None or inst.state in ("TERMINATED", "FAILED", "REJECTED"):
                        out.append(f"VM {vm.id} (node {nid}) leaked: EPUM has "
                                   f"{'no instance' if inst is None else inst.state}")
        if pd is not None and self._processes_unsound(pd):
            for upid in self.scheduled:
                p = pd.processes.get(upid)
                if p is None and upid in pd.tombstones:
                    continue  # finished, and forgotten after the PD's retention (PD10)
                if p is None:
                    out.append(f"process {upid} lost: not in the PD")
                elif p.state not in _ACCOUNTED:
                    out.append(f"process {upid} is {p.state}: neither queued, placed nor finished")
                elif p.state in ps.PLACED and p.resource_id not in pd.resources:
                    out.append(f"process {upid} {p.state} on unknown resource {p.resource_id}")
        live = [(nid, agent, agent.live_keys()) for nid, agent in self.agents.items()]
        pds = {name: self.sim.state(name) for name in self.pd_names}
        for nid, agent, keys in live:
            apd = pds[agent.pd] if agent.pd in pds else self.sim.state(agent.pd)
            if apd is None:
                continue
            procs = apd.processes
            for upid, rnd in keys:
                p = procs.get(upid)
                if p is not None and p.round >= rnd:
                    continue
                stone = apd.tombstones.get(upid) if p is None else None
                last = p.round if p is not None else (stone.record["round"] if stone is not None else -1)
                if last < rnd:
                    out.append(f"agent {nid} runs {upid} round {rnd}, which {agent.pd} never placed")
        ha = self.sim.state("ha") if self.config.ha else None
        every = [key for _, _, keys in live for key in keys]
        if ha is not None or len(set(every)) != len(every):  # else no key is live twice
            copies: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
            for nid, _, keys in live:
                for key in keys:
                    copies[key].append(nid)
            out += [f"process {u} round {r} live on {len(ns)} agents: {sorted(ns)}"
                    for (u, r), ns in copies.items() if len(ns) > 1]
        if ha is not None:
            # none forgotten, none doubled: every live copy on an agent is one HA holds, on
            # the PD HA placed it with; so at most N run once the terminations are confirmed
            for (upid, _rnd), ns in copies.items():
                name = next((g for g in (*self.groups, *self.removed_groups) if upid.startswith(f"{g}-")), None)
                if name is None:
                    continue
                found = ha.copy_of(upid)
                if found is None:
                    out.append(f"HA copy {upid} runs on {sorted(ns)} but HA does not hold it")
                elif any(self.agents[n].pd != found[1].pd for n in ns):
                    out.append(f"HA copy {upid} runs under another PD than {found[1].pd}")
        if replay:
            out += self.sim.check()
        return out

    def _processes_unsound(self, pd: Any) -> bool:
        """False when every scheduled process is sound (in the PD, queued, placed on a known
        resource or finished, or forgotten with a tombstone), found with set operations and
        one pass over the PD's processes; True sends :meth:`violations` to its exact,
        ordered pass over the scheduled ones (decision SIM13)."""
        procs, resources = pd.processes, pd.resources
        gone = self.scheduled.keys() - procs.keys()
        if gone:
            gone.difference_update(pd.tombstones)  # C-level: no tombstone lookup per upid
            if gone:
                return True
        placed, accounted = ps.PLACED, _ACCOUNTED
        return any(p.state not in accounted or (p.state in placed and p.resource_id not in resources)
                   for p in procs.values())

    def pd_need(self, name: str = "pd") -> int | None:
        pd = self.sim.state(name)
        if pd is None:
            return None
        spec = self.sim.nodes[name].component.cfg.engines[ENGINE]  # type: ignore[attr-defined]
        return need(spec, pd.live_count[ENGINE], pd.occupied[ENGINE])

    def convergence(self) -> list[str]:
        """What has not settled (call after :meth:`heal` and enough quiet time)."""
        out: list[str] = []
        prov, epum, pd = (self.sim.state(n) for n in COMPONENTS)
        if prov is None or epum is None or pd is None:
            return ["a component is down"]
        for upid, spec in self.scheduled.items():
            p = pd.processes.get(upid)
            if p is None:  # finished and forgotten after the PD's retention (decision PD10)
                stone = pd.tombstones.get(upid)
                if stone is None or math.isinf(spec["duration"]):
                    out.append(f"process {upid} is unknown to the PD")
                continue
            if upid in self.killed:
                if p.state not in (ps.TERMINATED, ps.EXITED, ps.FAILED, ps.REJECTED):
                    out.append(f"killed process {upid} is {p.state}")
            elif math.isinf(spec["duration"]):
                if p.state != ps.RUNNING:
                    out.append(f"service {upid} is {p.state}, not RUNNING")
                else:
                    agent = self.agents.get(p.resource_id or "")
                    rec = agent.records.get((upid, p.round)) if agent else None
                    if rec is None or rec.state != ast.RUNNING:
                        out.append(f"service {upid} round {p.round} does not run on {p.resource_id}")
            elif p.state not in (ps.EXITED, ps.FAILED, ps.TERMINATED, ps.REJECTED):
                out.append(f"process {upid} is {p.state} (round {p.round}), not finished")
        for nid, agent in self.agents.items():
            apd = self.sim.state(agent.pd)
            for upid, rnd in agent.live_keys():
                p = apd.processes.get(upid) if apd is not None else None
                if p is None or p.round != rnd or p.resource_id != nid or p.state not in ps.PLACED:
                    out.append(f"zombie process {upid} round {rnd} on agent {nid}")
        wanted = 0
        for name in self.pd_names:
            npd = self.sim.state(name)
            domain_id = f"{name}_domain_{ENGINE}"
            dom = epum.domain("default", domain_id)
            want = self.pd_need(name)
            wanted += want or 0
            if npd is None:
                out.append(f"{name} is down")
            elif dom is None:
                if want:
                    out.append(f"EPUM has no domain {domain_id}")
            else:
                running = dom.count(["RUNNING"])
                if dom.engine_conf.get("preserve_n") != want or running != want:
                    out.append(f"{domain_id}: {name} needs {want}, EPUM wants "
                               f"{dom.engine_conf.get('preserve_n')}, {running} RUNNING")
                pd_nodes = set(npd.engine_nodes.get(ENGINE, {}))
                running_ids = set(dom.by_state.get("RUNNING", ()))
                if pd_nodes != running_ids:
                    out.append(f"{name} nodes {sorted(pd_nodes ^ running_ids)} differ from EPUM's")
        out += self._ha_convergence()
        for did, n in self.domains.items():
            d = epum.domain("default", did)
            if d is None or d.count(["RUNNING"]) != n:
                out.append(f"domain {did}: want {n} RUNNING, have "
                           f"{None if d is None else d.count(['RUNNING'])}")
        for did in self.removed:
            if epum.domain("default", did) is not None:
                out.append(f"removed domain {did} still exists")
        live_vms = [vm for vm in self.cloud_vms() if vm.status in _LIVE_VM]
        expected = sum(self.domains.values()) + wanted
        if len(live_vms) != expected:
            out.append(f"{len(live_vms)} live VMs, expected {expected}")
        for vm in live_vms:
            nid = prov.by_token.get(vm.client_token)
            node = prov.nodes.get(nid) if nid else None
            if node is None or node.state != "RUNNING":
                out.append(f"VM {vm.id} is a zombie ({None if node is None else node.state})")
        return out

    def _ha_convergence(self) -> list[str]:
        """Each HA group STEADY with exactly N copies RUNNING where HA placed them."""
        if not self.config.ha:
            return []
        ha = self.sim.state("ha")
        if ha is None:
            return ["ha is down"]
        out: list[str] = []
        comp = self.sim.nodes["ha"].component
        for name, n in self.groups.items():
            g = ha.groups.get(name)
            if g is None:
                out.append(f"HA group {name} is missing")
                continue
            running = []
            for c in g.copies.values():
                p = (self.sim.state(c.pd) or ps_empty).processes.get(c.upid)
                if p is not None and p.state == ps.RUNNING and not c.terminating:
                    running.append(c)
            status, why = comp.status(ha, g)  # type: ignore[attr-defined]
            if len(g.copies) != n or len(running) != n or status != "STEADY":
                out.append(f"HA group {name}: want {n} RUNNING, {len(running)} of {len(g.copies)} "
                           f"copies are; HA says {status} ({why})")
            live = {u for a in self.agents.values() for u, _ in a.live_keys() if u.startswith(f"{name}-")}
            if live != {c.upid for c in g.copies.values()}:
                out.append(f"HA group {name}: copies {sorted(g.copies)} but live on agents {sorted(live)}")
        for name in self.removed_groups:
            if name in ha.groups:
                out.append(f"removed HA group {name} still exists")
        return out

    def ha_spread(self) -> dict[str, dict[str, int]]:
        """Per HA group, how many of its copies each PD holds."""
        ha = self.sim.state("ha") if self.config.ha else None
        if ha is None:
            return {}
        return {name: dict(sorted(collections.Counter(c.pd for c in g.copies.values()).items()))
                for name, g in sorted(ha.groups.items())}

    # ---- reporting

    def summary(self) -> dict[str, Any]:
        pd = self.sim.state("pd")
        states: collections.Counter[str] = collections.Counter()
        if pd is not None:
            states.update(pd.processes[u].state for u in self.scheduled if u in pd.processes)
        all_stats = [c.stats() for c in self.clouds.values()]
        return {
            "seed": self.seed,
            "virtual_time": round(self.sim.clock.now() - self.start, 6),
            "steps": self.sim.steps,
            "messages_delivered": self.sim.delivered,
            "messages_dropped": self.sim.dropped,
            "processes_scheduled": len(self.scheduled),
            "processes_finished": sum(states[s] for s in (ps.EXITED, ps.FAILED, ps.TERMINATED, ps.REJECTED)),
            "process_states": dict(sorted(states.items())),
            "agent_launches": self.launches,
            "vms_started": sum(st.vms_created for st in all_stats),
            "vms_live": sum(st.live for st in all_stats),
            "vms_peak": self.peak_vms,
            "agents_live": len(self.agents),
            "agents_died": self.dead_agents,
            "faults_injected": dict(sorted(self.faults.items())),
            "invariant_checks": self.checks,
            "log_heads": {n: self.sim.nodes[n].log.head(self.sim.nodes[n].component.stream)
                          for n in self.components},
            **({"ha_copies": self.ha_spread()} if self.config.ha else {}),
            "state_digest": self.digest(),
        }

    def digest(self) -> str:
        """A short hash of every running component's state (equal runs, equal digests): of
        each snapshot form's msgpack encoding (decision SIM12), maps in their own order, which
        a run fixes whatever the hash seed (a test compares two hash seeds)."""
        h = hashlib.sha256()
        for name in self.components:
            h.update(self.sim.packed_snapshot(name))
        return h.hexdigest()[:16]
