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
from ..runtime.shell import EventSourcedActor
from .logic import ProcessDispatcher


class ProcessDispatcherActor(EventSourcedActor):
    """The PD actor."""

    #: Heartbeats from many agents arrive a few ms apart: waiting 2 ms lets one append and one
    #: ``AgentRequests`` per agent cover several of them (measured: ~12% more launches/s).
    group_commit_delay = 0.002

    def make_component(self, config: dict[str, Any]) -> ProcessDispatcher:
        return ProcessDispatcher(dict(config or {}))

    def peer_named_by(self, msg: Any) -> str | None:
        """An agent's heartbeat names it (``eeagent:<id>``), whether or not its ``Hello`` came."""
        return f"eeagent:{msg.eeagent_id}" if isinstance(msg, AgentHeartbeat) and isinstance(msg.eeagent_id, str) else None
