"""The event log interface and the batching, fencing and reading rules every backend shares.

A backend implements a handful of storage primitives (``_put``, ``_get``, ``_index`` ...);
:class:`EventLog` turns them into appends that are fenced, split, idempotent on retry and
atomic per call, and into reads that check order, density and checksums.
"""

from __future__ import annotations

import bisect
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

from .archive import Archive, check_archive_spec, open_archive
from .batch import (
    SharedValues,
    batch_checksum,
    decode_batch,
    decode_snapshot,
    encode_event,
    encode_rows,
    encode_snapshot,
    open_batch,
    records_of,
)
from .errors import BadLogUrl, CorruptLog, EventLogError, Fenced, OffsetConflict
from .records import Fence, PendingEvent, Record, Snapshot, check_stream


class BatchExists(EventLogError):
    """Raised by a backend's ``_put`` when a batch with that first offset is already stored."""

    def __init__(self, stream: str, first: int) -> None:
        super().__init__(f"stream {stream!r}: a batch at offset {first} exists")
        self.stream, self.first = stream, first


class EventLog(ABC):
    """An append-only log of event streams with leader fencing, snapshots and an archive."""

    #: Largest encoded batch a backend stores as one unit.
    max_batch_bytes: int = 256 * 1024
    #: Largest total of batches a backend can write atomically in one ``_put``.
    max_atomic_bytes: int = 1 << 62
    #: Data bytes per stored snapshot chunk.
    snapshot_chunk_bytes: int = 4 * 1024 * 1024

    def __init__(self, url: str) -> None:
        self.url = url
        self._heads: dict[tuple[str, int], int] = {}
        self._heads_lock = threading.Lock()
        #: Snapshots kept per stream (the newest by offset); the runtime truncates below the
        #: oldest of them, so recovery can fall back that far without the archive.
        self.keep_snapshots = 2
        self._archive_store: Archive | None = None

    def _history_options(self, archive: object, keep_snapshots: object) -> str | None:
        """Check the ``archive`` and ``keep_snapshots`` options; returns the archive spec."""
        try:
            keep = int(keep_snapshots)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            keep = 0
        if keep < 1:
            raise BadLogUrl(f"log URL {self.url!r}: keep_snapshots must be an integer >= 1, got {keep_snapshots!r}")
        self.keep_snapshots = keep
        if archive in (None, ""):
            return None
        return check_archive_spec(str(archive), self.url)

    def _use_archive(
        self, given: str | None, recorded: str | None, namespace: str, read_only: bool = False
    ) -> str | None:
        """Open the archive named by the option (``given``) or, without one, the archive this
        log recorded when it was last opened with one; returns the spec to record (or None)."""
        spec = given or recorded
        if spec:
            self._archive_store = open_archive(spec, namespace, self.url, read_only=read_only)
        return given if given and given != recorded else None

    @property
    def archive(self) -> str | None:
        """The archive this log moves truncated history to (its spec), or None."""
        return self._archive_store.spec if self._archive_store is not None else None

    # ---- the public interface -------------------------------------------------------------

    def streams(self) -> list[str]:
        """Names of the streams that hold anything (events, an epoch or a snapshot)."""
        return sorted(self._streams())

    def epoch(self, stream: str) -> int:
        """The stream's current leader epoch (0 before anyone acquired it)."""
        return self._epoch(check_stream(stream))

    def acquire(self, stream: str) -> Fence:
        """Become the stream's writer: bump its epoch, fencing out every earlier writer.

        An append that an earlier writer split over several atomic writes and never finished
        is removed here, so the log never shows half of one append.
        """
        check_stream(stream)
        epoch = self._bump_epoch(stream)
        head, orphans = self._scan_tail(stream)
        if orphans:
            self._delete(stream, epoch, orphans)
        with self._heads_lock:
            self._heads[(stream, epoch)] = head
        return Fence(stream, epoch)

    def head(self, stream: str) -> int:
        """The offset of the newest complete event (0 if none)."""
        return self._scan_tail(check_stream(stream))[0]

    def append(self, fence: Fence, after: int, events: Sequence[PendingEvent]) -> int:
        """Append ``events`` at offsets ``after + 1 ...``; returns the new head.

        Refused with :class:`Fenced` if a newer writer acquired the stream, with
        :class:`OffsetConflict` if ``after`` is not the head. Retrying an append whose outcome
        was unknown (e.g. a lost connection) is safe: an identical stored append counts as done.
        """
        stream, epoch = fence.stream, fence.epoch
        if not events:
            return after
        key = (stream, epoch)
        with self._heads_lock:
            cached = self._heads.get(key)
        if cached is None:
            cached = self.head(stream)
        if cached != after:
            raise OffsetConflict(stream, after, cached)
        puts = self._plan(stream, epoch, after, events)
        for put in puts:
            try:
                self._put(stream, epoch, put)
            except BatchExists:
                if not all(self._get(stream, first) == blob for first, blob in put):
                    raise OffsetConflict(stream, after, self.head(stream)) from None
        new_head = after + len(events)
        with self._heads_lock:
            self._heads[key] = new_head
        return new_head

    def read(self, stream: str, start: int = 1, stop: int | None = None) -> Iterator[Record]:
        """Yield the records with ``start <= offset <= stop`` in order, archive included."""
        for first, epoch, rows in self.read_rows(stream, start, stop):
            yield from records_of(stream, first, epoch, rows)

    def read_rows(self, stream: str, start: int = 1, stop: int | None = None,
                  shared: SharedValues | None = None) -> Iterator[tuple[int, int, list]]:
        """What :meth:`read` reads, a stored batch (or its part in range) at a time, as
        stored: ``(offset of the first row, epoch, rows)``, each row ``[type, version,
        timestamp, body]`` (a fifth item: recorded inputs) and its shape not checked, for a
        reader that makes no :class:`Record` of it (a replay's fold, decision RS3). With
        ``shared``, the values it learns from the rows are decoded once and shared (RS5)."""
        check_stream(stream)
        firsts = self._all_firsts(stream)
        if not firsts:
            return
        i = max(bisect.bisect_right(firsts, max(start, 1)) - 1, 0)
        expected = firsts[i]
        last_epoch = 0
        held: list[tuple[int, int, list]] = []
        learn: list | None = None  # the rows ``shared`` learns from next
        for first in firsts[i:]:
            if stop is not None and first > stop:
                break
            if first != expected:
                raise CorruptLog(stream, expected, f"gap: next stored batch starts at {first}")
            if learn is not None and not held:  # the reader is done with them: a value may go
                shared.learn(learn)  # type: ignore[union-attr]
            epoch, group_end, rows = open_batch(self._get(stream, first), stream, first, shared=shared)
            learn = rows if shared is not None else None
            if not rows:
                raise CorruptLog(stream, first, "empty batch")
            if epoch < last_epoch:
                raise CorruptLog(stream, first, f"epoch went back from {last_epoch} to {epoch}")
            last_epoch = epoch
            n = len(rows)
            expected = first + n
            lo = max(start - first, 0)
            hi = n if stop is None else min(n, stop - first + 1)
            if lo or hi < n:
                rows = rows[lo:hi]
            if group_end and not held:  # the common case: a complete batch
                if rows:
                    yield first + lo, epoch, rows
                continue
            held.append((first + lo, epoch, rows))
            if group_end:
                yield from (chunk for chunk in held if chunk[2])
                held = []

    def batch_checksums(self, stream: str, stop: int) -> list[tuple[int, int]]:
        """``(first offset, CRC-32)`` of every stored batch starting at or before ``stop``,
        archive included, read from the batch headers (nothing decoded): what a reader's
        cache of folded states checks a log against (decision RS2)."""
        check_stream(stream)
        return [(first, batch_checksum(self._get(stream, first), stream, first))
                for first in self._all_firsts(stream) if first <= stop]

    def stored_batches(self, stream: str, after: int = 0) -> list[tuple[int, bytes]]:
        """``(first offset, blob)`` of the stored batches starting past offset ``after`` (a
        head the log had, where a batch ends), live or archived, as stored (nothing decoded
        or checked): for a copy of the log kept elsewhere (the simulator's replay check in a
        forked child)."""
        check_stream(stream)
        firsts = self._all_firsts(stream)
        return [(first, self._get(stream, first)) for first in firsts[bisect.bisect_right(firsts, after):]]

    def tail(self, stream: str, after: int, timeout: float) -> list[Record]:
        """Records after ``after``, waiting up to ``timeout`` seconds for at least one."""
        deadline = time.monotonic() + timeout
        while True:
            records = list(self.read(stream, after + 1))
            remaining = deadline - time.monotonic()
            if records or remaining <= 0:
                return records
            self._wait(stream, remaining)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store ``snapshot``; it must not be past the head. The stream keeps its
        :attr:`keep_snapshots` newest snapshots by offset (an older one saved late is dropped)."""
        check_stream(snapshot.stream)
        head = self.head(snapshot.stream)
        if snapshot.offset > head:
            raise ValueError(
                f"stream {snapshot.stream!r}: snapshot at {snapshot.offset} is past the head {head}"
            )
        chunks = encode_snapshot(snapshot, self.snapshot_chunk_bytes)
        self._put_snapshot(snapshot.stream, snapshot.offset, chunks, self.keep_snapshots)

    def snapshots(self, stream: str) -> list[int]:
        """Offsets of the stream's stored snapshots, newest first."""
        return sorted(self._snapshot_offsets(check_stream(stream)), reverse=True)

    def load_snapshot(self, stream: str, offset: int | None = None) -> Snapshot | None:
        """The newest snapshot of ``stream`` (or the one at ``offset``), or None.

        Raises :class:`CorruptLog` if that snapshot is damaged (see :meth:`snapshots` for the
        older ones to fall back to)."""
        check_stream(stream)
        if offset is None:
            offsets = self._snapshot_offsets(stream)
            if not offsets:
                return None
            offset = max(offsets)
        chunks = self._get_snapshot(stream, offset)
        if chunks is None:
            return None
        snap = decode_snapshot(chunks, stream)
        if snap.offset != offset:
            raise CorruptLog(stream, None, f"the snapshot stored at {offset} says it is at {snap.offset}")
        return snap

    def truncate(self, stream: str, before: int) -> int:
        """Move batches wholly below offset ``before`` to the archive; returns how many moved.

        ``before`` may not pass the newest snapshot, so recovery never needs the archive.
        Offsets keep counting from where they were; :meth:`read` still reaches archived events.
        Each batch is in the archive before it leaves the live log, so a crash in between
        leaves it in both (readers take one copy), never in neither.
        """
        check_stream(stream)
        offsets = self._snapshot_offsets(stream)
        limit = max(offsets) + 1 if offsets else 1
        if before > limit:
            raise ValueError(
                f"stream {stream!r}: cannot truncate below {before}, newest snapshot covers up to {limit - 1}"
            )
        live = self._index(stream)
        movable = [first for first, nxt in zip(live, live[1:], strict=False) if nxt <= before]
        if movable:
            self._archive(stream, movable)
        return len(movable)

    def close(self) -> None:
        """Release connections; the data stays."""
        if self._archive_store is not None:
            self._archive_store.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- shared machinery -----------------------------------------------------------------

    def _plan(
        self, stream: str, epoch: int, after: int, events: Sequence[PendingEvent]
    ) -> list[list[tuple[int, bytes]]]:
        """Split an append into batches (<= max_batch_bytes) and atomic puts (<= max_atomic_bytes)."""
        # ``encode_event``'s row, a row the read-back check packed taken without the call (RT15)
        rows = [e.row if e.input is None and e.row is not None else encode_event(e) for e in events]
        if sum(map(len, rows)) <= self.max_batch_bytes:  # one batch, one put: the usual append
            return [[(after + 1, encode_rows(stream, after + 1, epoch, rows))]]
        groups: list[list[bytes]] = []
        size = 0
        for row in rows:
            n = len(row)
            if groups and size + n <= self.max_batch_bytes:
                groups[-1].append(row)
                size += n
            else:
                groups.append([row])
                size = n
        puts: list[list[tuple[int, bytes]]] = [[]]
        put_size = 0
        offset = after + 1
        for k, group in enumerate(groups):
            blob = encode_rows(stream, offset, epoch, group, group_end=k == len(groups) - 1)
            if puts[-1] and put_size + len(blob) > self.max_atomic_bytes:
                puts.append([])
                put_size = 0
            puts[-1].append((offset, blob))
            put_size += len(blob)
            offset += len(group)
        return puts

    def _all_firsts(self, stream: str) -> list[int]:
        live = self._index(stream)
        archived = self._archived_index(stream)
        if archived:
            cut = live[0] if live else None
            return [f for f in archived if cut is None or f < cut] + live
        return live

    def _scan_tail(self, stream: str) -> tuple[int, list[int]]:
        """The head, and the first offsets of trailing batches of an unfinished append."""
        live = self._index(stream)
        orphans: list[int] = []
        for first in reversed(live):
            records, group_end = decode_batch(self._get(stream, first), stream, first)
            if group_end:
                return first + len(records) - 1, orphans
            orphans.insert(0, first)
        archived = self._archived_index(stream)
        if archived:
            records, _ = decode_batch(self._get(stream, archived[-1]), stream, archived[-1])
            return archived[-1] + len(records) - 1, orphans
        return 0, orphans

    def _wait(self, stream: str, timeout: float) -> None:
        """Block until ``stream`` may have changed, at most ``timeout`` seconds."""
        time.sleep(min(timeout, 0.02))

    # ---- storage primitives a backend provides --------------------------------------------

    @abstractmethod
    def _streams(self) -> list[str]: ...

    @abstractmethod
    def _epoch(self, stream: str) -> int: ...

    @abstractmethod
    def _bump_epoch(self, stream: str) -> int:
        """Atomically increment and return the stream's epoch."""

    @abstractmethod
    def _put(self, stream: str, epoch: int, batches: list[tuple[int, bytes]]) -> None:
        """Store all ``(first_offset, blob)`` batches atomically if the epoch is still ``epoch``.

        Raises :class:`Fenced` or :class:`BatchExists`; stores nothing when it raises.
        """

    @abstractmethod
    def _get(self, stream: str, first: int) -> bytes:
        """The blob of the batch at ``first``, live or archived."""

    @abstractmethod
    def _index(self, stream: str) -> list[int]:
        """First offsets of the live (not archived) batches, ascending."""

    @abstractmethod
    def _archived_index(self, stream: str) -> list[int]:
        """First offsets of archived batches, ascending."""

    @abstractmethod
    def _delete(self, stream: str, epoch: int, firsts: list[int]) -> None:
        """Delete live batches, fenced by ``epoch`` (used to drop an unfinished append)."""

    @abstractmethod
    def _archive(self, stream: str, firsts: list[int]) -> None:
        """Move live batches to the archive."""

    @abstractmethod
    def _put_snapshot(self, stream: str, offset: int, chunks: list[bytes], keep: int) -> None:
        """Store the snapshot at ``offset`` (replacing one there) atomically, then drop all
        but the ``keep`` snapshots with the highest offsets."""

    @abstractmethod
    def _snapshot_offsets(self, stream: str) -> list[int]:
        """Offsets of the stored snapshots (any order)."""

    @abstractmethod
    def _get_snapshot(self, stream: str, offset: int) -> list[bytes] | None:
        """The chunks of the snapshot at ``offset`` (a legacy one: its single blob), or None."""


__all__ = ["BatchExists", "EventLog", "Fenced", "OffsetConflict"]
