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


__all__ = ["plain"]
