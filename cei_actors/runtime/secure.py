"""Authenticated frames and restricted unpickling on thespian's TCP transport.

thespian's TCP transport sends every message as one frame, ``b"<len>>" + pickle``, and
unpickles whatever a socket delivers. :func:`install` replaces the transport's serializer
(the module global ``thespian.system.transport.TCPTransport.serializer``, looked up at every
send and every new receive buffer) so that

- every frame this process sends carries ``HMAC-SHA256(key, pickle)`` before the pickle;
- every frame it receives is checked against that tag *before* anything is unpickled
  (constant-time compare); a frame without the right tag is refused;
- an authenticated frame is unpickled by :class:`RestrictedUnpickler`, whose ``find_class``
  admits only the classes the system's messages use (see :func:`allowed`); anything else is
  refused.

A refused frame raises :class:`RefusedFrame` inside the transport, which answers the peer
``ACK+DATAERR`` and closes that connection; nothing reaches an actor. Each refusal is written
as one line to this process's stderr (the actor system's ``system.log`` under ``cei up``),
rate-limited (:data:`LOG_BURST`) so a peer that reconnects in a loop cannot flood it. thespian's two constant acknowledgement frames (``ACK``, ``ACK+DATAERR``) stay
unsigned and are recognised by comparing bytes (no unpickling), so a peer with a different key
gets a prompt ``ACK+DATAERR`` instead of a silent drop.

The key is 32 random bytes in a file only its owner may read (:func:`new_secret_file`;
``HOME/secret`` for a launched system). A process loads it with :func:`use_secret_file`,
which also sets ``CEI_SECRET_FILE`` to the file's *path* (never the key), so every process
forked or started from it (thespian's admin and actors, the local cloud's EEAgent "VMs")
finds the same file. The transport is process-wide, so a process that talks to several
systems (a test, a host embedding two) holds a keyring: every key it was given, newest first
(:data:`MAX_KEYS` at most). A frame carries one tag per key of its sender
(``count | tags | pickle``) and is accepted when one of them is the receiver's; a system's own
processes hold its key alone. The price: a process that holds the keys of two systems signs
for both, so either could replay a frame it received from that process to the other.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import hmac
import io
import logging
import os
import pickle
import secrets
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "KEY_BYTES",
    "SECRET_ENV",
    "SECRET_FILE",
    "RefusedFrame",
    "RestrictedUnpickler",
    "SecretError",
    "allowed",
    "ensure_secret_file",
    "install",
    "new_secret_file",
    "read_secret",
    "refusal_count",
    "resolve_secret_file",
    "restricted_loads",
    "seal",
    "use_secret_file",
]

#: Environment variable naming the secret *file* of the system this process belongs to.
SECRET_ENV = "CEI_SECRET_FILE"
#: Name of the secret file under a launched system's home.
SECRET_FILE = "secret"
KEY_BYTES = 32
_TAG_BYTES = 32
_DIGEST = "sha256"


class SecretError(OSError):
    """The secret file is missing, unreadable, readable by others, or not a secret."""


class RefusedFrame(ValueError):  # noqa: N818 - it is what happened to the frame
    """A received frame failed authentication or named a class outside the allowlist."""


# ------------------------------------------------------------------------------ the secret


def new_secret_file(path: str | Path, key: bytes | None = None) -> Path:
    """Write ``key`` (default: a fresh random one) to ``path``, mode 0600, replacing any file
    there atomically; return the path."""
    path = Path(path)
    key = secrets.token_bytes(KEY_BYTES) if key is None else key
    if len(key) != KEY_BYTES:
        raise ValueError(f"key of {len(key)} bytes, expected {KEY_BYTES}")
    fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def ensure_secret_file(path: str | Path) -> Path:
    """``path`` if it holds a usable secret, else a fresh one written there."""
    path = Path(path)
    if not path.exists():
        return new_secret_file(path)
    read_secret(path)
    return path


def read_secret(path: str | Path) -> bytes:
    """The key in ``path``; :class:`SecretError` unless it is a regular file of this user that
    nobody else may read or write, holding exactly :data:`KEY_BYTES` bytes."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SecretError(f"cannot read the actor system's secret {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"secret {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise SecretError(f"secret {path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
        if st.st_mode & 0o077:
            raise SecretError(f"secret {path} is accessible to others (mode {stat.S_IMODE(st.st_mode):04o}); "
                              "it must be 0600")
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise SecretError(f"secret {path} holds {len(key)} bytes, not {KEY_BYTES}")
    return key


def use_secret_file(path: str | Path) -> Path:
    """Load the key in ``path`` into this process's transport and name the file in
    ``$CEI_SECRET_FILE`` for the processes started from here. Returns the absolute path."""
    path = Path(path).expanduser().absolute()
    install(read_secret(path))
    os.environ[SECRET_ENV] = str(path)
    return path


_process_secret: dict[str, Any] = {}


def resolve_secret_file(secret_file: str | Path | None = None, *, create: bool = False) -> Path:
    """The secret file to use: ``secret_file``, else ``$CEI_SECRET_FILE``, else (``create``, also
    when that file is gone) a fresh one in a private temporary directory, removed when this
    process exits.

    Raises :class:`SecretError` when there is none and ``create`` is false.
    """
    if secret_file is not None:
        return Path(secret_file)
    named = os.environ.get(SECRET_ENV)
    if named and (not create or os.path.exists(named)):  # a removed temporary home's: start anew
        return Path(named)
    if not create:
        raise SecretError(f"no actor system secret: pass its secret file (a system's HOME/{SECRET_FILE}) "
                          f"or set ${SECRET_ENV} to it")
    if _process_secret.get("pid") != os.getpid():
        directory = tempfile.mkdtemp(prefix="cei-secret-")  # 0700
        _process_secret.update(pid=os.getpid(), path=new_secret_file(Path(directory) / SECRET_FILE))
        atexit.register(_remove_process_secret, os.getpid(), directory)
    return _process_secret["path"]


def _remove_process_secret(pid: int, directory: str) -> None:
    if os.getpid() == pid:
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------- the frames


#: Keys a process holds at most (the oldest is dropped past it).
MAX_KEYS = 8


def seal(keys: bytes | list[bytes], obj: Any) -> bytes:
    """The payload of a frame carrying ``obj``: the number of tags, a tag per key, its pickle."""
    keys = [keys] if isinstance(keys, bytes) else keys
    data = pickle.dumps(obj)
    return bytes([len(keys)]) + b"".join(hmac.digest(k, data, _DIGEST) for k in keys) + data


class _Codec:
    """What thespian's TCP transport calls as ``serializer.dumps`` / ``serializer.loads``."""

    def __init__(self, key: bytes) -> None:
        self.keys = [key]

    def add(self, key: bytes) -> None:
        """Make ``key`` the newest of the keyring (kept once, at most :data:`MAX_KEYS`)."""
        self.keys = [key, *(k for k in self.keys if k != key)][:MAX_KEYS]

    def dumps(self, obj: Any) -> bytes:
        return seal(self.keys, obj)

    def loads(self, frame: bytes) -> Any:
        plain = _PLAIN_ACKS.get(bytes(frame)) if len(frame) < _ACK_MAX else None
        if plain is not None:
            return plain
        view = memoryview(frame)
        count = view[0] if len(view) else 0
        start = 1 + count * _TAG_BYTES
        if not 0 < count <= MAX_KEYS or len(view) < start or not self._authentic(view[1:start], view[start:]):
            _refused(f"unauthenticated frame of {len(view)} bytes (no or wrong secret); nothing unpickled")
            raise RefusedFrame("frame not authenticated")
        return restricted_loads(view[start:])

    def _authentic(self, tags: memoryview, data: memoryview) -> bool:
        found = False
        for key in self.keys:
            mine = hmac.digest(key, data, _DIGEST)
            for at in range(0, len(tags), _TAG_BYTES):  # no early exit: time does not tell which
                found |= hmac.compare_digest(tags[at:at + _TAG_BYTES], mine)
        return found


def _plain_acks() -> dict[bytes, str]:
    from thespian.system.transport.streamBuffer import ackDataErrPacket, ackPacket

    return {pickle.dumps(p): p for p in (ackPacket, ackDataErrPacket)}


_PLAIN_ACKS = _plain_acks()
_ACK_MAX = max(map(len, _PLAIN_ACKS)) + 1


def install(key: bytes) -> None:
    """Make thespian's TCP transport in this process sign with and accept ``key`` (idempotent;
    a new key joins the keyring, newest first). Call it before the system starts or is
    attached to."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"key of {len(key)} bytes, expected {KEY_BYTES}")
    from thespian.system.transport import TCPTransport

    codec = TCPTransport.serializer
    if isinstance(codec, _Codec):
        codec.add(key)
    else:
        TCPTransport.serializer = _Codec(key)


# ------------------------------------------------------------------------------- allowlist

#: Module prefixes whose classes may be unpickled (only classes defined there).
ALLOWED_PACKAGES = ("cei_actors", "thespian")
#: builtins that pickles of plain data use (exception classes are admitted besides).
_SAFE_BUILTINS = frozenset({"set", "frozenset", "bytearray", "complex", "slice", "range", "object"})
#: Standard-library classes that messages carry.
_SAFE_STDLIB = frozenset({
    ("collections", "OrderedDict"),
    ("collections", "deque"),
    ("datetime", "date"),
    ("datetime", "datetime"),
    ("datetime", "time"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
    ("decimal", "Decimal"),
    ("logging", "LogRecord"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("socket", "AddressFamily"),
    ("socket", "SocketKind"),
    ("uuid", "UUID"),
    ("uuid", "SafeUUID"),
})


def allowed(module: str, name: str, obj: Any) -> bool:
    """Whether ``module.name`` (resolved to ``obj``) may be unpickled: a class, and either a
    builtin of plain data or an exception, one of a few standard-library value classes, or a
    class defined in this project or in thespian; or a member of such an enum class (some
    Python versions pickle ``socket.AF_INET`` by its global name, not by value)."""
    if isinstance(obj, enum.Enum):
        cls = type(obj)
        return allowed(cls.__module__, cls.__qualname__, cls)
    if not isinstance(obj, type):
        return False
    if module == "builtins":
        return name in _SAFE_BUILTINS or issubclass(obj, BaseException)
    if (module, name) in _SAFE_STDLIB:
        return True
    defined = getattr(obj, "__module__", "") or ""
    return any(
        (module == p or module.startswith(p + ".")) and (defined == p or defined.startswith(p + "."))
        for p in ALLOWED_PACKAGES
    )


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only :func:`allowed` classes."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _admitted.get((module, name))
        if obj is not None:
            return obj
        if "." in name or name.startswith("__"):
            obj = None
        else:
            try:
                obj = super().find_class(module, name)
            except (ImportError, AttributeError):
                obj = None
        if obj is None or not allowed(module, name, obj):
            _refused(f"authenticated frame names {module}.{name}, which is not an allowed class; "
                     "nothing of it was built")
            raise RefusedFrame(f"class {module}.{name} is not allowed")
        _admitted[(module, name)] = obj
        return obj


#: Classes admitted before, by (module, name): the check runs once per class and process.
_admitted: dict[tuple[str, str], Any] = {}


def restricted_loads(data: bytes | memoryview) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


# ------------------------------------------------------------------------------ refusals

_log = logging.Logger("cei_actors.transport")  # not in any manager: thespian replaces the root
_log.propagate = False
_log_lock = threading.Lock()
#: Refusals logged in a burst, and seconds per further line: a peer that reconnects in a loop
#: gets ``LOG_BURST`` lines, then one every ``LOG_EVERY`` s with a count of the ones between.
LOG_BURST = 10
LOG_EVERY = 6.0
_refusals = {"total": 0, "unlogged": 0, "tokens": float(LOG_BURST), "at": 0.0}


class _Fd2Handler(logging.Handler):
    """Writes each record as one line to file descriptor 2 (the system log under ``up``, where
    the admin is forked with its stderr there), whatever ``sys.stderr`` was replaced with."""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            os.write(2, (self.format(record) + "\n").encode(errors="replace"))


_handler = _Fd2Handler()
_handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
_log.addHandler(_handler)


def _refused(reason: str) -> None:
    """Count a refusal and log it (rate-limited, see :data:`LOG_BURST`)."""
    with _log_lock:
        _refusals["total"] += 1
        now = time.monotonic()
        tokens = min(float(LOG_BURST), _refusals["tokens"] + (now - _refusals["at"]) / LOG_EVERY)
        _refusals["at"] = now
        if tokens < 1.0:
            _refusals["tokens"] = tokens
            _refusals["unlogged"] += 1
            return
        _refusals["tokens"] = tokens - 1.0
        skipped, _refusals["unlogged"] = _refusals["unlogged"], 0
    more = f" ({skipped} more refused, not logged, before this one)" if skipped else ""
    with contextlib.suppress(Exception):
        _log.warning("refused a message: %s%s", reason, more)


def refusal_count() -> int:
    """How many frames this process has refused."""
    return _refusals["total"]
