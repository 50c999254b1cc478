"""The event log: streams of events with fencing, snapshots and an archive, on three backends.

``open_log(url)`` picks the backend: ``memory://NAME``, ``sqlite:///PATH`` (the embedded
default) or ``zk://HOST:PORT[,HOST:PORT...]/CHROOT`` (ZooKeeper). Every backend takes the
options ``archive`` (where ``truncate`` moves history: ``sqlite:///PATH`` or a directory,
URL-quoted in a query), ``keep_snapshots`` (snapshots kept per stream, default 2) and
``read_only`` (open an existing log without writing anything: what ``cei log`` does).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from .codec import EventRegistry, UnstorableEvent
from .errors import (
    BadLogUrl,
    CorruptLog,
    EventLogError,
    Fenced,
    InvalidStream,
    LogLost,
    LogUnavailable,
    NewerEventVersion,
    OffsetConflict,
    UnknownEventType,
)
from .log import EventLog
from .records import Fence, PendingEvent, Record, Snapshot


def open_log(url: str, **options: object) -> EventLog:
    """Open the log at ``url``; ``options`` (and the URL's query) go to the backend."""
    if not isinstance(url, str) or "://" not in url:
        raise BadLogUrl(f"log URL {url!r}: expected memory://NAME, sqlite:///PATH or zk://HOSTS/CHROOT")
    scheme, rest = url.split("://", 1)
    rest, _, query_text = rest.partition("?")
    query = {**dict(parse_qsl(query_text)), **options}
    if scheme == "memory":
        from .memory import MemoryLog

        return MemoryLog(url, rest or "default", **query)
    if scheme == "sqlite":
        from .sqlite import SqliteLog

        if not rest.startswith("/") or rest == "/":
            raise BadLogUrl(f"log URL {url!r}: sqlite needs an absolute path, sqlite:///PATH")
        return SqliteLog(url, rest, **query)
    if scheme == "zk":
        from .zookeeper import ZkLog

        parts = urlsplit(url)
        if not parts.netloc:
            raise BadLogUrl(f"log URL {url!r}: zk needs hosts, zk://HOST:PORT[,...]/CHROOT")
        query = dict(parse_qsl(parts.query))
        return ZkLog(url, parts.netloc, parts.path or "/cei", **{**query, **options})
    raise BadLogUrl(f"log URL {url!r}: unknown scheme {scheme!r} (memory, sqlite or zk)")


__all__ = [
    "BadLogUrl",
    "CorruptLog",
    "EventLog",
    "EventLogError",
    "EventRegistry",
    "Fence",
    "Fenced",
    "InvalidStream",
    "LogLost",
    "LogUnavailable",
    "NewerEventVersion",
    "OffsetConflict",
    "PendingEvent",
    "Record",
    "Snapshot",
    "UnknownEventType",
    "UnstorableEvent",
    "open_log",
]
