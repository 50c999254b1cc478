"""The EEAgent's reaper: one long-lived parent of every command a ProcessSupervisor runs.

The supervisor starts it as a file (``python -I -S reaper.py STATE_DIR [IDLE_SECONDS]``, in
its own session, so a kill of the agent's process group does not reach it); it needs nothing
but the standard library. It is single-threaded: one selector loop over a unix stream socket
(``STATE_DIR/reaper.sock``, mode 0600, only peers of the same uid) and the SIGCHLD wake-up
fd. Only one reaper runs per state dir (``flock`` on ``STATE_DIR/reaper.lock``).

What it does:

- **spawn**: ``posix_spawn`` of the command itself (no shell) as the leader of a new session
  and process group, stdin ``/dev/null``, stdout/stderr appended to the files named, the
  environment given; ``cwd`` by ``chdir`` around the spawn. A bad cwd or a failed exec is an
  error reply for that launch.
- **exits**: on SIGCHLD, for each exited child: ``waitid(WNOWAIT)``, ``killpg(SIGKILL)`` of
  its group while the zombie still holds the group id (so the group is the unit and never a
  stranger's), then ``waitpid``. The exit (key, pid, exact code, ``-N`` for signal ``N``,
  wall time) is appended to ``STATE_DIR/reaper.exits`` (one ``write(2)``) before it is sent
  to the supervisor; it counts as pending until the supervisor acknowledges it (an ``ack``
  line; a reaper started after this one died reports the pending ones).
- **signal**: a group is signalled only on request and only while its leader is an unreaped
  child, so a reused pid is never signalled.
- **lease** (decision EA8): once a ``lease`` arrives, commands may run only until its
  deadline, on ``CLOCK_MONOTONIC`` (``time.monotonic``: the supervisor that started this
  reaper runs on the same host and clock, so the deadline is the agent's own, not one
  shifted by the time the request took to arrive). When it passes unextended, every group
  gets SIGTERM, and SIGKILL ``grace`` seconds later if its leader is still unreaped; their
  exits are reported as usual, marked ``"fenced": true``; spawns are refused until a later
  lease arrives. This is the backstop of the agent's own fence (PD9) for an agent that is
  frozen (SIGSTOP, a hang): the reaper runs in its own session. A reaper that never got a
  ``lease`` enforces nothing (standalone use, an agent older than this request).
- **lifetime**: ``stop`` (with ``kill``: SIGKILL to every group) or SIGTERM (SIGTERM to every
  group; their exits are marked ``"stopped": true``: the node is going away) makes it exit
  once it has no children. With no children and no supervisor
  connected for ``IDLE_SECONDS`` (default 5) it exits by itself.

Protocol: one JSON object per line (at most :data:`MAX_LINE` bytes) each way. A request has
``op`` and optionally ``id`` (an int); a request with an ``id`` gets ``{"re": id, "ok": true,
...}`` or ``{"re": id, "ok": false, "error": "..."}``, in order; a malformed or oversized line
gets an error reply (``re`` null when no id could be read) and changes nothing. Exits are
sent as ``{"ev": "exit", "seq", "key", "pid", "code", "ended_at", "boot"}`` (the very line
recorded in the exits file) to the client that said ``hello`` last. Requests:

- ``hello`` → ``{pid, start_ticks, children: [{key, pid, start_ticks}], exits: [...]}``
  (the unacknowledged exits); this client now receives the exits.
- ``spawn {key: [upid, round], argv, exe, env, cwd, out, err}`` → ``{pid, start_ticks}``.
- ``signal {key, pid, sig}`` → ``{sent: bool}``.
- ``ack {seqs}`` forgets those exits.
- ``stats`` → CPU seconds ``{self: [user, sys], children: [user, sys]}``.
- ``stop {kill}`` → ``{children: n}``; the reaper exits once it has no children.
- ``lease {until, grace}`` → ``{left}``: commands may run until ``until`` (seconds on
  ``CLOCK_MONOTONIC``); ``grace`` (optional, default :data:`LEASE_GRACE`) is the SIGTERM to
  SIGKILL delay when it runs out. Each lease replaces the previous one. ``stats`` also
  reports ``lease``: the seconds left, or null without a lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time
import traceback

SOCK_NAME = "reaper.sock"
EXITS_NAME = "reaper.exits"
LOCK_NAME = "reaper.lock"
LOG_NAME = "reaper.log"
#: Longest accepted request line (bytes, without the newline).
MAX_LINE = 4 << 20
#: A client whose unsent replies exceed this is disconnected (its exits are kept).
MAX_OUT = 64 << 20
MAX_CLIENTS = 16
#: Bytes asked of each ``recv``: under glibc's 128 KiB mmap threshold, since CPython allocates
#: the whole buffer first (a 256 KiB one was mapped and unmapped on every call: ~27 us).
READ_SIZE = 64 << 10
IDLE = 5.0
#: Default seconds between SIGTERM and SIGKILL when the lease runs out (the agent's FENCE_GRACE).
LEASE_GRACE = 1.0
#: Longest accepted ``grace`` of a lease (seconds).
MAX_LEASE_GRACE = 3600.0
#: Exit code when another reaper holds the state dir.
EX_LOCKED = 75
#: The exits file is emptied once all its exits are acknowledged and it has this many lines,
#: and rewritten with only the unacknowledged exits beyond COMPACT_LINES lines.
TRUNCATE_LINES = 256
COMPACT_LINES = 4096
_SUN_PATH_MAX = 107
_RESTORE = tuple(
    getattr(signal, n)
    for n in ("SIGPIPE", "SIGXFSZ", "SIGXFZ", "SIGINT", "SIGHUP", "SIGTERM", "SIGCHLD")
    if hasattr(signal, n)
)
_SIGMAX = int(getattr(signal, "SIGRTMAX", 64))


def socket_address(state_dir: str, dirfd: int | None = None) -> str:
    """The address to bind or connect to for ``state_dir``'s reaper socket.

    A path too long for ``sun_path`` goes through ``/proc/self/fd/DIRFD`` (``dirfd`` an
    ``O_PATH`` descriptor of ``state_dir``, which the caller keeps open while using it).
    """
    path = os.path.join(state_dir, SOCK_NAME)
    if len(os.fsencode(path)) <= _SUN_PATH_MAX or dirfd is None:
        return path
    return f"/proc/self/fd/{dirfd}/{SOCK_NAME}"


def needs_dirfd(state_dir: str) -> bool:
    """True when ``state_dir``'s socket path does not fit in ``sun_path``."""
    return len(os.fsencode(os.path.join(state_dir, SOCK_NAME))) > _SUN_PATH_MAX


def split_lines(pending: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of ``pending + data`` (without newlines) and the unfinished rest."""
    *lines, rest = (pending + data if pending else data).split(b"\n")
    return lines, rest




if not __package__:  # run as a file (python -I -S): the package is beside this file's parents
    sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from cei_actors.runtime import procfs  # noqa: E402

#: Start time of a pid in clock ticks since boot (with the pid, its identity), or None.
start_ticks = procfs.start_ticks


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _log(msg: str) -> None:
    try:
        sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} reaper[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except Exception:
        pass


class BadRequest(Exception):
    """An error reply for one request; nothing changed."""


class _Child:
    __slots__ = ("key", "pid", "ticks", "fenced", "stopped")

    def __init__(self, key: list, pid: int, ticks: int | None) -> None:
        self.key = key
        self.pid = pid
        self.ticks = ticks
        #: stopped because the lease ran out
        self.fenced = False
        self.stopped = False  # stopped on the reaper's SIGTERM: the node is going away


class _Client:
    __slots__ = ("sock", "fd", "rbuf", "wbuf", "replies", "discard", "want_write")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.rbuf = b""
        self.wbuf = bytearray()
        #: replies to the requests of the current read, written out at its end
        self.replies: list[dict] = []
        self.discard = False
        self.want_write = False


def _key(value: object) -> list:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not value[0]
        or isinstance(value[1], bool)
        or not isinstance(value[1], int)
    ):
        raise BadRequest("key must be [upid, round]")
    return value


def _str(msg: dict, name: str, optional: bool = False) -> str | None:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise BadRequest(f"{name} must be a non-empty string without NUL")
    return value


def _int(msg: dict, name: str) -> int:
    value = msg.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an int")
    return value


def _seconds(msg: dict, name: str) -> float:
    value = msg.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number of seconds")
    return float(value)


def _which(name: str, env: dict) -> str:
    for d in (env.get("PATH") or os.defpath).split(os.pathsep):
        p = os.path.join(d or ".", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return name


class Reaper:
    """The reaper's state and loop (see the module docstring)."""

    def __init__(self, state_dir: str, idle: float = IDLE) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.idle = idle
        self.uid = os.getuid()
        self.pid = os.getpid()
        self.ticks = start_ticks(self.pid)
        self.boot = boot_id()
        self.dirfd = os.open(self.state_dir, os.O_PATH | os.O_DIRECTORY)
        self.lockfd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600, dir_fd=self.dirfd)
        try:
            fcntl.flock(self.lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(EX_LOCKED) from None
        self.children: dict[int, _Child] = {}
        self.unacked: dict[int, dict] = {}
        self.seq = 0
        self.stopping = False
        self.clients: dict[int, _Client] = {}
        self.supervisor: _Client | None = None
        self.idle_since = time.monotonic()
        #: the lease's deadline (``time.monotonic``), None: no lease ever received
        self.lease_until: float | None = None
        self.lease_grace = LEASE_GRACE
        #: the deadline passed unextended and the groups were signalled
        self.lease_out = False
        #: when the groups stopped for the lease get SIGKILL
        self.fence_kill_at: float | None = None
        self._load_exits()

        os.chdir("/")
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, _noop)
            signal.siginterrupt(sig, False)
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

        addr = socket_address(self.state_dir, self.dirfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCK_NAME, dir_fd=self.dirfd)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(addr)
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")

    # -- the exits file ----------------------------------------------------------------

    def _load_exits(self) -> None:
        """Keep the unacknowledged exits of a reaper that died (same boot), then rewrite."""
        try:
            fd = os.open(EXITS_NAME, os.O_RDONLY, dir_fd=self.dirfd)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        acked: set = set()
        for line in data.splitlines():
            try:
                e = json.loads(line)
                if isinstance(e.get("ack"), list):
                    acked.update(e["ack"])
                elif e.get("boot") == self.boot and isinstance(e.get("seq"), int):
                    self.unacked[e["seq"]] = e
            except (ValueError, AttributeError, TypeError):
                continue  # a torn line (killed while writing)
        for seq in acked:
            self.unacked.pop(seq, None)
        self.seq = max(self.unacked, default=0)
        self._rewrite_exits()

    def _rewrite_exits(self) -> None:
        tmp = EXITS_NAME + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=self.dirfd)
        try:
            body = "".join(_line(e) for e in self.unacked.values()).encode()
            if body:
                os.write(fd, body)
        finally:
            os.close(fd)
        os.rename(tmp, EXITS_NAME, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        old = getattr(self, "exitsfd", None)
        self.exitsfd = os.open(EXITS_NAME, os.O_WRONLY | os.O_APPEND, dir_fd=self.dirfd)
        if old is not None:
            os.close(old)
        self.exits_lines = len(self.unacked)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        while True:
            try:
                if self._done():
                    break
                now = time.monotonic()
                timeout = self._check_lease(now)
                if not self.children and self.supervisor is None and not self.stopping:
                    idle = max(0.0, self.idle_since + self.idle - now)
                    timeout = idle if timeout is None else min(timeout, idle)
                events = self.sel.select(timeout)
                woken = False
                for key, mask in events:
                    tag = key.data
                    if tag == "wake":
                        woken = True
                        self._on_wake()
                    elif tag == "listen":
                        self._accept()
                    else:
                        client = self.clients.get(key.fd)
                        if client is None:
                            continue
                        if mask & selectors.EVENT_READ:
                            self._read(client)
                        if mask & selectors.EVENT_WRITE and key.fd in self.clients:
                            self._flush(client)
                if woken:
                    self._reap()
                for client in list(self.clients.values()):
                    if client.wbuf:
                        self._flush(client)
            except Exception:  # never let one bad event end the loop
                _log("error in the loop:\n" + traceback.format_exc())
                time.sleep(0.01)
        self._exit()

    def _done(self) -> bool:
        if self.children:
            return False
        if self.stopping:
            return True
        return self.supervisor is None and time.monotonic() >= self.idle_since + self.idle

    def _exit(self) -> None:
        for client in list(self.clients.values()):
            if client.wbuf:
                try:
                    client.sock.setblocking(True)
                    client.sock.settimeout(1.0)
                    client.sock.sendall(client.wbuf)
                except OSError:
                    pass
        with contextlib.suppress(OSError):  # under our lock: never a new reaper's socket
            os.unlink(SOCK_NAME, dir_fd=self.dirfd)
        if not self.unacked:
            with contextlib.suppress(OSError):
                os.unlink(EXITS_NAME, dir_fd=self.dirfd)

    def _on_wake(self) -> None:
        try:
            data = os.read(self.wake_r, 4096)
        except BlockingIOError:
            return
        if signal.SIGTERM in data and not self.stopping:
            _log("SIGTERM: terminating every group, exiting once they are gone")
            self.stopping = True
            for child in self.children.values():
                child.stopped = True
            self._signal_all(signal.SIGTERM)

    def _check_lease(self, now: float) -> float | None:
        """Stop the groups when the lease runs out (SIGTERM, SIGKILL after its grace);
        seconds until the next lease deadline or kill, None if there is none."""
        until = self.lease_until
        if until is not None and not self.lease_out and now >= until:
            self.lease_out = True
            if self.children:
                _log(f"the lease ran out ({now - until:.3f} s ago): stopping "
                     f"{len(self.children)} group(s), no spawn until a new lease")
                for child in self.children.values():
                    child.fenced = True
                self._signal_all(signal.SIGTERM)
                kill_at = now + self.lease_grace
                self.fence_kill_at = (
                    kill_at if self.fence_kill_at is None else min(self.fence_kill_at, kill_at)
                )
        if self.fence_kill_at is not None and now >= self.fence_kill_at:
            self.fence_kill_at = None
            for pid, child in list(self.children.items()):
                if child.fenced:  # still an unreaped child: the group id is its own
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
        waits = []
        if until is not None and not self.lease_out:
            waits.append(until - now)
        if self.fence_kill_at is not None:
            waits.append(self.fence_kill_at - now)
        return max(0.0, min(waits)) if waits else None

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.killpg(pid, sig)

    def _reap(self) -> None:
        new: list[dict] = []
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            pid = info.si_pid
            with contextlib.suppress(OSError):  # the zombie still holds the group id
                os.killpg(pid, signal.SIGKILL)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self.seq += 1
            ev = {
                "ev": "exit",
                "seq": self.seq,
                "key": child.key,
                "pid": pid,
                "code": os.waitstatus_to_exitcode(status),
                "ended_at": time.time(),
                "boot": self.boot,
            }
            if child.fenced:
                ev["fenced"] = True
            if child.stopped:
                ev["stopped"] = True
            new.append(ev)
        if not new:
            return
        lines = "".join(_line(e) for e in new).encode()  # the record is the event
        try:
            os.write(self.exitsfd, lines)  # recorded before it is reported
            self.exits_lines += len(new)
        except OSError as exc:
            _log(f"cannot record exits: {exc}")
        for e in new:
            self.unacked[e["seq"]] = e
        if self.supervisor is not None:
            self.supervisor.wbuf += lines
        if not self.children:
            self.idle_since = time.monotonic()

    # -- clients -----------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _log(f"accept failed: {exc}")
                return
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                _, uid, _ = struct.unpack("3i", creds)
            except OSError:
                uid = -1
            if uid != self.uid or len(self.clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock)
            self.clients[client.fd] = client
            self.sel.register(sock, selectors.EVENT_READ, "client")

    def _close(self, client: _Client) -> None:
        self.clients.pop(client.fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(client.sock)
        client.sock.close()
        if self.supervisor is client:
            self.supervisor = None
            self.idle_since = time.monotonic()

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        if not data:
            self._close(client)
            return
        lines, rest = split_lines(client.rbuf, data)
        for line in lines:
            if client.discard:  # the tail of an oversized line
                client.discard = False
                continue
            if len(line) > MAX_LINE:
                self._reply(client, None, error=f"line longer than {MAX_LINE} bytes")
                continue
            if line.strip():
                self._handle(client, line)
        if len(rest) > MAX_LINE:
            if not client.discard:
                self._reply(client, None, error=f"line longer than {MAX_LINE} bytes")
                client.discard = True
            rest = b""
        client.rbuf = rest
        self._send_replies(client)
        if len(client.wbuf) > MAX_OUT:
            _log("a client does not read its replies: disconnected")
            self._close(client)

    def _send_replies(self, client: _Client) -> None:
        """Serialize the replies of one read, after the start times of the children it
        spawned are read: a child read right after its exec costs twice as much (its exec
        and dynamic loading hold its memory map)."""
        if not client.replies:
            return
        out = []
        for doc in client.replies:
            pid = doc.get("pid") if "start_ticks" in doc else None
            if pid is not None and doc["start_ticks"] is None:
                child = self.children.get(pid)
                ticks = start_ticks(pid)
                if child is not None:
                    child.ticks = ticks
                doc["start_ticks"] = ticks
            out.append(json.dumps(doc, separators=(",", ":")))
        client.replies.clear()
        client.wbuf += ("\n".join(out) + "\n").encode()

    def _flush(self, client: _Client) -> None:
        try:
            n = client.sock.send(client.wbuf)
            del client.wbuf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(client)
            return
        want = bool(client.wbuf)
        if want != client.want_write:
            client.want_write = want
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(client.sock, mask, "client")

    def _reply(
        self, client: _Client, rid: int | None, result: dict | None = None, error: str = ""
    ) -> None:
        if error:
            doc = {"re": rid, "ok": False, "error": error}
        else:
            doc = {"re": rid, "ok": True}
            if result:
                doc.update(result)
        client.replies.append(doc)

    def _handle(self, client: _Client, line: bytes) -> None:
        rid = None
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise BadRequest("a request must be a JSON object")
            rid = msg.get("id")
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int)):
                rid = None
                raise BadRequest("id must be an int")
            op = msg.get("op")
            handler = _OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise BadRequest(f"unknown op {op!r}")
            result = handler(self, client, msg)
        except BadRequest as exc:
            self._reply(client, rid, error=str(exc))
            return
        except (ValueError, UnicodeDecodeError) as exc:
            self._reply(client, rid, error=f"malformed request: {exc}")
            return
        except Exception as exc:
            _log("error handling a request:\n" + traceback.format_exc())
            self._reply(client, rid, error=f"internal error: {exc}")
            return
        if rid is not None:
            self._reply(client, rid, result)

    # -- requests ----------------------------------------------------------------------

    def op_hello(self, client: _Client, msg: dict) -> dict:
        self.supervisor = client
        return {
            "pid": self.pid,
            "start_ticks": self.ticks,
            "children": [
                {"key": c.key, "pid": c.pid, "start_ticks": c.ticks}
                for c in self.children.values()
            ],
            "exits": [self.unacked[s] for s in sorted(self.unacked)],
        }

    def op_spawn(self, client: _Client, msg: dict) -> dict:
        key = _key(msg.get("key"))
        argv = msg.get("argv")
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) and "\0" not in a for a in argv)
        ):
            raise BadRequest("argv must be a non-empty list of strings without NUL")
        env = msg.get("env")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k
            and "\0" not in k and "\0" not in v
            for k, v in env.items()
        ):
            raise BadRequest("env must be an object of strings")
        cwd = _str(msg, "cwd", optional=True)
        out = _str(msg, "out")
        err = _str(msg, "err")
        exe = _str(msg, "exe", optional=True) or argv[0]
        if self.stopping:
            raise BadRequest("the reaper is stopping")
        until = self.lease_until
        if until is not None:
            now = time.monotonic()
            if now >= until:
                raise BadRequest(
                    f"the lease ran out {now - until:.3f} s ago (it ran until {until:.3f} on "
                    "the monotonic clock): no spawn until a new lease"
                )
        if "/" not in exe:
            exe = _which(exe, env)
        # The files are opened here, not in the child: one process creates them one after the
        # other (children creating files in one directory at once contend for its lock).
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        fds: list[int] = []
        try:
            for path in (out, err):
                fds.append(os.open(path, flags, 0o644))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise BadRequest(f"cannot open {exc.filename!r}: {exc.strerror}") from None
        actions = [
            (os.POSIX_SPAWN_DUP2, self.devnull, 0),
            (os.POSIX_SPAWN_DUP2, fds[0], 1),
            (os.POSIX_SPAWN_DUP2, fds[1], 2),
        ]
        try:
            if cwd is not None:
                try:
                    os.chdir(cwd)
                except OSError as exc:
                    msg = f"cannot change to directory {cwd!r}: {exc.strerror}"
                    raise BadRequest(msg) from None
            pid = os.posix_spawn(
                exe,
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigmask=(),
                setsigdef=_RESTORE,
            )
        except OSError as exc:
            raise BadRequest(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            for fd in fds:
                os.close(fd)
            if cwd is not None:
                os.chdir("/")
        self.children[pid] = _Child(key, pid, None)
        return {"pid": pid, "start_ticks": None}  # read before the reply goes out

    def op_signal(self, client: _Client, msg: dict) -> dict:
        key = _key(msg.get("key"))
        pid = _int(msg, "pid")
        sig = _int(msg, "sig")
        if not 0 < sig <= _SIGMAX:
            raise BadRequest(f"bad signal {sig}")
        child = self.children.get(pid)
        if child is None or child.key != key:
            return {"sent": False}
        try:  # an unreaped child: the pid and group id are still its own
            os.killpg(pid, sig)
        except OSError:
            return {"sent": False}
        return {"sent": True}

    def op_ack(self, client: _Client, msg: dict) -> dict:
        seqs = msg.get("seqs")
        if not isinstance(seqs, list):
            raise BadRequest("seqs must be a list")
        done = [s for s in seqs if isinstance(s, int) and self.unacked.pop(s, None) is not None]
        if done:  # so a reaper started after this one died does not report them again
            os.write(self.exitsfd, _line({"ack": done}).encode())
            self.exits_lines += 1
        if self.exits_lines >= TRUNCATE_LINES and not self.unacked:
            os.ftruncate(self.exitsfd, 0)  # not after every ack: a truncate costs ~10 appends
            self.exits_lines = 0
        elif self.exits_lines > max(COMPACT_LINES, 2 * len(self.unacked)):
            self._rewrite_exits()
        return {}

    def op_stats(self, client: _Client, msg: dict) -> dict:
        me = resource.getrusage(resource.RUSAGE_SELF)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "self": [me.ru_utime, me.ru_stime],
            "children": [ch.ru_utime, ch.ru_stime],
            "live": len(self.children),
            "lease": None if self.lease_until is None else self.lease_until - time.monotonic(),
        }

    def op_lease(self, client: _Client, msg: dict) -> dict:
        until = _seconds(msg, "until")
        grace = LEASE_GRACE if msg.get("grace") is None else _seconds(msg, "grace")
        if not 0 <= grace <= MAX_LEASE_GRACE:
            raise BadRequest(f"grace must be within 0 and {MAX_LEASE_GRACE:g} seconds")
        self.lease_until = until
        self.lease_grace = grace
        self.lease_out = False  # checked again, with the new deadline, before the next wait
        return {"left": until - time.monotonic()}

    def op_stop(self, client: _Client, msg: dict) -> dict:
        self.stopping = True
        if msg.get("kill"):
            self._signal_all(signal.SIGKILL)
        return {"children": len(self.children)}


_OPS = {
    "hello": Reaper.op_hello,
    "spawn": Reaper.op_spawn,
    "signal": Reaper.op_signal,
    "ack": Reaper.op_ack,
    "stats": Reaper.op_stats,
    "stop": Reaper.op_stop,
    "lease": Reaper.op_lease,
}


def _noop(signum: int, frame: object) -> None:
    return None


def _line(e: dict) -> str:
    return json.dumps(e, separators=(",", ":")) + "\n"


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        sys.stderr.write("usage: reaper.py STATE_DIR [IDLE_SECONDS]\n")
        return 2
    idle = float(argv[1]) if len(argv) > 1 else IDLE
    try:
        reaper = Reaper(argv[0], idle)
    except SystemExit:
        raise
    except Exception:
        _log("cannot start:\n" + traceback.format_exc())
        return 1
    reaper.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
