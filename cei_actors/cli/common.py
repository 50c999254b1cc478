"""What the ``cei`` command groups share: the connection to a running system, usage errors,
``KEY=VALUE`` arguments and YAML/JSON definition files."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .output import CliError, Output


class UsageError(CliError):
    """A command line that parses but does not make sense (exit status 2)."""


def not_up_message(home: Path) -> str:
    """The one line for "no system runs under ``home``"."""
    return f"system not up (no {home / 'system.json'}): run cei up"


@contextlib.contextmanager
def connected(args: argparse.Namespace) -> Iterator[Any]:
    """The launcher's ``Connection`` to the system under ``--home``; closed afterwards.

    Raises :class:`CliError` ("system not up ...") when nothing runs there.
    """
    from ..launch.launcher import NotRunning, connect

    home = Path(args.home)
    if not (home / "system.json").exists():
        raise CliError(not_up_message(home))
    try:
        conn = connect(home, timeout=getattr(args, "request_timeout", 10.0))
    except NotRunning as exc:
        raise CliError(str(exc) or not_up_message(home)) from None
    args._connection = conn  # for --watch: it follows the system's logs through it
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def check_with(command: str) -> Iterator[None]:
    """Name ``command`` (e.g. ``cei process describe P``) as the way to see whether a request
    whose outcome is unknown (:class:`~..runtime.client.OutcomeUnknown`) took effect."""
    from ..runtime.client import OutcomeUnknown

    try:
        yield
    except OutcomeUnknown as exc:
        exc.check = exc.check or command
        raise


def scalar(text: str) -> Any:
    """A command-line value read as a YAML scalar (``3`` -> 3, ``true`` -> True, ``a`` -> "a")."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None and text.strip() not in ("null", "~") else value


def assignments(items: list[str] | None, what: str, *, parse: bool = True) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b.c": "x"}`` (values as YAML scalars when ``parse``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = scalar(value) if parse else value
    return out


def load_document(path: str, what: str) -> Any:
    """The YAML (or JSON) document in ``path``; a missing or malformed file is a :class:`CliError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
    except yaml.YAMLError as exc:
        from ..launch.plan import yaml_error_text

        raise CliError(f"{what} {path}: not valid YAML ({yaml_error_text(exc)})") from None
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"{what} {path}: not valid JSON ({first})") from None
    return data


def load_mapping(path: str, what: str) -> dict[str, Any]:
    """Like :func:`load_document`, but the document must be a mapping."""
    data = load_document(path, what)
    if not isinstance(data, dict):
        raise CliError(f"{what} {path}: expected a mapping at the top, got {type(data).__name__}")
    return data


def seconds(text: str) -> float:
    """An argparse ``type``: a positive, finite number of seconds (a timeout, an interval)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def upper_choice(choices: tuple[str, ...], lower: bool = True) -> Any:
    """An argparse ``type`` that accepts any case of ``choices`` and gives the upper-case name."""
    shown = ", ".join(c.lower() if lower else c for c in choices)

    def convert(text: str) -> str:
        value = text.upper()
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {shown})"
            )
        return value

    convert.__name__ = "choice"
    return convert


def done(out: Output, result: Any, text: str) -> None:
    """Report a change: ``result`` as JSON, or ``text`` for people."""
    if out.json:
        out.emit(result)
    else:
        out.line(text)
