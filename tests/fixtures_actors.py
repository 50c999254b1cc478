"""Shared actor-system fixtures (imported by conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cei_actors.runtime.system import TCP_BASE, shutdown_system, start_system


@pytest.fixture(scope="module")
def tcp_system() -> Iterator[Any]:
    """A thespian TCP actor system for a test module (loopback, authenticated), shut down after it."""
    asys = start_system(TCP_BASE)
    try:
        yield asys
    finally:
        shutdown_system(asys)
