"""Errors raised by the event log. Each names the stream and, where it applies, the offset."""

from __future__ import annotations


class EventLogError(Exception):
    """Base class of every event-log error."""


class InvalidStream(EventLogError, ValueError):
    """A stream name that the log does not accept."""


class Fenced(EventLogError):
    """The writer's epoch is no longer the stream's epoch: a newer leader exists."""

    def __init__(self, stream: str, epoch: int, current: int) -> None:
        super().__init__(
            f"stream {stream!r}: append under epoch {epoch} refused, the stream is at epoch {current}"
        )
        self.stream, self.epoch, self.current = stream, epoch, current


class OffsetConflict(EventLogError):
    """Another batch already holds the offsets this append wanted."""

    def __init__(self, stream: str, expected_head: int, actual_head: int) -> None:
        super().__init__(
            f"stream {stream!r}: append expected head {expected_head}, the log is at {actual_head}"
        )
        self.stream, self.expected_head, self.actual_head = stream, expected_head, actual_head


class CorruptLog(EventLogError):
    """Stored data that fails its checksum, does not decode, or breaks the log's order."""

    def __init__(self, stream: str, offset: int | None, reason: str) -> None:
        where = f"offset {offset}" if offset is not None else "snapshot"
        super().__init__(f"stream {stream!r} at {where}: {reason}")
        self.stream, self.offset, self.reason = stream, offset, reason


class UnknownEventType(EventLogError):
    """An event type that no registered class handles."""

    def __init__(self, stream: str, offset: int, type_name: str) -> None:
        super().__init__(f"stream {stream!r} at offset {offset}: unknown event type {type_name!r}")
        self.stream, self.offset, self.type_name = stream, offset, type_name


class NewerEventVersion(EventLogError):
    """An event written by newer code than this one understands."""

    def __init__(self, stream: str, offset: int, type_name: str, version: int, known: int) -> None:
        super().__init__(
            f"stream {stream!r} at offset {offset}: event {type_name!r} has schema version "
            f"{version}, this code knows up to {known}"
        )
        self.stream, self.offset = stream, offset


class LogUnavailable(EventLogError):
    """The backing store cannot be reached (after the configured timeout)."""


class BadLogUrl(EventLogError, ValueError):
    """A log URL that names no known backend or is malformed."""


class LogLost(EventLogError):
    """A log that held data is gone: its file was deleted, emptied, truncated or replaced."""
