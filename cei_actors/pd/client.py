"""PDClient: typed calls to the Process Dispatcher.

It wraps a runtime ``ServiceClient`` (or anything with ``call(message, timeout=None)``
returning the ``Ok`` value and raising on an ``ErrorReply``, and ``tell(message)``). Processes
come back as dicts (``upid, state, round, node_id, assigned, restart_mode, queueing_mode,
constraints, engine, ...``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ..epum.messages import NodeState
from .messages import (
    CreateDefinition,
    CreateProcess,
    DescribeDefinition,
    DescribeProcess,
    DescribeProcesses,
    Dump,
    KillProcess,
    ListDefinitions,
    ProcessCounts,
    RemoveDefinition,
    RestartProcess,
    ScheduleProcess,
    ScheduleProcesses,
    SetSystemBoot,
    UpdateDefinition,
)


class PDClient:
    """Requests to the PD, each returning the reply's value; errors raise (from the transport)."""

    def __init__(self, service: Any, timeout: float | None = None) -> None:
        self.service = service
        self.timeout = timeout

    def _call(self, message: Any) -> Any:
        return self.service.call(message, timeout=self.timeout)

    # ---- definitions --------------------------------------------------------------------

    def create_definition(
        self,
        definition_id: str,
        executable: dict,
        definition_type: str = "supd",
        name: str | None = None,
        description: str | None = None,
    ) -> dict:
        return self._call(
            CreateDefinition(definition_id, executable, definition_type, name, description)
        )

    def update_definition(
        self,
        definition_id: str,
        executable: dict,
        definition_type: str = "supd",
        name: str | None = None,
        description: str | None = None,
    ) -> dict:
        return self._call(
            UpdateDefinition(definition_id, executable, definition_type, name, description)
        )

    def describe_definition(self, definition_id: str) -> dict:
        return self._call(DescribeDefinition(definition_id))

    def list_definitions(self) -> list[str]:
        return self._call(ListDefinitions())

    def remove_definition(self, definition_id: str) -> None:
        return self._call(RemoveDefinition(definition_id))

    # ---- processes ----------------------------------------------------------------------

    def create_process(self, upid: str, definition_id: str, name: str | None = None) -> dict:
        return self._call(CreateProcess(upid, definition_id, name))

    def schedule_process(
        self,
        upid: str,
        definition_id: str | None = None,
        *,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        configuration: dict | None = None,
        subscribers: list[str] | None = None,
        constraints: dict | None = None,
        queueing_mode: str | None = None,
        restart_mode: str | None = None,
        execution_engine_id: str | None = None,
        node_exclusive: str | None = None,
        name: str | None = None,
        once: bool = False,
    ) -> dict:
        """Schedule ``upid``; the process as it stands after the call. ``once``: a upid the PD
        already has (even ended) is not run again, so a retry after ``OutcomeUnknown`` is safe."""
        return self._call(
            ScheduleProcess(
                upid,
                definition_id,
                command,
                env,
                cwd,
                configuration,
                subscribers,
                constraints,
                queueing_mode,
                restart_mode,
                execution_engine_id,
                node_exclusive,
                name,
                once,
            )
        )

    def schedule_processes(self, requests: list[ScheduleProcess]) -> list[dict]:
        """Many schedules in one request; each result is a process or ``{upid, error, message}``."""
        return self._call(ScheduleProcesses(list(requests)))

    def terminate_process(self, upid: str) -> dict:
        return self._call(KillProcess(upid))

    def restart_process(self, upid: str) -> dict:
        return self._call(RestartProcess(upid))

    def describe_process(self, upid: str) -> dict:
        return self._call(DescribeProcess(upid))

    def describe_processes(
        self, upids: list[str] | None = None, state: str | None = None
    ) -> list[dict]:
        return self._call(DescribeProcesses(upids, state))

    def set_system_boot(self, on: bool) -> dict:
        return self._call(SetSystemBoot(bool(on)))

    def dump(self) -> dict:
        return self._call(Dump())

    def process_counts(self) -> dict[str, int]:
        return self._call(ProcessCounts())

    def node_state(
        self, node_id: str, domain_id: str, state: str, properties: dict | None = None
    ) -> None:
        """Announce a node by hand (``static_resources``), as EPUM would."""
        return self._call(NodeState(node_id, domain_id, state, dict(properties or {})))

    # ---- conveniences -------------------------------------------------------------------

    def wait_process(
        self, upid: str, states: str | Iterable[str], timeout: float = 30.0, every: float = 0.05
    ) -> dict:
        """Poll until ``upid`` is in one of ``states``; ``TimeoutError`` with its last state."""
        want = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            p = self.describe_process(upid)
            if p["state"] in want:
                return p
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"process {upid} is {p['state']} (round {p['round']}), not {sorted(want)}"
                )
            time.sleep(every)
