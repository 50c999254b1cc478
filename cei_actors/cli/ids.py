"""Ids by unique prefix, as ``kubectl``/``nomad`` users expect: an exact id wins; else the one
id that starts with what was given; several -> a one-line error listing them; none -> the id
as given (the component then answers "unknown ...")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .output import CliError

#: How many candidates an "ambiguous" error lists.
SHOWN = 8


def resolve(what: str, given: str, candidates: Iterable[str]) -> str:
    """The id ``given`` names among ``candidates`` (exact, else unique prefix); ``given`` itself
    when none matches; :class:`CliError` when several start with it."""
    ids = list(dict.fromkeys(candidates))
    if given in ids or not given:
        return given
    matches = sorted(i for i in ids if i.startswith(given))
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:SHOWN]) + (f" ... ({len(matches)} in all)" if len(matches) > SHOWN else "")
        raise CliError(f"{what} id {given!r} is ambiguous: {shown}")
    return given


def resolve_lazily(what: str, given: str, exists: Callable[[str], bool],
                   candidates: Callable[[], Iterable[str]]) -> str:
    """Like :func:`resolve`, but lists the candidates only when ``exists(given)`` is false (one
    cheap call for a whole id, the listing only for a prefix)."""
    if exists(given):
        return given
    return resolve(what, given, candidates())


def process_id(conn: Any, given: str) -> str:
    """A upid from a whole id or a unique prefix (through the PD)."""
    from ..runtime.client import NotFound

    def exists(upid: str) -> bool:
        try:
            conn.pd.describe_process(upid)
        except NotFound:
            return False
        return True

    return resolve_lazily("process", given, exists, lambda: (p["upid"] for p in conn.pd.describe_processes()))


def node_id(nodes: Iterable[dict[str, Any]], given: str) -> str:
    """A node id from a whole id or a unique prefix among ``nodes`` (e.g. ``node.gather``)."""
    return resolve("node", given, (n["node_id"] for n in nodes))


def domain_id(conn: Any, given: str) -> str:
    """An EPUM domain id from a whole id or a unique prefix."""
    return resolve("domain", given, conn.epum.list_domains())


def group_name(conn: Any, given: str) -> str:
    """An HA group name from a whole name or a unique prefix."""
    return resolve("HA group", given, (g["name"] for g in conn.ha.list_groups()))
