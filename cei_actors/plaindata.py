"""Plain data for people and JSON: what the CLI prints and the debug tools return."""

from __future__ import annotations

import json
from typing import Any


def plain(value: Any, as_text: bool = True) -> Any:
    """``value`` as JSON-able data (bytes as hex, tuples as lists); as text when ``as_text``."""

    def convert(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): convert(x) for k, x in v.items()}
        if isinstance(v, list | tuple | set | frozenset):
            return [convert(x) for x in v]
        if isinstance(v, bytes):
            return v.hex()
        return v

    data = convert(value)
    return json.dumps(data, sort_keys=True, default=str) if as_text else data


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun, singular for 1: ``1 process``, ``2 processes`` (``plural``: default
    the noun plus ``es`` after s/x/ch/sh, else ``s``)."""
    if n == 1:
        return f"1 {noun}"
    if plural is None:
        plural = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n} {plural}"


__all__ = ["count", "plain"]
