"""``sqlite:///PATH``: the embedded default log, one file, no server.

WAL mode lets readers run while the writer appends. Each thread gets its own connection.
The file and its ``-wal`` / ``-shm`` companions are 0600 whatever the umask (SQLite gives the
companions the database file's mode); an existing log that is more open is tightened.

The marker: a new log stores a random id in its ``meta`` table and in ``PATH.id`` next to the
file. A marker whose log file is missing, empty (SQLite would silently start a new log),
truncated or holds another id is :class:`LogLost`, naming both files; remove the marker to
start a new log there on purpose (docs/decisions.md C4).

With ``read_only`` (URL query ``?read_only=1`` or keyword; what ``cei log`` uses) the file is
opened with SQLite's ``mode=ro`` (``immutable`` when no ``-wal`` file exists, i.e. no writer
has it open, so not even a companion file appears): nothing is created, marked or tightened,
and a file that is not a log is refused (decision DBG1).

Options (URL query or keyword): ``archive`` (``sqlite:///PATH`` or a directory: ``truncate``
moves history there and the batches leave this file; without it they are only marked archived
here) and ``keep_snapshots`` (default 2). The archive is recorded in the file, so a reader that
opens the log without the option (``cei log`` while the system is down) still finds it.

Snapshots are stored in chunks, the data chunks first, each in its own short transaction (an
append never waits behind a whole snapshot), the head chunk last with the removal of the
snapshots no longer kept: a snapshot without its head is invisible.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from ..private_files import private_file
from .errors import BadLogUrl, CorruptLog, EventLogError, Fenced, LogLost, LogUnavailable
from .log import BatchExists, EventLog

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (name TEXT PRIMARY KEY, epoch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    stream TEXT NOT NULL, first INTEGER NOT NULL, blob BLOB NOT NULL, archived INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stream, first));
CREATE TABLE IF NOT EXISTS snapshots (stream TEXT PRIMARY KEY, offset INTEGER NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot_chunks (
    stream TEXT NOT NULL, offset INTEGER NOT NULL, k INTEGER NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (stream, offset, k));
"""


def private_log_files(path: Path, url: str) -> None:
    """Create the SQLite file ``path`` as 0600 if missing; tighten it, its -wal / -shm and its marker."""
    try:
        private_file(path)
        for suffix in ("-wal", "-shm", ".id"):
            companion = path.with_name(path.name + suffix)
            if companion.exists():
                private_file(companion)
    except OSError as exc:
        raise LogUnavailable(f"{url}: cannot create {path}: {exc}") from exc


def flag(value: object) -> bool:
    """A boolean log option given as a bool or as URL text (1/true/yes/on)."""
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


def read_only_uri(path: Path) -> str:
    """The SQLite URI opening ``path`` read-only; ``immutable`` (no lock, no ``-shm``) when no
    ``-wal`` shows a writer, so reading leaves the directory exactly as it was."""
    immutable = not path.with_name(path.name + "-wal").exists()
    absolute = "/" + str(path).lstrip("/")  # "//x" is a URI authority
    return f"file:{quote(absolute)}?mode=ro" + ("&immutable=1" if immutable else "")


def _stored_id(db: sqlite3.Connection) -> str | None:
    """The log id in the file's ``meta`` table, or None (no table: a new or emptied file)."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key='log_id'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return row[0] if row else None


class SqliteLog(EventLog):
    """A log in one SQLite file."""

    max_batch_bytes = 1024 * 1024

    def __init__(
        self, url: str, path: str, *, archive: str | None = None, keep_snapshots: int | str = 2,
        read_only: bool | str = False, **unknown: object,
    ) -> None:
        super().__init__(url)
        if unknown:
            raise BadLogUrl(f"log URL {url!r}: unknown option(s) {', '.join(sorted(unknown))} "
                            "(known: archive, keep_snapshots, read_only)")
        given = self._history_options(archive, keep_snapshots)
        self.path = Path(path)
        self.read_only = flag(read_only)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        if self.read_only:
            self._open_read_only(given)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogUnavailable(f"{url}: cannot create {self.path.parent}: {exc}") from exc
        self._claim()
        with self._conn() as db:
            db.executescript(_SCHEMA)
        db = self._conn()
        row = db.execute("SELECT value FROM meta WHERE key='archive'").fetchone()
        try:
            record = self._use_archive(given, row[0] if row else None, f"sqlite:{_stored_id(db)}")
        except BaseException:
            self.close()
            raise
        if record:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('archive', ?)", (record,))

    def _marker(self) -> tuple[Path, str | None, str]:
        """The log's marker file, the log id it names (None: no marker) and the message for
        a file that lost that log (``{how}`` to fill in)."""
        marker = Path(f"{self.path}.id")
        try:
            expected = marker.read_text().strip() or None
        except FileNotFoundError:
            expected = None
        except OSError as exc:
            raise LogUnavailable(f"{self.url}: cannot read {marker}: {exc}") from exc
        lost = (f"{self.url}: {marker} says {self.path} held the log {expected}, but the file "
                "{how}; restore it, or remove the marker to start a new, empty log there")
        return marker, expected, lost

    def _open_read_only(self, given: str | None) -> None:
        """Open an existing log without writing anything: check its marker and its tables."""
        marker, expected, lost = self._marker()
        if not self.path.is_file():
            if expected:
                raise LogLost(lost.format(how="is missing"))
            raise LogUnavailable(f"{self.url}: no log at {self.path} (no such file)")
        if self.path.stat().st_size == 0:
            if expected:
                raise LogLost(lost.format(how="is empty (emptied or truncated)"))
            raise LogLost(f"{self.url}: {self.path} is empty, not a cei log")
        try:
            db = self._conn()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = {"streams", "batches", "snapshots", "snapshot_chunks"} - tables
            if missing:
                raise LogLost(f"{self.url}: {self.path} is an SQLite file but not a cei log "
                              f"(no {', '.join(sorted(missing))} table)")
            stored = _stored_id(db) if "meta" in tables else None
            if expected is not None and stored != expected:
                raise LogLost(f"{self.url}: {marker} says {self.path} held the log {expected}, "
                              f"but the file holds {stored or 'no log id'}")
            row = db.execute("SELECT value FROM meta WHERE key='archive'").fetchone() if "meta" in tables else None
        except LogLost:
            self.close()
            raise
        except sqlite3.OperationalError as exc:
            self.close()
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # not SQLite at all, or a damaged header
            self.close()
            raise LogLost(f"{self.url}: {self.path} is damaged or not a log: {exc}") from exc
        try:
            self._use_archive(given, row[0] if row else None, f"sqlite:{stored}", read_only=True)
        except BaseException:
            self.close()
            raise

    def _claim(self) -> None:
        """Check the file against its marker (see the module docstring); mark a new log."""
        marker, expected, lost = self._marker()
        if expected is not None:  # looked at before SQLite opens (and writes) the file
            if not self.path.exists():
                raise LogLost(lost.format(how="is missing"))
            if self.path.stat().st_size == 0:
                raise LogLost(lost.format(how="is empty (emptied or truncated)"))
        private_log_files(self.path, self.url)  # 0600 before SQLite creates or opens it
        try:
            try:
                db = self._conn()
            except LogUnavailable as exc:  # connecting reads the header: damage shows here
                cause = exc.__cause__
                if isinstance(cause, sqlite3.DatabaseError) and not isinstance(cause, sqlite3.OperationalError):
                    raise cause from None
                raise
            stored = _stored_id(db)
            if expected is not None:
                if stored is None:
                    raise LogLost(lost.format(how="is empty (emptied or truncated)"))
                if stored != expected:
                    raise LogLost(lost.format(how=f"holds another log ({stored})"))
                return
            if stored is None:
                db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('log_id', ?)", (uuid.uuid4().hex,))
                stored = _stored_id(db)
        except LogLost:
            self.close()
            raise
        except sqlite3.OperationalError as exc:  # locked, unreadable: not the data's fault
            self.close()
            raise LogUnavailable(f"{self.url}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # a damaged file: the header or a page
            self.close()
            raise LogLost(f"{self.url}: {self.path} is damaged: {exc}") from exc
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{stored}\n")
            os.replace(tmp, marker)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise LogUnavailable(f"{self.url}: cannot write {marker}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                if self.read_only:
                    db = sqlite3.connect(read_only_uri(self.path), timeout=30, isolation_level=None,
                                         check_same_thread=False, uri=True)
                    db.execute("PRAGMA mmap_size=1073741824")  # a reader maps pages, no read() each (RS5)
                else:
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
        super().close()
        with self._all_lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    def _streams(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT name FROM streams UNION SELECT DISTINCT stream FROM batches "
            "UNION SELECT stream FROM snapshots UNION SELECT DISTINCT stream FROM snapshot_chunks"
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
        if row is not None:
            return row[0]
        blob = self._archive_store.get(stream, first) if self._archive_store is not None else None
        if blob is None:
            raise CorruptLog(stream, first, "batch neither in the live log nor in the archive")
        return blob

    def _index(self, stream: str) -> list[int]:
        rows = self._conn().execute(
            "SELECT first FROM batches WHERE stream=? AND archived=0 ORDER BY first", (stream,)
        )
        firsts = [r[0] for r in rows]
        self._local.__dict__.setdefault("seen", {})[stream] = firsts[-1] if firsts else None
        return firsts

    def _newest(self, stream: str) -> int | None:
        return self._conn().execute(
            "SELECT max(first) FROM batches WHERE stream=? AND archived=0", (stream,)
        ).fetchone()[0]

    def _wait(self, stream: str, timeout: float) -> None:
        """Poll (every 20 ms, one indexed lookup) until the newest batch differs from the one
        this thread's last listing ended with, at most ``timeout`` s: a follower (``tail``)
        then lists the whole stream only when something was appended."""
        seen = self._local.__dict__.get("seen", {}).get(stream, -1)
        deadline = time.monotonic() + timeout
        while self._newest(stream) == seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.02))

    def _archived_index(self, stream: str) -> list[int]:
        rows = self._conn().execute(
            "SELECT first FROM batches WHERE stream=? AND archived=1 ORDER BY first", (stream,)
        )
        marked = [r[0] for r in rows]
        if self._archive_store is None:
            return marked
        return sorted(set(marked).union(self._archive_store.index(stream)))

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
        store = self._archive_store
        if store is not None:
            for k in range(0, len(firsts), 500):  # archived (durably) first, then deleted here
                part = firsts[k : k + 500]
                marks = ",".join("?" * len(part))
                items = db.execute(
                    f"SELECT first, blob FROM batches WHERE stream=? AND first IN ({marks})",  # noqa: S608
                    (stream, *part),
                ).fetchall()
                store.put(stream, [(f, bytes(b)) for f, b in items])
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany(
                        "DELETE FROM batches WHERE stream=? AND first=?", [(stream, f) for f, _ in items]
                    )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            return
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

    def _put_snapshot(self, stream: str, offset: int, chunks: list[bytes], keep: int) -> None:
        db = self._conn()
        db.execute("DELETE FROM snapshot_chunks WHERE stream=? AND offset=?", (stream, offset))
        for k in range(len(chunks) - 1, 0, -1):  # data first, each chunk its own transaction
            db.execute(
                "INSERT OR REPLACE INTO snapshot_chunks(stream, offset, k, blob) VALUES (?, ?, ?, ?)",
                (stream, offset, k, chunks[k]),
            )
        db.execute("BEGIN IMMEDIATE")
        try:
            stored = db.execute(
                "SELECT count(*) FROM snapshot_chunks WHERE stream=? AND offset=? AND k>0",
                (stream, offset),
            ).fetchone()[0]
            if stored != len(chunks) - 1:
                raise EventLogError(f"stream {stream!r}: the snapshot at {offset} was overwritten while being saved")
            db.execute(
                "INSERT INTO snapshot_chunks(stream, offset, k, blob) VALUES (?, ?, 0, ?)",
                (stream, offset, chunks[0]),
            )
            offsets = sorted(self._snapshot_offsets(stream), reverse=True)
            for old in offsets[keep:]:
                db.execute("DELETE FROM snapshot_chunks WHERE stream=? AND offset=?", (stream, old))
                db.execute("DELETE FROM snapshots WHERE stream=? AND offset=?", (stream, old))
            # data chunks that lost their head (a writer that died) below what is kept
            db.execute(
                "DELETE FROM snapshot_chunks WHERE stream=? AND offset<? AND offset NOT IN "
                "(SELECT offset FROM snapshot_chunks WHERE stream=? AND k=0)",
                (stream, min(offsets[:keep]), stream),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _snapshot_offsets(self, stream: str) -> list[int]:
        rows = self._conn().execute(
            "SELECT offset FROM snapshot_chunks WHERE stream=? AND k=0 "
            "UNION SELECT offset FROM snapshots WHERE stream=?",
            (stream, stream),
        )
        return [r[0] for r in rows]

    def _get_snapshot(self, stream: str, offset: int) -> list[bytes] | None:
        db = self._conn()
        db.execute("BEGIN")  # one read snapshot of the chunks
        try:
            rows = db.execute(
                "SELECT k, blob FROM snapshot_chunks WHERE stream=? AND offset=? ORDER BY k",
                (stream, offset),
            ).fetchall()
            if rows and rows[0][0] == 0:
                return [bytes(b) for _, b in rows]
            row = db.execute(
                "SELECT blob FROM snapshots WHERE stream=? AND offset=?", (stream, offset)
            ).fetchone()
            return [bytes(row[0])] if row else None
        finally:
            db.execute("COMMIT")

    # test hooks: damage a stored batch, or a stored snapshot's last chunk, in place
    def _corrupt(self, stream: str, first: int, blob: bytes) -> None:
        self._conn().execute(
            "UPDATE batches SET blob=? WHERE stream=? AND first=?", (blob, stream, first)
        )

    def _corrupt_snapshot(self, stream: str, offset: int) -> None:
        db = self._conn()
        k, blob = db.execute(
            "SELECT k, blob FROM snapshot_chunks WHERE stream=? AND offset=? ORDER BY k DESC LIMIT 1",
            (stream, offset),
        ).fetchone()
        damaged = bytes(blob[:-1]) + bytes([blob[-1] ^ 0xFF])
        db.execute(
            "UPDATE snapshot_chunks SET blob=? WHERE stream=? AND offset=? AND k=?",
            (damaged, stream, offset, k),
        )
