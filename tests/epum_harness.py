"""A deterministic mini-simulation for EPUM: its Runner plus a Provisioner in one loop.

Until the Provisioner's core exists, ``FakeProvisioner`` stands in for it: it answers
``Provision`` / ``TerminateNodes`` / ``DumpState`` with ``NodeStateChanged`` like the real
one (forward-only states, a growing ``update_counter``, idempotent by node id, unknown
terminates recorded TERMINATED) over a tiny cloud with boot delays, a quota and out-of-band
kills. Messages travel through an in-memory network that delivers in order.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from cei_actors.epum.logic import EPUM
from cei_actors.epum.messages import DeciderPass, DoctorPass, NodeState
from cei_actors.epum.sensors import run_sensor
from cei_actors.eventlog import open_log
from cei_actors.provisioner.messages import (
    DumpState,
    NodeStateChanged,
    Provision,
    Subscribe,
    TerminateNodes,
)
from cei_actors.provisioner.states import rank
from cei_actors.runtime.core import Send, SetTimer, Work
from cei_actors.runtime.runner import Runner


class Clock:
    """Callable (for Runners) and with ``now()`` (for the simulated cloud)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def now(self) -> float:
        return self.t


@dataclass
class FakeNode:
    node_id: str
    launch_id: str
    site: str
    deployable_type: str
    state: str
    counter: int = 0
    desc: str | None = None
    boot_at: float = 0.0
    gone_at: float | None = None
    vm: bool = False  # a VM exists (counts against the quota)

    def record(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "launch_id": self.launch_id, "state": self.state,
            "state_desc": self.desc, "site": self.site, "caller": None,
            "update_counter": self.counter, "iaas_id": f"vm-{self.node_id[-6:]}" if self.vm else None,
            "public_ip": None, "private_ip": None, "hostname": f"h-{self.node_id[-6:]}",
            "deployable_type": self.deployable_type,
        }


class FakeProvisioner:
    """Stand-in Provisioner over a tiny simulated cloud (see module doc)."""

    def __init__(self, clock: Clock, boot: float = 10.0, quota: dict[str, int] | None = None) -> None:
        self.clock = clock
        self.boot = boot
        self.quota = dict(quota or {})  # site -> max live VMs (absent: unlimited)
        self.nodes: dict[str, FakeNode] = {}
        self.outbox: list[NodeStateChanged] = []
        self.creates: dict[str, int] = {}  # node id -> VMs created for it (must stay <= 1)

    def _move(self, n: FakeNode, state: str, desc: str | None = None) -> None:
        if rank(state) < rank(n.state) or (state == n.state and desc == n.desc):
            return
        n.state, n.desc = state, desc
        n.counter += 1
        self.outbox.append(NodeStateChanged(n.record()))

    def live_vms(self, site: str | None = None) -> list[FakeNode]:
        return [n for n in self.nodes.values() if n.vm and (site is None or n.site == site)]

    def handle(self, msg: Any) -> None:
        now = self.clock()
        if isinstance(msg, Provision):
            for nid in msg.node_ids:
                if nid in self.nodes:
                    continue  # idempotent
                n = FakeNode(nid, msg.launch_id, msg.site, msg.deployable_type, "REQUESTED")
                self.nodes[nid] = n
                self.outbox.append(NodeStateChanged(n.record()))
                limit = self.quota.get(msg.site)
                if limit is not None and len(self.live_vms(msg.site)) >= limit:
                    self._move(n, "FAILED", "IAAS_FULL: InstanceLimitExceeded")
                    continue
                n.vm, n.boot_at = True, now + self.boot
                self.creates[nid] = self.creates.get(nid, 0) + 1
                self._move(n, "PENDING")
        elif isinstance(msg, TerminateNodes):
            for nid in msg.node_ids:
                n = self.nodes.get(nid)
                if n is None:
                    n = FakeNode(nid, "provisioner-unknown-launch", "?", "?", "TERMINATED", desc="UNKNOWN_NODE")
                    self.nodes[nid] = n
                    self.outbox.append(NodeStateChanged(n.record()))
                elif rank(n.state) < rank("TERMINATING"):
                    self._move(n, "TERMINATING")
                    n.gone_at = now + 1.0
        elif isinstance(msg, DumpState):
            held = dict(zip(msg.node_ids, msg.counters or [], strict=False))
            for nid in msg.node_ids:
                if nid in self.nodes:
                    record = self.nodes[nid].record()
                    if held.get(nid) != record["update_counter"]:  # as the real one (SC2)
                        self.outbox.append(NodeStateChanged(record))
                else:  # as the real one: an id it never had is recorded as gone
                    n = FakeNode(nid, "provisioner-unknown-launch", "?", "?", "TERMINATED", desc="UNKNOWN_NODE")
                    self.nodes[nid] = n
                    self.outbox.append(NodeStateChanged(n.record()))
        elif isinstance(msg, Subscribe):
            pass
        else:
            raise AssertionError(f"provisioner got {msg!r}")

    def tick(self) -> None:
        now = self.clock()
        for n in list(self.nodes.values()):
            if n.state == "PENDING" and now >= n.boot_at:
                self._move(n, "RUNNING")
            elif n.state == "TERMINATING" and n.gone_at is not None and now >= n.gone_at:
                n.vm = False
                self._move(n, "TERMINATED")

    def kill(self, node_id: str) -> None:
        """The cloud loses a VM out of band."""
        n = self.nodes[node_id]
        n.vm = False
        self._move(n, "TERMINATED", "NODE_DISAPPEARED")


class RealProvisioner:
    """The Provisioner's own core (a Runner on a memory log, from ``provisioner_harness``)
    over its ``SimulatedCloudDriver``, with the same face as :class:`FakeProvisioner`.

    One site, ``local``, of type ``sim``; deployable type ``eeagent``. Cloud work runs at
    once; the Provisioner's timers (site listings) fire on :meth:`tick`.
    """

    def __init__(self, clock: Clock, boot: float = 10.0, quota: dict[str, int] | None = None,
                 seed: int = 7) -> None:
        from provisioner_harness import Harness

        from cei_actors.provisioner.messages import AddDeployableType, AddSite

        self.clock = clock
        self.h = Harness(clock=clock, seed=seed, subscribers=["epum"], query_interval=5.0,
                         disappear_grace=20.0)
        site = {"type": "sim", "seed": seed, "boot_delay": boot, "terminated_linger": 30.0}
        self.h.ok(AddSite("local", site))
        self.h.ok(AddDeployableType("eeagent", {
            "mappings": {"local": {"iaas_image": "ami-sim-eeagent", "iaas_allocation": "t1.micro"}},
            "contextualization": {"method": "userdata", "userdata": "cei node"},
        }))
        self.outbox: list[NodeStateChanged] = []
        self._quota = dict(quota or {})

    @property
    def quota(self) -> dict[str, int]:
        return self._quota

    @quota.setter
    def quota(self, value: dict[str, int]) -> None:
        self._quota = dict(value)

    def _driver(self):  # noqa: ANN202
        return self.h.cloud()

    def _apply_quota(self) -> None:
        d = self._driver()
        if d is not None:
            d.max_instances = self._quota.get("local")

    def _settle(self) -> None:
        for _ in range(100):
            self._apply_quota()
            if not self.h.work:
                break
            self.h.drain()
        for e in self.h.sent:
            if e.to == "epum" and isinstance(e.message, NodeStateChanged):
                self.outbox.append(e.message)
        self.h.sent.clear()

    def handle(self, msg: Any) -> None:
        self._apply_quota()
        self.h.handle(msg)
        self._settle()

    def tick(self) -> None:
        for key, (at, msg) in sorted(self.h.timers.items()):
            if at <= self.clock.t:
                del self.h.timers[key]
                self.h.handle(msg)
        self._settle()

    def kill(self, node_id: str) -> None:
        self._driver().kill(self.h.state.nodes[node_id].iaas_id)

    def live_vms(self, site: str | None = None) -> list[Any]:
        from provisioner_harness import sim_vms

        d = self._driver()
        if d is None:
            return []
        by_iaas = {n.iaas_id: n for n in self.h.state.nodes.values() if n.iaas_id}
        out = []
        for vm in sim_vms(d):
            if vm.status in ("pending", "running") and vm.id in by_iaas:
                n = by_iaas[vm.id]
                if site is None or n.site == site:
                    out.append(n)
        return out

    @property
    def creates(self) -> dict[str, int]:
        from provisioner_harness import sim_vms

        d = self._driver()
        counts: dict[str, int] = {}
        for vm in sim_vms(d) if d is not None else []:
            counts[vm.client_token] = counts.get(vm.client_token, 0) + 1
        return counts


@dataclass
class Sim:
    seed: int = 0
    boot: float = 10.0
    quota: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    real: bool = False  # the Provisioner's own core instead of the stand-in
    url: str = ""  # EPUM's log (default: a fresh memory log)

    def __post_init__(self) -> None:
        self.clock = Clock()
        self.url = self.url or f"memory://epum-sim-{uuid.uuid4().hex}"
        if self.real:
            self.prov = RealProvisioner(self.clock, self.boot, self.quota)
        else:
            self.prov = FakeProvisioner(self.clock, self.boot, self.quota)
        self.inbox: dict[str, list[Any]] = {}  # subscriber -> NodeState messages
        self.generation = 0
        self.runner: Runner | None = None
        self.crash_at: int | None = None  # crash at this handled-message count
        self.crash_before = False  # ... before its events are persisted (else: before effects)
        self.handled = 0
        self.crashes = 0
        self.recover()

    def component(self) -> EPUM:
        return EPUM({"timers": False, **self.config})

    def _log(self):  # noqa: ANN202
        if self.url.startswith("memory://"):
            return open_log(self.url)
        if not hasattr(self, "_logs"):
            self._logs = []
        log = open_log(self.url)  # a new leader's own connection
        self._logs.append(log)
        return log

    def close(self) -> None:
        for log in getattr(self, "_logs", []):
            log.close()

    def recover(self) -> None:
        """A new leader: a fresh Runner (new rng) on the same log."""
        self.generation += 1
        rng = random.Random(self.seed * 1000 + self.generation)
        self.runner = Runner(self.component(), self._log(), clock=self.clock, rng=rng)
        self.perform(self.runner.recover().effects)

    def perform(self, effects: list[Any]) -> None:
        for eff in effects:
            if isinstance(eff, Send):
                if eff.to == "provisioner":
                    self.prov.handle(eff.message)
                else:
                    assert isinstance(eff.message, NodeState) or eff.to.startswith("agent"), eff
                    self.inbox.setdefault(eff.to, []).append(eff.message)
            elif isinstance(eff, Work):
                assert eff.kind == "sensor"
                self.send(run_sensor(eff.payload))
            elif isinstance(eff, SetTimer):
                pass
            else:
                raise AssertionError(eff)

    def _crash_now(self) -> bool:
        self.handled += 1
        if self.crash_at is not None and self.handled == self.crash_at:
            self.crashes += 1
            return True
        return False

    def send(self, msg: Any, perform: bool = True) -> Any:
        """Handle one message; with a crash scheduled here the reply is None (lost)."""
        if self._crash_now():
            if not self.crash_before:
                self.runner.handle(msg)  # persisted; its effects never happen
            self.recover()
            return None
        d = self.runner.handle(msg)
        if perform:
            self.perform(d.effects)
        return d.reply

    def deliver(self) -> None:
        """Provisioner -> EPUM notifications, in order."""
        while self.prov.outbox:
            batch, self.prov.outbox = self.prov.outbox, []
            if self._crash_now():
                if not self.crash_before:
                    self.runner.handle_many(batch)
                self.recover()
                continue
            for d in self.runner.handle_many(batch):
                self.perform(d.effects)

    def step(self, dt: float = 5.0, doctor: bool = False) -> None:
        self.clock.t += dt
        self.prov.tick()
        self.deliver()
        self.send(DeciderPass())
        if doctor:
            self.send(DoctorPass())
        self.deliver()

    def run(self, seconds: float, dt: float = 5.0, **kw: Any) -> None:
        end = self.clock.t + seconds
        while self.clock.t < end:
            self.step(dt, **kw)

    # ---- views ---------------------------------------------------------------------------------

    @property
    def state(self):
        return self.runner.state

    def running(self, site: str | None = None) -> int:
        return sum(1 for n in self.prov.live_vms(site) if n.state == "RUNNING")

    def vms(self, site: str | None = None) -> int:
        return len(self.prov.live_vms(site))


# ---- engines loaded by dotted path in tests ----------------------------------------------------

from cei_actors.epum.engines.base import Engine, Key  # noqa: E402


class BrokenEngine(Engine):
    """Raises in decide while ``engine_conf.broken`` is true."""

    CONFIG = {"broken": Key(check=lambda v: isinstance(v, bool), expect="a bool"),
              "preserve_n": Key(required=True)}

    def decide(self, control, state):
        if self.conf.get("broken"):
            raise RuntimeError("engine exploded")
        for _ in range(self.conf["preserve_n"] - state.count_valid()):
            control.launch()


class CountingEngine(Engine):
    """Counts its decide calls in its memory (to check persistence across failover)."""

    CONFIG = {}

    def decide(self, control, state):
        self.memory["decides"] = self.memory.get("decides", 0) + 1


def definition(engine: str = "preserve_n", **sections: Any) -> dict:
    return {"general": {"engine_class": engine}, "engine_conf": sections.get("engine_conf", {}),
            "health": sections.get("health", {})}
