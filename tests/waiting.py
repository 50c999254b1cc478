"""The tests' one way to wait for a condition (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, every: float = 0.05,
             what: str | None = None) -> Any:
    """The first truthy value of ``predicate()``, asked every ``every`` s; AssertionError after
    ``timeout`` s, naming ``what`` (or the predicate's docstring) and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            name = what or getattr(predicate, "__doc__", None) or "condition"
            raise AssertionError(f"timed out after {timeout}s waiting for {name} (last: {value!r})")
        time.sleep(every)
