"""A snapshot written by another process, so that the leader never pays for it (decision FO5).

A leader's runner spawns ``python -m cei_actors.runtime.snapshotter`` once (a fresh
interpreter: nothing of the leader's heap is copied) and sends it a job for each due snapshot,
one JSON object a line on its stdin: the log URL and options, the stream and the offset
``upto`` it has appended. The snapshotter folds the log from the newest usable snapshot up to
``upto`` with the component class the job names (:func:`fold_class`: the leader's own, or the
package class it folds as), saves the
snapshot at ``upto`` and answers one line, ``{"bytes": N}`` (0: a snapshot at or past ``upto``
was already stored) or ``{"error": "..."}``; it keeps no state between jobs and exits at the end
of its input (when the leader exits). It runs at a lower CPU priority (:data:`NICE`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import sys
import time
from typing import IO, Any

from ..eventlog import EventLog, Snapshot, open_log
from .core import Component
from .runner import Runner, snapshot_blob

logger = logging.getLogger(__name__)

#: The snapshotter's niceness: it is background work (~30 s of CPU for a PD of 1M processes),
#: the leader's messages come first; on a busy host the snapshot waits instead.
NICE = 10

#: How long to wait for the log to show the offset asked for (a ZooKeeper server the
#: snapshotter reads from may lag the one the leader wrote to by a moment).
HEAD_WAIT_S = 10.0


class SnapshotterError(Exception):
    """The snapshot asked for cannot be written (the message says why)."""


#: What a snapshot depends on: a component that keeps these of the class owning its stream
#: folds and serializes as the snapshotter's does (it may decide differently).
_FOLD = ("registry", "snapshot_version", "initial_state", "apply", "body_appliers", "snapshot", "restore")


def fold_class(component: Component[Any]) -> str | None:
    """``module:Class`` of the class a snapshotter builds to fold ``component``'s stream: the
    least derived class of this package's whose fold and snapshot (:data:`_FOLD`) ``component``
    keeps unchanged, or None if there is none (a variant known to this process only, e.g. one
    defined in a test or an embedding application, whose snapshots are forked instead)."""
    mine = type(component)
    for cls in reversed(mine.__mro__):
        if cls is Component or not issubclass(cls, Component):
            continue
        if (cls.__module__.startswith("cei_actors.") and "<" not in cls.__qualname__
                and all(getattr(mine, name) is getattr(cls, name) for name in _FOLD)):
            return f"{cls.__module__}:{cls.__qualname__}"
    return None


def _build(path: str) -> Component[Any]:
    module, _, name = path.partition(":")
    if not module.startswith("cei_actors."):
        raise SnapshotterError(f"{path!r} is not a component of this package")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Component)):
        raise SnapshotterError(f"{path!r} is not a component")
    return cls.for_replay()


def write_snapshot(component: Component[Any], log: EventLog, stream: str, upto: int, ts: float) -> int:
    """Fold ``stream`` from its newest usable snapshot up to ``upto`` and save the state as the
    snapshot at ``upto``; returns its size in bytes (0: a snapshot at or past ``upto`` exists)."""
    deadline = time.monotonic() + HEAD_WAIT_S
    while log.head(stream) < upto:
        if time.monotonic() > deadline:
            raise SnapshotterError(f"stream {stream}: the log's head {log.head(stream)} is below offset {upto}")
        time.sleep(0.05)
    folder = Runner(component, log, stream=stream)
    state, head, _ = folder._restore_snapshot()
    if head >= upto:
        return 0
    if state is None:
        state = component.initial_state()
    decode, apply = component.registry.from_record, component.apply
    for record in log.read(stream, head + 1, upto):
        if record.offset != head + 1:
            raise SnapshotterError(f"stream {stream}: folded up to {head}, next record is {record.offset}")
        state = apply(state, decode(record))
        head = record.offset
    if head != upto:
        raise SnapshotterError(f"stream {stream}: the log ends at {head}, below offset {upto}")
    blob = snapshot_blob(component, state)
    if blob is None:
        return 0
    log.save_snapshot(Snapshot(stream, upto, ts, component.snapshot_version, blob))
    return len(blob)


def run(job: dict[str, Any]) -> int:
    """Carry out one job as the leader sends it (see the module's doc); returns the bytes saved."""
    stream, upto, ts = str(job["stream"]), int(job["upto"]), float(job["ts"])
    component = _build(str(job["component"]))
    log = open_log(str(job["log"]), **dict(job.get("options") or {}))
    try:
        if job.get("chunk_bytes"):
            log.snapshot_chunk_bytes = int(job["chunk_bytes"])
        return write_snapshot(component, log, stream, upto, ts)
    finally:
        log.close()


def _give_back_memory() -> None:
    """Return the free pages of the C heap to the system (glibc's ``malloc_trim``): a job's
    state is gone, but without this a 1M-process PD job left ~0.9 GB resident until the next."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).malloc_trim(0)


def serve(jobs: IO[str], answers: IO[str]) -> None:
    """Carry out each job (one JSON object a line) of ``jobs``, answering each with one line
    on ``answers``: ``{"bytes": N}`` or ``{"error": "one line"}``; return at end of input or
    when the leader can no longer be answered (it died: a snapshot saved is kept)."""
    for line in jobs:
        try:
            answer: dict[str, Any] = {"bytes": run(json.loads(line))}
        except Exception as exc:  # noqa: BLE001 - reported to the leader as one line
            answer = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        gc.collect()  # what the fold left (cycles, if any) goes before the next job
        _give_back_memory()
        try:
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
        except (BrokenPipeError, ValueError):  # the leader is gone (e.g. kill -9): so is the job
            return


def main() -> int:
    with contextlib.suppress(OSError):
        os.nice(NICE)
    gc.disable()  # a fold makes no cycles to collect (RS1); the collector would only slow it
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="snapshotter: %(message)s")
    serve(sys.stdin, sys.stdout)
    with contextlib.suppress(OSError):
        sys.stdout.close()  # nothing more to say: no second broken pipe at exit
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
