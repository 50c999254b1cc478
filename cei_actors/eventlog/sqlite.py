"""``sqlite:///PATH``: the embedded default log, one file, no server.

WAL mode lets readers run while the writer appends. Each thread gets its own connection.
The file and its ``-wal`` / ``-shm`` companions are 0600 whatever the umask (SQLite gives the
companions the database file's mode); an existing log that is more open is tightened.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from ..private_files import private_file
from .errors import Fenced, LogUnavailable
from .log import BatchExists, EventLog

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (name TEXT PRIMARY KEY, epoch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    stream TEXT NOT NULL, first INTEGER NOT NULL, blob BLOB NOT NULL, archived INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stream, first));
CREATE TABLE IF NOT EXISTS snapshots (stream TEXT PRIMARY KEY, offset INTEGER NOT NULL, blob BLOB NOT NULL);
"""


def private_log_files(path: Path, url: str) -> None:
    """Create the SQLite file ``path`` as 0600 if missing; tighten it and its -wal / -shm."""
    try:
        private_file(path)
        for suffix in ("-wal", "-shm"):
            companion = path.with_name(path.name + suffix)
            if companion.exists():
                private_file(companion)
    except OSError as exc:
        raise LogUnavailable(f"{url}: cannot create {path}: {exc}") from exc


class SqliteLog(EventLog):
    """A log in one SQLite file."""

    max_batch_bytes = 1024 * 1024

    def __init__(self, url: str, path: str) -> None:
        super().__init__(url)
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogUnavailable(f"{url}: cannot create {self.path.parent}: {exc}") from exc
        private_log_files(self.path, url)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        with self._conn() as db:
            db.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(
                    self.path, timeout=30, isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise LogUnavailable(f"{self.url}: {exc}") from exc
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    def close(self) -> None:
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    def _streams(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT name FROM streams UNION SELECT DISTINCT stream FROM batches "
            "UNION SELECT stream FROM snapshots"
        )
        return [r[0] for r in rows]

    def _epoch(self, stream: str) -> int:
        row = self._conn().execute("SELECT epoch FROM streams WHERE name=?", (stream,)).fetchone()
        return row[0] if row else 0

    def _bump_epoch(self, stream: str) -> int:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO streams(name, epoch) VALUES (?, 1) "
                "ON CONFLICT(name) DO UPDATE SET epoch = epoch + 1",
                (stream,),
            )
            epoch = db.execute("SELECT epoch FROM streams WHERE name=?", (stream,)).fetchone()[0]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return epoch

    def _check_epoch(self, db: sqlite3.Connection, stream: str, epoch: int) -> None:
        row = db.execute("SELECT epoch FROM streams WHERE name=?", (stream,)).fetchone()
        current = row[0] if row else 0
        if current != epoch:
            raise Fenced(stream, epoch, current)

    def _put(self, stream: str, epoch: int, batches: list[tuple[int, bytes]]) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            self._check_epoch(db, stream, epoch)
            for first, blob in batches:
                try:
                    db.execute(
                        "INSERT INTO batches(stream, first, blob) VALUES (?, ?, ?)",
                        (stream, first, blob),
                    )
                except sqlite3.IntegrityError:
                    raise BatchExists(stream, first) from None
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _get(self, stream: str, first: int) -> bytes:
        row = self._conn().execute(
            "SELECT blob FROM batches WHERE stream=? AND first=?", (stream, first)
        ).fetchone()
        if row is None:
            raise KeyError(f"stream {stream!r}: no batch at {first}")
        return row[0]

    def _index(self, stream: str) -> list[int]:
        rows = self._conn().execute(
            "SELECT first FROM batches WHERE stream=? AND archived=0 ORDER BY first", (stream,)
        )
        return [r[0] for r in rows]

    def _archived_index(self, stream: str) -> list[int]:
        rows = self._conn().execute(
            "SELECT first FROM batches WHERE stream=? AND archived=1 ORDER BY first", (stream,)
        )
        return [r[0] for r in rows]

    def _delete(self, stream: str, epoch: int, firsts: list[int]) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            self._check_epoch(db, stream, epoch)
            db.executemany(
                "DELETE FROM batches WHERE stream=? AND first=? AND archived=0",
                [(stream, f) for f in firsts],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _archive(self, stream: str, firsts: list[int]) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "UPDATE batches SET archived=1 WHERE stream=? AND first=?",
                [(stream, f) for f in firsts],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _put_snapshot(self, stream: str, offset: int, blob: bytes) -> None:
        self._conn().execute(
            "INSERT INTO snapshots(stream, offset, blob) VALUES (?, ?, ?) "
            "ON CONFLICT(stream) DO UPDATE SET offset=excluded.offset, blob=excluded.blob",
            (stream, offset, blob),
        )

    def _get_snapshot(self, stream: str) -> bytes | None:
        row = self._conn().execute(
            "SELECT blob FROM snapshots WHERE stream=?", (stream,)
        ).fetchone()
        return row[0] if row else None

    # test hook: damage a stored batch in place
    def _corrupt(self, stream: str, first: int, blob: bytes) -> None:
        self._conn().execute(
            "UPDATE batches SET blob=? WHERE stream=? AND first=?", (blob, stream, first)
        )
