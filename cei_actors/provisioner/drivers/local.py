"""A libcloud ``NodeDriver`` whose "VMs" are processes on this host.

Each node is one command (an EEAgent) started in its own session and process group under a
small init (``vminit.py``, a child subreaper), so that the node dies whole: when the command
ends or the node is destroyed, the init ends every descendant, even ``setsid``'d ones; if the
init itself is killed, the driver finds what is left by the ``CEI_LOCAL_VM`` marker each
process inherits (decision PV1). Output goes in ``<state_dir>/nodes/<node_id>/output.log``. The driver keeps a small JSON
table of its nodes in ``<state_dir>/nodes.json`` (under a file lock), so a new driver
instance, e.g. after a Provisioner restart, still lists and destroys the nodes of the old
one. A node is RUNNING while its process lives and TERMINATED once it has exited; a reused
PID is told apart by the process start time in ``/proc/<pid>/stat`` (:mod:`~cei_actors.runtime.procfs`). Linux only; loopback
only (every node's address is 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shlex
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from libcloud.common.types import LibcloudError
from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeLocation, NodeSize
from libcloud.compute.types import NodeState

from ...runtime import procfs
from .simcloud import Clock, WallClock

__all__ = ["CommandSpec", "LocalNodeNotFound", "LocalProcessDriver"]

#: A callable ``(name, userdata, vars) -> argv``, or an argv template (a list of strings,
#: or one string split with shlex) whose ``{placeholders}`` are filled from the vars.
CommandSpec = Callable[[str, str | None, dict[str, Any]], Sequence[str]] | str | Sequence[str]

LOOPBACK = "127.0.0.1"
_TABLE_VERSION = 1
#: Set to the node's directory in the environment of a node's every process (the EEAgent
#: passes it on to its commands): how the remains of a node whose init died are found.
VM_MARKER_ENV = "CEI_LOCAL_VM"
#: ``STATE_DIR/tokens/<sha256 of a client token>`` names the directory of the node made for that
#: token; written before the node's process is started (the table records it after).
TOKENS_DIR = "tokens"
_VMINIT = str(Path(__file__).with_name("vminit.py"))


class LocalNodeNotFound(LibcloudError):
    """No such local node (text starts with ``InvalidInstanceID.NotFound``, as on EC2)."""

    def __init__(self, node_id: str, driver: NodeDriver | None = None) -> None:
        super().__init__(
            f"InvalidInstanceID.NotFound: The instance ID '{node_id}' does not exist", driver
        )
        self.node_id = node_id

    def __str__(self) -> str:
        return str(self.value)


# Child processes started by any driver instance in this process, by pid, so whichever
# instance notices an exit can reap it (no zombies) and read the exit code.
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


class LocalProcessDriver(NodeDriver):
    """Nodes are local processes; see the module docstring.

    - ``state_dir``: where the node table, lock, per-node logs and userdata live.
    - ``command``: a :data:`CommandSpec`. Template and callable see these vars: ``python``
      (``sys.executable``), the driver's ``vars``, the create's ``ex_vars``, then ``name``,
      ``node_id``, ``node_dir``, ``state_dir``, ``userdata``, ``userdata_file``.
    - ``vars``, ``env``: extra template vars / environment for every node. Each node also
      gets ``CEI_NODE_ID``, ``CEI_NODE_NAME``, ``CEI_NODE_DIR``, ``CEI_USERDATA_FILE`` and
      the marker ``CEI_LOCAL_VM``.
    - ``grace_period``: seconds between SIGTERM and SIGKILL on destroy (the node's init
      gives its command half of it, then ends the rest of the node).
    - ``terminated_linger``: seconds a TERMINATED node stays listed.
    - ``forget_after``: seconds after which unlisted nodes (and their client tokens) are
      dropped from the table.
    - ``clock``: object with ``now()`` for the table's timestamps (default wall clock).
    """

    type = "cei-local"
    name = "CEI local processes"
    website = "https://example.invalid/cei-local"
    api_name = "cei-local"
    features: dict[str, list[str]] = {"create_node": []}

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        command: CommandSpec | None = None,
        *,
        vars: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        grace_period: float = 5.0,
        terminated_linger: float = 300.0,
        forget_after: float = 86400.0,
        clock: Clock | None = None,
    ) -> None:
        # Deliberately no BaseDriver.__init__: there is no connection to build.
        self.key = None
        self.secret = None
        self.secure = False
        self.region = "local"
        self.state_dir = Path(state_dir).resolve()
        self.command = command
        self.vars = dict(vars or {})
        self.env = dict(env or {})
        self.grace_period = float(grace_period)
        self.terminated_linger = float(terminated_linger)
        self.forget_after = float(forget_after)
        self.clock: Clock = clock if clock is not None else WallClock()
        self._lock = threading.RLock()
        (self.state_dir / "nodes").mkdir(parents=True, exist_ok=True)

    @property
    def table_path(self) -> Path:
        return self.state_dir / "nodes.json"

    # ------------------------------------------------------------------ catalog

    def list_images(self, location: NodeLocation | None = None) -> list[NodeImage]:
        return [NodeImage(id="local", name="this host", driver=self)]

    def list_sizes(self, location: NodeLocation | None = None) -> list[NodeSize]:
        return [
            NodeSize(
                id="local", name="a process", ram=0, disk=0, bandwidth=None, price=0.0, driver=self
            )
        ]

    def list_locations(self) -> list[NodeLocation]:
        return [NodeLocation(id="localhost", name="localhost", country="LOCAL", driver=self)]

    # ------------------------------------------------------------------ nodes

    def create_node(  # type: ignore[override]
        self,
        name: str,
        size: NodeSize | str | None = None,
        image: NodeImage | str | None = None,
        location: NodeLocation | None = None,
        auth: Any = None,
        ex_clienttoken: str | None = None,
        ex_userdata: str | None = None,
        ex_vars: Mapping[str, Any] | None = None,
        ex_env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Node:
        """Start one node process, or return the node already made for ``ex_clienttoken``."""
        if self.command is None:
            raise ValueError("LocalProcessDriver has no command configured")
        with self._locked_table() as table:
            now = self.clock.now()
            if ex_clienttoken is not None:
                for rec in table["nodes"].values():
                    if rec.get("client_token") == ex_clienttoken:
                        self._refresh(rec, now)
                        return self._to_node(rec)
                # a create of this token that died between its spawn and its record: that VM
                # is unknown to everyone; stop it before making the one that will be recorded
                with contextlib.suppress(OSError):
                    earlier = self._token_path(ex_clienttoken).read_text()
                    if earlier not in {rec.get("node_dir") for rec in table["nodes"].values()}:
                        _kill_marked(earlier)
            while True:  # ids are never reused, even after a crash mid-create
                table["next_seq"] += 1
                node_id = f"local-{table['next_seq']:06d}"
                node_dir = self.state_dir / "nodes" / node_id
                if node_id not in table["nodes"] and not node_dir.exists():
                    break
            node_dir.mkdir(parents=True)
            userdata_file = node_dir / "userdata"
            userdata_file.write_text(ex_userdata or "")
            if ex_clienttoken is not None:  # before the spawn
                self._token_path(ex_clienttoken).parent.mkdir(exist_ok=True)
                self._token_path(ex_clienttoken).write_text(str(node_dir))
            tvars: dict[str, Any] = {
                "python": sys.executable,
                **self.vars,
                **(ex_vars or {}),
                "name": name,
                "node_id": node_id,
                "node_dir": str(node_dir),
                "state_dir": str(self.state_dir),
                "userdata": ex_userdata or "",
                "userdata_file": str(userdata_file),
            }
            argv = self._argv(name, ex_userdata, tvars)
            env = {
                **os.environ,
                **self.env,
                **(ex_env or {}),
                "CEI_NODE_ID": node_id,
                "CEI_NODE_NAME": name,
                "CEI_NODE_DIR": str(node_dir),
                "CEI_USERDATA_FILE": str(userdata_file),
                VM_MARKER_ENV: str(node_dir),
            }
            init = [sys.executable, "-I", "-S", _VMINIT, repr(self.grace_period / 2), "--"]
            log_path = node_dir / "output.log"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [*init, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=node_dir,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            with _children_lock:
                _children[proc.pid] = proc
            stat = procfs.stat(proc.pid)
            rec = {
                "id": node_id,
                "name": name,
                "client_token": ex_clienttoken,
                "pid": proc.pid,
                "pgid": stat.pgrp if stat else proc.pid,
                "start_ticks": stat.start_ticks if stat else None,
                "created": now,
                "argv": list(argv),
                "image": _object_id(image),
                "size": _object_id(size),
                "node_dir": str(node_dir),
                "log": str(log_path),
                "exited_at": None,
                "exit_code": None,
                "destroyed_at": None,
                "gone_at": None,
            }
            table["nodes"][node_id] = rec
            return self._to_node(rec)

    def list_nodes(self, ex_node_ids: Sequence[str] | None = None) -> list[Node]:  # type: ignore[override]
        """Listed nodes: RUNNING while the process lives, then TERMINATED for a while."""
        wanted = set(ex_node_ids) if ex_node_ids is not None else None
        with self._locked_table() as table:
            now = self.clock.now()
            nodes = []
            for node_id, rec in list(table["nodes"].items()):
                self._refresh(rec, now)
                gone_at = rec.get("gone_at")
                if gone_at is not None:
                    if now >= gone_at + self.forget_after:
                        del table["nodes"][node_id]
                        if rec.get("client_token") is not None:
                            self._token_path(rec["client_token"]).unlink(missing_ok=True)
                    continue
                if wanted is None or node_id in wanted:
                    nodes.append(self._to_node(rec))
            return nodes

    def destroy_node(self, node: Node | str) -> bool:  # type: ignore[override]
        """Kill the node's whole process group (SIGTERM, then SIGKILL after the grace
        period) and wait for it. Destroying an exited but listed node succeeds."""
        node_id = _object_id(node)
        with self._locked_table() as table:
            rec = table["nodes"].get(node_id)
            if rec is None or rec.get("gone_at") is not None:
                raise LocalNodeNotFound(node_id, self)
            pid, pgid, ticks = rec["pid"], rec["pgid"], rec["start_ticks"]
        # Kill outside the lock: waiting for the grace period must not block other calls.
        _kill_group(pid, pgid, ticks, self.grace_period)
        _kill_marked(rec["node_dir"])
        with self._locked_table() as table:
            rec = table["nodes"].get(node_id)
            if rec is not None:
                now = self.clock.now()
                self._refresh(rec, now)
                if rec["destroyed_at"] is None:
                    rec["destroyed_at"] = now
                if rec["exited_at"] is None:  # cannot normally happen: the group is gone
                    rec["exited_at"] = now
        return True

    def marked_node_dirs(self) -> set[str]:
        """This driver's node directories that a live process is marked with (recorded in
        the table or not; one /proc scan), e.g. to find a VM the table does not show."""
        base = str(self.state_dir / "nodes") + os.sep
        return {d for d in marked_dirs() if d.startswith(base)}

    def kill_unrecorded(self) -> list[int]:
        """Stop every process of a node directory that the table does not record (a create
        that died between its spawn and its record); their pids."""
        with self._locked_table() as table:
            recorded = {rec.get("node_dir") for rec in table["nodes"].values()}
            killed: list[int] = []
            for node_dir in sorted(self.marked_node_dirs() - recorded):
                killed += _kill_marked(node_dir)
            return killed

    # ------------------------------------------------------------------ internals

    def _token_path(self, token: str) -> Path:
        return self.state_dir / TOKENS_DIR / hashlib.sha256(token.encode()).hexdigest()


    def _argv(self, name: str, userdata: str | None, tvars: dict[str, Any]) -> list[str]:
        command = self.command
        if callable(command):
            argv = [str(a) for a in command(name, userdata, tvars)]
        else:
            template = shlex.split(command) if isinstance(command, str) else list(command)
            argv = []
            formatter = string.Formatter()
            for part in template:
                try:
                    argv.append(formatter.vformat(str(part), (), tvars))
                except (KeyError, IndexError) as e:
                    raise ValueError(
                        f"command template {part!r} refers to an unknown variable: {e}"
                    ) from None
        if not argv:
            raise ValueError("LocalProcessDriver command produced an empty argv")
        return argv

    def _refresh(self, rec: dict[str, Any], now: float) -> None:
        """Notice an exit, and the end of the TERMINATED listing window."""
        if rec["exited_at"] is None and not _process_alive(rec["pid"], rec["start_ticks"]):
            # The init is gone: normally it ended the node first; if it was killed, what it
            # left is ended here, before anyone is told the node is TERMINATED.
            _kill_marked(rec["node_dir"])
            rec["exited_at"] = now
        if rec["exited_at"] is not None and rec["exit_code"] is None:
            rec["exit_code"] = _take_exit_code(rec["pid"])
        ended = rec["exited_at"]
        if ended is not None and rec["gone_at"] is None and now >= ended + self.terminated_linger:
            rec["gone_at"] = now

    def _to_node(self, rec: dict[str, Any]) -> Node:
        if rec.get("gone_at") is not None or rec["exited_at"] is not None:
            state = NodeState.TERMINATED
            status = "destroyed" if rec["destroyed_at"] is not None else "exited"
        else:
            state, status = NodeState.RUNNING, "running"
        return Node(
            id=rec["id"],
            name=rec["name"],
            state=state,
            public_ips=[LOOPBACK],
            private_ips=[LOOPBACK],
            driver=self,
            size=NodeSize(
                id=rec["size"] or "local",
                name="a process",
                ram=0,
                disk=0,
                bandwidth=None,
                price=0.0,
                driver=self,
            ),
            image=NodeImage(id=rec["image"] or "local", name="this host", driver=self),
            created_at=datetime.datetime.fromtimestamp(rec["created"], tz=datetime.UTC),
            extra={
                "client_token": rec["client_token"],
                "status": status,
                "pid": rec["pid"],
                "pgid": rec["pgid"],
                "argv": rec["argv"],
                "node_dir": rec["node_dir"],
                "log": rec["log"],
                "exited_at": rec["exited_at"],
                "exit_code": rec["exit_code"],
                "destroyed_at": rec["destroyed_at"],
            },
        )

    @contextlib.contextmanager
    def _locked_table(self) -> Iterator[dict[str, Any]]:
        """Load the node table under the thread lock and the file lock; save it after."""
        with self._lock, open(self.state_dir / ".lock", "a+") as lockf:
            fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)
            try:
                table = self._load()
                before = json.dumps(table, sort_keys=True)
                try:
                    yield table
                finally:  # also on error: a failed create still used up its id
                    if json.dumps(table, sort_keys=True) != before:
                        self._save(table)
            finally:
                fcntl.flock(lockf.fileno(), fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.table_path.read_text())
        except FileNotFoundError:
            return {"version": _TABLE_VERSION, "next_seq": 0, "nodes": {}}
        if data.get("version") != _TABLE_VERSION:
            raise LibcloudError(f"unsupported local node table version in {self.table_path}", self)
        return data

    def _save(self, table: dict[str, Any]) -> None:
        tmp = self.table_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.table_path)


# ---------------------------------------------------------------------- process helpers


def _reap(pid: int) -> None:
    with _children_lock:
        proc = _children.get(pid)
    if proc is not None:
        proc.poll()


def _take_exit_code(pid: int) -> int | None:
    """The exit code of our reaped child ``pid`` (then forgotten), or None."""
    with _children_lock:
        proc = _children.get(pid)
        if proc is None or proc.returncode is None:
            return None
        del _children[pid]
        return proc.returncode


def _process_alive(pid: int, start_ticks: int | None) -> bool:
    """True while the node's own process (not a reused pid, not a zombie) exists."""
    _reap(pid)
    stat = procfs.stat(pid)
    if stat is None:
        return False
    if start_ticks is not None and stat.start_ticks != start_ticks:
        return False  # the pid now belongs to another process
    return stat.state not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = procfs.stat(int(entry.name))
            if stat is not None and stat.pgrp == pgid and stat.state not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _wait_group_empty(pid: int, pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not _group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _kill_group(pid: int, pgid: int, start_ticks: int | None, grace: float) -> None:
    """SIGTERM the group, SIGKILL what is left after ``grace`` seconds, wait for it."""
    leader = procfs.stat(pid)
    if leader is not None and start_ticks is not None and leader.start_ticks != start_ticks:
        # The leader's pid was reused, which the kernel only does once our group is
        # empty: any group with this id now belongs to someone else.
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _group_members(pgid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        if _wait_group_empty(pid, pgid, wait):
            break
    _reap(pid)


def marked_processes(node_dir: str) -> list[int]:
    """Live processes whose environment carries ``CEI_LOCAL_VM=<node_dir>`` (a /proc scan)."""
    marker = f"{VM_MARKER_ENV}={node_dir}".encode()
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        stat = procfs.stat(int(entry.name))
        if stat is not None and stat.state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def marked_dirs() -> set[str]:
    """The node directories named by the ``CEI_LOCAL_VM`` marker of some live process (one
    /proc scan)."""
    prefix = f"{VM_MARKER_ENV}=".encode()
    me = os.getpid()
    dirs: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                found = [v[len(prefix):] for v in f.read().split(b"\0") if v.startswith(prefix)]
        except OSError:
            continue
        stat = procfs.stat(int(entry.name)) if found else None
        if stat is not None and stat.state not in ("Z", "X"):
            dirs.add(os.fsdecode(found[0]))
    return dirs


def _kill_marked(node_dir: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process of the node (by its marker) until none is left; their pids."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := marked_processes(node_dir):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
        with _children_lock:
            for proc in _children.values():
                proc.poll()
    return killed


def _object_id(obj: Any) -> str | None:
    if obj is None:
        return None
    return str(obj) if isinstance(obj, str) else str(obj.id)
