"""The Process Dispatcher as a thespian actor: the runtime's event-sourced shell around
:class:`~.logic.ProcessDispatcher`.

``Start(log_url, config=...)`` configures it (see :mod:`.logic` for the keys); its peers
should include ``"epum"`` unless ``static_resources``. EEAgents introduce themselves with
``Hello("eeagent:<id>")``; subscribers of processes are peer names too. Start it with
``globalName="pd"`` so that agents in other OS processes can find it
(``runtime.system.lookup``).
"""

from __future__ import annotations

from typing import Any

from ..eeagent.messages import AgentHeartbeat
from ..runtime.metrics import Sample, counts
from ..runtime.shell import EventSourcedActor
from . import states as ps
from .logic import ProcessDispatcher
from .needs import EngineSpec, need
from .state import PDState


def metrics(state: PDState, engines: dict[str, EngineSpec]) -> list[Sample]:
    """The PD's figures (:mod:`~cei_actors.runtime.metrics`) from its state: processes by
    state, the queue, nodes, resources and slots per engine, need per engine."""
    out = counts("cei_pd_processes", "state", state.state_count)
    out.append(("cei_pd_queued_processes", {}, float(sum(state.state_count[s] for s in ps.QUEUED))))
    resources: dict[str, int] = {}
    slots: dict[str, int] = dict.fromkeys(engines, 0)
    used: dict[str, int] = dict.fromkeys(engines, 0)
    for r in state.resources.values():
        resources[r.state] = resources.get(r.state, 0) + 1
        slots[r.engine] = slots.get(r.engine, 0) + r.slots
        used[r.engine] = used.get(r.engine, 0) + len(r.assigned)
    out += counts("cei_pd_resources", "state", resources)
    for engine in sorted(set(engines) | set(state.engine_nodes)):
        label = {"engine": engine}
        out.append(("cei_pd_nodes", label, float(len(state.engine_nodes.get(engine, ())))))
        out.append(("cei_pd_slots", label, float(slots.get(engine, 0))))
        out.append(("cei_pd_slots_used", label, float(used.get(engine, 0))))
        spec = engines.get(engine)
        if spec is not None:
            n = need(spec, state.live_count[engine], state.occupied[engine])
            out.append(("cei_pd_engine_need", label, float(n)))
    out.append(("cei_pd_agent_requests", {}, float(sum(len(v) for v in state.soft.outbox.values()))))
    return out


class ProcessDispatcherActor(EventSourcedActor):
    """The PD actor."""

    #: Heartbeats from many agents arrive a few ms apart: waiting 2 ms lets one append and one
    #: ``AgentRequests`` per agent cover several of them (measured: ~12% more launches/s).
    group_commit_delay = 0.002
    heartbeat_types = ("AgentHeartbeat",)
    launch_events = ("ProcessAssigned",)

    def make_component(self, config: dict[str, Any]) -> ProcessDispatcher:
        return ProcessDispatcher(dict(config or {}))

    def metrics(self, state: PDState) -> list[Sample]:
        return metrics(state, self._runner.component.cfg.engines)

    def peer_named_by(self, msg: Any) -> str | None:
        """An agent's heartbeat names it (``eeagent:<id>``), whether or not its ``Hello`` came."""
        return f"eeagent:{msg.eeagent_id}" if isinstance(msg, AgentHeartbeat) and isinstance(msg.eeagent_id, str) else None
