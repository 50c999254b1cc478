"""Real ZooKeeper servers on 127.0.0.1 for tests, benchmarks and developers.

Each server is ``java -cp ... org.apache.zookeeper.server.quorum.QuorumPeerMain DIR/zoo.cfg``
run directly (Debian's ``zkServer.sh`` forces root-owned paths), in a private directory, on free
loopback ports, with a capped heap and a short ``tickTime`` so that failures show quickly.

    with ZkServer() as zk:              # one standalone server
        client = KazooClient(hosts=zk.hosts)
    with ZkEnsemble(3) as ens:          # three servers; kill/restart/pause one of them
        ens.kill(ens.wait_for_leader())

A server counts as started only once the four-letter word ``srvr`` answers with a ``Mode:``
line: ZooKeeper 3.8 stalls clients that connect just after the port opens.

Layout of a cluster directory: ``DIR/cluster.json`` (hosts and ports) and one ``DIR/serverN``
per server (``zoo.cfg``, ``data/``, ``zookeeper.log``, ``zookeeper.pid``), so that
:func:`stop_directory` can stop servers that another process started.

Environment: ``ZK_JAVA`` (java executable) and ``ZK_CLASSPATH`` (``os.pathsep``-separated jars)
override the defaults (``java`` on PATH; Debian's jars in ``/usr/share/java``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..runtime import procfs

if TYPE_CHECKING:
    from kazoo.client import KazooClient

__all__ = [
    "DEFAULT_CLASSPATH",
    "MAIN_CLASS",
    "ZkEnsemble",
    "ZkError",
    "ZkNode",
    "ZkServer",
    "ZkUnavailable",
    "directory_status",
    "expire_session",
    "four_letter_word",
    "free_port",
    "free_ports",
    "java_executable",
    "listening_sockets",
    "server_mode",
    "stop_directory",
    "unavailable_reason",
    "unreachable_address",
    "zookeeper_classpath",
]

MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
DEFAULT_CLASSPATH = ("/usr/share/java/zookeeper.jar", "/usr/share/java/slf4j-simple.jar")
LOOPBACK = "127.0.0.1"
CONFIG_FILE = "zoo.cfg"
LOG_FILE = "zookeeper.log"
PID_FILE = "zookeeper.pid"
STATE_FILE = "cluster.json"

_POLL_INTERVAL = 0.05  # between readiness probes
_PROBE_TIMEOUT = 0.5  # socket timeout of one four-letter-word probe


class ZkError(RuntimeError):
    """A ZooKeeper server could not be started, reached or stopped."""


class ZkUnavailable(ZkError):
    """Java or the ZooKeeper jars are not installed."""


# --------------------------------------------------------------------------- environment


def java_executable() -> str | None:
    """Path of the java executable (``$ZK_JAVA``, ``$JAVA_HOME/bin/java``, PATH), or None."""
    explicit = os.environ.get("ZK_JAVA")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = os.path.join(java_home, "bin", "java")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("java")


def zookeeper_classpath() -> list[str]:
    """Jars for the server's classpath (``$ZK_CLASSPATH`` or :data:`DEFAULT_CLASSPATH`).

    The zookeeper jar's manifest pulls in its other dependencies.
    """
    explicit = os.environ.get("ZK_CLASSPATH")
    if explicit:
        return [p for p in explicit.split(os.pathsep) if p]
    return list(DEFAULT_CLASSPATH)


def unavailable_reason() -> str | None:
    """Why a server cannot be started here (missing java or jars), or None if it can."""
    if java_executable() is None:
        return (
            "java not found (install a JRE such as openjdk-17-jre-headless, "
            "or set ZK_JAVA / JAVA_HOME)"
        )
    missing = [p for p in zookeeper_classpath() if not os.path.exists(p)]
    if missing:
        return (
            f"ZooKeeper jar(s) missing: {', '.join(missing)} "
            "(apt-get install zookeeper, or set ZK_CLASSPATH)"
        )
    return None


# --------------------------------------------------------------------------- network helpers


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports that were free on 127.0.0.1 (bound to port 0 together, then closed)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port that was free on 127.0.0.1."""
    return free_ports(1)[0]


@contextlib.contextmanager
def unreachable_address() -> Iterator[str]:
    """Yield ``"127.0.0.1:PORT"`` where nothing listens: connections are refused.

    The port stays bound (never listening) until the block exits, so nothing else can take it.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((LOOPBACK, 0))
        yield f"{LOOPBACK}:{s.getsockname()[1]}"
    finally:
        s.close()


def four_letter_word(
    port: int, word: str = "srvr", host: str = LOOPBACK, timeout: float = _PROBE_TIMEOUT
) -> str:
    """Send a four-letter word and return the whole reply; raises OSError on failure."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(word.encode("ascii"))
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def _parse_mode(reply: str) -> str | None:
    for line in reply.splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


def server_mode(port: int, host: str = LOOPBACK, timeout: float = _PROBE_TIMEOUT) -> str | None:
    """``standalone``/``leader``/``follower``/``observer`` from ``srvr``; None if not serving."""
    try:
        return _parse_mode(four_letter_word(port, "srvr", host, timeout))
    except OSError:
        return None


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _decode_proc_address(hex_addr: str) -> tuple[str, int]:
    host_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(host_hex)
    if len(raw) == 4:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # /proc/net/tcp6 stores four host-order 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        host = socket.inet_ntop(socket.AF_INET6, words)
    return host, int(port_hex, 16)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket process ``pid`` listens on (Linux /proc).

    IPv4-mapped IPv6 addresses appear as ``::ffff:127.0.0.1``.
    """
    inodes = _socket_inodes(pid)
    found = []
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):  # the process's namespace
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                found.append(_decode_proc_address(local))
    return found


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
    return procfs.alive(pid)


def _pid_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_our_server(pid: int, config_path: Path) -> bool:
    """True if ``pid`` is a live QuorumPeerMain running ``config_path`` (not a reused PID)."""
    cmd = _pid_cmdline(pid)
    return _pid_alive(pid) and MAIN_CLASS in cmd and str(config_path) in cmd


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _terminate_pids(pids: Sequence[int], grace: float) -> None:
    """SIGTERM (and SIGCONT, in case one is paused) to all, SIGKILL to any left after ``grace``."""
    for pid in pids:
        _signal_pid(pid, signal.SIGTERM)
        _signal_pid(pid, signal.SIGCONT)
    deadline = time.monotonic() + grace
    for pid in pids:
        if not _wait_pid_gone(pid, max(0.0, deadline - time.monotonic())):
            _signal_pid(pid, signal.SIGKILL)
            if not _wait_pid_gone(pid, 10.0):
                raise ZkError(f"ZooKeeper process {pid} survived SIGKILL")


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


_live_lock = threading.Lock()
_live: set[_Cluster] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Last resort: stop servers a caller forgot (detached ones are meant to outlive us)."""
    with _live_lock:
        leftovers = list(_live)
    for cluster in leftovers:
        with contextlib.suppress(Exception):
            cluster.stop()


class ZkNode:
    """One ZooKeeper server process: its directory, ports and process."""

    def __init__(
        self,
        sid: int,
        directory: Path,
        client_port: int,
        peer_port: int | None = None,
        election_port: int | None = None,
        host: str = LOOPBACK,
        wrap: Sequence[str] = (),
    ) -> None:
        self.sid = sid
        self.directory = directory
        self.client_port = client_port
        self.peer_port = peer_port
        self.election_port = election_port
        #: the address it binds and is reached at (another network namespace's, say)
        self.host = host
        #: a command prefix it runs under, e.g. ``ip netns exec NAME`` (cei_actors.testing.netns)
        self.wrap = list(wrap)
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ZkNode(sid={self.sid}, address={self.address!r}, pid={self.pid})"

    @property
    def address(self) -> str:
        """``"HOST:client_port"`` (HOST: 127.0.0.1 unless given)."""
        return f"{self.host}:{self.client_port}"

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_FILE

    @property
    def pid_path(self) -> Path:
        return self.directory / PID_FILE

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """True while the process exists (also when paused)."""
        return self._proc is not None and self._proc.poll() is None

    def mode(self, timeout: float = _PROBE_TIMEOUT) -> str | None:
        """Mode reported by ``srvr``, or None if the server does not answer or serve."""
        return server_mode(self.client_port, host=self.host, timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of this server's log."""
        return _tail(self.log_path, lines)

    def write_config(self, settings: Mapping[str, Any], servers: Sequence[ZkNode] = ()) -> None:
        """Write ``zoo.cfg`` (and ``myid`` when part of an ensemble)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "dataDir": self.data_dir,
            "clientPort": self.client_port,
            "clientPortAddress": self.host,
            **settings,
        }
        lines = [f"{k}={v}" for k, v in cfg.items()]
        for s in servers:
            lines.append(f"server.{s.sid}={s.host}:{s.peer_port}:{s.election_port}")
        if servers:
            (self.data_dir / "myid").write_text(f"{self.sid}\n")
        self.config_path.write_text("\n".join(lines) + "\n")

    def spawn(self, command: Sequence[str], detach: bool) -> None:
        """Start the process (``command`` + config path); the log and PID file go in its dir."""
        if self.running:
            raise ZkError(f"server {self.sid} is already running (pid {self.pid})")
        for port in (self.client_port, self.peer_port, self.election_port):
            if port is not None and self.host == LOOPBACK and not _port_free(port):
                # Another server there would answer our readiness probe: refuse to start.
                raise ZkError(f"server {self.sid}: port {LOOPBACK}:{port} is already in use")
        argv = [*self.wrap, *command, str(self.config_path)]
        # Without detach, the kernel kills the server if this process dies abruptly (the
        # parent-death signal follows the forking thread, so only from the main thread).
        setpriv = shutil.which("setpriv")
        if not detach and setpriv and threading.current_thread() is threading.main_thread():
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {argv}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches Python, which stops us in order
                close_fds=True,
            )
        self.pid_path.write_text(f"{self._proc.pid}\n")

    def wait_serving(self, deadline: float) -> str:
        """Poll ``srvr`` until a ``Mode:`` line answers; return the mode or raise ZkError."""
        last = "no answer yet"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ZkError(self._failure(f"the process exited with code {code}", last))
            try:
                reply = four_letter_word(self.client_port, "srvr", self.host)
                mode = _parse_mode(reply)
                if mode:
                    return mode
                last = reply.strip() or "empty reply"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise ZkError(self._failure("timed out waiting for it to serve", last))
            time.sleep(_POLL_INTERVAL)

    def wait_listening(self, port: int, deadline: float) -> None:
        """Poll until the process listens on ``port`` (checked in /proc, without connecting)."""
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ZkError(self._failure(f"the process exited with code {code}", "-"))
            with contextlib.suppress(OSError):
                if any(p == port for _, p in listening_sockets(self._proc.pid)):
                    return
            if time.monotonic() >= deadline:
                raise ZkError(self._failure(f"it never listened on port {port}", "-"))
            time.sleep(_POLL_INTERVAL)

    def _failure(self, what: str, last: str) -> str:
        return (
            f"ZooKeeper server {self.sid} on {self.address} did not start: {what}; "
            f"last 'srvr' probe: {last}.\nLast lines of {self.log_path}:\n{self.log_tail()}"
        )

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process if it runs."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(sig)

    def terminate(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; wait until it is gone."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                self._proc.send_signal(signal.SIGCONT)  # a paused JVM cannot act on SIGTERM
                try:
                    self._proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        self.pid_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL (a crash) and wait until it is gone."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        self.pid_path.unlink(missing_ok=True)


class _Cluster:
    """Shared machinery of :class:`ZkServer` and :class:`ZkEnsemble`."""

    def __init__(
        self,
        n: int,
        standalone: bool,
        directory: str | os.PathLike[str] | None,
        client_ports: Sequence[int] | None,
        tick_time_ms: int,
        min_session_timeout_ms: int | None,
        max_session_timeout_ms: int | None,
        heap: str,
        force_sync: bool,
        settings: Mapping[str, Any] | None,
        jvm_args: Sequence[str],
        start_timeout: float,
        detach: bool,
        hosts: Sequence[str] | None = None,
        wrappers: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("need at least one server")
        if client_ports is not None and len(client_ports) != n:
            raise ValueError(f"need {n} client ports, got {len(client_ports)}")
        if hosts is not None and len(hosts) != n or wrappers is not None and len(wrappers) != n:
            raise ValueError(f"need {n} hosts and wrappers, one per server")
        self._owns_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="zk-")).resolve()
        self.standalone = standalone
        self.tick_time_ms = tick_time_ms
        self.start_timeout = start_timeout
        self.detach = detach
        self._heap = heap
        self._jvm_args = list(jvm_args)
        self._settings: dict[str, Any] = {
            "tickTime": tick_time_ms,
            "initLimit": 10,
            "syncLimit": 5,
            "admin.enableServer": "false",
            "4lw.commands.whitelist": "*",
            "maxClientCnxns": 0,  # every client comes from 127.0.0.1; the default is 60
            "minSessionTimeout": min_session_timeout_ms or 2 * tick_time_ms,
            "maxSessionTimeout": max_session_timeout_ms or 20 * tick_time_ms,
        }
        if not force_sync:
            self._settings["forceSync"] = "no"
        if not standalone:
            self._settings["quorumListenOnAllIPs"] = "false"
        self._settings.update(settings or {})

        per_node = 1 if standalone else 3
        wanted = n * per_node - (n if client_ports else 0)
        pool = iter(free_ports(wanted))
        self.nodes: list[ZkNode] = []
        for i in range(n):
            client = client_ports[i] if client_ports else next(pool)
            peer = None if standalone else next(pool)
            election = None if standalone else next(pool)
            self.nodes.append(
                ZkNode(i + 1, self.directory / f"server{i + 1}", client, peer, election,
                       host=hosts[i] if hosts else LOOPBACK, wrap=wrappers[i] if wrappers else ())
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(hosts={self.hosts!r}, directory={str(self.directory)!r})"

    def __enter__(self) -> _Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- properties

    @property
    def hosts(self) -> str:
        """Connection string ``"127.0.0.1:p1,127.0.0.1:p2,..."`` (no chroot)."""
        return ",".join(node.address for node in self.nodes)

    @property
    def pids(self) -> list[int | None]:
        """PID of each server (None for one that is not running)."""
        return [node.pid for node in self.nodes]

    def _command(self) -> list[str]:
        reason = unavailable_reason()
        if reason:
            raise ZkUnavailable(reason)
        java = java_executable()
        assert java is not None
        return [
            java,
            f"-Xmx{self._heap}",
            "-XX:+UseSerialGC",
            "-XX:-UsePerfData",  # no /tmp/hsperfdata_* files
            "-Djava.net.preferIPv4Stack=true",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
            *self._jvm_args,
            "-cp",
            os.pathsep.join(zookeeper_classpath()),
            MAIN_CLASS,
        ]

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start every server and return once each answers ``srvr`` with a Mode."""
        command = self._command()
        self.directory.mkdir(parents=True, exist_ok=True)
        peers = () if self.standalone else self.nodes
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            node.write_config(self._settings, peers)
        if not self.detach:
            with _live_lock:
                _live.add(self)
        deadline = time.monotonic() + self.start_timeout
        try:
            # Started together, the servers sometimes elect a leader that the highest id then
            # overrules, which costs initLimit ticks (5 s). Starting the highest id first and
            # the rest once its election port listens avoids that race.
            first, *rest = sorted(self.nodes, key=lambda node: node.sid, reverse=True)
            first.spawn(command, self.detach)
            if first.election_port is not None:
                first.wait_listening(first.election_port, deadline)
            for node in rest:
                node.spawn(command, self.detach)
            self._write_state()
            for node in self.nodes:
                node.wait_serving(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 5.0) -> None:
        """Stop every server (SIGTERM, SIGKILL after ``grace`` s); remove a temporary dir."""
        for node in self.nodes:  # signal all first: each JVM takes ~0.4 s to shut down
            node.send_signal(signal.SIGTERM)
            node.send_signal(signal.SIGCONT)
        for node in self.nodes:
            node.terminate(grace)
        with _live_lock:
            _live.discard(self)
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self, i: int) -> None:
        """Crash server ``i`` (0-based) with SIGKILL and wait until it is gone."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float | None = None) -> str:
        """(Re)start server ``i`` (killing it first if it runs); return its mode once it serves."""
        node = self.nodes[i]
        node.kill()
        node.spawn(self._command(), self.detach)
        self._write_state()
        return node.wait_serving(time.monotonic() + (timeout or self.start_timeout))

    def pause(self, i: int) -> None:
        """Freeze server ``i`` with SIGSTOP (a hung server: its sockets stay open)."""
        self.nodes[i].send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        """Continue server ``i`` after :meth:`pause` (SIGCONT)."""
        self.nodes[i].send_signal(signal.SIGCONT)

    # ---------------------------------------------------------------- inspection

    def modes(self, timeout: float = _PROBE_TIMEOUT) -> list[str | None]:
        """Mode of each server from ``srvr`` (None if it does not answer or serve)."""
        return [node.mode(timeout) if node.running else None for node in self.nodes]

    def leader_index(self) -> int | None:
        """Index of the server reporting ``leader`` (or ``standalone``), or None."""
        for i, mode in enumerate(self.modes()):
            if mode in ("leader", "standalone"):
                return i
        return None

    def wait_for_leader(self, timeout: float = 15.0) -> int:
        """Poll until some server reports ``leader``/``standalone``; return its index."""
        deadline = time.monotonic() + timeout
        while True:
            index = self.leader_index()
            if index is not None:
                return index
            if time.monotonic() >= deadline:
                raise ZkError(f"no ZooKeeper leader within {timeout}s; modes: {self.modes()}")
            time.sleep(_POLL_INTERVAL)

    def _write_state(self) -> None:
        state = {
            "hosts": self.hosts,
            "standalone": self.standalone,
            "servers": [
                {
                    "sid": node.sid,
                    "directory": str(node.directory),
                    "client_port": node.client_port,
                    "peer_port": node.peer_port,
                    "election_port": node.election_port,
                    "host": node.host,
                    "pid": node.pid,
                }
                for node in self.nodes
            ],
        }
        (self.directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


class ZkServer(_Cluster):
    """One standalone ZooKeeper server on 127.0.0.1.

    ``directory`` defaults to a temporary directory removed by :meth:`stop`; a given one is
    kept. ``detach=True`` lets the server outlive this process (the CLI uses it).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        tick_time_ms: int = 500,
        min_session_timeout_ms: int | None = None,
        max_session_timeout_ms: int | None = None,
        heap: str = "256m",
        force_sync: bool = True,
        settings: Mapping[str, Any] | None = None,
        jvm_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        detach: bool = False,
        host: str = LOOPBACK,
        wrap: Sequence[str] = (),
    ) -> None:
        super().__init__(
            1,
            True,
            directory,
            None if port is None else [port],
            tick_time_ms,
            min_session_timeout_ms,
            max_session_timeout_ms,
            heap,
            force_sync,
            settings,
            jvm_args,
            start_timeout,
            detach,
            [host],
            [wrap],
        )

    def __enter__(self) -> ZkServer:
        self.start()
        return self

    @property
    def port(self) -> int:
        """The client port."""
        return self.nodes[0].client_port

    @property
    def pid(self) -> int | None:
        """PID of the server process, or None if it is not running."""
        return self.nodes[0].pid

    def kill(self, i: int = 0) -> None:
        super().kill(i)

    def restart(self, i: int = 0, timeout: float | None = None) -> str:
        return super().restart(i, timeout)

    def pause(self, i: int = 0) -> None:
        super().pause(i)

    def resume(self, i: int = 0) -> None:
        super().resume(i)


class ZkEnsemble(_Cluster):
    """An ensemble of ``n`` ZooKeeper servers on 127.0.0.1 (server ids 1..n, indices 0..n-1).

    :meth:`start` returns once every server serves as leader or follower. ``directory``
    defaults to a temporary directory removed by :meth:`stop`. ``hosts`` (one address per
    server) and ``wrappers`` (one command prefix per server) place the servers elsewhere, e.g.
    one per network namespace (``cei_actors.testing.netns.Host.zk_place``).
    """

    def __init__(
        self,
        n: int = 3,
        directory: str | os.PathLike[str] | None = None,
        *,
        client_ports: Sequence[int] | None = None,
        tick_time_ms: int = 500,
        min_session_timeout_ms: int | None = None,
        max_session_timeout_ms: int | None = None,
        heap: str = "256m",
        force_sync: bool = True,
        settings: Mapping[str, Any] | None = None,
        jvm_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        detach: bool = False,
        hosts: Sequence[str] | None = None,
        wrappers: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__(
            n,
            False,
            directory,
            client_ports,
            tick_time_ms,
            min_session_timeout_ms,
            max_session_timeout_ms,
            heap,
            force_sync,
            settings,
            jvm_args,
            start_timeout,
            detach,
            hosts,
            wrappers,
        )

    def __enter__(self) -> ZkEnsemble:
        self.start()
        return self


# --------------------------------------------------------------------------- directories


def _node_dirs(directory: Path) -> list[Path]:
    return sorted(p.parent for p in directory.glob(f"*/{PID_FILE}"))


def stop_directory(directory: str | os.PathLike[str], grace: float = 5.0) -> list[int]:
    """Stop the servers whose PID files are under ``directory``; return the PIDs stopped.

    A PID file whose process is gone, or is no longer that server (a reused PID), is removed
    without signalling anything.
    """
    stopped = []
    pid_paths = [node_dir / PID_FILE for node_dir in _node_dirs(Path(directory).resolve())]
    for pid_path in pid_paths:
        try:
            pid = int(pid_path.read_text().strip())
        except (OSError, ValueError):
            continue
        if _is_our_server(pid, pid_path.parent / CONFIG_FILE):
            stopped.append(pid)
    _terminate_pids(stopped, grace)
    for pid_path in pid_paths:
        pid_path.unlink(missing_ok=True)
    return stopped


def directory_status(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``directory``'s ``cluster.json`` records, with each server's live PID and mode."""
    directory = Path(directory).resolve()
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        raise ZkError(f"no ZooKeeper cluster in {directory} (no {STATE_FILE})") from None
    for server in state["servers"]:
        node_dir = Path(server["directory"])
        pid: int | None
        try:
            pid = int((node_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            pid = None
        alive = pid is not None and _is_our_server(pid, node_dir / CONFIG_FILE)
        server["pid"] = pid if alive else None
        server["mode"] = server_mode(server["client_port"], server.get("host", LOOPBACK)) if alive else None
    return state


# --------------------------------------------------------------------------- sessions


def expire_session(client: KazooClient, timeout: float = 10.0, hosts: str | None = None) -> None:
    """Make ZooKeeper expire ``client``'s session for real; return once it reports LOST.

    A second client attaches to the same session (id and password) and closes it, which ends
    the session on the server. ``hosts`` defaults to the client's own servers.
    """
    from kazoo.client import KazooClient, KazooState

    client_id = client.client_id
    if client_id is None:
        raise ZkError("the client is not connected: it has no session to expire")
    if hosts is None:
        hosts = ",".join(f"{host}:{port}" for host, port in client.hosts)
    lost = threading.Event()

    def on_state(state: str) -> None:
        if state == KazooState.LOST:
            lost.set()

    client.add_listener(on_state)
    try:
        twin = KazooClient(hosts=hosts, client_id=client_id)
        try:
            twin.start(timeout=timeout)
        finally:
            twin.stop()
            twin.close()
        if not lost.wait(timeout):
            raise ZkError(
                f"session 0x{client_id[0]:x} was closed but the client did not report LOST "
                f"within {timeout}s (state {client.state})"
            )
    finally:
        client.remove_listener(on_state)
