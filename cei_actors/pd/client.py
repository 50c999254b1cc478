"""PDClient: typed calls to the Process Dispatcher.

It wraps a runtime ``ServiceClient`` (or anything with ``call(message, timeout=None)``
returning the ``Ok`` value and raising on an ``ErrorReply``, and ``tell(message)``). Processes
come back as dicts (``upid, state, round, node_id, assigned, restart_mode, queueing_mode,
constraints, engine, ...``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

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
from .states import advances

if TYPE_CHECKING:
    from ..subscribe import Watcher


class PDClient:
    """Requests to the PD, each returning the reply's value; errors raise (from the transport)."""

    def __init__(self, service: Any, timeout: float | None = None, *,
                 changes: Callable[[], Watcher] | None = None,
                 pump: Callable[[float], None] | None = None) -> None:
        """``changes``: the :class:`~cei_actors.subscribe.Watcher` to wait on (waits poll
        without one); ``pump(seconds)``: runs the actors meanwhile (the simple base runs
        them only while the caller is inside a call)."""
        self.service = service
        self.timeout = timeout
        self.changes = changes
        self.pump = pump

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
        """Wait until ``upid`` is in one of ``states``; ``TimeoutError`` with its last state.

        With ``changes`` it asks once, then waits for the PD's recorded changes of the
        process; without, it asks every ``every`` seconds."""
        want = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        if self.changes is not None:
            return self._wait_changes(upid, want, deadline)
        while True:
            p = self.describe_process(upid)
            if p["state"] in want:
                return p
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"process {upid} is {p['state']} (round {p['round']}), not {sorted(want)}"
                )
            time.sleep(every)

    def _wait_changes(self, upid: str, want: set[str], deadline: float) -> dict:
        assert self.changes is not None
        sub = self.changes().subscribe(kinds=["process"], upids=[upid])
        try:
            p = self.describe_process(upid)  # after subscribing: no change can fall between
            while p["state"] not in want:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"process {upid} is {p['state']} (round {p['round']}), not {sorted(want)}"
                    )
                if self.pump is not None:
                    self.pump(min(remaining, 0.05))
                    change = sub.get(0)
                else:
                    change = sub.get(remaining)
                if change is None and sub.closed:
                    raise RuntimeError(f"waiting for process {upid}: the subscription ended ({sub.error})")
                while change is not None:
                    d = change.data
                    # a change the watcher had not yet folded when we asked is older news
                    if d is not None and (d["round"], d["state"]) != (p["round"], p["state"]) and \
                            advances(p["round"], p["state"], d["round"], d["state"]):
                        p = d
                        if p["state"] in want:
                            break
                    change = sub.get(0)
            return p
        finally:
            sub.close()
