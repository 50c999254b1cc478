"""A harness for the PD's pure core: a Runner on a memory log, a fake clock, simulated agents.

``Sim`` drives :class:`ProcessDispatcher` through a :class:`Runner` and plays the EEAgents:
the PD's ``LaunchProcess``/``TerminateProcess``/``CleanupProcess`` effects change the agents'
process tables, and ``heartbeat(agent)`` reports a table back, level-based, like the real
agent. Timers are collected, never fired on their own; tests send the timer messages.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from cei_actors.eeagent.messages import (
    AgentHeartbeat,
    AgentRequests,
    CleanupProcess,
    LaunchProcess,
    TerminateProcess,
)
from cei_actors.epum.messages import NodeState, RegisterNeed
from cei_actors.eventlog import open_log
from cei_actors.pd import states as ps
from cei_actors.pd.logic import ProcessDispatcher
from cei_actors.pd.messages import ProcessStateChanged
from cei_actors.runtime.core import Send, SetTimer
from cei_actors.runtime.messages import ErrorReply, Ok
from cei_actors.runtime.runner import Runner, replay

ENGINE = "e1"


def config(**over: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "engines": {
            ENGINE: {
                "slots": 2,
                "heartbeat_period": 1.0,
                "heartbeat_warning": 3.0,
                "heartbeat_missing": 5.0,
            }
        },
        "restart_throttling_config": {"minimum_time_between_starts": 0.0},
        "crash_backoff_base": 0.0,  # off: tests drive restarts without time (on: decision OP3 tests)
        "dispatch_retry_seconds": 10.0,
    }
    conf.update(over)
    return conf


@dataclass
class Agent:
    agent_id: str
    node_id: str
    slots: int = 99
    procs: dict[tuple[str, int], str] = field(default_factory=dict)  # (upid, round) -> state
    commands: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    up: bool = True

    def live(self) -> int:
        return sum(1 for s in self.procs.values() if s in ps.AGENT_LIVE)


class Sim:
    def __init__(self, conf: dict[str, Any] | None = None, url: str | None = None, seed: int = 1):
        self.conf = conf or config()
        self.url = url or f"memory://{uuid.uuid4().hex}"
        self.now = 1000.0
        self.seed = seed
        self.agents: dict[str, Agent] = {}
        self.sent: list[Send] = []
        self.timers: dict[str, SetTimer] = {}
        self.needs: list[RegisterNeed] = []
        self.notices: list[tuple[str, dict]] = []
        self.runner = self._new_runner()
        self.effects(self.runner.recover())

    def _new_runner(self) -> Runner:
        return Runner(
            ProcessDispatcher(self.conf),
            open_log(self.url),
            clock=lambda: self.now,
            rng=random.Random(self.seed),
            snapshot_every=10**9,
        )

    @property
    def state(self):
        return self.runner.state

    def crash(self, snapshot: bool = False) -> None:
        """The PD dies and a new one recovers from the log (optionally from a snapshot)."""
        if snapshot:
            self.runner.take_snapshot()
        self.runner = self._new_runner()
        self.effects(self.runner.recover())

    def replayed(self):
        return replay(ProcessDispatcher(self.conf), open_log(self.url), "pd")

    # ---- driving ------------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        decision = self.runner.handle(message)
        self.effects(decision)
        return decision.reply

    def ok(self, message: Any) -> Any:
        reply = self.handle(message)
        assert isinstance(reply, Ok), reply
        return reply.value

    def err(self, message: Any) -> ErrorReply:
        reply = self.handle(message)
        assert isinstance(reply, ErrorReply), reply
        return reply

    def effects(self, decision: Any) -> None:
        flush = None
        for eff in decision.effects:
            if isinstance(eff, SetTimer):
                if eff.key == "outbox":  # a zero-delay timer: the shell fires it right away
                    flush = eff.message
                else:
                    self.timers[eff.key] = eff
                continue
            assert isinstance(eff, Send), eff
            msg = eff.message
            if isinstance(msg, AgentRequests):
                self.sent.extend(Send(eff.to, m) for m in msg.requests)
            else:
                self.sent.append(eff)
            if isinstance(msg, RegisterNeed):
                self.needs.append(msg)
            elif isinstance(msg, ProcessStateChanged):
                self.notices.append((eff.to, msg.process))
            elif eff.to.startswith("eeagent:"):
                agent = self.agents.get(eff.to.split(":", 1)[1])
                if agent is not None and agent.up:
                    self._agent_gets(agent, msg)
        if flush is not None:
            self.effects(self.runner.handle(flush))

    def _agent_gets(self, agent: Agent, msg: Any) -> None:
        if isinstance(msg, AgentRequests):
            for m in msg.requests:
                self._agent_gets(agent, m)
        elif isinstance(msg, LaunchProcess):
            key = (msg.upid, msg.round)
            if key in agent.procs:
                return
            older = [k for k in agent.procs if k[0] == msg.upid and k[1] < msg.round]
            newer = [k for k in agent.procs if k[0] == msg.upid and k[1] > msg.round]
            if newer:
                return
            for k in older:  # supersede: the older round ends, the slot passes on
                del agent.procs[k]
            if agent.live() >= agent.slots:
                agent.procs[key] = ps.REJECTED
            else:
                agent.procs[key] = ps.RUNNING
                agent.commands[key] = list(msg.command)
        elif isinstance(msg, TerminateProcess):
            key = (msg.upid, msg.round)
            if agent.procs.get(key) in ps.AGENT_LIVE:
                agent.procs[key] = ps.TERMINATED
        elif isinstance(msg, CleanupProcess):
            key = (msg.upid, msg.round)
            if agent.procs.get(key) in ps.TERMINAL:
                del agent.procs[key]

    # ---- the cluster --------------------------------------------------------------------------

    def add_node(self, node_id: str, agents: int = 1, engine: str = ENGINE, slots: int = 99, **props: Any) -> list[str]:
        self.ok(NodeState(node_id, f"pd_domain_{engine}", "RUNNING", dict(props)))
        ids = []
        for i in range(agents):
            aid = f"{node_id}-a{i}"
            self.agents[aid] = Agent(aid, node_id, slots)
            ids.append(aid)
            self.heartbeat(aid)
        return ids

    def lose_node(self, node_id: str, state: str = "TERMINATED") -> None:
        self.ok(NodeState(node_id, f"pd_domain_{self.state.nodes[node_id].engine}" if node_id in self.state.nodes else f"pd_domain_{ENGINE}", state, {}))
        for a in self.agents.values():
            if a.node_id == node_id:
                a.up = False

    def heartbeat(self, agent_id: str, timestamp: float | None = None, seq: int = 0) -> Any:
        a = self.agents[agent_id]
        procs = [
            {"upid": u, "round": r, "state": s, "msg": ""} for (u, r), s in sorted(a.procs.items())
        ]
        return self.handle(
            AgentHeartbeat(agent_id, a.node_id, self.now if timestamp is None else timestamp, procs, seq)
        )

    def heartbeat_all(self) -> None:
        for aid, a in list(self.agents.items()):
            if a.up:
                self.heartbeat(aid)

    def finish(self, upid: str, state: str = ps.EXITED) -> str:
        """The process's current copy ends on its agent with ``state``; returns the agent."""
        p = self.state.processes[upid]
        for aid, a in self.agents.items():
            key = (upid, p.round)
            if a.procs.get(key) in ps.AGENT_LIVE:
                a.procs[key] = state
                return aid
        raise AssertionError(f"{upid} round {p.round} runs nowhere")

    def proc(self, upid: str):
        return self.state.processes[upid]

    def pstate(self, upid: str) -> str:
        return self.state.processes[upid].state

    def running_copies(self) -> dict[tuple[str, int], list[str]]:
        out: dict[tuple[str, int], list[str]] = {}
        for aid, a in self.agents.items():
            if not a.up:
                continue
            for key, s in a.procs.items():
                if s in ps.AGENT_LIVE:
                    out.setdefault(key, []).append(aid)
        return out


def check_invariants(state) -> None:
    """Slots, placements, node_exclusive and indices are consistent."""
    seen: dict[str, str] = {}
    for rid, res in state.resources.items():
        assert len(res.assigned) + res.foreign <= res.slots or res.foreign > 0, (rid, res)
        assert len(res.assigned) <= res.slots, (rid, len(res.assigned), res.slots)
        for upid, rnd in res.assigned.items():
            p = state.processes[upid]
            assert p.resource_id == rid and p.round == rnd and p.state in ps.PLACED, (upid, p.state)
            assert upid not in seen, f"{upid} on {seen[upid]} and {rid}"
            seen[upid] = rid
    for p in state.processes.values():
        if p.state in ps.PLACED:
            assert seen.get(p.upid) == p.resource_id, (p.upid, p.state, p.resource_id)
        else:
            assert p.resource_id is None, (p.upid, p.state)
    for node in state.nodes.values():
        tags: dict[str, list[str]] = {}
        used = 0
        for rid in node.resources:
            res = state.resources[rid]
            used += len(res.assigned) + res.foreign
            for upid in res.assigned:
                tag = state.processes[upid].node_exclusive
                if tag is not None:
                    tags.setdefault(tag, []).append(upid)
        assert node.used == used, (node.node_id, node.used, used)
        for tag, upids in tags.items():
            assert len(upids) == 1, f"node_exclusive {tag} twice on {node.node_id}: {upids}"
            assert node.tags.get(tag) == upids[0]
        assert set(node.tags) == set(tags), (node.tags, tags)
    queued = [p for p in state.processes.values() if p.state in ps.QUEUED]
    mm = state.mm
    for p in queued:
        assert p.upid in mm.where or p.upid in mm.throttled_set, p.upid
    assert len(mm.where) + len(mm.throttled_set) == len(queued)
    for upid in mm.fresh:
        assert state.processes[upid].state in ps.QUEUED


def placeable(state, p) -> bool:
    """Brute force: is there a slot ``p`` could take right now?"""
    from cei_actors.pd.matchmaker import constraint_key, satisfies

    ckey = constraint_key(p.constraints)
    for res in state.resources.values():
        node = state.nodes[res.node_id]
        if res.state != ps.RESOURCE_OK or node.retiring or res.engine != p.engine:
            continue
        if len(res.assigned) + res.foreign >= res.slots:
            continue
        if ckey and not satisfies(res.properties, ckey):
            continue
        if p.node_exclusive is not None and p.node_exclusive in node.tags:
            continue
        return True
    return False


def check_no_placeable_waiting(state) -> None:
    """Nothing waits that could run: the matchmaker's cached "no slot" marks are sound."""
    for p in state.processes.values():
        if p.state in ps.QUEUED and not state.mm.is_throttled(p.upid):
            assert not placeable(state, p), f"{p.upid} is {p.state} but a slot is free for it"
