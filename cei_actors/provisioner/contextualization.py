"""Contextualization of a VM that runs an EEAgent: the ``cei-agent`` userdata (pure; no I/O).

A deployable type whose ``contextualization`` has ``method: cei-agent`` makes the Provisioner
send each VM a small document that says how its EEAgent starts::

    contextualization:
      method: cei-agent
      pd: "198.18.0.1:1900"               # the actor system the agent joins: HOST:PORT[/NAME]
                                          # (or every host's admin: "HOST:PORT,HOST:PORT")
      secret_ref: "file:/etc/cei/secret"  # where the system secret is *on the VM*
      epum_name: epum                     # optional (default epum; '' = none)
      slots: "${slots}"                   # optional: numbers or ${var} templates, filled
      heartbeat: "${heartbeat}"           #   from the launch's vars (the PD's engine gives
      fence: "${fence}"                   #   slots, heartbeat and fence)
      grace: 10                           # optional
      state_dir: /var/lib/cei/eeagent     # optional: where the agent keeps its table

The userdata is ``#cei-agent v1`` and one line of JSON. It is rendered once per launch
(:func:`render_agent`, at the registry lookup) and gets each node's id at its create
(:func:`for_node`). The system secret goes *by reference* only: ``secret_ref`` is a path on
the VM that the operator (or the image) provides; a value is never accepted, so no secret is
in the userdata, the log or the cloud's copy of the userdata (decision CL3).

On the VM, ``python -m cei_actors.eeagent --from-userdata FILE`` reads it back
(:func:`parse_userdata`) and starts the agent with :func:`agent_args`.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping
from typing import Any

__all__ = [
    "AGENT_METHOD",
    "HEADER",
    "InvalidUserdata",
    "agent_args",
    "for_node",
    "is_agent_userdata",
    "parse_userdata",
    "render_agent",
    "validate_agent_context",
]

AGENT_METHOD = "cei-agent"
HEADER = "#cei-agent v1"
VERSION = 1
_REQUIRED = ("pd", "secret_ref")
_NUMBERS = ("slots", "heartbeat", "fence", "grace")
_STRINGS = ("pd", "secret_ref", "epum_name", "state_dir")
_KEYS = frozenset({"method", *_STRINGS, *_NUMBERS})
_SECRET_SCHEME = "file:"


class InvalidUserdata(ValueError):
    """A ``cei-agent`` definition or userdata is unusable (a one-line reason)."""


def _template(value: Any, key: str) -> string.Template:
    template = string.Template(value)
    if not template.is_valid():
        raise InvalidUserdata(f"cei-agent {key}: invalid placeholder (write $$ for a literal $)")
    return template


def _check_secret_ref(ref: Any) -> str:
    if not isinstance(ref, str) or not ref.startswith(_SECRET_SCHEME + "/") or "\n" in ref:
        raise InvalidUserdata(
            "cei-agent secret_ref must be file:/ABSOLUTE/PATH (the secret goes by reference, "
            "never in the userdata)")
    return ref


def validate_agent_context(ctx: Mapping[str, Any]) -> None:
    """Check a DT's ``cei-agent`` contextualization; raises :class:`InvalidUserdata`."""
    extra = sorted(set(ctx) - _KEYS)
    if extra:
        raise InvalidUserdata(f"cei-agent contextualization has unknown key {extra[0]!r}")
    for key in _REQUIRED:
        if not isinstance(ctx.get(key), str) or not ctx[key]:
            raise InvalidUserdata(f"cei-agent contextualization needs a string {key!r}")
    for key in _STRINGS:
        if key in ctx:
            if not isinstance(ctx[key], str):
                raise InvalidUserdata(f"cei-agent {key} must be a string")
            _template(ctx[key], key)
    _check_secret_ref(ctx["secret_ref"])
    for key in _NUMBERS:
        if key in ctx:
            value = ctx[key]
            if isinstance(value, str):
                _template(value, key)
            elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidUserdata(f"cei-agent {key} must be a number >= 0 or a ${{var}}")


def _number(key: str, text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidUserdata(f"cei-agent {key} is {text!r}, not a number") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidUserdata(f"cei-agent {key} is {text!r}, not a number >= 0")
    return int(value) if key == "slots" and value == int(value) else value


def render_agent(ctx: Mapping[str, Any], vars: Mapping[str, Any],
                 var_text: Any = str) -> str:
    """The userdata of a launch (no node id yet): templates filled from ``vars``.

    Raises :class:`InvalidUserdata` (a var is missing, a number is not one) and ``KeyError``
    naming a missing var."""
    validate_agent_context(ctx)
    values = {k: var_text(v) for k, v in vars.items()}
    doc: dict[str, Any] = {"version": VERSION}
    for key in (*_STRINGS, *_NUMBERS):
        if key not in ctx:
            continue
        value = ctx[key]
        if isinstance(value, str):
            value = _template(value, key).substitute(values)
            if key in _NUMBERS:
                value = _number(key, value)
        doc[key] = value
    _check_secret_ref(doc["secret_ref"])
    return _dump(doc)


def _dump(doc: Mapping[str, Any]) -> str:
    return HEADER + "\n" + json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"


def is_agent_userdata(userdata: str | None) -> bool:
    return isinstance(userdata, str) and userdata.startswith(HEADER + "\n")


def for_node(userdata: str | None, node_id: str) -> str | None:
    """A launch's userdata for one of its nodes: a ``cei-agent`` document gets the node's
    id; any other userdata is returned unchanged."""
    if not is_agent_userdata(userdata):
        return userdata
    assert userdata is not None
    doc = json.loads(userdata[len(HEADER) + 1:])
    doc["node_id"] = node_id
    return _dump(doc)


def parse_userdata(text: str | bytes) -> dict[str, Any]:
    """The agent's settings from a ``cei-agent`` userdata; :class:`InvalidUserdata` if it
    is not one (or lacks the node id, the PD or the secret reference)."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise InvalidUserdata("userdata is not UTF-8 text") from None
    if not is_agent_userdata(text):
        raise InvalidUserdata(f"userdata does not start with {HEADER!r}")
    try:
        doc = json.loads(text[len(HEADER) + 1:])
    except ValueError as exc:
        raise InvalidUserdata(f"userdata JSON is malformed: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidUserdata("userdata JSON is not an object")
    if doc.get("version") != VERSION:
        raise InvalidUserdata(f"userdata version {doc.get('version')!r} is not {VERSION}")
    for key in ("node_id", *_REQUIRED):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise InvalidUserdata(f"userdata has no {key}")
    _check_secret_ref(doc["secret_ref"])
    for key in _NUMBERS:
        if key in doc and (isinstance(doc[key], bool) or not isinstance(doc[key], int | float)):
            raise InvalidUserdata(f"userdata {key} is not a number")
    for key in ("epum_name", "state_dir"):
        if key in doc and not isinstance(doc[key], str):
            raise InvalidUserdata(f"userdata {key} is not a string")
    return doc


def agent_args(doc: Mapping[str, Any]) -> list[str]:
    """``python -m cei_actors.eeagent`` options for a parsed userdata (flags given after
    them on the command line override them)."""
    args = ["--node-id", doc["node_id"], "--pd", doc["pd"],
            "--secret-file", doc["secret_ref"][len(_SECRET_SCHEME):]]
    if "epum_name" in doc:
        args += ["--epum-name", doc["epum_name"]]
    if "state_dir" in doc:
        args += ["--state-dir", doc["state_dir"]]
    for key in _NUMBERS:
        if key in doc:
            args += [f"--{key}", str(doc[key])]
    return args
