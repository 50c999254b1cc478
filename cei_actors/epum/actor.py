"""EPUM as a thespian actor: the runtime's event-sourced shell around :class:`EPUM`.

``Start(log_url, config=...)`` configures it (keys of :class:`~.logic.EPUMConfig`); its
peers must include ``"provisioner"`` (and the domains' subscribers, e.g. ``"pd"``). Pulled
sensors run in the shell's worker pool (``Work("sensor", ...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..runtime.metrics import Sample, counts
from ..runtime.shell import EventSourcedActor
from .engines.base import VALID_STATES
from .logic import EPUM
from .messages import NodeHeartbeat, ProvisionerLeads
from .sensors import run_sensor
from .state import EPUMState


def metrics(state: EPUMState) -> list[Sample]:
    """EPUM's figures (:mod:`~cei_actors.runtime.metrics`) from its state: per domain its
    instances by state, need (the engine's ``target``, else its ``preserve_n``) and have
    (instances below TERMINATING); requests to the Provisioner not yet acknowledged."""
    out: list[Sample] = [("cei_epum_domains", {}, float(len(state.domains)))]
    for dom in sorted(state.domains.values(), key=lambda d: d.key):
        label = {"domain": dom.domain_id, "owner": dom.owner}
        out += [(name, {**label, **lab}, v) for name, lab, v in
                counts("cei_epum_instances", "state", {s: len(ids) for s, ids in dom.by_state.items()})]
        engine_conf = dom.config.get("engine_conf") or {}
        target = (dom.engine_state or {}).get("target", engine_conf.get("preserve_n"))
        if isinstance(target, int | float) and not isinstance(target, bool):
            out.append(("cei_epum_domain_need", label, float(target)))
        out.append(("cei_epum_domain_have", label, float(dom.count(VALID_STATES))))
    out.append(("cei_epum_pending_requests", {"kind": "launch"}, float(len(state.open_launches))))
    out.append(("cei_epum_pending_requests", {"kind": "terminate"}, float(len(state.open_terminations))))
    return out


class EPUMActor(EventSourcedActor):
    """The EPU Management Service actor."""

    heartbeat_types = ("NodeHeartbeat",)
    launch_events = ("InstanceLaunchRequested",)

    def metrics(self, state: EPUMState) -> list[Sample]:
        return metrics(state)

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
