"""``zk://HOST:PORT[,HOST:PORT...]/CHROOT?opt=...``: the event log on ZooKeeper (kazoo).

Znode layout under CHROOT (created if missing; paths are prefixed here, not by kazoo's chroot)::

    /streams/<s>                        msgpack {bucket: width}: fixed when the stream is created
    /streams/<s>/epoch                  ASCII digits: the stream's leader epoch. Changed only by a
                                        versioned set, so each epoch is one data version of it.
    /streams/<s>/b/<bucket>/<first>     one batch (the blob of batch.py) per znode, named by the
                                        writer: <first> is its first offset (20 digits), <bucket>
                                        is first // width (16 digits)
    /streams/<s>/snap/manifest          msgpack {snaps: [{id, offset, chunks}, ...]}: the kept
                                        snapshots, newest first (``keep_snapshots``; an older
                                        manifest {id, offset, chunks, size, crc} still reads)
    /streams/<s>/snap/<id>/<k>          that snapshot's chunks (batch.encode_snapshot), <= 512 KiB
    /archive                            the archive's spec, recorded by a log opened with one

Writes and fencing:

- ``_put`` is ONE ``multi``: ``check(epoch, version)`` and the ``create`` of each batch. A deposed
  writer's check fails (``BadVersionError`` -> :class:`Fenced`); a taken name fails
  (``NodeExistsError`` -> ``BatchExists``). The orphan cleanup of ``acquire()`` (``_delete``) is
  a fenced multi too. Nothing relies on sessions or ephemeral nodes.
- Batches are at most 256 KiB (``max_batch_bytes``) and one multi carries at most 900 KiB
  (``max_atomic_bytes``), well under ``jute.maxbuffer`` (~1 MB; ZooKeeper drops the connection
  on a bigger request).
- Buckets: every batch holds at least one event, so a bucket of ``width`` offsets (default
  10,000) holds at most that many znodes and its children listing stays ~240 KB; the bucket
  directory gets one child per 10,000 live offsets (truncate removes emptied buckets).
- A lost connection during ``_put`` leaves the outcome unknown. Once connected again (same
  session) the log ``sync``s and reads the batches back: all present with the same bytes means
  stored, none present means retry the multi, anything else is ``BatchExists`` (the base class
  then tells an idempotent retry from a conflict). If the session expired meanwhile, or no server
  answers within ``timeout``, it raises :class:`LogUnavailable` saying the outcome is unknown;
  retrying the same append is safe.

Reads: kazoo spends ~0.3 ms per request whatever its size, so reads use ZooKeeper's read-only
``multiRead`` (opcode 22, servers >= 3.6; kazoo has no API for it, see :class:`_MultiRead`;
probed at start, one get per znode otherwise). The live index is one multiRead of every bucket's
children; ``_get`` reads ahead along the latest listing in groups of ~512 KiB per multiRead, up
to ``readahead`` bytes in flight, and keeps an LRU (``cache_bytes``) of blobs that end a group
(such a batch is never deleted or rewritten; an orphan may be). Followers block in ``_wait`` on
a children watch of the bucket directory and of the last bucket, set by a listing that is
compared with what the reader last saw (watches are one-shot and a change between the read and
the watch would otherwise be missed; ``tail`` re-reads from its offset anyway).

Archive: ``truncate`` moves batches out of ZooKeeper (whose whole tree lives in every server's
RAM) to ``archive=sqlite:///PATH`` (a ``zk_archive`` table, keyed by chroot) or
``archive=DIRECTORY`` (one file per batch under ``DIRECTORY/<quoted chroot>/<stream>/``). A batch
is written to the archive durably before its znode is deleted; ``read()`` reaches both. Without
``archive=`` (given or recorded in ``CHROOT/archive`` by a log that had one) truncate raises
:class:`ArchiveNotConfigured`, and so does reading from before the live range (reads from a
snapshot on never need the archive). Every process that reads archived history needs the same
archive (a directory archive: on its host).

Snapshots: chunks are created under a fresh ``<id>``, then one multi checks every chunk and swaps
the manifest, so a half-written snapshot is never loaded; the snapshots no longer kept are
deleted after.

Access control: ``auth_file=PATH`` names a file (mode 0600, refused if others may read it)
holding ``USER:PASSWORD``. The client then authenticates with ZooKeeper's ``digest`` scheme, and
every znode under CHROOT (the chroot itself, streams, epochs, batches, snapshots, the leader
elections) carries the ACL ``digest:USER:<hash>`` with all permissions and nothing for anyone
else: a client without the credentials can neither read the log nor bump an epoch (fence). A
chroot that is not yet protected this way (created open, or before ``auth_file`` was set) is
protected when the log opens: every znode under it gets the ACL, the chroot last. The
credentials never appear in the URL, a command line or an error message (see docs/decisions.md
SA3). Without ``auth_file`` znodes are open (``world:anyone``), as before.

Options (URL query or keyword): ``timeout`` (s, default 10: connecting, and the longest any call
waits for an unreachable server before :class:`LogUnavailable`), ``session_timeout`` (s, 10),
``archive``, ``keep_snapshots`` (2), ``bucket`` (10000, fixed per stream when it is created), ``cache_bytes`` (32 MiB),
``readahead`` (bytes of batches requested ahead of a reader, 2 MiB), ``multiread`` (true: read
many znodes per request with ZooKeeper's read-only multi, servers >= 3.6; probed at start),
``auth_file`` (see above).
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
import uuid
import zlib
from collections import OrderedDict, namedtuple
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    EXCEPTIONS,
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    SessionExpiredError,
)
from kazoo.protocol.serialization import (
    GetChildren,
    GetData,
    MultiHeader,
    int_struct,
    multiheader_struct,
    read_buffer,
    read_string,
    stat_struct,
)
from kazoo.security import make_digest_acl

from ..private_files import SecretFileError, read_secret_file
from .errors import BadLogUrl, CorruptLog, EventLogError, Fenced, LogUnavailable
from .log import BatchExists, EventLog

#: Largest znode this backend writes (jute.maxbuffer is 1,048,575 bytes for a whole request).
ZNODE_MAX_BYTES = 1_000_000
SNAPSHOT_CHUNK_BYTES = 512 * 1024  # data per snapshot chunk znode (plus an 8-byte seal)
_MAX_WAIT = 1.0  # longest single wait for a watch (a watch lost with a session costs at most this)
_RETRY_PAUSE = 0.02
_DELETES_PER_MULTI = 500
_GROUP_BYTES = 512 * 1024  # batches per multiRead: about this many bytes of reply
_FIRST_GUESS_BYTES = 128 * 1024  # batch size assumed before the first one is read
_LOST = (ConnectionLoss, SessionExpiredError)


class ArchiveNotConfigured(EventLogError):
    """``truncate`` on a ZooKeeper log that has no ``archive=`` option."""


class AccessDenied(EventLogError):
    """ZooKeeper refused this client (no credentials, or other ones) access to the log."""


def zk_auth(auth_file: str | None) -> dict[str, Any]:
    """``KazooClient`` keywords for ``auth_file`` (``auth_data``, ``default_acl``); ``{}``
    without one. Raises :class:`BadLogUrl` (never showing the password) if the file is
    missing, open to others, or not ``USER:PASSWORD``."""
    if not auth_file:
        return {}
    try:
        text = read_secret_file(auth_file, "ZooKeeper credentials file").decode().strip()
    except (SecretFileError, UnicodeDecodeError) as exc:
        raise BadLogUrl(str(exc)) from None
    user, sep, password = text.partition(":")
    if not sep or not user or not password or "\n" in text:
        raise BadLogUrl(f"ZooKeeper credentials file {auth_file}: expected one line USER:PASSWORD")
    return {"auth_data": [("digest", f"{user}:{password}")],
            "default_acl": [make_digest_acl(user, password, all=True)]}


class _MissingBucket(Exception):
    """A batch's bucket znode vanished (internal: the put is retried once)."""


def _group_end(blob: bytes) -> bool:
    """The ``group_end`` flag of a batch blob, read without decoding its events."""
    try:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(blob[8:520])
        if unpacker.read_array_header() != 5:
            return False
        for _ in range(3):
            unpacker.skip()
        return unpacker.unpack() is True
    except Exception:  # a damaged blob is simply not cached; decoding it reports the damage
        return False


def _digits(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n.isdigit())


class _MultiRead(namedtuple("_MultiRead", "ops")):
    """ZooKeeper's read-only multi (opcode 22, servers >= 3.6): many getData/getChildren in one
    request, each answered on its own (a missing node fails only its op).

    kazoo has no API for it; this request plugs into kazoo's request queue (``_call``), which
    only needs ``type``, ``serialize()`` and ``deserialize(buffer, offset)``. One request instead
    of one per batch is what makes replay fast: kazoo spends ~0.3 ms per request, whatever its size.
    """

    type = 22

    def serialize(self) -> bytearray:
        b = bytearray()
        for kind, path in self.ops:
            op = GetData(path, None) if kind == "data" else GetChildren(path, None)
            b.extend(MultiHeader(op.type, False, -1).serialize())
            b.extend(op.serialize())
        b.extend(multiheader_struct.pack(-1, True, -1))
        return b

    def deserialize(self, buffer: bytes, offset: int) -> list[Any]:
        """One result per op: bytes (data), a list of names (children) or an exception."""
        results: list[Any] = []
        while True:
            kind, done, _ = multiheader_struct.unpack_from(buffer, offset)
            offset += multiheader_struct.size
            if done:
                return results
            if kind == GetData.type:
                data, offset = read_buffer(buffer, offset)
                offset += stat_struct.size
                results.append(data)
            elif kind == GetChildren.type:
                count = int_struct.unpack_from(buffer, offset)[0]
                offset += int_struct.size
                names = []
                for _ in range(max(count, 0)):
                    name, offset = read_string(buffer, offset)
                    names.append(name)
                results.append(names)
            elif kind == -1:
                code = int_struct.unpack_from(buffer, offset)[0]
                offset += int_struct.size
                results.append(EXCEPTIONS[code]())
            else:
                raise ValueError(f"unexpected multiRead result type {kind}")


# ---- the log ---------------------------------------------------------------------------------


class ZkLog(EventLog):
    """An event log in ZooKeeper: batched znodes, fenced multis, chunked snapshots, an archive."""

    max_batch_bytes = 256 * 1024
    max_atomic_bytes = 900 * 1024
    snapshot_chunk_bytes = SNAPSHOT_CHUNK_BYTES

    def __init__(
        self,
        url: str,
        hosts: str,
        chroot: str = "/cei",
        *,
        timeout: float | str = 10.0,
        session_timeout: float | str = 10.0,
        archive: str | None = None,
        bucket: int | str = 10_000,
        cache_bytes: int | str = 32 * 1024 * 1024,
        readahead: int | str = 2 * 1024 * 1024,
        multiread: bool | str = True,
        auth_file: str | None = None,
        keep_snapshots: int | str = 2,
        read_only: bool | str = False,
        **unknown: object,
    ) -> None:
        super().__init__(url)
        if unknown:
            raise BadLogUrl(
                f"log URL {url!r}: unknown option(s) {', '.join(sorted(unknown))} (known: timeout, "
                "session_timeout, archive, keep_snapshots, bucket, cache_bytes, readahead, "
                "multiread, auth_file, read_only)"
            )
        from .sqlite import flag

        #: creates no znode, sets no ACL, records no archive (decision DBG1)
        self.read_only = flag(read_only)
        given_archive = self._history_options(archive, keep_snapshots)
        auth = zk_auth(auth_file)
        self._acl: list[Any] | None = auth.get("default_acl")
        try:
            self.timeout = float(timeout)
            session = float(session_timeout)
            self.bucket_size = int(bucket)
            self._cache_limit = int(cache_bytes)
            self._readahead = max(int(readahead), 1)
        except (TypeError, ValueError) as exc:
            raise BadLogUrl(f"log URL {url!r}: bad option value ({exc})") from None
        if self.timeout <= 0 or session <= 0 or self.bucket_size < 1:
            raise BadLogUrl(f"log URL {url!r}: timeouts and bucket must be positive")
        if not chroot.startswith("/") or "//" in chroot:
            raise BadLogUrl(f"log URL {url!r}: chroot must be an absolute znode path")
        self.hosts = hosts
        self.chroot = chroot.rstrip("/") or "/"
        if self._acl is not None and self.chroot == "/":
            raise BadLogUrl(f"log URL {url!r}: auth_file needs a chroot (zk://HOSTS/CHROOT), "
                            "not the server's root")
        self._root = chroot.rstrip("/")

        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], int] = {}
        self._known_streams: set[str] = set()
        self._buckets: dict[str, set[int]] = {}
        self._widths: dict[str, int] = {}
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._cache_size = 0
        self._listing: dict[str, list[int]] = {}
        self._pf: dict[str, dict[int, Any]] = {}
        self._pf_next: dict[str, int] = {}
        self._avg_blob = 0.0  # running mean of batch sizes read, to size read-ahead groups
        self._multiread = str(multiread).lower() not in ("0", "false", "no", "off")
        self._tls = threading.local()
        self._connected = threading.Event()
        self._losses = 0
        self._closed = False


        try:
            self._client = KazooClient(
                hosts=hosts,
                timeout=session,
                connection_retry={"max_tries": -1, "delay": 0.05, "backoff": 1.5, "max_delay": 1.0},
                **auth,
            )
        except (ValueError, KazooException) as exc:
            raise BadLogUrl(f"log URL {url!r}: bad hosts {hosts!r} ({exc})") from None
        self._timeout_exc = self._client.handler.timeout_exception
        self._client.add_listener(self._on_state)
        try:
            self._client.start(timeout=self.timeout)
        except self._timeout_exc:
            with contextlib.suppress(Exception):
                self._client.close()
            raise LogUnavailable(
                f"ZooKeeper at {hosts} is unreachable: no connection within {self.timeout:g}s "
                f"(log {url}; set ?timeout= to wait longer)"
            ) from None
        self._connected.set()
        try:
            if self.read_only:
                if self._call("looking for the log", lambda: self._client.exists_async(self._p("/streams"))) is None:
                    raise LogUnavailable(f"ZooKeeper at {hosts}: no log at {self.chroot} (log {url})")
            else:
                self._call(
                    "creating the log root", lambda: self._client.ensure_path_async(self._p("/streams"))
                )
            if self._acl is not None and not self.read_only:
                self._protect()
            self._call("reading the log root", lambda: self._client.get_children_async(self._p("/streams")))
            self._adopt_archive(given_archive)
        except NoAuthError:
            self.close()
            raise AccessDenied(
                f"ZooKeeper at {hosts} refused access to {self.chroot}: the log is protected by an "
                "ACL; this client has " + ("other credentials" if self._acl else "no credentials "
                                           "(give them with ?auth_file=PATH)") + f" (log {url})"
            ) from None
        except BaseException:
            self.close()
            raise
        if self._multiread:
            self._multiread = self._probe_multiread()

    def _protect(self) -> None:
        """Give every znode under the chroot this log's ACL, unless the chroot has it already.

        Deepest first and the chroot last, so an interrupted run is redone at the next open."""
        root = self._root or "/"
        acls, _ = self._call("reading the log root's ACL", lambda: self._client.get_acls_async(root))
        if list(acls) == self._acl:
            return
        paths, i = [root], 0
        while i < len(paths):
            group = paths[i : i + 200]
            i += len(group)
            futures = [(p, self._client.get_children_async(p)) for p in group]
            for parent, future in futures:
                children = self._result(future, "listing the log to protect it",
                                        lambda p=parent: self._client.get_children_async(p))
                paths += [f"{parent.rstrip('/')}/{child}" for child in children]
        deepest_first = paths[:0:-1]
        for group in [deepest_first[k : k + 500] for k in range(0, len(deepest_first), 500)] + [[root]]:
            futures = [(p, self._client.set_acls_async(p, self._acl)) for p in group]
            for path, future in futures:
                with contextlib.suppress(NoNodeError):  # deleted meanwhile
                    self._result(future, "protecting the log",
                                 lambda p=path: self._client.set_acls_async(p, self._acl))

    def _adopt_archive(self, given: str | None) -> None:
        """Open the ``archive=`` option's archive, or the one recorded in ``CHROOT/archive``
        by the last writer that had one (so readers without the option find it); record a new one."""
        path = self._p("/archive")
        try:
            data, _ = self._call("reading the archive's name", lambda: self._client.get_async(path))
            recorded: str | None = data.decode() or None
        except NoNodeError:
            recorded = None
        record = self._use_archive(given, recorded, self.chroot, read_only=self.read_only)
        if record and not self.read_only:
            try:
                self._call("naming the archive", lambda: self._client.create_async(path, record.encode()))
            except NodeExistsError:
                self._call("naming the archive", lambda: self._client.set_async(path, record.encode()))

    def _probe_multiread(self) -> bool:
        """Whether this server and kazoo answer a multiRead (else reads fall back to one get each)."""
        try:
            got = self._read_many([("children", self._p("/streams"))]).get(timeout=self.timeout)
        except Exception:
            return False
        return isinstance(got, list) and len(got) == 1 and isinstance(got[0], list)

    def _read_many(self, ops: list[tuple[str, str]]) -> Any:
        """Send one multiRead of ``("data" | "children", path)`` ops; returns its async result."""
        result = self._client.handler.async_result()
        self._client._call(_MultiRead(tuple(ops)), result)
        return result

    def __repr__(self) -> str:
        return f"ZkLog({self.url!r})"

    # ---- connection handling ----------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
            if state == KazooState.LOST:
                self._losses += 1

    def _left(self, deadline: float) -> float:
        return max(deadline - time.monotonic(), 0.001)

    def _unavailable(self, what: str) -> LogUnavailable:
        return LogUnavailable(
            f"ZooKeeper at {self.hosts} unreachable: {what} got no answer within "
            f"{self.timeout:g}s (log {self.url})"
        )

    def _await_connection(self, deadline: float, what: str) -> None:
        if self._closed:
            raise EventLogError(f"{self.url}: the log is closed")
        if not self._connected.wait(self._left(deadline)):
            raise self._unavailable(what)

    def _call(self, what: str, make: Callable[[], Any], deadline: float | None = None) -> Any:
        """Run one idempotent request, retrying across lost connections until the deadline."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while True:
            self._await_connection(deadline, what)
            try:
                return make().get(timeout=self._left(deadline))
            except self._timeout_exc:
                raise self._unavailable(what) from None
            except ConnectionClosedError:
                raise EventLogError(f"{self.url}: the log is closed") from None
            except _LOST:
                if time.monotonic() >= deadline:
                    raise self._unavailable(what) from None
                time.sleep(_RETRY_PAUSE)

    def _result(self, future: Any, what: str, retry: Callable[[], Any]) -> Any:
        """Wait for an already issued request; reissue it with ``_call`` if the connection dropped."""
        try:
            return future.get(timeout=self.timeout)
        except self._timeout_exc:
            raise self._unavailable(what) from None
        except _LOST:
            return self._call(what, retry)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._client.stop()
        with contextlib.suppress(Exception):
            self._client.close()
        if self._archive_store is not None:
            self._archive_store.close()

    # ---- paths --------------------------------------------------------------------------------

    def _p(self, path: str) -> str:
        return self._root + path

    def _sp(self, stream: str) -> str:
        return f"{self._root}/streams/{stream}"

    def _epoch_path(self, stream: str) -> str:
        return f"{self._root}/streams/{stream}/epoch"

    def _width(self, stream: str) -> int:
        """The stream's bucket width in offsets: fixed in its znode when the stream was created."""
        width = self._widths.get(stream)
        if width is None:
            path = self._sp(stream)
            try:
                data, _ = self._call("reading the stream", lambda: self._client.get_async(path))
            except NoNodeError:
                return self.bucket_size  # nothing stored yet, so nothing to address
            try:
                width = int(msgpack.unpackb(data)["bucket"])
            except Exception as exc:
                raise CorruptLog(
                    stream, None, f"stream znode {path} holds no bucket width"
                ) from exc
            self._widths[stream] = width
        return width

    def _bucket(self, stream: str, first: int) -> int:
        return first // self._width(stream)

    def _bucket_path(self, stream: str, bucket: int) -> str:
        return f"{self._root}/streams/{stream}/b/{bucket:016d}"

    def _batch_path(self, stream: str, first: int) -> str:
        return f"{self._root}/streams/{stream}/b/{first // self._width(stream):016d}/{first:020d}"

    # ---- streams and epochs -------------------------------------------------------------------

    def _streams(self) -> list[str]:
        try:
            return self._call(
                "listing streams", lambda: self._client.get_children_async(self._p("/streams"))
            )
        except NoNodeError:
            return []

    def _ensure_stream(self, stream: str) -> None:
        if stream in self._known_streams:
            return
        sp = self._sp(stream)

        def skeleton() -> Any:
            txn = self._client.transaction()
            txn.create(sp, msgpack.packb({"bucket": self.bucket_size}))
            txn.create(f"{sp}/epoch", b"0")
            txn.create(f"{sp}/b")
            txn.create(f"{sp}/snap")
            return txn.commit_async()

        results = self._call(f"creating stream {stream!r}", skeleton)
        first = results[0]
        if isinstance(first, Exception) and not isinstance(first, NodeExistsError):
            raise EventLogError(f"stream {stream!r}: ZooKeeper refused to create it: {results!r}")
        self._known_streams.add(stream)

    def _epoch(self, stream: str) -> int:
        path = self._epoch_path(stream)
        try:
            data, _ = self._call("reading the epoch", lambda: self._client.get_async(path))
        except NoNodeError:
            return 0
        return int(data or b"0")

    def _bump_epoch(self, stream: str) -> int:
        self._ensure_stream(stream)
        path = self._epoch_path(stream)
        deadline = time.monotonic() + self.timeout
        while True:
            data, stat = self._call(
                "reading the epoch", lambda: self._client.get_async(path), deadline
            )
            new = int(data or b"0") + 1
            try:
                # a lost reply makes the retry fail with BadVersionError: that epoch is wasted,
                # never shared, and the loop bumps again
                new_stat = self._call(
                    "bumping the epoch",
                    lambda: self._client.set_async(path, str(new).encode(), stat.version),  # noqa: B023
                    deadline,
                )
            except BadVersionError:
                continue
            with self._lock:
                self._versions[(stream, new)] = new_stat.version
            return new

    def _epoch_version(self, stream: str, epoch: int) -> int:
        """The epoch znode's data version that corresponds to ``epoch``, or :class:`Fenced`."""
        with self._lock:
            version = self._versions.get((stream, epoch))
        if version is not None:
            return version
        path = self._epoch_path(stream)
        try:
            data, stat = self._call("reading the epoch", lambda: self._client.get_async(path))
        except NoNodeError:
            raise Fenced(stream, epoch, 0) from None
        current = int(data or b"0")
        if current != epoch:
            raise Fenced(stream, epoch, current)
        with self._lock:
            self._versions[(stream, epoch)] = stat.version
        return stat.version

    # ---- appends ------------------------------------------------------------------------------

    def _ensure_buckets(self, stream: str, firsts: Iterable[int], deadline: float) -> None:
        wanted = {self._bucket(stream, f) for f in firsts}
        with self._lock:
            known = self._buckets.setdefault(stream, set())
            missing = sorted(wanted - known)
        for bucket in missing:
            path = self._bucket_path(stream, bucket)
            # an empty bucket (even one a deposed writer made) is harmless: readers skip it
            with contextlib.suppress(NodeExistsError):
                self._call(
                    "creating a bucket", lambda p=path: self._client.create_async(p), deadline
                )
            with self._lock:
                known.add(bucket)

    def _commit(self, txn: Any, timeout: float) -> list[Any]:
        """Send one multi and wait for its results (tests wrap this to lose replies)."""
        return txn.commit_async().get(timeout=timeout)

    def _put(self, stream: str, epoch: int, batches: list[tuple[int, bytes]]) -> None:
        for first, blob in batches:
            if len(blob) > ZNODE_MAX_BYTES:
                raise EventLogError(
                    f"stream {stream!r}: the batch at offset {first} is {len(blob)} bytes, over "
                    f"ZooKeeper's {ZNODE_MAX_BYTES}-byte znode limit (one event is too large)"
                )
        version = self._epoch_version(stream, epoch)
        what = f"appending to stream {stream!r} at offset {batches[0][0]}"
        deadline = time.monotonic() + self.timeout
        losses: int | None = None
        bucket_retry = True
        while True:
            self._ensure_buckets(stream, (f for f, _ in batches), deadline)
            self._await_connection(deadline, what)
            txn = self._client.transaction()
            txn.check(self._epoch_path(stream), version)
            for first, blob in batches:
                txn.create(self._batch_path(stream, first), blob)
            if losses is None:
                losses = self._losses
            try:
                results = self._commit(txn, self._left(deadline))
            except self._timeout_exc:
                raise LogUnavailable(
                    f"{what}: ZooKeeper at {self.hosts} did not reply within {self.timeout:g}s; "
                    "the outcome is unknown (retrying the same append is safe)"
                ) from None
            except _LOST:
                if self._stored(stream, batches, losses, deadline, what):
                    return
                continue
            try:
                self._raise_put_failure(stream, epoch, batches, results)
            except _MissingBucket:
                if not bucket_retry:
                    raise EventLogError(f"{what}: the bucket znode keeps vanishing") from None
                bucket_retry = False
                with self._lock:
                    self._buckets.pop(stream, None)
                continue
            return

    def _raise_put_failure(
        self, stream: str, epoch: int, batches: list[tuple[int, bytes]], results: list[Any]
    ) -> None:
        if not any(isinstance(r, Exception) for r in results):
            return
        if isinstance(results[0], (BadVersionError, NoNodeError)):
            with self._lock:
                self._versions.pop((stream, epoch), None)
            raise Fenced(stream, epoch, self._epoch(stream))
        for (first, _), result in zip(batches, results[1:], strict=False):
            if isinstance(result, NodeExistsError):
                self._forget(stream, [f for f, _ in batches])
                raise BatchExists(stream, first)
            if isinstance(result, NoNodeError):
                raise _MissingBucket()
        raise EventLogError(f"stream {stream!r}: ZooKeeper refused the append: {results!r}")

    def _stored(
        self, stream: str, batches: list[tuple[int, bytes]], losses: int, deadline: float, what: str
    ) -> bool:
        """After a lost reply: True if the put is stored, False if not (retry it)."""
        unknown = f"{what} (outcome unknown; retrying the same append is safe)"
        paths = [self._batch_path(stream, first) for first, _ in batches]
        while True:
            self._await_connection(deadline, unknown)
            if self._losses != losses:
                raise LogUnavailable(
                    f"{what}: the ZooKeeper session expired before the reply arrived, so whether "
                    "the append was stored is unknown; retrying the same append is safe"
                )
            try:
                # sync: this server has applied everything the leader committed before, so a
                # multi sent on the lost connection is visible now or will never be applied
                self._client.sync_async(paths[0]).get(timeout=self._left(deadline))
                futures = [self._client.get_async(p) for p in paths]
                found: list[bytes | None] = []
                for future in futures:
                    try:
                        found.append(future.get(timeout=self._left(deadline))[0])
                    except NoNodeError:
                        found.append(None)
            except self._timeout_exc:
                raise self._unavailable(unknown) from None
            except _LOST:
                time.sleep(_RETRY_PAUSE)
                continue
            if all(g == blob for g, (_, blob) in zip(found, batches, strict=True)):
                return True
            if all(g is None for g in found):
                return False
            for g, (first, blob) in zip(found, batches, strict=True):
                if g != blob:
                    raise BatchExists(stream, first)

    def _delete(self, stream: str, epoch: int, firsts: list[int]) -> None:
        version = self._epoch_version(stream, epoch)
        self._forget(stream, firsts)
        # newest first: if a later multi fails, what is left is still a trailing orphan, no gap
        pending = sorted(firsts, reverse=True)
        deadline = time.monotonic() + self.timeout
        while pending:
            chunk = pending[:_DELETES_PER_MULTI]

            def multi(chunk: list[int] = chunk) -> Any:
                txn = self._client.transaction()
                txn.check(self._epoch_path(stream), version)
                for first in chunk:
                    txn.delete(self._batch_path(stream, first))
                return txn.commit_async()

            results = self._call(f"deleting an unfinished append of {stream!r}", multi, deadline)
            if isinstance(results[0], (BadVersionError, NoNodeError)):
                raise Fenced(stream, epoch, self._epoch(stream))
            gone = {
                f for f, r in zip(chunk, results[1:], strict=False) if isinstance(r, NoNodeError)
            }
            if gone:  # deleted already (a retry after a lost reply): drop those, redo the rest
                pending = [f for f in pending if f not in gone]
                continue
            if any(isinstance(r, Exception) for r in results):
                raise EventLogError(f"stream {stream!r}: ZooKeeper refused a delete: {results!r}")
            pending = pending[len(chunk) :]

    # ---- reads --------------------------------------------------------------------------------

    def _index(self, stream: str) -> list[int]:
        bdir = f"{self._sp(stream)}/b"
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                buckets = _digits(
                    self._call(
                        "listing batches", lambda: self._client.get_children_async(bdir), deadline
                    )
                )
            except NoNodeError:
                buckets = []
            names: list[list[str]] = []
            try:
                for got in self._list_many([f"{bdir}/{b}" for b in buckets], deadline):
                    # NoNodeError: emptied and removed by an archiver meanwhile
                    names.append([] if isinstance(got, NoNodeError) else _digits(got))
            except self._timeout_exc:
                raise self._unavailable("listing batches") from None
            except _LOST:
                time.sleep(_RETRY_PAUSE)
                continue
            break
        firsts = [int(n) for group in names for n in group]
        firsts.sort()
        listings = self._tls.__dict__.setdefault("listing", {})
        listings[stream] = (tuple(buckets), tuple(names[-1]) if names else ())
        self._tls.__dict__.setdefault("live_first", {})[stream] = firsts[0] if firsts else None
        with self._lock:
            self._listing[stream] = firsts
            self._pf.pop(stream, None)
            self._pf_next[stream] = 0
        return firsts

    def _list_many(self, paths: list[str], deadline: float) -> list[Any]:
        """Children of each path (or its NoNodeError), pipelined; multiRead when available."""
        if self._multiread:
            futures = [
                self._read_many([("children", p) for p in paths[k : k + 256]])
                for k in range(0, len(paths), 256)
            ]
            try:
                got = [r for future in futures for r in future.get(timeout=self._left(deadline))]
            except (*_LOST, self._timeout_exc):
                raise
            except KazooException:  # the multiRead itself was refused: stop using it
                self._multiread = False
            else:
                for r in got:
                    if isinstance(r, Exception) and not isinstance(r, NoNodeError):
                        raise r
                return got
        results: list[Any] = []
        for future in [self._client.get_children_async(p) for p in paths]:
            try:
                results.append(future.get(timeout=self._left(deadline)))
            except NoNodeError as exc:
                results.append(exc)
        return results

    def _archived_index(self, stream: str) -> list[int]:
        archived = [] if self._archive_store is None else self._archive_store.index(stream)
        live_first = self._tls.__dict__.get("live_first", {}).get(stream)
        if live_first is not None and live_first > 1 and (not archived or archived[0] != 1):
            # history was truncated but this archive lacks its start: list offset 1 anyway, so
            # that a read from before the live range fails in _get with a clear error instead
            # of silently starting later (reads from inside the live range never touch it)
            archived = [1, *archived]
        return archived

    def _remember(self, key: tuple[str, int], blob: bytes) -> None:
        if len(blob) > self._cache_limit // 4 or not _group_end(blob):
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = blob
            self._cache_size += len(blob)
            while self._cache_size > self._cache_limit:
                _, old = self._cache.popitem(last=False)
                self._cache_size -= len(old)

    def _forget(self, stream: str, firsts: Iterable[int]) -> None:
        with self._lock:
            pf = self._pf.get(stream, {})
            for first in firsts:
                pf.pop(first, None)
                old = self._cache.pop((stream, first), None)
                if old is not None:
                    self._cache_size -= len(old)

    def _take(self, stream: str, first: int) -> tuple[Any, int | None] | None:
        """The in-flight request holding ``first`` (if any), after topping up the read-ahead.

        Read-ahead follows the latest listing: groups of ~512 KiB of batches, one multiRead
        each (or one get per batch without multiRead), up to ``readahead`` bytes in flight.
        """
        self._width(stream)  # cached before the lock is held
        with self._lock:
            pf = self._pf.setdefault(stream, {})
            listing = self._listing.get(stream, [])
            i = bisect.bisect_left(listing, first)
            if i < len(listing) and listing[i] == first:
                avg = max(self._avg_blob or _FIRST_GUESS_BYTES, 64.0)
                group = int(min(max(_GROUP_BYTES // avg, 1), 512))
                ahead = max(int(self._readahead // avg), group)
                nxt = max(self._pf_next.get(stream, 0), i if first not in pf else i + 1)
                while nxt < min(i + 1 + ahead, len(listing)):
                    chunk = [
                        f
                        for f in listing[nxt : nxt + group]
                        if f not in pf and (stream, f) not in self._cache
                    ]
                    if chunk and self._multiread:
                        future = self._read_many(
                            [("data", self._batch_path(stream, f)) for f in chunk]
                        )
                        for j, f in enumerate(chunk):
                            pf[f] = (future, j)
                    else:
                        for f in chunk:
                            pf[f] = (self._client.get_async(self._batch_path(stream, f)), None)
                    nxt += group
                self._pf_next[stream] = nxt
                if len(pf) > 2 * ahead + 2 * group:  # abandoned read-aheads
                    keep = pf.get(first)
                    pf.clear()
                    if keep is not None:
                        pf[first] = keep
            return pf.pop(first, None)

    def _fetch(self, entry: tuple[Any, int | None] | None, path: str) -> bytes:
        """The data of a read-ahead entry, or of a fresh get when there is none or it failed."""
        if entry is not None:
            future, j = entry
            try:
                got = future.get(timeout=self.timeout)
            except self._timeout_exc:
                raise self._unavailable("reading a batch") from None
            except NoNodeError:
                raise
            except _LOST:
                got = None
            except KazooException:  # the multiRead itself was refused: stop using it
                self._multiread = False
                got = None
            if got is not None:
                if j is None:
                    return got[0]
                if isinstance(got[j], Exception):
                    raise got[j]
                return got[j]
        return self._call("reading a batch", lambda: self._client.get_async(path))[0]

    def _get(self, stream: str, first: int) -> bytes:
        key = (stream, first)
        with self._lock:
            blob = self._cache.get(key)
            if blob is not None:
                self._cache.move_to_end(key)
                return blob
            listing = self._listing.get(stream)
        archive = self._archive_store
        if archive is not None and listing is not None and (not listing or first < listing[0]):
            blob = archive.get(stream, first)  # below the live range: archived, most likely
            if blob is not None:
                return blob
        path = self._batch_path(stream, first)
        try:
            data = self._fetch(self._take(stream, first), path)
        except NoNodeError:
            blob = archive.get(stream, first) if archive is not None else None
            if blob is not None:
                return blob
            if archive is None:
                raise ArchiveNotConfigured(
                    f"stream {stream!r}: the batch at offset {first} is not in ZooKeeper (moved to "
                    f"an archive by truncate?) and this log has no archive; open it with "
                    f"?archive=... to read that history (log {self.url})"
                ) from None
            raise CorruptLog(
                stream, first, "batch neither in ZooKeeper nor in the configured archive"
            ) from None
        avg = self._avg_blob
        self._avg_blob = len(data) if not avg else avg + (len(data) - avg) * 0.1
        self._remember(key, data)
        return data

    def _wait(self, stream: str, timeout: float) -> None:
        """Block until a watch on the stream's buckets fires (at most ``timeout``, capped at 1 s)."""
        timeout = min(timeout, _MAX_WAIT)
        deadline = time.monotonic() + timeout
        seen = self._tls.__dict__.setdefault("listing", {}).get(stream)
        waiters = self._tls.__dict__.setdefault("waiters", {})
        if stream not in waiters:
            event = threading.Event()
            # one callable per thread and stream: kazoo keeps watchers in a set, so re-registering
            # the same one does not pile up while nothing changes
            waiters[stream] = (event, lambda _e, ev=event: ev.set())
        event, watcher = waiters[stream]
        event.clear()
        bdir = f"{self._sp(stream)}/b"
        try:
            try:
                buckets = _digits(
                    self._call(
                        "watching",
                        lambda: self._client.get_children_async(bdir, watch=watcher),
                        deadline,
                    )
                )
            except NoNodeError:
                if self._call(
                    "watching", lambda: self._client.exists_async(bdir, watch=watcher), deadline
                ):
                    return
                buckets = []
            if seen is None or tuple(buckets) != seen[0]:
                return
            if buckets:
                last = f"{bdir}/{buckets[-1]}"
                try:
                    names = self._call(
                        "watching",
                        lambda: self._client.get_children_async(last, watch=watcher),
                        deadline,
                    )
                except NoNodeError:
                    return
                if tuple(_digits(names)) != seen[1]:
                    return
        except LogUnavailable:
            return  # the next read reports it
        event.wait(self._left(deadline))

    # ---- truncation and the archive -----------------------------------------------------------

    def _archive(self, stream: str, firsts: list[int]) -> None:
        store = self._archive_store
        if store is None:
            raise ArchiveNotConfigured(
                f"stream {stream!r}: truncate moves batches out of ZooKeeper into an archive, and "
                f"this log has none; open it with ?archive=sqlite:///PATH or ?archive=/DIRECTORY "
                f"(log {self.url})"
            )
        items = [(first, self._get(stream, first)) for first in firsts]
        store.put(stream, items)  # durable before anything leaves ZooKeeper
        self._forget(stream, firsts)
        deadline = time.monotonic() + self.timeout
        for start in range(0, len(firsts), _DELETES_PER_MULTI):
            chunk = firsts[start : start + _DELETES_PER_MULTI]
            futures = [self._client.delete_async(self._batch_path(stream, f)) for f in chunk]
            for first, future in zip(chunk, futures, strict=True):
                path = self._batch_path(stream, first)
                with contextlib.suppress(NoNodeError):
                    self._result(future, "archiving", lambda p=path: self._client.delete_async(p))
        live = self._index(stream)
        keep = {self._bucket(stream, f) for f in live}
        newest = max(keep) if keep else None
        for bucket in sorted({self._bucket(stream, f) for f in firsts} - keep):
            if newest is not None and bucket > newest:
                continue
            with contextlib.suppress(NoNodeError, NotEmptyError):
                self._call(
                    "removing an empty bucket",
                    lambda b=bucket: self._client.delete_async(self._bucket_path(stream, b)),
                    deadline,
                )
            with self._lock:
                self._buckets.get(stream, set()).discard(bucket)

    # ---- snapshots ----------------------------------------------------------------------------

    def _read_manifest(self, stream: str, deadline: float | None = None) -> tuple[list[dict[str, Any]], Any]:
        """The stream's snapshot entries, newest first, and the manifest's stat (None: none).

        An entry is ``{id, offset, chunks}``; a manifest written before several snapshots were
        kept is one entry with ``legacy``, ``size`` and ``crc`` (its chunks slice one blob)."""
        path = f"{self._sp(stream)}/snap/manifest"
        try:
            data, stat = self._call(
                "reading the snapshot manifest", lambda: self._client.get_async(path), deadline
            )
        except NoNodeError:
            return [], None
        try:
            manifest = msgpack.unpackb(data)
            if "snaps" in manifest:
                entries = list(manifest["snaps"])
            else:
                entries = [{**manifest, "legacy": True}]
        except Exception as exc:
            raise CorruptLog(stream, None, f"snapshot manifest {path} does not decode") from exc
        entries.sort(key=lambda e: e["offset"], reverse=True)
        return entries, stat

    def _put_snapshot(self, stream: str, offset: int, chunks: list[bytes], keep: int) -> None:
        self._ensure_stream(stream)
        snap = f"{self._sp(stream)}/snap"
        deadline = time.monotonic() + self.timeout
        while True:
            sid = f"{offset:020d}-{uuid.uuid4().hex[:12]}"
            sdir = f"{snap}/{sid}"
            paths = [f"{sdir}/{k:06d}" for k in range(len(chunks))]
            try:
                self._call("writing a snapshot", lambda: self._client.create_async(sdir), deadline)  # noqa: B023
                futures = [
                    self._client.create_async(p, c) for p, c in zip(paths, chunks, strict=True)
                ]
                for future in futures:
                    future.get(timeout=self._left(deadline))
            except self._timeout_exc:
                raise self._unavailable("writing a snapshot") from None
            except (*_LOST, NodeExistsError):
                self._delete_tree(sdir)
                if time.monotonic() >= deadline:
                    raise self._unavailable("writing a snapshot") from None
                continue
            entry = {"id": sid, "offset": offset, "chunks": len(chunks)}
            dropped = self._swap_manifest(stream, paths, entry, keep, deadline)
            for old in dropped:
                self._delete_tree(f"{snap}/{old}")
            self._collect_snapshot_garbage(stream, keep=sid)
            return

    def _swap_manifest(
        self, stream: str, chunk_paths: list[str], entry: dict[str, Any], keep: int, deadline: float
    ) -> list[str]:
        """Add ``entry`` to the manifest once every chunk exists, keeping the ``keep`` newest
        snapshots by offset; returns the ids no longer listed (to delete)."""
        path = f"{self._sp(stream)}/snap/manifest"
        sid = entry["id"]
        while True:
            old, stat = self._read_manifest(stream, deadline)
            if any(e["id"] == sid for e in old):  # an earlier attempt went through; only its reply was lost
                return []
            merged = [e for e in old if e["offset"] != entry["offset"]] + [entry]
            merged.sort(key=lambda e: e["offset"], reverse=True)
            kept = merged[:keep]
            dropped = [e["id"] for e in merged[keep:]] + [
                e["id"] for e in old if e["offset"] == entry["offset"]
            ]
            if entry not in kept:  # older than every snapshot kept: not needed
                return [sid]
            manifest = msgpack.packb({"snaps": [{k: e[k] for k in ("id", "offset", "chunks", "legacy", "size", "crc") if k in e} for e in kept]})
            txn = self._client.transaction()
            for p in chunk_paths:
                txn.check(p, 0)
            if stat is None:
                txn.create(path, manifest)
            else:
                txn.set_data(path, manifest, stat.version)
            try:
                results = txn.commit_async().get(timeout=self._left(deadline))
            except self._timeout_exc:
                raise self._unavailable("swapping the snapshot manifest") from None
            except _LOST:
                self._await_connection(deadline, "swapping the snapshot manifest")
                time.sleep(_RETRY_PAUSE)
                continue  # the re-read shows whether it went through
            if not any(isinstance(r, Exception) for r in results):
                return dropped
            if any(isinstance(r, NoNodeError) for r in results[: len(chunk_paths)]):
                raise EventLogError(
                    f"stream {stream!r}: snapshot chunks vanished while being written"
                )
            # another snapshot was saved meanwhile (BadVersion/NodeExists): merge again

    def _collect_snapshot_garbage(self, stream: str, keep: str, age: float = 60.0) -> None:
        """Remove snapshot directories that writers abandoned (older than ``age`` seconds)."""
        snap = f"{self._sp(stream)}/snap"
        try:
            names = self._call("listing snapshots", lambda: self._client.get_children_async(snap))
            listed = {e["id"] for e in self._read_manifest(stream)[0]}
        except (KazooException, EventLogError):
            return
        stale = [n for n in names if n != "manifest" and n != keep and n not in listed]
        futures = [self._client.exists_async(f"{snap}/{n}") for n in stale]
        now_ms = time.time() * 1000
        for name, future in zip(stale, futures, strict=True):
            with contextlib.suppress(KazooException, *_LOST):
                stat = future.get(timeout=self.timeout)
                if stat is not None and now_ms - stat.ctime > age * 1000:
                    self._delete_tree(f"{snap}/{name}")

    def _delete_tree(self, path: str) -> None:
        """Best-effort removal of a snapshot directory and its chunks."""
        try:
            children = self._call(
                "cleaning a snapshot", lambda: self._client.get_children_async(path)
            )
            for future in [self._client.delete_async(f"{path}/{c}") for c in children]:
                with contextlib.suppress(KazooException):
                    future.get(timeout=self.timeout)
            self._call("cleaning a snapshot", lambda: self._client.delete_async(path))
        except (KazooException, EventLogError):
            pass

    def _snapshot_offsets(self, stream: str) -> list[int]:
        return [e["offset"] for e in self._read_manifest(stream)[0]]

    def _get_snapshot(self, stream: str, offset: int) -> list[bytes] | None:
        deadline = time.monotonic() + self.timeout
        for _ in range(20):
            entries, _stat = self._read_manifest(stream, deadline)
            entry = next((e for e in entries if e["offset"] == offset), None)
            if entry is None:
                return None
            sdir = f"{self._sp(stream)}/snap/{entry['id']}"
            futures = [self._client.get_async(f"{sdir}/{k:06d}") for k in range(entry["chunks"])]
            try:
                parts = [f.get(timeout=self._left(deadline))[0] for f in futures]
            except NoNodeError:
                continue  # replaced and deleted while we read it: read the manifest again
            except self._timeout_exc:
                raise self._unavailable("reading a snapshot") from None
            except _LOST:
                time.sleep(_RETRY_PAUSE)
                continue
            if not entry.get("legacy"):
                return parts
            blob = b"".join(parts)
            if len(blob) != entry["size"] or zlib.crc32(blob) != entry["crc"]:
                raise CorruptLog(stream, None, "snapshot chunks do not match their manifest")
            return [blob]
        raise CorruptLog(stream, None, "snapshot chunks keep vanishing while being read")

    # ---- test hooks ---------------------------------------------------------------------------

    def _corrupt(self, stream: str, first: int, blob: bytes) -> None:
        """Overwrite a stored batch in place (tests only)."""
        self._forget(stream, [first])
        path = self._batch_path(stream, first)
        self._call("corrupting a batch", lambda: self._client.set_async(path, blob))

    def _corrupt_snapshot(self, stream: str, offset: int) -> None:
        """Flip the last byte of the last chunk of the snapshot at ``offset`` (tests only)."""
        entry = next(e for e in self._read_manifest(stream)[0] if e["offset"] == offset)
        path = f"{self._sp(stream)}/snap/{entry['id']}/{entry['chunks'] - 1:06d}"
        data, _ = self._call("reading a chunk", lambda: self._client.get_async(path))
        damaged = data[:-1] + bytes([data[-1] ^ 0xFF])
        self._call("corrupting a snapshot", lambda: self._client.set_async(path, damaged))


__all__ = ["ArchiveNotConfigured", "ZkLog"]
