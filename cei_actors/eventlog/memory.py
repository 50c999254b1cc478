"""``memory://NAME``: an in-process log; every log opened with the same NAME shares the data.

Options: ``archive`` (truncated history goes there, see :mod:`.archive`; without one it stays
in this process's memory, apart from the live batches) and ``keep_snapshots`` (default 2).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .errors import BadLogUrl, CorruptLog, Fenced
from .log import BatchExists, EventLog


@dataclass
class _Stream:
    epoch: int = 0
    batches: dict[int, bytes] = field(default_factory=dict)
    archive: dict[int, bytes] = field(default_factory=dict)
    snapshots: dict[int, list[bytes]] = field(default_factory=dict)


class _Space:
    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        #: held for every read and change; ``changed`` is notified under it, only when a
        #: reader waits (``waiting``): a held ``RLock`` is entered in C, a ``Condition`` in
        #: Python, and a notify with no waiter does nothing but cost (decision RT15)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.waiting = 0
        self.archive: str | None = None  # the archive last configured for this space


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

    def __init__(
        self, url: str, name: str, *, archive: str | None = None, keep_snapshots: int | str = 2,
        read_only: bool | str = False, **unknown: object,
    ) -> None:
        super().__init__(url)
        if unknown:
            raise BadLogUrl(f"log URL {url!r}: unknown option(s) {', '.join(sorted(unknown))} "
                            "(known: archive, keep_snapshots, read_only)")
        from .sqlite import flag

        self.read_only = flag(read_only)  # the space is this process's: nothing to protect
        given = self._history_options(archive, keep_snapshots)
        self._space = _space(name)
        self._lock = self._space.lock
        record = self._use_archive(given, self._space.archive, f"memory:{name}", read_only=self.read_only)
        if record and not self.read_only:
            self._space.archive = record

    def _s(self, stream: str) -> _Stream:
        s = self._space.streams.get(stream)
        if s is None:  # not ``setdefault(stream, _Stream())``: that builds one per call
            s = self._space.streams[stream] = _Stream()
        return s

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
            if self._space.waiting:
                self._space.changed.notify_all()

    def _get(self, stream: str, first: int) -> bytes:
        with self._lock:
            s = self._s(stream)
            blob = s.batches.get(first)
            if blob is None:
                blob = s.archive.get(first)
        if blob is None and self._archive_store is not None:
            blob = self._archive_store.get(stream, first)
        if blob is None:
            raise CorruptLog(stream, first, "batch neither in the live log nor in the archive")
        return blob

    def _index(self, stream: str) -> list[int]:
        with self._lock:
            s = self._space.streams.get(stream)
            return sorted(s.batches) if s else []

    def _archived_index(self, stream: str) -> list[int]:
        with self._lock:
            s = self._space.streams.get(stream)
            held = list(s.archive) if s else []
        if self._archive_store is not None:
            held += self._archive_store.index(stream)
        return sorted(set(held))

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
            blobs = [(first, s.batches[first]) for first in firsts if first in s.batches]
        store = self._archive_store
        if store is not None:
            store.put(stream, blobs)  # durable before the live copies go
        with self._lock:
            for first, blob in blobs:
                s.batches.pop(first, None)
                if store is None:
                    s.archive[first] = blob

    def _put_snapshot(self, stream: str, offset: int, chunks: list[bytes], keep: int) -> None:
        with self._lock:
            snaps = self._s(stream).snapshots
            snaps[offset] = list(chunks)
            for old in sorted(snaps, reverse=True)[keep:]:
                del snaps[old]

    def _snapshot_offsets(self, stream: str) -> list[int]:
        with self._lock:
            s = self._space.streams.get(stream)
            return list(s.snapshots) if s else []

    def _get_snapshot(self, stream: str, offset: int) -> list[bytes] | None:
        with self._lock:
            s = self._space.streams.get(stream)
            chunks = s.snapshots.get(offset) if s else None
            return list(chunks) if chunks is not None else None

    def _wait(self, stream: str, timeout: float) -> None:
        space = self._space
        with self._lock:
            space.waiting += 1
            try:
                space.changed.wait(timeout)
            finally:
                space.waiting -= 1

    def put_stored(self, stream: str, batches: list[tuple[int, bytes]]) -> None:
        """Hold ``batches`` as another log stored them (:meth:`EventLog.stored_batches`),
        unfenced and unchecked, one at a first offset held replaced: for a copy of a log
        (the simulator's replay check in a forked child)."""
        with self._lock:
            self._s(stream).batches.update(batches)
            if self._space.waiting:
                self._space.changed.notify_all()

    # test hooks: damage a stored batch, or a stored snapshot's last chunk, in place
    def _corrupt(self, stream: str, first: int, blob: bytes) -> None:
        with self._lock:
            self._s(stream).batches[first] = blob

    def _corrupt_snapshot(self, stream: str, offset: int) -> None:
        with self._lock:
            chunks = self._s(stream).snapshots[offset]
            chunks[-1] = chunks[-1][:-1] + bytes([chunks[-1][-1] ^ 0xFF])
