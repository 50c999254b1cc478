"""``memory://NAME``: an in-process log; every log opened with the same NAME shares the data."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .errors import Fenced
from .log import BatchExists, EventLog


@dataclass
class _Stream:
    epoch: int = 0
    batches: dict[int, bytes] = field(default_factory=dict)
    archive: dict[int, bytes] = field(default_factory=dict)
    snapshot: bytes | None = None


class _Space:
    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        self.changed = threading.Condition()


_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


def _space(name: str) -> _Space:
    with _SPACES_LOCK:
        return _SPACES.setdefault(name, _Space())


def forget(name: str) -> None:
    """Drop the shared data of ``memory://name`` (for tests)."""
    with _SPACES_LOCK:
        _SPACES.pop(name, None)


class MemoryLog(EventLog):
    """A log held in this process's memory; fast, and gone when the process ends."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(url)
        self._space = _space(name)
        self._lock = self._space.changed

    def _s(self, stream: str) -> _Stream:
        return self._space.streams.setdefault(stream, _Stream())

    def _streams(self) -> list[str]:
        with self._lock:
            return list(self._space.streams)

    def _epoch(self, stream: str) -> int:
        with self._lock:
            s = self._space.streams.get(stream)
            return s.epoch if s else 0

    def _bump_epoch(self, stream: str) -> int:
        with self._lock:
            s = self._s(stream)
            s.epoch += 1
            return s.epoch

    def _put(self, stream: str, epoch: int, batches: list[tuple[int, bytes]]) -> None:
        with self._lock:
            s = self._s(stream)
            if s.epoch != epoch:
                raise Fenced(stream, epoch, s.epoch)
            for first, _ in batches:
                if first in s.batches or first in s.archive:
                    raise BatchExists(stream, first)
            s.batches.update(batches)
            self._lock.notify_all()

    def _get(self, stream: str, first: int) -> bytes:
        with self._lock:
            s = self._s(stream)
            blob = s.batches.get(first)
            return blob if blob is not None else s.archive[first]

    def _index(self, stream: str) -> list[int]:
        with self._lock:
            s = self._space.streams.get(stream)
            return sorted(s.batches) if s else []

    def _archived_index(self, stream: str) -> list[int]:
        with self._lock:
            s = self._space.streams.get(stream)
            return sorted(s.archive) if s else []

    def _delete(self, stream: str, epoch: int, firsts: list[int]) -> None:
        with self._lock:
            s = self._s(stream)
            if s.epoch != epoch:
                raise Fenced(stream, epoch, s.epoch)
            for first in firsts:
                s.batches.pop(first, None)

    def _archive(self, stream: str, firsts: list[int]) -> None:
        with self._lock:
            s = self._s(stream)
            for first in firsts:
                s.archive[first] = s.batches.pop(first)

    def _put_snapshot(self, stream: str, offset: int, blob: bytes) -> None:
        with self._lock:
            self._s(stream).snapshot = blob

    def _get_snapshot(self, stream: str) -> bytes | None:
        with self._lock:
            s = self._space.streams.get(stream)
            return s.snapshot if s else None

    def _wait(self, stream: str, timeout: float) -> None:
        with self._lock:
            self._lock.wait(timeout)

    # test hook: damage a stored batch in place
    def _corrupt(self, stream: str, first: int, blob: bytes) -> None:
        with self._lock:
            self._s(stream).batches[first] = blob
