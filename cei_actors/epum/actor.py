"""EPUM as a thespian actor: the runtime's event-sourced shell around :class:`EPUM`.

``Start(log_url, config=...)`` configures it (keys of :class:`~.logic.EPUMConfig`); its
peers must include ``"provisioner"`` (and the domains' subscribers, e.g. ``"pd"``). Pulled
sensors run in the shell's worker pool (``Work("sensor", ...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..runtime.shell import EventSourcedActor
from .logic import EPUM
from .messages import NodeHeartbeat, ProvisionerLeads
from .sensors import run_sensor


class EPUMActor(EventSourcedActor):
    """The EPU Management Service actor."""

    def make_component(self, config: dict[str, Any]) -> EPUM:
        return EPUM(dict(config or {}))

    def work_handlers(self) -> dict[str, Callable[[Any], Any]]:
        return {"sensor": run_sensor}

    def peer_named_by(self, msg: Any) -> str | None:
        """A node's health heartbeat names the agent that sent it (the peer probed by
        ``HealthProbe``), whether or not its ``Hello`` came."""
        return msg.agent if isinstance(msg, NodeHeartbeat) and isinstance(msg.agent, str) else None

    def greeted(self, name: str) -> ProvisionerLeads | None:
        """A new Provisioner leader: ask it for every live instance at once (decision H4)."""
        component = self._runner.component if self._runner is not None else None
        provisioner = component.config.provisioner if isinstance(component, EPUM) else "provisioner"
        return ProvisionerLeads() if name == provisioner else None
