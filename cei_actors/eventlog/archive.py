"""The archive: where ``truncate`` moves a stream's history out of the live log.

Two kinds, named by the log option ``archive=``: ``sqlite:///PATH`` (a ``zk_archive`` table,
keyed by the log's namespace, so several logs can share one file) or an absolute ``DIRECTORY``
(one file per batch under ``DIRECTORY/<quoted namespace>/<stream>/<first>``). Files are 0600,
directories 0700 (:mod:`cei_actors.private_files`).

A batch is durable in the archive before the live log drops it (:meth:`put` commits with
``synchronous=FULL`` or fsyncs the file and its directory), so a crash between the two leaves
the batch in both places, which readers tolerate, never in neither. Putting a batch that is
already archived is a no-op if the bytes are the same and :class:`CorruptLog` if they differ.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from ..private_files import private_dir
from .errors import BadLogUrl, CorruptLog, LogUnavailable


class Archive(Protocol):
    """Archived batches of one log: ``(stream, first offset) -> blob``."""

    spec: str

    def put(self, stream: str, items: list[tuple[int, bytes]]) -> None: ...

    def get(self, stream: str, first: int) -> bytes | None: ...

    def index(self, stream: str) -> list[int]: ...

    def close(self) -> None: ...


def _digits(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.isdigit())


def check_archive_spec(spec: str, url: str) -> str:
    """``spec`` if it names an archive (``sqlite:///ABSOLUTE`` or an absolute directory), else
    :class:`BadLogUrl` naming the log ``url``."""
    if spec.startswith("sqlite://"):
        path = spec[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise BadLogUrl(f"log URL {url!r}: archive needs sqlite:///ABSOLUTE_PATH, got {spec!r}")
    elif "://" in spec:
        raise BadLogUrl(f"log URL {url!r}: archive must be sqlite:///PATH or a directory, got {spec!r}")
    elif not spec.startswith("/"):
        raise BadLogUrl(f"log URL {url!r}: an archive directory must be an absolute path, got {spec!r}")
    return spec


def open_archive(spec: str, namespace: str, url: str, read_only: bool = False) -> Archive:
    """Open (creating if needed, unless ``read_only``) the archive ``spec`` for the log ``namespace``."""
    check_archive_spec(spec, url)
    if spec.startswith("sqlite://"):
        return SqliteArchive(spec[len("sqlite://") :], namespace, read_only)
    return DirArchive(spec, namespace, read_only)


class SqliteArchive:
    """Archived batches in a table of a SQLite file (one connection per thread)."""

    def __init__(self, path: str, namespace: str, read_only: bool = False) -> None:
        from .sqlite import private_log_files

        self.spec = f"sqlite://{path}"
        self.path = Path(path)
        self.namespace = namespace
        self.read_only = read_only
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if read_only:
            return  # nothing to create; a missing file or table reads as an empty archive
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            private_log_files(self.path, f"archive {self.spec}")
            self._db().execute(
                "CREATE TABLE IF NOT EXISTS zk_archive (log TEXT NOT NULL, stream TEXT NOT NULL, "
                "first INTEGER NOT NULL, blob BLOB NOT NULL, PRIMARY KEY (log, stream, first))"
            )
        except (OSError, sqlite3.Error) as exc:
            raise LogUnavailable(f"archive {self.spec}: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            if self.read_only:
                from .sqlite import read_only_uri

                db = sqlite3.connect(read_only_uri(self.path), timeout=30, isolation_level=None,
                                     check_same_thread=False, uri=True)
            else:
                db = sqlite3.connect(
                    self.path, timeout=30, isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # durable before the live copy goes
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def put(self, stream: str, items: list[tuple[int, bytes]]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for first, blob in items:
                cur = db.execute(
                    "INSERT INTO zk_archive(log, stream, first, blob) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (self.namespace, stream, first, blob),
                )
                if cur.rowcount == 0 and self.get(stream, first) != blob:
                    raise CorruptLog(stream, first, "the archive holds a different batch here")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def get(self, stream: str, first: int) -> bytes | None:
        if self._absent():
            return None
        row = (
            self._db()
            .execute(
                "SELECT blob FROM zk_archive WHERE log=? AND stream=? AND first=?",
                (self.namespace, stream, first),
            )
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    def index(self, stream: str) -> list[int]:
        if self._absent():
            return []
        rows = self._db().execute(
            "SELECT first FROM zk_archive WHERE log=? AND stream=? ORDER BY first",
            (self.namespace, stream),
        )
        return [r[0] for r in rows]

    def _absent(self) -> bool:
        """Read-only and nothing archived yet (no file, or no table in it)."""
        if not self.read_only:
            return False
        if not self.path.is_file():
            return True
        found = self._db().execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='zk_archive'").fetchone()
        return found is None

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()


class DirArchive:
    """Archived batches as files ``DIR/<quoted namespace>/<stream>/<first>``, written atomically."""

    def __init__(self, directory: str, namespace: str, read_only: bool = False) -> None:
        self.spec = directory
        self.root = Path(directory) / quote(namespace, safe="")
        if read_only:
            return
        try:
            private_dir(Path(directory))
            private_dir(self.root)
        except OSError as exc:
            raise LogUnavailable(f"archive {directory}: {exc}") from exc

    def _file(self, stream: str, first: int) -> Path:
        return self.root / stream / f"{first:020d}"

    def put(self, stream: str, items: list[tuple[int, bytes]]) -> None:
        folder = self.root / stream
        folder.mkdir(exist_ok=True, mode=0o700)
        for first, blob in items:
            target = self._file(stream, first)
            if target.exists():
                if target.read_bytes() != blob:
                    raise CorruptLog(stream, first, "the archive holds a different batch here")
                continue
            tmp = folder / f".{first:020d}.{uuid.uuid4().hex[:8]}.tmp"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, stream: str, first: int) -> bytes | None:
        try:
            return self._file(stream, first).read_bytes()
        except FileNotFoundError:
            return None

    def index(self, stream: str) -> list[int]:
        try:
            names = os.listdir(self.root / stream)
        except FileNotFoundError:
            return []
        return [int(n) for n in _digits(names)]

    def close(self) -> None:
        return None


__all__ = ["Archive", "DirArchive", "SqliteArchive", "check_archive_spec", "open_archive"]
