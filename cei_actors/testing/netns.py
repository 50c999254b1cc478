"""Real "hosts" on one machine: Linux network namespaces joined by a bridge (root only).

    with Hosts(3) as hosts:                      # hosts[0].address == "198.18.X.1", ...
        p = hosts[0].popen(["python", "-m", "..."])   # runs inside the namespace
        hosts[2].link(False)                     # its cable pulled; link(True) puts it back
        hosts[1].kill_all()                      # every process in that namespace, SIGKILL

Layout: one bridge in the root namespace (``cnb<token>``) with address ``198.18.X.254/24``
(so the creating process, in the root namespace, reaches every host), and per host a
namespace ``cei-nh-<pid>-<token>-h<i>`` whose ``eth0`` (a veth pair, root side
``cnv<token><i>`` on the bridge) has ``198.18.X.<i+1>/24``. ``X`` is a /24 of 198.18.0.0/15
(reserved for network benchmarks, RFC 2544) that no interface or route of this machine uses;
``<token>`` is random, so parallel runs never collide. The namespaces have no default route
and nothing NATs them: their traffic reaches the bridge's hosts and nothing else.

Teardown (``__exit__``, also after a failure; and ``atexit``) kills every process in each
namespace and deletes the namespaces and the bridge. :func:`sweep_stale` removes what a
killed run left: namespaces with our prefix whose creator pid is gone, and their bridges.
:func:`unavailable_reason` says why this cannot run here (not root, no ``ip netns``).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "BLOCK",
    "PREFIX",
    "Host",
    "Hosts",
    "NetnsError",
    "sweep_stale",
    "unavailable_reason",
]

#: Namespace names start with this (and the creator's pid), so the sweeper knows ours.
PREFIX = "cei-nh"
#: Addresses come from this block (RFC 2544 network testing).
BLOCK = ipaddress.ip_network("198.18.0.0/15")
_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]+)-h(\d+)$")


class NetnsError(RuntimeError):
    """A namespace command failed; the message has the command and its error output."""


def _ip(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(("-n", ns) if ns else ()), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``, no netns support), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-0-h999"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        bridge = f"cnbp{os.getpid() % 100000}"
        made = _ip("link", "add", bridge, "type", "bridge", check=False)
        if made.returncode != 0:
            return f"cannot create a bridge: {made.stderr.strip()}"
        _ip("link", "del", bridge, check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _used_subnets() -> set[int]:
    """Third octets of the 198.18.X.0/24s that an address or route of the root namespace uses."""
    used = set()
    text = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
    for match in re.finditer(r"\b198\.(18|19)\.(\d+)\.\d+", text):
        used.add((int(match.group(1)) - 18) * 256 + int(match.group(2)))
    return used


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ns_pids(ns: str) -> list[int]:
    """Pids of every process in namespace ``ns`` (``ip netns pids``)."""
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_ns(ns: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process in ``ns`` until none is left (or ``timeout``); the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in ns_pids(ns) if p != os.getpid()]
        if not pids or time.monotonic() > deadline:
            return killed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.05)


class Host:
    """One namespace "host": its name, address and what runs in it."""

    def __init__(self, hosts: Hosts, index: int, ns: str, address: str, veth: str) -> None:
        self.hosts = hosts
        self.index = index
        self.ns = ns
        self.address = address
        self.veth = veth  # the root side of its cable

    def __repr__(self) -> str:
        return f"Host({self.ns!r}, {self.address!r})"

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a command inside this host (``ip netns exec NS``)."""
        return ["ip", "netns", "exec", self.ns]

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [*self.prefix, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside this host."""
        return subprocess.run(self.argv(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside this host (the process is the command itself: ``ip``
        execs it after entering the namespace)."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def pids(self) -> list[int]:
        """Every process running in this host."""
        return ns_pids(self.ns)

    def kill_all(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process in this host (a power cut); returns the pids killed."""
        return _kill_ns(self.ns, timeout)

    def link(self, up: bool) -> None:
        """Plug (``True``) or pull (``False``) this host's cable (the bridge side of its veth)."""
        _ip("link", "set", self.veth, "up" if up else "down")


class Hosts:
    """``n`` namespace hosts on one bridge (see the module docstring); a context manager."""

    def __init__(self, n: int, subnet: int | None = None) -> None:
        if not 1 <= n <= 200:
            raise ValueError("between 1 and 200 hosts")
        self.n = n
        self.token = secrets.token_hex(3)
        self.bridge = f"cnb{self.token}"
        self._subnet = subnet
        self.hosts: list[Host] = []
        self.network: ipaddress.IPv4Network | None = None
        self.gateway: str | None = None  # the bridge's address (this process reaches hosts from it)
        self._up = False

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def cidr(self) -> str:
        """The hosts' network, e.g. ``198.18.7.0/24`` (for an allowlist)."""
        return str(self.network)

    def __enter__(self) -> Hosts:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _pick_subnet(self) -> int:
        used = _used_subnets()
        if self._subnet is not None:
            if self._subnet in used:
                raise NetnsError(f"198.18.{self._subnet}.0/24 is in use here")
            return self._subnet
        free = [x for x in range(256) if x not in used]
        if not free:
            raise NetnsError("every 198.18.X.0/24 is in use")
        return random.choice(free)

    def start(self) -> None:
        """Create the bridge and the namespaces (removes a killed run's leftovers first)."""
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        sweep_stale()
        x = self._pick_subnet()
        self.network = ipaddress.ip_network(f"198.18.{x}.0/24")
        self.gateway = f"198.18.{x}.254"
        self._up = True
        atexit.register(self.stop)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for _ in range(self.n):
                self.add_host()
        except BaseException:
            self.stop()
            raise

    def add_host(self, address: str | None = None) -> Host:
        """One more host on the bridge (``address``: any free one of the /24, e.g. for a host
        outside an allowlist); returns it."""
        assert self.network is not None, "start() first"
        i = len(self.hosts)
        ns = f"{PREFIX}-{os.getpid()}-{self.token}-h{i}"
        veth = f"cnv{self.token}{i}"
        address = address or f"198.18.{self.network.network_address.packed[2]}.{i + 1}"
        _ip("netns", "add", ns)
        host = Host(self, i, ns, address, veth)
        self.hosts.append(host)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        return host

    def stop(self) -> None:
        """Kill every process in every host, delete the namespaces and the bridge (idempotent)."""
        if not self._up:
            return
        self._up = False
        for host in self.hosts:
            _kill_ns(host.ns)
            _ip("netns", "del", host.ns, check=False)
            _ip("link", "del", host.veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)


def sweep_stale() -> list[str]:
    """Delete namespaces named ``cei-nh-<pid>-...`` whose creator ``pid`` is gone (and every
    process in them, their bridges); returns the namespaces removed."""
    if shutil.which("ip") is None:
        return []
    removed = []
    tokens = set()
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        match = _NAME.match(ns)
        if not match or _pid_alive(int(match.group(1))):
            continue
        _kill_ns(ns)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
        tokens.add(match.group(2))
    for token in tokens:
        _ip("link", "del", f"cnb{token}", check=False)
    return removed
