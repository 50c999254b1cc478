"""The messages an EEAgent receives, and the heartbeat it sends to the PD.

Processes are keyed by ``(upid, round)``. ``LaunchProcess`` for a key the agent already has is
a duplicate (ignored); a higher round of a live upid replaces the older round. Replies are
``Ok(process dict)`` or ``ErrorReply``; the PD does not wait for them, it learns outcomes from
heartbeats.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.messages import InvalidMessage, Message, validate
from . import states as st


def _check_key(cls: str, upid: str, round_: int) -> None:
    if not upid:
        raise InvalidMessage(f"{cls}.upid: must not be empty")
    if round_ < 0:
        raise InvalidMessage(f"{cls}.round: must be >= 0")


@dataclass(frozen=True)
class LaunchProcess(Message):
    """Run ``command`` (argv) as process ``(upid, round)`` with ``env`` merged over a safe base."""

    upid: str
    round: int
    command: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None

    def check(self) -> None:
        _check_key("LaunchProcess", self.upid, self.round)
        if not self.command:
            raise InvalidMessage("LaunchProcess.command: must not be empty")


@dataclass(frozen=True)
class TerminateProcess(Message):
    """SIGTERM the process group of ``(upid, round)``, SIGKILL after the agent's grace."""

    upid: str
    round: int

    def check(self) -> None:
        _check_key("TerminateProcess", self.upid, self.round)


@dataclass(frozen=True)
class CleanupProcess(Message):
    """Forget the terminal process ``(upid, round)``; a no-op if unknown."""

    upid: str
    round: int

    def check(self) -> None:
        _check_key("CleanupProcess", self.upid, self.round)


@dataclass(frozen=True)
class LeaseGrant(Message):
    """The PD's answer to heartbeat ``seq``: the agent may run its processes until ``fence``
    seconds after it sent that heartbeat (its own monotonic clock); decision PD9."""

    seq: int
    fence: float

    def check(self) -> None:
        if type(self.seq) is not int or self.seq < 1:
            raise InvalidMessage("LeaseGrant.seq: must be an int >= 1")
        if not (isinstance(self.fence, int | float) and 0 < self.fence < 1e9):
            raise InvalidMessage("LeaseGrant.fence: must be seconds > 0")


@dataclass(frozen=True)
class AgentRequests(Message):
    """Several requests in one message, handled in order (the PD batches per agent)."""

    requests: list[LaunchProcess | TerminateProcess | CleanupProcess | LeaseGrant]

    def check(self) -> None:
        for request in self.requests:
            validate(request)


#: Most bytes of output one :class:`ReadOutput` reply carries (a client pages on by offset).
MAX_OUTPUT_CHUNK = 256 * 1024
#: Most lines :class:`ReadOutput` ``tail`` may ask for.
MAX_TAIL_LINES = 100_000
#: The output streams of a process.
OUTPUT_STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class ReadOutput(Message):
    """Reply ``Ok`` with up to ``limit`` bytes of the output file of ``(upid, round)``
    (``stream`` stdout or stderr) from byte ``offset``, or from where its last ``tail`` lines
    begin: ``{upid, round, stream, offset, next_offset, size, data, state}`` (``state``: the
    agent's record of it, None once cleaned up). ``not_found`` when the agent has neither a
    record nor the file (never ran here, or removed after the output retention)."""

    upid: str
    round: int
    stream: str = "stdout"
    offset: int = 0
    limit: int = MAX_OUTPUT_CHUNK
    tail: int | None = None

    def check(self) -> None:
        _check_key("ReadOutput", self.upid, self.round)
        if self.stream not in OUTPUT_STREAMS:
            raise InvalidMessage(f"ReadOutput.stream: expected stdout or stderr, got {self.stream!r:.40}")
        if self.offset < 0:
            raise InvalidMessage("ReadOutput.offset: must be >= 0")
        if not 0 < self.limit <= MAX_OUTPUT_CHUNK:
            raise InvalidMessage(f"ReadOutput.limit: must be 1 to {MAX_OUTPUT_CHUNK} bytes")
        if self.tail is not None and not 0 <= self.tail <= MAX_TAIL_LINES:
            raise InvalidMessage(f"ReadOutput.tail: must be 0 to {MAX_TAIL_LINES} lines")


@dataclass(frozen=True)
class DumpAgentState(Message):
    """Reply ``Ok(heartbeat dict)`` and send a heartbeat to the PD now."""


@dataclass(frozen=True)
class AgentHeartbeat(Message):
    """Level-based: every process the agent knows, ``{upid, round, state, msg}`` each, plus
    ``cause`` (:data:`~.states.CAUSE_NODE`) for an end the agent caused because its node is
    going away.

    ``timestamp`` is the agent's clock (seconds since the epoch); ``state`` an agent state
    name (``RUNNING``; the original's ``"500-RUNNING"`` is accepted too). ``seq`` > 0 asks
    the PD for a :class:`LeaseGrant` naming it (0: the agent holds no lease).
    """

    max_bytes = None  # sized by the agent's process table, not a client (decisions M2)

    eeagent_id: str
    node_id: str | None
    timestamp: float
    processes: list[dict]
    seq: int = 0

    def check(self) -> None:
        if not self.eeagent_id:
            raise InvalidMessage("AgentHeartbeat.eeagent_id: must not be empty")
        if type(self.seq) is not int or self.seq < 0:
            raise InvalidMessage("AgentHeartbeat.seq: must be an int >= 0")
        normalize = st.normalize
        for i, p in enumerate(self.processes):
            problem = None
            upid, round_ = p.get("upid"), p.get("round")
            if not isinstance(upid, str) or not upid:
                problem = f"upid: expected a non-empty str, got {upid!r:.40}"
            elif type(round_) is not int or round_ < 0:
                problem = f"round: expected an int >= 0, got {round_!r:.40}"
            else:
                msg = p.get("msg")
                cause = p.get("cause")
                if msg is not None and not isinstance(msg, str):
                    problem = "msg: expected a str"
                elif cause is not None and not isinstance(cause, str):
                    problem = f"cause: expected a str, got {cause!r:.40}"
                else:
                    try:
                        normalize(p.get("state"))
                    except ValueError as exc:
                        problem = f"state: {exc}"
            if problem is not None:
                raise InvalidMessage(f"AgentHeartbeat.processes[{i}].{problem}")
