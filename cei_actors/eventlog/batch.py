"""The stored form of a batch of events and of a snapshot: msgpack with a magic and a CRC-32.

A batch blob is ``MAGIC | crc32(payload) | payload`` where the payload is the msgpack array
``[stream, first_offset, epoch, group_end, [[type, version, timestamp, body], ...]]``.
Bodies are nested msgpack maps (not re-encoded bytes), so one ``unpackb`` decodes a batch.
``group_end`` is false on every batch but the last of an append that had to be split over
several atomic writes; readers stop before a group that never got its last batch.
A snapshot is stored as chunks (:func:`encode_snapshot`), each sealed and size-checked on its
own, so a snapshot of any size that was saved can be loaded by the same code.

Plain data. Everything stored must read back equal to what was written: :func:`is_plain` is
that rule for one value (msgpack data of exact types: None, bool, int in [-2**63, 2**64),
float but not NaN, str, bytes, list, dict with such keys and values; no tuple, set or other
object, since those read back as something else or not at all), :func:`why_not_plain` names
the first offending item. One event row is at most :data:`MAX_EVENT_BYTES` on every backend.
"""

from __future__ import annotations

import re
import struct
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import msgpack

from .errors import CorruptLog
from .records import PendingEvent, Record, Snapshot

BATCH_MAGIC = b"CEB1"
SNAPSHOT_MAGIC = b"CES1"  # a whole snapshot in one blob (before chunking)
SNAPSHOT2_MAGIC = b"CES2"  # the head chunk of a chunked snapshot
CHUNK_MAGIC = b"CEC2"  # one data chunk of a chunked snapshot
_HEADER = struct.Struct(">4sI")
DEFAULT_MAX_DECODE_BYTES = 64 * 1024 * 1024

#: Largest encoded event (its row, :func:`encode_event`), the same on every backend. With the
#: batch framing (< 300 bytes: magic, CRC, stream name, offsets) one event fits a ZooKeeper
#: znode (1,000,000 bytes) and one atomic write (900 KiB, under ``jute.maxbuffer``) alone, so
#: an append of events within this limit can always be split into writes that fit (D3).
MAX_EVENT_BYTES = 512 * 1024

_INT_MIN, _INT_END = -(2**63), 2**64


def is_plain(value: object) -> bool:
    """True if ``value`` is msgpack data that encodes and decodes back to an equal value."""
    try:
        packed = msgpack.packb(value, use_bin_type=True, strict_types=True)
        return bool(msgpack.unpackb(packed, raw=False, strict_map_key=False) == value)
    except Exception:  # msgpack raises several unrelated types (TypeError, OverflowError, ...)
        return False


def why_not_plain(value: object, path: str = "") -> str | None:
    """The first item of ``value`` that keeps it from being plain (at ``path``), or None."""
    return _why(value, path, 0)


def _why(value: object, path: str, depth: int) -> str | None:  # noqa: PLR0911
    t = type(value)
    where = path or "value"
    if value is None or t is bool or t is bytes:
        return None
    if t is int:
        if _INT_MIN <= value < _INT_END:  # type: ignore[operator]
            return None
        return f"{where}: int {str(value)[:30]} is out of msgpack's range [-2**63, 2**64)"
    if t is float:
        return None if value == value else f"{where}: NaN never reads back equal"
    if t is str:
        try:
            value.encode("utf-8")  # type: ignore[attr-defined]
        except UnicodeEncodeError:
            return f"{where}: str is not valid UTF-8 (it holds a lone surrogate)"
        return None
    if depth >= 500:
        return f"{where}: nested deeper than 500 levels"
    if t is list:
        for i, item in enumerate(value):  # type: ignore[call-overload]
            found = _why(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    if t is dict:
        for key, item in value.items():  # type: ignore[attr-defined]
            at = f"{path}[{key!r:.40}]"
            if type(key) not in (str, int, float, bool, bytes, type(None)):
                return f"{at}: a map key of type {type(key).__name__} (use str or int keys)"
            found = _why(key, at, depth + 1) or _why(item, at, depth + 1)
            if found:
                return found
        return None
    if t is tuple:
        return f"{where}: a tuple reads back as a list (send a list)"
    if t in (set, frozenset):
        return f"{where}: a {t.__name__} is not msgpack data (send a list)"
    return f"{where}: {t.__name__} is not plain data (use None, bool, int, float, str, bytes, list or dict)"


def _seal(magic: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(magic, zlib.crc32(payload)) + payload


def _open(magic: bytes, blob: bytes, stream: str, offset: int | None, max_bytes: int,
          shared: SharedValues | None = None) -> object:
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
    if shared is not None:
        found = shared.unpack(blob, _HEADER.size)
        if found is not _MISS:
            return found
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptLog(stream, offset, f"undecodable payload: {exc}") from exc


_MISS = object()
_MARK_TYPE = 127  # the msgpack ext type a shared value's placeholder has while decoding


class SharedValues:
    """Big values that repeat in a stream's event bodies, such as the spec every process of a
    workload is scheduled with, decoded once and shared (decision RS5): for a reader that
    only reads them (a replay's fold), not for one that changes what it reads.

    ``fields`` names, per event type, the body fields whose values are worth sharing. A value
    is learnt (:meth:`learn`, from a sample of the rows) once it is seen twice; from then on
    every ``key + value`` as stored in a payload is replaced by a 3-byte msgpack ext
    placeholder that decodes to the one shared object. The stored bytes and the decoded value
    are equal, so nothing read changes but its identity. A payload is decoded plainly instead
    (the same as without sharing) unless exactly as many placeholders were decoded as were
    put in: a pattern replaced inside a ``bin`` value would lose one (a ``str`` cannot hold
    one: the pattern is not UTF-8)."""

    every = 16  #: one row in this many is looked at for a repeated value
    kept = 8  #: values shared at a time; the oldest learnt goes first

    def __init__(self, fields: dict[str, tuple[str, ...]]) -> None:
        self.fields = {t: tuple(f) for t, f in fields.items() if f}
        self._keys = {f: msgpack.packb(f, use_bin_type=True) for fs in self.fields.values() for f in fs}
        self._known: dict[bytes, int] = {}  # key + value as stored -> placeholder index
        self._values: list[Any] = []  # placeholder index -> the shared value
        self._ids: set[int] = set()  # of the shared values
        self._seen: dict[bytes, None] = {}  # values sampled once
        self._subs: list[tuple[Any, Any]] = []  # per key: (regex of its values, replacement)
        self._phase = 0
        self._found = 0
        self.shared = 0  #: values handed out shared so far

    def unpack(self, blob: bytes, start: int) -> Any:
        """``blob[start:]`` decoded with the shared values in place, or ``_MISS`` (no known
        value in it, or a mismatch: the caller decodes it plainly)."""
        if not self._subs:
            return _MISS
        data, put = bytes(blob[start:]), 0
        for regex, repl in self._subs:  # one scan per key, whatever the number of values
            data, n = regex.subn(repl, data)
            put += n
        if not put:
            return _MISS
        self._found = 0
        try:
            value = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=self._hook)
        except Exception:  # noqa: BLE001 - decoded plainly instead, which names the damage
            return _MISS
        if self._found != put:
            return _MISS
        self.shared += put
        return value

    def _hook(self, code: int, data: bytes) -> Any:
        if code != _MARK_TYPE or len(data) != 1 or data[0] >= len(self._values):
            return msgpack.ExtType(code, data)
        self._found += 1
        return self._values[data[0]]

    def learn(self, rows: list) -> None:
        """Look at a sample of the rows of the named types (one in :attr:`every`, in step
        across batches) for values not shared yet; share one seen twice from the next payload."""
        start = self._phase
        self._phase = (start - len(rows)) % self.every
        fields, ids, seen = self.fields, self._ids, self._seen
        for row in rows[start :: self.every]:  # rows as stored: their shape is not checked yet
            if type(row) is not list or len(row) < 4 or type(row[0]) is not str or type(row[3]) is not dict:
                continue
            for name in fields.get(row[0], ()):
                value = row[3].get(name)
                if type(value) not in (dict, list) or id(value) in ids:
                    continue
                try:
                    raw = self._keys[name] + msgpack.packb(value, use_bin_type=True)
                except Exception:  # noqa: BLE001 - not plain data: nothing to share
                    continue
                if raw in seen:
                    self._add(raw)
                else:
                    if len(seen) >= 256:
                        seen.clear()
                    seen[raw] = None

    def _add(self, raw: bytes) -> None:
        if raw in self._known:
            return
        if len(self._known) >= self.kept:  # the oldest learnt goes; its placeholder is reused
            old = next(iter(self._known))
            index = self._known.pop(old)
            self._ids.discard(id(self._values[index]))
        else:
            index = len(self._values)
            self._values.append(None)
        key = next(k for k in self._keys.values() if raw.startswith(k))
        value = msgpack.unpackb(raw[len(key) :], raw=False, strict_map_key=False)
        self._values[index] = value
        self._ids.add(id(value))
        self._known[raw] = index
        self._seen.pop(raw, None)
        self._subs = []
        for k in self._keys.values():  # a regex per key: the key, then one of its values
            mine = [(r, i) for r, i in self._known.items() if r.startswith(k)]
            if mine:
                marks = [b""] + [k + bytes((0xD4, _MARK_TYPE, i)) for _, i in mine]
                alternatives = b"|".join(b"(" + re.escape(r[len(k) :]) + b")" for r, _ in mine)
                regex = re.compile(re.escape(k) + b"(?:" + alternatives + b")")
                self._subs.append((regex, lambda m, marks=marks: marks[m.lastindex]))

    def unshared(self, value: Any) -> Any:
        """``value`` with a copy in place of every shared value inside it (for a reader that
        may change what it was given)."""
        if not self.shared:
            return value
        if id(value) in self._ids:
            return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False)
        if type(value) is dict:
            return {k: self.unshared(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
        if type(value) is list:
            return [self.unshared(v) if type(v) in _CONTAINERS else v for v in value]
        return value


_CONTAINERS = (dict, list)


def batch_checksum(blob: bytes, stream: str, first_offset: int) -> int:
    """The CRC-32 a stored batch's header carries (nothing decoded or checked beyond its magic)."""
    if len(blob) < _HEADER.size:
        raise CorruptLog(stream, first_offset, "stored blob is truncated")
    found, crc = _HEADER.unpack_from(blob)
    if found != BATCH_MAGIC:
        raise CorruptLog(stream, first_offset, f"bad magic {found!r}")
    return int(crc)


def encode_event(event: PendingEvent) -> bytes:
    """One event's row as it stands inside a batch (packed once, sized and reused: the row
    :meth:`~.codec.EventRegistry.to_checked` read back, if it holds one); a fifth item holds
    its recorded inputs, if any."""
    if event.input is None:
        if event.row is not None:
            return event.row
        return packb([event.type, event.version, event.timestamp, event.body])
    return packb([event.type, event.version, event.timestamp, event.body, event.input])


def encode_rows(stream: str, first_offset: int, epoch: int, rows: Sequence[bytes], group_end: bool = True) -> bytes:
    """A stored batch from rows already packed by :func:`encode_event`."""
    n = len(rows)
    # msgpack's array headers (what ``Packer.pack_array_header`` writes), 5 items then the rows
    rows_head = (bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big") if n < 65536
                 else b"\xdd" + n.to_bytes(4, "big"))
    payload = b"\x95" + packb([stream, first_offset, epoch, group_end])[1:] + rows_head + b"".join(rows)
    return _HEADER.pack(BATCH_MAGIC, zlib.crc32(payload)) + payload  # ``_seal``'s, inline


_PACKERS = threading.local()
_PACKER_KEEP_BYTES = 1 << 20


def packb(value: object) -> bytes:
    """``msgpack.packb(value, use_bin_type=True)``'s bytes, by this thread's reused ``Packer``
    (a ``packb`` call builds one each time: about half its cost for an event's row, RT1). A
    failed pack raises as ``packb`` does and leaves the packer empty; a packer whose buffer
    grew past 1 MiB is dropped, not kept."""
    try:
        packer = _PACKERS.packer
    except AttributeError:
        packer = _PACKERS.packer = msgpack.Packer(use_bin_type=True)
    try:
        packed = packer.pack(value)
    except BaseException:
        del _PACKERS.packer  # its buffer may have grown before the failure
        raise
    if len(packed) > _PACKER_KEEP_BYTES:
        del _PACKERS.packer
    return packed


def encode_batch(
    stream: str, first_offset: int, epoch: int, events: Sequence[PendingEvent], group_end: bool = True
) -> bytes:
    """Encode ``events`` as one stored batch starting at ``first_offset``."""
    return encode_rows(stream, first_offset, epoch, [encode_event(e) for e in events], group_end)


def open_batch(
    blob: bytes, stream: str, first_offset: int, max_bytes: int | None = None,
    shared: SharedValues | None = None,
) -> tuple[int, bool, list]:
    """A stored batch's epoch, ``group_end`` flag and rows as stored (each ``[type, version,
    timestamp, body]``, a fifth item the recorded inputs; their shape is not checked here:
    :func:`records_of` does). Raises :class:`CorruptLog` if the blob is damaged or does not
    belong where it was found. With ``shared``, its values are decoded once (RS5)."""
    limit = DEFAULT_MAX_DECODE_BYTES if max_bytes is None else max_bytes
    value = _open(BATCH_MAGIC, blob, stream, first_offset, limit, shared)
    try:
        b_stream, b_first, epoch, group_end, rows = value  # type: ignore[misc]
    except (TypeError, ValueError) as exc:
        raise CorruptLog(stream, first_offset, "batch payload has the wrong shape") from exc
    if type(rows) is not list:
        raise CorruptLog(stream, first_offset, "batch payload has the wrong shape")
    if b_stream != stream or b_first != first_offset:
        raise CorruptLog(
            stream, first_offset, f"batch belongs to {b_stream!r} at offset {b_first}"
        )
    return epoch, bool(group_end), rows


def records_of(stream: str, first_offset: int, epoch: int, rows: list) -> list[Record]:
    """The records of stored ``rows`` (from :func:`open_batch`), the first at ``first_offset``;
    a row of the wrong shape is a :class:`CorruptLog`."""
    try:
        new = tuple.__new__
        try:
            return [
                new(Record, (stream, first_offset + i, t, v, ts, epoch, body, None))
                for i, (t, v, ts, body) in enumerate(rows)
            ]
        except ValueError:  # rows with recorded inputs (a fifth item)
            records = []
            for i, row in enumerate(rows):
                t, v, ts, body, *more = row
                if len(more) > 1:
                    raise ValueError("too many items") from None
                records.append(new(Record, (stream, first_offset + i, t, v, ts, epoch, body, more[0] if more else None)))
            return records
    except (TypeError, ValueError) as exc:
        raise CorruptLog(stream, first_offset, "event row has the wrong shape") from exc


def decode_batch(
    blob: bytes, stream: str, first_offset: int, max_bytes: int | None = None
) -> tuple[list[Record], bool]:
    """Decode a stored batch; returns its records and its ``group_end`` flag.

    Raises :class:`CorruptLog` if the blob is damaged or does not belong where it was found.
    """
    epoch, group_end, rows = open_batch(blob, stream, first_offset, max_bytes)
    return records_of(stream, first_offset, epoch, rows), group_end


def snapshot_chunk_limit(backend_chunk: int) -> int:
    """Data bytes per stored snapshot chunk: the backend's size, and always within what
    :func:`decode_snapshot` accepts per chunk, so a snapshot that was saved can be loaded."""
    return max(1, min(backend_chunk, DEFAULT_MAX_DECODE_BYTES - 1024))


def encode_snapshot(snapshot: Snapshot, chunk_bytes: int = 4 * 1024 * 1024) -> list[bytes]:
    """A snapshot as stored: a head chunk (``CES2``: stream, offset, timestamp, version, the
    number of data chunks, the data's size and CRC) then the data in sealed ``CEC2`` chunks of
    at most ``chunk_bytes`` (bounded by :func:`snapshot_chunk_limit`). Each chunk is checked
    on its own when read, so no whole-snapshot size limit exists that a writer could exceed."""
    data = memoryview(snapshot.data)
    step = snapshot_chunk_limit(chunk_bytes)
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    head = msgpack.packb(
        [snapshot.stream, snapshot.offset, snapshot.timestamp, snapshot.version,
         len(pieces), len(data), zlib.crc32(data)],
        use_bin_type=True,
    )
    return [_seal(SNAPSHOT2_MAGIC, head)] + [_seal(CHUNK_MAGIC, bytes(p)) for p in pieces]


def decode_snapshot(
    chunks: list[bytes] | bytes, stream: str, max_bytes: int | None = None
) -> Snapshot:
    """Decode a stored snapshot of ``stream`` (its chunks, or one legacy ``CES1`` blob);
    raises :class:`CorruptLog` when damaged. ``max_bytes`` bounds each chunk (default
    :data:`DEFAULT_MAX_DECODE_BYTES`, read at call time), never the whole snapshot."""
    limit = DEFAULT_MAX_DECODE_BYTES if max_bytes is None else max_bytes
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [bytes(chunks)]
    if not chunks:
        raise CorruptLog(stream, None, "snapshot has no chunks")
    if bytes(chunks[0][:4]) == SNAPSHOT_MAGIC and len(chunks) == 1:
        # written before chunking: one blob, already in memory, so no size limit applies
        value = _open(SNAPSHOT_MAGIC, chunks[0], stream, None, max(limit, len(chunks[0])))
        try:
            s_stream, offset, ts, version, data = value  # type: ignore[misc]
        except (TypeError, ValueError) as exc:
            raise CorruptLog(stream, None, "snapshot payload has the wrong shape") from exc
        if s_stream != stream:
            raise CorruptLog(stream, None, f"snapshot belongs to stream {s_stream!r}")
        return Snapshot(stream, offset, ts, version, bytes(data))
    value = _open(SNAPSHOT2_MAGIC, chunks[0], stream, None, limit)
    try:
        s_stream, offset, ts, version, count, size, crc = value  # type: ignore[misc]
    except (TypeError, ValueError) as exc:
        raise CorruptLog(stream, None, "snapshot head has the wrong shape") from exc
    if s_stream != stream:
        raise CorruptLog(stream, None, f"snapshot belongs to stream {s_stream!r}")
    if count != len(chunks) - 1:
        raise CorruptLog(stream, None, f"snapshot at {offset}: {len(chunks) - 1} of {count} chunks stored")
    data = bytearray()
    for k, chunk in enumerate(chunks[1:]):
        if len(chunk) > limit + _HEADER.size:
            raise CorruptLog(
                stream, None,
                f"snapshot at {offset}: chunk {k} of {len(chunk)} bytes exceeds the {limit}-byte chunk limit",
            )
        if len(chunk) < _HEADER.size or bytes(chunk[:4]) != CHUNK_MAGIC:
            raise CorruptLog(stream, None, f"snapshot at {offset}: chunk {k} is damaged")
        payload = memoryview(chunk)[_HEADER.size :]
        if zlib.crc32(payload) != _HEADER.unpack_from(chunk)[1]:
            raise CorruptLog(stream, None, f"snapshot at {offset}: chunk {k} fails its checksum")
        data += payload
    if len(data) != size or zlib.crc32(data) != crc:
        raise CorruptLog(stream, None, f"snapshot at {offset}: data does not match its head")
    return Snapshot(stream, offset, ts, version, bytes(data))


# ---- a snapshot's data, decoded in pieces --------------------------------------------------

#: Encoded bytes a single C call of :func:`unpack_state` decodes at most (about: one element
#: bigger than this is still decoded at once). ~64 KiB is a few ms of ``unpackb``.
STATE_PIECE_BYTES = 64 * 1024
_WALK_LIMIT = 32  # nesting levels walked one element at a time; deeper is decoded at once
_FEW = 64  # a bigger container is decoded in pieces of whole elements; a smaller one, walked
_MAP16, _MAP32, _ARRAY16, _ARRAY32 = 0xDE, 0xDF, 0xDC, 0xDD


def unpack_state(data: bytes | bytearray | memoryview) -> object:
    """``msgpack.unpackb(data, raw=False, strict_map_key=False)`` for a snapshot's data, with
    the same result, but never in one long C call: a big map or array is decoded a few
    thousand elements at a time (a piece of about :data:`STATE_PIECE_BYTES`), with Python code
    in between, so other threads (kazoo's pings that keep a ZooKeeper session alive, a
    follower) get the GIL every few ms. A one-call ``unpackb`` of a 1M-entry state held it
    for 1.5-2 s, and the session of a recovering leader expired (docs/decisions.md FO3)."""
    view = memoryview(data).cast("B")
    if len(view) <= STATE_PIECE_BYTES:
        return msgpack.unpackb(view, raw=False, strict_map_key=False)
    value, end = _unpack_walk(view, 0, len(view), 0)
    if end != len(view):
        raise msgpack.ExtraData(value, bytes(view[end:]))
    return value


def _unpacker(size: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=size + 16)


def _unpack_one(view: memoryview, pos: int, prefix: bytes = b"", skip: bool = False) -> tuple[object, int]:
    """Decode (or with ``skip`` only measure) the value at ``pos``, behind ``prefix`` (the
    header of a piece); returns it and the position after it. Fed in growing windows, so a
    small value costs no copy of the rest of the data."""
    unpacker = _unpacker(len(view) + len(prefix))
    if prefix:
        unpacker.feed(prefix)
    at, window = pos, 4096
    while True:
        if at < len(view):
            unpacker.feed(view[at : at + window])
            at, window = at + window, min(window * 4, 4 * 1024 * 1024)
        try:
            value = None if skip else unpacker.unpack()
            if skip:
                unpacker.skip()
            break
        except msgpack.OutOfData:
            if at >= len(view):
                raise ValueError("snapshot data is incomplete") from None
    return value, pos + unpacker.tell() - len(prefix)


def _container(view: memoryview, pos: int) -> tuple[bool, int, int] | None:
    """(is_map, element count, header length) of a map or array at ``pos``, else None."""
    if pos >= len(view):
        return None
    b = view[pos]
    if 0x80 <= b <= 0x9F:
        return b < 0x90, b & 0x0F, 1
    width = {_MAP16: 2, _ARRAY16: 2, _MAP32: 4, _ARRAY32: 4}.get(b)
    if width is None or pos + 1 + width > len(view):
        return None
    return b in (_MAP16, _MAP32), int.from_bytes(view[pos + 1 : pos + 1 + width], "big"), 1 + width


def _unpack_walk(view: memoryview, pos: int, size: int, depth: int) -> tuple[object, int]:
    """Decode the value of ``size`` encoded bytes at ``pos``: at once when small, else a
    container with many elements in pieces, one with few element by element."""
    head = _container(view, pos)
    if head is None or size <= STATE_PIECE_BYTES or depth >= _WALK_LIMIT:
        return _unpack_one(view, pos)
    is_map, count, head_len = head
    at = pos + head_len
    if count >= _FEW:
        return _unpack_pieces(view, at, count, is_map)
    if is_map:
        out: dict = {}
        for _ in range(count):
            if _container(view, at) is not None:  # a list as a key reads back as a tuple: decode in C
                return _unpack_one(view, pos)
            key, at = _unpack_one(view, at)
            _, end = _unpack_one(view, at, skip=True)
            out[key], at = _unpack_walk(view, at, end - at, depth + 1)
        return out, at
    items: list = []
    for _ in range(count):
        _, end = _unpack_one(view, at, skip=True)
        item, at = _unpack_walk(view, at, end - at, depth + 1)
        items.append(item)
    return items, at


def _unpack_pieces(view: memoryview, at: int, count: int, is_map: bool) -> tuple[object, int]:
    """The ``count`` elements of a map or array whose body starts at ``at``, decoded in pieces
    of about :data:`STATE_PIECE_BYTES` (each a map or array of its own, behind a made-up
    header), joined in order: the same value as one ``unpackb``."""
    out: dict | list = {} if is_map else []
    done, step = 0, 16
    while done < count:
        k = min(step, count - done)
        prefix = struct.pack(">BI", _MAP32 if is_map else _ARRAY32, k)
        piece, end = _unpack_one(view, at, prefix)
        if is_map:
            out.update(piece)  # type: ignore[union-attr, call-overload]
        else:
            out.extend(piece)  # type: ignore[union-attr, arg-type]
        per_element = max((end - at) / k, 1.0)
        done, at = done + k, end
        step = max(1, min(int(STATE_PIECE_BYTES / per_element), 1 << 20))
    return out, at
