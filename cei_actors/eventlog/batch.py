"""The stored form of a batch of events and of a snapshot: msgpack with a magic and a CRC-32.

A batch blob is ``MAGIC | crc32(payload) | payload`` where the payload is the msgpack array
``[stream, first_offset, epoch, group_end, [[type, version, timestamp, body], ...]]``.
Bodies are nested msgpack maps (not re-encoded bytes), so one ``unpackb`` decodes a batch.
``group_end`` is false on every batch but the last of an append that had to be split over
several atomic writes; readers stop before a group that never got its last batch.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import msgpack

from .errors import CorruptLog
from .records import PendingEvent, Record, Snapshot

BATCH_MAGIC = b"CEB1"
SNAPSHOT_MAGIC = b"CES1"
_HEADER = struct.Struct(">4sI")
DEFAULT_MAX_DECODE_BYTES = 64 * 1024 * 1024


def _seal(magic: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(magic, zlib.crc32(payload)) + payload


def _open(magic: bytes, blob: bytes, stream: str, offset: int | None, max_bytes: int) -> object:
    if len(blob) > max_bytes:
        raise CorruptLog(stream, offset, f"stored blob of {len(blob)} bytes exceeds the {max_bytes}-byte limit")
    if len(blob) < _HEADER.size:
        raise CorruptLog(stream, offset, "stored blob is truncated")
    found, crc = _HEADER.unpack_from(blob)
    if found != magic:
        raise CorruptLog(stream, offset, f"bad magic {found!r}")
    payload = memoryview(blob)[_HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise CorruptLog(stream, offset, "checksum mismatch")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptLog(stream, offset, f"undecodable payload: {exc}") from exc


def encode_event(event: PendingEvent) -> bytes:
    """One event's row as it stands inside a batch (packed once, sized and reused)."""
    return msgpack.packb([event.type, event.version, event.timestamp, event.body], use_bin_type=True)


def encode_rows(stream: str, first_offset: int, epoch: int, rows: Sequence[bytes], group_end: bool = True) -> bytes:
    """A stored batch from rows already packed by :func:`encode_event`."""
    packer = msgpack.Packer(use_bin_type=True)
    head = (
        packer.pack_array_header(5)
        + packer.pack(stream)
        + packer.pack(first_offset)
        + packer.pack(epoch)
        + packer.pack(group_end)
        + packer.pack_array_header(len(rows))
    )
    return _seal(BATCH_MAGIC, head + b"".join(rows))


def encode_batch(
    stream: str, first_offset: int, epoch: int, events: Sequence[PendingEvent], group_end: bool = True
) -> bytes:
    """Encode ``events`` as one stored batch starting at ``first_offset``."""
    return encode_rows(stream, first_offset, epoch, [encode_event(e) for e in events], group_end)


def decode_batch(
    blob: bytes, stream: str, first_offset: int, max_bytes: int = DEFAULT_MAX_DECODE_BYTES
) -> tuple[list[Record], bool]:
    """Decode a stored batch; returns its records and its ``group_end`` flag.

    Raises :class:`CorruptLog` if the blob is damaged or does not belong where it was found.
    """
    value = _open(BATCH_MAGIC, blob, stream, first_offset, max_bytes)
    try:
        b_stream, b_first, epoch, group_end, rows = value  # type: ignore[misc]
    except (TypeError, ValueError) as exc:
        raise CorruptLog(stream, first_offset, "batch payload has the wrong shape") from exc
    if b_stream != stream or b_first != first_offset:
        raise CorruptLog(
            stream, first_offset, f"batch belongs to {b_stream!r} at offset {b_first}"
        )
    try:
        new = tuple.__new__
        records = [
            new(Record, (stream, first_offset + i, t, v, ts, epoch, body))
            for i, (t, v, ts, body) in enumerate(rows)
        ]
    except (TypeError, ValueError) as exc:
        raise CorruptLog(stream, first_offset, "event row has the wrong shape") from exc
    return records, bool(group_end)


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """Encode a snapshot for storage (the caller may chunk the result)."""
    payload = msgpack.packb(
        [snapshot.stream, snapshot.offset, snapshot.timestamp, snapshot.version, snapshot.data],
        use_bin_type=True,
    )
    return _seal(SNAPSHOT_MAGIC, payload)


def decode_snapshot(blob: bytes, stream: str, max_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> Snapshot:
    """Decode a stored snapshot of ``stream``; raises :class:`CorruptLog` when damaged."""
    value = _open(SNAPSHOT_MAGIC, blob, stream, None, max_bytes)
    try:
        s_stream, offset, ts, version, data = value  # type: ignore[misc]
    except (TypeError, ValueError) as exc:
        raise CorruptLog(stream, None, "snapshot payload has the wrong shape") from exc
    if s_stream != stream:
        raise CorruptLog(stream, None, f"snapshot belongs to stream {s_stream!r}")
    return Snapshot(stream, offset, ts, version, bytes(data))
