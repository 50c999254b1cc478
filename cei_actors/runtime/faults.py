"""Crash points: end this process (``os._exit(137)``, as a kill -9 would) at named places.

For fault tests only (``tests/faults/``). Off by default, and free when off: :func:`crash_point`
returns at its first test while nothing is armed. Armed per actor process when the shell
handles ``Start`` (:func:`arm`), from the component config key ``crash_at`` or, when the
config has none, the environment variable ``CEI_CRASH_AT``. The spec is a comma-separated
list of ``[stream:]point:probability``; an entry with a stream applies only to the actor of
that stream (``pd``, ``epum``, ``provisioner``, ...), so one environment can serve a whole
system::

    CEI_CRASH_AT=provisioner:after_work.create:0.3,pd:after_append:0.05

The points (each is passed by a leader only):

- ``after_work.<kind>``: a ``Work`` handler returned (the cloud call was made: ``create``,
  ``destroy``, ``list`` for the Provisioner) and its result message is not handled yet;
  ``after_work`` matches every kind;
- ``after_append``: a batch's events are appended, none of its effects performed yet;
- ``after_effects``: a batch's effects are performed and its replies sent;
- ``after_recovery``: a new leader rebuilt its state and appended what ``recovered`` decided,
  its effects (the re-driven intents) not performed yet.

Crash points arm the whole OS process: under a one-process actor base (``simpleSystemBase``)
a firing point ends every actor in it. A firing point writes one line
(``cei crash point NAME fired (pid N)``) to stderr before it exits. See docs/decisions.md FT1.
"""

from __future__ import annotations

import contextlib
import os
import random

__all__ = ["ENV", "EXIT_CODE", "arm", "armed", "crash_point", "parse"]

#: The environment variable read when the config has no ``crash_at``.
ENV = "CEI_CRASH_AT"
#: The exit status of a fired crash point (what a shell reports for kill -9).
EXIT_CODE = 137

_armed: dict[str, float] = {}
_rng = random.Random()


def parse(spec: str) -> list[tuple[str | None, str, float]]:
    """``(stream or None, point, probability)`` per entry; ``ValueError`` names a bad entry."""
    out: list[tuple[str | None, str, float]] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"crash point {entry!r}: expected [stream:]point:probability")
        try:
            p = float(parts[-1])
        except ValueError:
            raise ValueError(f"crash point {entry!r}: probability {parts[-1]!r} is not a number") from None
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"crash point {entry!r}: probability must be within [0, 1]")
        out.append((parts[0] if len(parts) == 3 else None, parts[-2], p))
    return out


def arm(spec: str | None, stream: str) -> dict[str, float]:
    """Arm the points of ``spec`` (None: ``$CEI_CRASH_AT``) that apply to ``stream``, replacing
    what was armed; returns the armed points. ``ValueError`` (nothing armed) on a bad spec."""
    if spec is None:
        spec = os.environ.get(ENV, "")
    points = {point: p for s, point, p in parse(str(spec)) if s in (None, stream) and p > 0}
    _armed.clear()
    _armed.update(points)
    return dict(_armed)


def armed() -> dict[str, float]:
    """The armed points and their probabilities."""
    return dict(_armed)


def crash_point(name: str, detail: str = "") -> None:
    """End the process here with the probability armed for ``name.detail`` (else ``name``)."""
    if not _armed:
        return
    full = f"{name}.{detail}" if detail else name
    p = _armed.get(full, _armed.get(name, 0.0))
    if p and _rng.random() < p:
        with contextlib.suppress(OSError):
            os.write(2, f"cei crash point {full} fired (pid {os.getpid()})\n".encode())
        os._exit(EXIT_CODE)
