"""A harness for the HA core against real PD cores: Runners on memory logs, one fake clock.

``World`` runs the HA component and one or more Process Dispatchers (``pd_harness.Sim``, each
with simulated agents). HA's requests to a PD are handled by that PD's runner and its reply
comes back as the actor shell would hand it (``ha.actor.pd_reply``); the PD's notices to
``"ha"`` are delivered too. Messages can be lost on the way (``lose_to_pd``, ``lose_to_ha``);
the HA leader can crash and recover from its log. Timers are never fired on their own: a
``tick`` advances the clock, heartbeats every agent and runs one ``HAPass``.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from pd_harness import ENGINE, Sim, config

from cei_actors.epum.sensors import run_sensor
from cei_actors.eventlog import open_log
from cei_actors.ha.actor import pd_reply
from cei_actors.ha.logic import HA
from cei_actors.ha.messages import HAPass
from cei_actors.pd import states as ps
from cei_actors.pd.messages import ProcessStateChanged
from cei_actors.runtime.control import Request, Response
from cei_actors.runtime.core import Send, SetTimer, Work
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.runtime.runner import Runner, replay


class World:
    def __init__(self, pds: tuple[str, ...] = ("pd",), nodes: int = 3, slots: int = 2,
                 seed: int = 1, **ha_conf: Any) -> None:
        self.now = 1000.0
        self.seed = seed
        self.pds: dict[str, Sim] = {}
        for name in pds:
            conf = config()
            conf["engines"][ENGINE]["slots"] = slots  # per node
            sim = Sim(conf, seed=seed)
            sim.now = self.now
            self.pds[name] = sim
            for i in range(nodes):
                sim.add_node(f"{name}-n{i}")
        self._seen = dict.fromkeys(self.pds, 0)
        self.ha_conf = {"pds": list(pds), "timers": False, **ha_conf}
        self.url = f"memory://{uuid.uuid4().hex}"
        self.lose_to_pd = False
        self.lose_to_ha = False
        self.queue: list[tuple[str, Any]] = []  # (to, message): "ha" or a PD name
        self.sent_to_pd: list[tuple[str, Any]] = []
        self.timers: dict[str, SetTimer] = {}
        self.runner = self._new_runner()
        self._effects(self.runner.recover().effects)
        self.settle()

    def _new_runner(self) -> Runner:
        return Runner(HA(self.ha_conf), open_log(self.url), clock=lambda: self.now,
                      rng=random.Random(self.seed), snapshot_every=10**9)

    @property
    def state(self):
        return self.runner.state

    def crash(self, snapshot: bool = False) -> None:
        """The HA leader dies (its in-flight messages with it) and a standby recovers."""
        if snapshot:
            self.runner.take_snapshot()
        self.queue = [(to, m) for to, m in self.queue if to != "ha"]
        self.seed += 1
        self.runner = self._new_runner()
        self._effects(self.runner.recover().effects)

    def replayed(self):
        return replay(HA(self.ha_conf), open_log(self.url), "ha")

    # ---- messages -------------------------------------------------------------------------

    def ha(self, message: Any) -> Any:
        """Handle ``message`` at HA now, then deliver everything that follows from it."""
        reply = self._ha(message)
        self.settle()
        return reply

    def ok(self, message: Any) -> Any:
        reply = self.ha(message)
        assert isinstance(reply, Ok), reply
        return reply.value

    def err(self, message: Any) -> ErrorReply:
        reply = self.ha(message)
        assert isinstance(reply, ErrorReply), reply
        return reply

    def _ha(self, message: Any) -> Any:
        decision = self.runner.handle(message)
        self._effects(decision.effects)
        return decision.reply

    def _effects(self, effects: list[Any]) -> None:
        for eff in effects:
            if isinstance(eff, SetTimer):
                self.timers[eff.key] = eff
            elif isinstance(eff, Work):
                assert eff.kind == "sensor"
                self.queue.append(("ha", run_sensor(eff.payload)))
            else:
                assert isinstance(eff, Send) and eff.to in self.pds, eff
                self.queue.append((eff.to, eff.message))

    def pd(self, name: str, message: Any) -> Any:
        """Handle ``message`` at PD ``name`` (from outside HA), then deliver what follows."""
        self.pds[name].now = self.now
        reply = self.pds[name].handle(message)
        self.settle()
        return reply

    def _route_pd(self) -> None:
        for name, sim in self.pds.items():
            new = sim.sent[self._seen[name]:]
            self._seen[name] = len(sim.sent)
            for eff in new:
                if eff.to == "ha":
                    assert isinstance(eff.message, ProcessStateChanged)
                    self.queue.append(("ha", eff.message))

    def settle(self, limit: int = 10_000) -> None:
        """Deliver queued messages (and all they cause) until none is left."""
        self._route_pd()
        for _ in range(limit):
            if not self.queue:
                return
            to, message = self.queue.pop(0)
            if to == "ha":
                if not self.lose_to_ha:
                    self._ha(message)
                continue
            if self.lose_to_pd:
                continue
            self.sent_to_pd.append((to, message))
            sim = self.pds[to]
            sim.now = self.now
            assert isinstance(message, Request)
            reply = sim.handle(message.message)
            self._route_pd()
            made = pd_reply(Response(message.rid, reply))
            if made is not None:
                self.queue.append(("ha", made))
        raise AssertionError("messages never settle")

    # ---- time -----------------------------------------------------------------------------

    def tick(self, dt: float = 1.0, heartbeats: bool = True) -> None:
        """Time passes: agents report, HA runs one pass."""
        self.now += dt
        for sim in self.pds.values():
            sim.now = self.now
            if heartbeats:
                sim.heartbeat_all()
        self.settle()
        self.ha(HAPass())

    # ---- looking --------------------------------------------------------------------------

    def live(self, group: str) -> list[str]:
        """Upids of the group's processes the PDs hold as live (not terminal), over every PD."""
        out = []
        for sim in self.pds.values():
            for upid, p in sim.state.processes.items():
                if upid.startswith(f"{group}-") and p.state not in ps.TERMINAL:
                    out.append(upid)
        return sorted(out)

    def running(self, group: str) -> list[str]:
        out = []
        for sim in self.pds.values():
            for upid, p in sim.state.processes.items():
                if upid.startswith(f"{group}-") and p.state == ps.RUNNING:
                    out.append(upid)
        return sorted(out)

    def where(self, upid: str) -> str:
        return next(n for n, sim in self.pds.items() if upid in sim.state.processes)

    def check(self) -> None:
        """HA's invariants hold, and its state is the fold of its log."""
        ha = HA(self.ha_conf)
        assert ha.invariants(self.state) == []
        assert self.replayed() == self.state
