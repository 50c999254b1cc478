"""Who may write a stream: one leader per component group, chosen without blocking the actor.

Leadership only decides who *tries* to write. Safety comes from the log: the winner's
``log.acquire`` bumps the stream's epoch, so a deposed leader's appends are refused
(``Fenced``) even if it still believes it leads.

- :class:`AlwaysLeader`: no election (memory logs, single-process tests).
- :class:`FileLockLeadership`: an exclusive ``flock`` on a lock file; one host, e.g. next to a
  SQLite log. The kernel drops the lock when the holder dies.
- :class:`ZkLeadership`: kazoo's ``Election`` recipe run in its own thread. ``SUSPENDED``
  pauses leadership (no appends, no effects) until ``CONNECTED``; ``LOST`` ends it.

Every method is non-blocking; ``on_change`` (if set) is called from any thread when the
status may have changed, so an actor can wake up instead of polling.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)


class Leadership(ABC):
    """The right to lead one stream. Implementations never block the caller for long."""

    #: Called (from any thread, without arguments) when the status may have changed.
    on_change: Callable[[], None] | None = None

    @abstractmethod
    def try_acquire(self) -> bool:
        """Contend if not already; True if this instance leads now. Never blocks."""

    @property
    @abstractmethod
    def is_leader(self) -> bool:
        """True while this instance leads and may append and act."""

    @property
    def suspended(self) -> bool:
        """True while leadership is in doubt but not lost (act again once it clears)."""
        return False

    @abstractmethod
    def release(self) -> None:
        """Stop leading (and contending); ``try_acquire`` may contend again later."""

    def fenced(self) -> None:
        """The log refused an append because a newer writer exists; default: release."""
        self.release()

    def close(self) -> None:
        """Release and free resources; the object is not used afterwards."""
        self.release()

    def describe(self) -> str:
        return type(self).__name__

    def _changed(self) -> None:
        callback = self.on_change
        if callback is not None:
            try:
                callback()
            except Exception:  # a notification must never break the notifier's thread
                logger.exception("leadership change callback failed")


class AlwaysLeader(Leadership):
    """Leads whenever asked, until fenced: after a newer writer fenced it, it never contends
    again (two always-leaders on one stream would otherwise take turns fencing each other)."""

    def __init__(self) -> None:
        self._held = False
        self._deposed = False

    def try_acquire(self) -> bool:
        if not self._deposed:
            self._held = True
        return self._held

    @property
    def is_leader(self) -> bool:
        return self._held

    def release(self) -> None:
        self._held = False

    def fenced(self) -> None:
        self._deposed = True
        self._held = False


# File descriptors of held locks, closed in forked children (see FileLockLeadership).
_held_lock_fds: weakref.WeakSet[FileLockLeadership] = weakref.WeakSet()


def _close_lock_fds_in_child() -> None:
    for holder in list(_held_lock_fds):
        holder._forget_in_child()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)


class FileLockLeadership(Leadership):
    """An exclusive, non-blocking ``flock`` on ``path`` (created if missing, never deleted).

    A forked child (thespian forks its admin and actors) closes its inherited copy at once, so
    a lock never outlives the process that took it. If someone deletes or replaces the lock
    file while it is held, a second holder can appear; the log's epoch fence then stops the
    older one at its next append (it steps down and contends on the new file).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None

    def describe(self) -> str:
        return f"flock {self.path}"

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        if not self._still_ours():  # deleted or replaced between open and lock: try again later
            self.release()
            return False
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _held_lock_fds.add(self)
        return True

    def _still_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    @property
    def is_leader(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd, self._ident = self._fd, None, None
        _held_lock_fds.discard(self)
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _forget_in_child(self) -> None:
        # Only close our copy: LOCK_UN would unlock the parent's lock too (shared description).
        fd, self._fd, self._ident = self._fd, None, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class ZkLeadership(Leadership):
    """kazoo's ``Election`` on ``path``, contended in a background thread.

    ``hosts`` is a kazoo host string (``"127.0.0.1:2181[,...][/chroot]"``); ``timeout`` is the
    session timeout in seconds: a leader that dies (kill -9) holds the election until its
    session expires, so this bounds failover. The server clamps it to
    [``minSessionTimeout``, ``maxSessionTimeout``], by default [2, 20] x ``tickTime``
    (``cei_actors.testing.zkserver`` runs tickTime 500 ms: 1 to 10 s). Pass ``client`` to share a started ``KazooClient`` (then it is
    not stopped by :meth:`close`), or ``client_options`` for the one it starts (e.g. the
    ``auth_data`` and ``default_acl`` of a log's ``auth_file``).
    """

    def __init__(
        self,
        hosts: str,
        path: str,
        identifier: str | None = None,
        *,
        timeout: float = 10.0,
        client: object | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.hosts, self.path, self.timeout = hosts, path, timeout
        self._client_options = dict(client_options or {})
        self.identifier = identifier or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._own_client = client is None
        self._client = client
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._election = None
        self._stop = threading.Event()
        self._won = False
        self._suspended = False
        self._closed = False
        self._listening = False

    def describe(self) -> str:
        return f"zk {self.hosts}{self.path}"

    # ---- the actor's side: all non-blocking -----------------------------------------------

    def try_acquire(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            if self._won:
                return self.is_leader
            if self._thread is None or not self._thread.is_alive():
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._contend, args=(self._stop,), name=f"zk-election{self.path}", daemon=True
                )
                self._thread.start()
            return False

    @property
    def is_leader(self) -> bool:
        from kazoo.client import KazooState

        client = self._client
        return (
            self._won
            and not self._suspended
            and client is not None
            and getattr(client, "state", None) == KazooState.CONNECTED
        )

    @property
    def suspended(self) -> bool:
        return self._won and self._suspended

    def release(self) -> None:
        with self._lock:
            self._stop.set()
            election = self._election
        self._won = False
        if election is not None:
            with contextlib.suppress(Exception):
                election.cancel()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.release()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=2.0)
        client = self._client
        if client is not None and self._listening:
            with contextlib.suppress(Exception):
                client.remove_listener(self._on_state)
        if client is not None and self._own_client:
            with contextlib.suppress(Exception):
                client.stop()
            with contextlib.suppress(Exception):
                client.close()
            self._client = None

    # ---- the election thread ---------------------------------------------------------------

    def _ensure_client(self):
        from kazoo.client import KazooClient

        if self._client is None:
            self._client = KazooClient(hosts=self.hosts, timeout=self.timeout, **self._client_options)
        client = self._client
        if not self._listening:
            client.add_listener(self._on_state)
            self._listening = True
        if self._own_client and not client.connected:
            client.start(timeout=max(self.timeout, 5.0))
        return client

    def _contend(self, stop: threading.Event) -> None:
        try:
            client = self._ensure_client()
            if stop.is_set():
                return
            election = client.Election(self.path, self.identifier)
            with self._lock:
                if stop.is_set():
                    return
                self._election = election
            election.run(self._lead, stop)
        except Exception as exc:  # connection trouble: the actor retries try_acquire later
            logger.warning("zk election on %s: %s: %s", self.path, type(exc).__name__, exc)
            client = self._client
            if self._own_client and client is not None and not client.connected:
                with contextlib.suppress(Exception):
                    client.remove_listener(self._on_state)
                with self._lock:  # a timed-out start closed it: make a fresh one next time
                    self._client, self._listening = None, False
        finally:
            with self._lock:
                self._election = None
            if self._won:
                self._won = False
                self._changed()

    def _lead(self, stop: threading.Event) -> None:
        self._suspended = False
        self._won = True
        logger.info("zk election on %s: won as %s", self.path, self.identifier)
        self._changed()
        stop.wait()
        self._won = False

    def _on_state(self, state: str) -> None:
        from kazoo.client import KazooState

        if state == KazooState.SUSPENDED:
            self._suspended = True
        elif state == KazooState.CONNECTED:
            self._suspended = False
        elif state == KazooState.LOST:
            self._won = False
            self._stop.set()  # _lead returns; the lost lock node is gone with the session
        self._changed()


def leadership_for(spec: str, log_url: str, stream: str, identifier: str | None = None) -> Leadership:
    """The :class:`Leadership` named by ``spec`` (see ``control.Start``) for ``stream``.

    ``auto`` derives it from the log URL: ``memory://`` -> :class:`AlwaysLeader`,
    ``sqlite:///P`` -> :class:`FileLockLeadership` on ``P.<stream>.lock``, ``zk://H/C`` ->
    :class:`ZkLeadership` on ``C/leaders/<stream>`` at ``H``, whose session timeout is the
    URL's ``session_timeout`` (or ``timeout``; default 10 s).
    """
    scheme = log_url.split("://", 1)[0] if "://" in log_url else ""
    kind = spec or "auto"
    if kind == "auto":
        kind = {"memory": "always", "sqlite": "flock", "zk": "zk"}.get(scheme, "")
        if not kind:
            raise ValueError(f"no default leadership for log URL {log_url!r}")
    if kind == "always":
        return AlwaysLeader()
    if kind == "flock":
        if scheme != "sqlite":
            raise ValueError(f"leadership 'flock' needs a sqlite:/// log URL (got {log_url!r}) or flock:PATH")
        path = os.path.realpath(log_url.split("://", 1)[1].split("?", 1)[0])  # one spelling per file
        return FileLockLeadership(f"{path}.{stream}.lock")
    if kind.startswith("flock:"):
        return FileLockLeadership(Path(kind[len("flock:") :]) / f"{stream}.lock")
    if kind == "zk" or kind.startswith("zk://"):
        url = log_url if kind == "zk" else kind
        if not url.startswith("zk://"):
            raise ValueError(f"leadership 'zk' needs a zk:// log URL (got {log_url!r}) or zk://HOSTS/PATH")
        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError(f"leadership URL {url!r}: no hosts")
        base = (parts.path or "/cei").rstrip("/")
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        # the session timeout is the failure detector: a dead leader's election node goes
        # when its session expires (see ZkLeadership); ``timeout`` is the older spelling
        timeout = float(query.get("session_timeout", query.get("timeout", 10.0)))
        from ..eventlog.zookeeper import zk_auth  # the log's credentials protect the election too

        return ZkLeadership(parts.netloc, f"{base}/leaders/{stream}", identifier, timeout=timeout,
                            client_options=zk_auth(unquote(query.get("auth_file", ""))))
    raise ValueError(f"unknown leadership {spec!r}")


__all__ = [
    "AlwaysLeader",
    "FileLockLeadership",
    "Leadership",
    "ZkLeadership",
    "leadership_for",
]
