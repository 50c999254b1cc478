"""The HA service as a thespian actor: the runtime's event-sourced shell around :class:`HA`.

``Start(log_url, config=...)`` configures it (keys of :class:`~.logic.HAConfig`); its peers
must include the PDs it uses (``"pd"``). It greets them with ``Hello("ha")`` when it leads,
so the PDs can send it the copies' ``ProcessStateChanged``. Its requests to a PD carry ids
(:func:`~.messages.request_id`); the PD's ``Response`` comes back as a ``PDReply``. Pulled
sensors run in the shell's worker pool (``Work("sensor", ...)``, EPUM's ``run_sensor``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..epum.sensors import run_sensor
from ..runtime.control import Response
from ..runtime.messages import ErrorReply, Message, Ok
from ..runtime.metrics import Sample
from ..runtime.shell import EventSourcedActor
from .logic import HA
from .messages import PDReply, parse_request_id
from .state import HAState


def metrics(state: HAState) -> list[Sample]:
    """HA's figures (:mod:`~cei_actors.runtime.metrics`): per group its target and copies."""
    out: list[Sample] = [("cei_ha_groups", {}, float(len(state.groups)))]
    for name, group in sorted(state.groups.items()):
        out.append(("cei_ha_group_target", {"group": name}, float(group.target)))
        live = sum(1 for c in group.copies.values() if not c.terminating)
        out.append(("cei_ha_group_copies", {"group": name}, float(live)))
    return out


def pd_reply(response: Response) -> PDReply | None:
    """The :class:`PDReply` for a PD's answer to one of HA's requests (None: not one)."""
    parsed = parse_request_id(response.rid) if isinstance(response.rid, str) else None
    if parsed is None:
        return None
    pd, kind, arg = parsed
    reply = response.reply
    if isinstance(reply, Ok):
        return PDReply(pd, kind, arg, True, reply.value)
    if isinstance(reply, ErrorReply):
        return PDReply(pd, kind, arg, False, None, str(reply.code), str(reply.message))
    return None


class HAActor(EventSourcedActor):
    """The High Availability service actor."""

    launch_events = ("CopyScheduled",)

    def metrics(self, state: HAState) -> list[Sample]:
        return metrics(state)

    def make_component(self, config: dict[str, Any]) -> HA:
        return HA(dict(config or {}))

    def work_handlers(self) -> dict[str, Callable[[Any], Any]]:
        return {"sensor": run_sensor}

    def peer_response(self, response: Response) -> Message | None:
        return pd_reply(response)
