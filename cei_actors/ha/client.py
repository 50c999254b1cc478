"""HAClient: typed calls to the HA service.

It wraps a runtime ``ServiceClient`` (anything with ``call(message, timeout=None)`` returning
the ``Ok`` value and raising on an ``ErrorReply``). Groups come back as dicts (``name, policy,
parameters, process, pds, target, status, why, wants, copies, ...``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..epum.messages import SensorData
from .messages import CreateGroup, DescribeGroup, ListGroups, ReconfigureGroup, RemoveGroup

if TYPE_CHECKING:
    from ..subscribe import Watcher


class HAClient:
    """Requests to the HA service, each returning the reply's value; errors raise."""

    def __init__(self, service: Any, timeout: float | None = None, *,
                 changes: Callable[[], Watcher] | None = None,
                 pump: Callable[[float], None] | None = None) -> None:
        """``changes`` and ``pump`` as for :class:`~cei_actors.pd.client.PDClient`."""
        self.service = service
        self.timeout = timeout
        self.changes = changes
        self.pump = pump

    def _call(self, message: Any) -> Any:
        return self.service.call(message, timeout=self.timeout)

    def create_group(self, name: str, policy: str, parameters: dict, process: dict,
                     pds: list[str] | None = None) -> dict:
        """Create a group (``policy`` npreserving or sensor); ``process`` holds ScheduleProcess
        fields (definition_id or command, constraints, queueing_mode, restart_mode, ...)."""
        return self._call(CreateGroup(name, policy, dict(parameters), dict(process),
                                      list(pds) if pds is not None else None))

    def reconfigure_group(self, name: str, policy: str | None = None,
                          parameters: dict | None = None) -> dict:
        return self._call(ReconfigureGroup(name, policy, dict(parameters) if parameters is not None else None))

    def remove_group(self, name: str) -> dict:
        return self._call(RemoveGroup(name))

    def describe_group(self, name: str) -> dict:
        return self._call(DescribeGroup(name))

    def list_groups(self) -> list[dict]:
        return self._call(ListGroups())

    def status(self, name: str) -> str:
        return self.describe_group(name)["status"]

    def sensor_data(self, name: str, metric: str, values: dict[str, float] | None = None,
                    domain_value: float | None = None) -> None:
        """Push a metric sample to a sensor group (``sensor_type: message``)."""
        return self._call(SensorData(name, metric, dict(values or {}), domain_value))

    def wait_group(self, name: str, statuses: str | Iterable[str] = "STEADY", timeout: float = 60.0,
                   every: float = 0.1) -> dict:
        """Wait until the group's status is one of ``statuses``; ``TimeoutError`` says where it is.

        Without ``changes`` it asks every ``every`` seconds. With them it asks again when the
        logs show the group changed (the status HA reports is from its own view of the PDs,
        which follows the logs closely), and at the latest every 0.5 s."""
        want = {statuses} if isinstance(statuses, str) else set(statuses)
        deadline = time.monotonic() + timeout
        sub = self.changes().subscribe(kinds=["ha"], groups=[name]) if self.changes else None
        try:
            while True:
                g = self.describe_group(name)
                if g["status"] in want:
                    return g
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"HA group {name} is {g['status']} ({g['why']}), not {sorted(want)}")
                if sub is None:
                    time.sleep(min(every, remaining))
                elif self.pump is not None:
                    self.pump(min(remaining, 0.05))
                    while sub.get(0) is not None:
                        pass
                else:
                    sub.get(min(remaining, 0.5))
                    while sub.get(0) is not None:
                        pass
        finally:
            if sub is not None:
                sub.close()
