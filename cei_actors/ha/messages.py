"""The messages the HA service receives.

Requests (``CreateGroup`` ...) get ``Ok(value)`` or ``ErrorReply``. ``HAPass`` is HA's own
timer. ``PDReply`` is a PD's answer to a request HA sent it (the actor shell turns the PD's
``Response`` into one). HA also takes the PD's ``ProcessStateChanged`` (HA subscribes every
copy it schedules), EPUM's ``SensorData`` (pushed metrics; ``domain_id`` names the group) and
``SensorReadings`` (pulled sensors, run in the shell's worker pool).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..pd.messages import ScheduleProcess
from ..runtime.messages import InvalidMessage, Message, validate

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
POLICIES = ("npreserving", "sensor")
#: The ScheduleProcess fields a group's ``process`` may set (upid and subscribers are HA's).
PROCESS_KEYS = (
    "definition_id", "command", "env", "cwd", "configuration", "constraints", "queueing_mode",
    "restart_mode", "execution_engine_id", "node_exclusive", "name",
)


def check_name(cls: str, name: str) -> None:
    if not _NAME.match(name):
        raise InvalidMessage(f"{cls}.name: {name!r} is not a valid group name "
                             "(letters, digits, _ . -; up to 64)")


def check_process(cls: str, process: dict) -> None:
    """The group's process spec must make a valid ``ScheduleProcess``."""
    unknown = sorted(set(process) - set(PROCESS_KEYS))
    if unknown:
        raise InvalidMessage(f"{cls}.process: unknown key(s) {', '.join(map(str, unknown))} "
                             f"(expected {', '.join(PROCESS_KEYS)})")
    if not process.get("definition_id") and not process.get("command"):
        raise InvalidMessage(f"{cls}.process: needs definition_id or command")
    try:
        validate(ScheduleProcess("x", **process))
    except InvalidMessage as exc:
        raise InvalidMessage(f"{cls}.process: {exc}") from None


@dataclass(frozen=True)
class CreateGroup(Message):
    """Keep copies of ``process`` alive under ``policy`` (npreserving or sensor).

    ``pds``: the PD peer names to use (None: every PD HA is configured with). Creating the
    same group again with the same arguments returns it; different ones are refused.
    """

    name: str
    policy: str
    parameters: dict
    process: dict
    pds: list[str] | None = None

    def check(self) -> None:
        check_name("CreateGroup", self.name)
        if self.policy not in POLICIES:
            raise InvalidMessage(f"CreateGroup.policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        check_process("CreateGroup", self.process)
        if self.pds is not None and not self.pds:
            raise InvalidMessage("CreateGroup.pds: must not be empty (None: every PD)")


@dataclass(frozen=True)
class ReconfigureGroup(Message):
    """Change the policy or its parameters live.

    With ``policy`` None or the group's own, ``parameters`` merge over the current ones; with
    another policy they replace them. A FAILED group is cleared (it schedules again).
    """

    name: str
    policy: str | None = None
    parameters: dict | None = None

    def check(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise InvalidMessage(f"ReconfigureGroup.policy: {self.policy!r} is not one of {', '.join(POLICIES)}")


@dataclass(frozen=True)
class RemoveGroup(Message):
    """Terminate every copy, then forget the group."""

    name: str


@dataclass(frozen=True)
class DescribeGroup(Message):
    """Reply: the group, its status and why, its copies (where, in which state), what the
    policy wants next."""

    name: str


@dataclass(frozen=True)
class ListGroups(Message):
    """Reply: a summary per group (name, policy, status, target, copies), sorted by name."""


@dataclass(frozen=True)
class HAPass(Message):
    """Ask the PDs for the copies' states, resend what is unacknowledged, apply the policies
    (the periodic timer; tests send it explicitly)."""


@dataclass(frozen=True)
class PDReply(Message):
    """A PD's answer to HA's request ``kind`` (describe, counts, schedule, kill) about ``arg``.

    ``ok`` True: ``value`` is the reply's value; else ``code`` and ``message`` the refusal.
    """

    pd: str
    kind: str
    arg: str
    ok: bool
    value: Any = None
    code: str = ""
    message: str = ""


#: Separator of the fields of the request ids HA gives its requests to PDs.
RID_SEP = "|"


def request_id(pd: str, kind: str, arg: str = "") -> str:
    """The id of an HA request to a PD; :func:`parse_request_id` reads it back."""
    return RID_SEP.join(("ha", pd, kind, arg))


def parse_request_id(rid: str) -> tuple[str, str, str] | None:
    """``(pd, kind, arg)`` of an id made by :func:`request_id`, else None."""
    parts = rid.split(RID_SEP, 3)
    if len(parts) != 4 or parts[0] != "ha":
        return None
    return parts[1], parts[2], parts[3]
