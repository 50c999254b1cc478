"""Save a simulation's component logs as SQLite files that ``cei log`` opens.

Each component's in-memory log becomes ``DIR/<component>.sqlite`` in the schema of
:class:`~cei_actors.eventlog.sqlite.SqliteLog`: the same batches (live and archived), epochs
and snapshots, byte for byte. The file is written directly (not through ``SqliteLog``, whose
new logs get a random id): its log id is derived from the component's name, it is written in
one order with rollback journaling and vacuumed, so the same run gives byte-identical files.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ..eventlog import EventLog
from ..eventlog.sqlite import _SCHEMA

__all__ = ["save_log", "save_logs"]


def save_log(log: EventLog, path: Path, log_id: str) -> None:
    """Write every stream of ``log`` into a new SQLite log file ``path`` (replaced if there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".id"), path.with_name(path.name + "-wal"),
                  path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.executescript(_SCHEMA)
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("BEGIN")
        db.execute("INSERT INTO meta(key, value) VALUES ('log_id', ?)", (log_id,))
        for stream in sorted(log.streams()):
            db.execute("INSERT INTO streams(name, epoch) VALUES (?, ?)", (stream, log.epoch(stream)))
            live = log._index(stream)
            archived = sorted(set(log._archived_index(stream)) - set(live))
            rows = [(stream, first, log._get(stream, first), 0) for first in live]
            rows += [(stream, first, log._get(stream, first), 1) for first in archived]
            db.executemany("INSERT INTO batches(stream, first, blob, archived) VALUES (?, ?, ?, ?)",
                           sorted(rows, key=lambda r: r[1]))
            for offset in sorted(log._snapshot_offsets(stream)):
                chunks = log._get_snapshot(stream, offset) or []
                db.executemany(
                    "INSERT INTO snapshot_chunks(stream, offset, k, blob) VALUES (?, ?, ?, ?)",
                    [(stream, offset, k, blob) for k, blob in enumerate(chunks)])
        db.execute("COMMIT")
        db.execute("VACUUM")
    finally:
        db.close()
    path.chmod(0o600)


def save_logs(system: Any, directory: Path) -> dict[str, str]:
    """Save every component log of ``system`` (a :class:`~.system.CEISystem` or a
    :class:`~.kernel.Simulation`) under ``directory``; component -> ``sqlite:///`` URL."""
    sim = getattr(system, "sim", system)
    directory = Path(directory).resolve()
    saved: dict[str, str] = {}
    for name in sorted(sim.nodes):
        path = directory / f"{name}.sqlite"
        save_log(sim.nodes[name].log, path, f"sim-{sim.seed}-{name}")
        saved[name] = f"sqlite:///{path}"
    return saved
