"""The messages the Process Dispatcher receives, and the notice it sends to subscribers.

Requests get ``Ok(value)`` or ``ErrorReply``. A process comes back as a dict with at least
``upid, state, round, node_id, assigned, restart_mode, queueing_mode, constraints, engine``.
The PD also handles EPUM's ``epum.messages.NodeState`` (node RUNNING or lost) and the
EEAgents' ``eeagent.messages.AgentHeartbeat``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..runtime.messages import InvalidMessage, Message, validate
from . import states as ps

_DEFINITION_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DEFINITION_TYPES = ("supd", "pyon", "pyon_single")


def _nonempty(where: str, value: str) -> None:
    if not value:
        raise InvalidMessage(f"{where}: must not be empty")


def _check_upid(cls: str, upid: str) -> None:
    if not upid:  # ``_nonempty``'s test, its message built only for a refusal (RT17)
        _nonempty(f"{cls}.upid", upid)
    if len(upid) > 256 or "\0" in upid or "\n" in upid:
        raise InvalidMessage(f"{cls}.upid: at most 256 characters, no NUL or newline")


def _check_str_list(where: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise InvalidMessage(f"{where}: expected a list of str")


def _check_env(where: str, env: Any) -> None:
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidMessage(f"{where}: expected a dict of str to str (names without '=')")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


# ---- definitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateDefinition(Message):
    """A process definition. ``executable``: ``{exec, argv?, working_directory?, env?}``
    (``supd``) or ``{module, class}`` (``pyon``); ``exec`` + ``argv`` is the default command
    of processes scheduled from it. Creating the same definition again is a no-op."""

    definition_id: str
    executable: dict
    definition_type: str = "supd"
    name: str | None = None
    description: str | None = None

    def check(self) -> None:
        _check_definition(type(self).__name__, self)


@dataclass(frozen=True)
class UpdateDefinition(Message):
    """Replace a definition (processes keep what they were scheduled with)."""

    definition_id: str
    executable: dict
    definition_type: str = "supd"
    name: str | None = None
    description: str | None = None

    def check(self) -> None:
        _check_definition(type(self).__name__, self)


def _check_definition(cls: str, m: CreateDefinition | UpdateDefinition) -> None:
    if not _DEFINITION_ID.match(m.definition_id):
        raise InvalidMessage(
            f"{cls}.definition_id: {m.definition_id!r} is not a valid id "
            "(letters, digits, _ . -; up to 128)"
        )
    if m.definition_type not in DEFINITION_TYPES:
        raise InvalidMessage(
            f"{cls}.definition_type: {m.definition_type!r} is not one of {', '.join(DEFINITION_TYPES)}"
        )
    ex = m.executable
    for key in ex:
        if key not in ("exec", "argv", "working_directory", "env", "module", "class", "url"):
            raise InvalidMessage(f"{cls}.executable: unknown key {key!r}")
    for key in ("exec", "working_directory", "module", "class", "url"):
        if key in ex and (not isinstance(ex[key], str) or not ex[key]):
            raise InvalidMessage(f"{cls}.executable.{key}: expected a non-empty str")
    if "argv" in ex:
        _check_str_list(f"{cls}.executable.argv", ex["argv"])
    if "env" in ex:
        _check_env(f"{cls}.executable.env", ex["env"])
    if m.definition_type == "supd" and "exec" not in ex:
        raise InvalidMessage(f"{cls}.executable: a supd definition needs 'exec'")


@dataclass(frozen=True)
class DescribeDefinition(Message):
    definition_id: str


@dataclass(frozen=True)
class ListDefinitions(Message):
    """Reply: the definition ids, sorted."""


@dataclass(frozen=True)
class RemoveDefinition(Message):
    definition_id: str


# ---- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateProcess(Message):
    """Create an UNSCHEDULED process from a definition (idempotent for the same arguments)."""

    upid: str
    definition_id: str
    name: str | None = None

    def check(self) -> None:
        _check_upid("CreateProcess", self.upid)


@dataclass(frozen=True)
class ScheduleProcess(Message):
    """Run process ``upid``: a new one, an UNSCHEDULED one, or a new round of one at rest.

    The command is ``command`` or else the definition's ``exec`` + ``argv``. ``constraints``
    map property names to a value (equality) or a list (membership). ``execution_engine_id``
    is the same as ``constraints["engine"]``. Modes are case-insensitive. Scheduling a live
    upid again with the same parameters returns it unchanged; different ones are refused.
    ``configuration["process"]`` may hold ``minimum_time_between_starts`` and
    ``omit_from_system_restart``. ``once``: never a new round, so a retry after an unknown
    outcome cannot run the work twice: a upid the PD has in any state (ended too) is
    returned as it stands (same parameters) or refused (docs/decisions.md C2).
    """

    upid: str
    definition_id: str | None = None
    command: list[str] | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    configuration: dict | None = None
    subscribers: list[str] | None = None
    constraints: dict | None = None
    queueing_mode: str | None = None
    restart_mode: str | None = None
    execution_engine_id: str | None = None
    node_exclusive: str | None = None
    name: str | None = None
    once: bool = False

    def check(self) -> None:
        _check_upid("ScheduleProcess", self.upid)
        if self.command is not None and not self.command:
            raise InvalidMessage("ScheduleProcess.command: must not be empty")
        if self.command is not None and any("\0" in a for a in self.command):
            raise InvalidMessage("ScheduleProcess.command: contains a NUL character")
        if self.env is not None:
            _check_env("ScheduleProcess.env", self.env)
        if self.queueing_mode is not None and self.queueing_mode.upper() not in ps.QUEUEING_MODES:
            raise InvalidMessage(
                f"ScheduleProcess.queueing_mode: {self.queueing_mode!r} is not one of "
                f"{', '.join(ps.QUEUEING_MODES)}"
            )
        if self.restart_mode is not None and self.restart_mode.upper() not in ps.RESTART_MODES:
            raise InvalidMessage(
                f"ScheduleProcess.restart_mode: {self.restart_mode!r} is not one of "
                f"{', '.join(ps.RESTART_MODES)}"
            )
        for key, value in (self.constraints or {}).items():
            if not isinstance(key, str) or not key:
                raise InvalidMessage("ScheduleProcess.constraints: keys must be non-empty str")
            ok = _scalar(value) or (isinstance(value, list) and all(map(_scalar, value)))
            if not ok:
                raise InvalidMessage(
                    f"ScheduleProcess.constraints[{key!r}]: expected a value or a list of values"
                )
        if self.subscribers is not None:
            _check_str_list("ScheduleProcess.subscribers", self.subscribers)
        if self.node_exclusive is not None and not self.node_exclusive:
            raise InvalidMessage("ScheduleProcess.node_exclusive: must not be empty")
        proc = (self.configuration or {}).get("process")
        if proc is not None:
            if not isinstance(proc, dict):
                raise InvalidMessage("ScheduleProcess.configuration.process: expected a dict")
            mt = proc.get("minimum_time_between_starts")
            if mt is not None and (
                isinstance(mt, bool) or not isinstance(mt, int | float) or mt < 0
            ):
                raise InvalidMessage(
                    "ScheduleProcess.configuration.process.minimum_time_between_starts: "
                    "expected a number >= 0"
                )


@dataclass(frozen=True)
class ScheduleProcesses(Message):
    """Several ScheduleProcess requests in one message (bulk launches).

    Reply: a list with, per request, the process dict or ``{"error": code, "message": ...}``;
    a refused request does not stop the others.
    """

    requests: list[ScheduleProcess]

    def check(self) -> None:
        for request in self.requests:
            validate(request)


@dataclass(frozen=True)
class KillProcess(Message):
    """``terminate_process``: end the process (TERMINATING until its agent confirms)."""

    upid: str


@dataclass(frozen=True)
class RestartProcess(Message):
    """Run the process again in a new round: in place if it is on a node, else requeued."""

    upid: str


@dataclass(frozen=True)
class DescribeProcess(Message):
    upid: str


@dataclass(frozen=True)
class DescribeProcesses(Message):
    """All processes, or those in ``upids``, optionally only those in ``state``."""

    upids: list[str] | None = None
    state: str | None = None

    def check(self) -> None:
        if self.state is not None and not ps.is_state(self.state.upper()):
            raise InvalidMessage(f"DescribeProcesses.state: unknown state {self.state!r}")


@dataclass(frozen=True)
class SetSystemBoot(Message):
    """Begin (True) or end (False) system-boot mode (reference §4.7)."""

    on: bool


@dataclass(frozen=True)
class ProcessCounts(Message):
    """Reply: ``{state: number of processes}`` (cheap; for status displays and waiting)."""


@dataclass(frozen=True)
class Dump(Message):
    """Reply: ``{processes, nodes, resources, queue, definitions, system_boot, needs}``."""


# ---- timers (the PD sends these to itself; tests may send them explicitly) -------------------


@dataclass(frozen=True)
class MonitorResources(Message):
    """Check resource heartbeat ages: OK -> WARNING -> MISSING (evacuate)."""


@dataclass(frozen=True)
class RetryDispatches(Message):
    """Resend launches (and terminations) not acknowledged after ``dispatch_retry_seconds``."""


@dataclass(frozen=True)
class ForgetProcesses(Message):
    """Forget finished processes older than the retention (each leaves a tombstone)."""


@dataclass(frozen=True)
class Matchmake(Message):
    """Run a matchmaking pass (throttled processes that came due)."""


@dataclass(frozen=True)
class FlushOutbox(Message):
    """Send the requests queued for each EEAgent, one message per agent."""


@dataclass(frozen=True)
class FlushNeeds(Message):
    """Send the current needs to EPUM if they changed."""


# ---- outbound ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessStateChanged(Message):
    """To a process's subscribers on each state change: ``{upid, round, state, node_id,
    assigned}``."""

    process: dict
