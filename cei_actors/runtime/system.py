"""Starting, attaching to and stopping thespian actor systems, on 127.0.0.1 unless configured.

Bases: ``simpleSystemBase`` (one thread, in process: tests, the simulator) and
``multiprocTCPBase`` (an admin process and one process per actor, talking TCP).

**Loopback unless configured.** thespian's TCP transport binds every listening socket to all
interfaces (``IPActorAddress.bindname`` is ``('', port)`` for any "external" address) and
advertises the address it finds by routing toward a public IP. ``THESPIAN_BASE_IPADDR`` fixes
only the advertised address. :func:`.network.use_network` therefore also replaces the one
property every bind goes through, ``IPActorAddress.bindArgs``, so that a wildcard bind (``''``
or ``0.0.0.0``) becomes a bind to the configured listening address (default ``127.0.0.1``;
another host's address with an allowlist of peer networks, :mod:`.network`). That covers the admin's, the logger's, every
actor's and every external endpoint's listening socket and the admin-port probe. The patch is
applied in the starting process before the admin is forked, and the admin and actor
processes are forked from it (the ``fork`` start method is forced), so they inherit it.
``tests/test_runtime_shell.py`` checks every listening socket of a running system.

**Authenticated.** Every frame the TCP transport sends carries an HMAC-SHA256 of the system's
secret, and every frame received is checked before anything is unpickled, then unpickled with
an allowlist of classes (:mod:`.secure`, docs/decisions.md TA1). :func:`start_system` and
:func:`attach_system` load the secret file (``secret_file=``, else ``$CEI_SECRET_FILE``) and
name it in ``$CEI_SECRET_FILE`` for the processes started from here; one key per process.

**Another OS process** (e.g. an EEAgent in a "VM" process of the local cloud driver) reaches
the system with :func:`attach_system`: it becomes an external endpoint of the running admin
(its own listening socket, in its own process), starts no admin and no actor, and receives
what actors send to it with ``asys.listen()``::

    asys = attach_system(admin_port)            # raises if no system listens there
    pd = lookup(asys, "pd")
    asys.tell(pd, Hello("eeagent:node-1"))      # the PD shell records our endpoint as that peer
    while running:
        msg = asys.listen(0.5)                  # LaunchProcess etc. sent by the PD
        ...
        asys.tell(pd, heartbeat)
    detach_system(asys)                         # never asys.shutdown(): that stops the system

Everything of that endpoint lives in that OS process, so killing its process group leaves
nothing behind. Starting a second admin that joins a convention (:func:`start_system` with
``convention=``) is possible but not for that purpose: thespian's admin calls ``setsid()`` and
double-forks, so it and its actors escape the caller's process group (see docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from thespian.actors import ActorAddress, ActorExitRequest, ActorSystem, InvalidActorAddress

from .network import (
    ADMIN_HOST_CAPABILITY,
    Network,
    NetworkError,
    current_network,
    split_host_port,
    use_network,
)
from .secure import resolve_secret_file, use_secret_file

LOOPBACK = "127.0.0.1"
TCP_BASE = "multiprocTCPBase"
SIMPLE_BASE = "simpleSystemBase"
BASES = (SIMPLE_BASE, TCP_BASE)


class SystemNotRunning(RuntimeError):
    """No actor system admin answers at the given port."""


def _own_host() -> str:
    net = current_network()
    return net.advertise if net.listen == "0.0.0.0" else net.listen


def free_port() -> int:
    """A TCP port that is free on this process's listening address right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_own_host(), 0))
        return s.getsockname()[1]


def _port_open(port: int, timeout: float = 0.5, host: str | None = None) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host or _own_host(), port))
        except OSError:
            return False
        return True


def _convention_address(convention: int | str) -> str:
    try:
        host, port = split_host_port(convention)
    except NetworkError as exc:
        raise ValueError(f"convention {convention!r}: expected a port or HOST:PORT ({exc})") from None
    return f"{host}:{port}"


def start_system(
    base: str = TCP_BASE,
    admin_port: int | None = None,
    convention: int | str | None = None,
    *,
    capabilities: dict[str, Any] | None = None,
    log_defs: Any = None,
    secret_file: str | Path | None = None,
    network: Network | None = None,
) -> ActorSystem:
    """Start a new actor system and return a handle on it; shut it down with :func:`shutdown_system`.

    TCP base: the admin listens on ``LISTEN:admin_port`` (``network``, else this process's
    settings, default 127.0.0.1; a free port if None; if something already listens on the
    given port this raises instead of joining it); ``convention`` (a port or ``HOST:PORT``)
    makes it a member of the convention led by that admin. The
    system outlives this process: always shut it down. Simple base: runs in this thread when
    you ``ask``/``tell``/``listen``; it does not touch logging unless ``log_defs`` is given.

    TCP base: every message is authenticated with the key in ``secret_file`` (else
    ``$CEI_SECRET_FILE``, else a fresh private one for this process; see
    :mod:`.secure`); the admin and actors inherit it, and whatever joins the system
    (:func:`attach_system`) must hold the same file.
    """
    if base == SIMPLE_BASE:
        asys = ActorSystem(SIMPLE_BASE, capabilities=dict(capabilities or {}),
                           logDefs=False if log_defs is None else log_defs, transientUnique=True)
        asys.cei_base, asys.cei_admin_port = SIMPLE_BASE, None
        return asys
    if base != TCP_BASE:
        raise ValueError(f"unsupported actor system base {base!r}: use one of {', '.join(BASES)}")
    use_network(network)
    use_secret_file(resolve_secret_file(secret_file, create=True))
    if admin_port and _port_open(admin_port):
        raise RuntimeError(f"{_own_host()}:{admin_port} is in use: use attach_system() to join a running system")
    attempts = 1 if admin_port else 3
    for attempt in range(attempts):
        port = admin_port or free_port()
        caps: dict[str, Any] = {"Admin Port": port, "Process Startup Method": "fork"}
        if convention is not None:
            caps["Convention Address.IPv4"] = _convention_address(convention)
        caps.update(capabilities or {})
        try:
            asys = ActorSystem(TCP_BASE, capabilities=caps, logDefs=log_defs, transientUnique=True)
        except InvalidActorAddress:
            # the free port was taken between our probe and the admin's bind (an outgoing
            # connection's ephemeral port, say): try another one
            if attempt + 1 == attempts:
                raise
            continue
        asys.cei_base, asys.cei_admin_port = TCP_BASE, port
        return asys
    raise AssertionError("unreachable")


def attach_system(admin_port: int | str, secret_file: str | Path | None = None) -> ActorSystem:
    """Join the running TCP actor system at ``admin_port`` (``PORT``: on this host's address;
    ``HOST:PORT``: another host's admin) as an external endpoint.

    Starts nothing: raises :class:`SystemNotRunning` if no admin listens there or the one that
    listens does not answer (thespian's own constructor would start an admin of its own once
    the port is free: a killed admin's logger holds its listening socket for a few seconds).
    Close with :func:`detach_system` (``shutdown()`` would stop the whole system).
    The system's secret comes from ``secret_file``, else ``$CEI_SECRET_FILE``
    (:class:`.secure.SecretError` if neither); an admin holding another key refuses us,
    which also reads as :class:`SystemNotRunning`.
    """
    use_network()
    secret = use_secret_file(resolve_secret_file(secret_file))
    _guard_admin_start()
    try:
        host, port = split_host_port(admin_port, _own_host())
    except NetworkError as exc:
        raise ValueError(f"admin {admin_port!r}: {exc}") from None
    if not _port_open(port, host=host):
        raise SystemNotRunning(f"no actor system admin listens on {host}:{port}")
    caps: dict[str, Any] = {"Admin Port": port}
    if host != _own_host():
        caps[ADMIN_HOST_CAPABILITY] = host
    _attach_only.on = True
    try:
        asys = ActorSystem(TCP_BASE, capabilities=caps, transientUnique=True)
    except (SystemNotRunning, InvalidActorAddress):
        raise SystemNotRunning(f"no actor system admin answers on {host}:{port} "
                               f"(or it holds another secret than {secret}, or refuses this host)") from None
    finally:
        _attach_only.on = False
    asys.cei_base, asys.cei_admin_port, asys.cei_admin_host = TCP_BASE, port, host
    asys.cei_attached = True
    return asys


#: Set while this thread attaches: thespian must not start an admin then.
_attach_only = threading.local()


def _guard_admin_start() -> None:
    """Make thespian's ``_startAdmin`` refuse (idempotent) while this thread attaches."""
    from thespian.system.multiprocCommon import multiprocessCommon

    if getattr(multiprocessCommon, "_cei_guarded", False):
        return
    original = multiprocessCommon._startAdmin

    def start_admin(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_attach_only, "on", False):
            raise SystemNotRunning("attaching: no admin answered, and none is started here")
        return original(self, *args, **kwargs)

    multiprocessCommon._startAdmin = start_admin
    multiprocessCommon._cei_guarded = True
    from thespian.system.transport.TCPTransport import TCPTransport

    original_probe = TCPTransport.probeAdmin

    def probe_admin(addr: Any) -> bool:
        # thespian probes by binding the admin's port here: another host's admin is not here
        return True if getattr(_attach_only, "on", False) else original_probe(addr)

    TCPTransport.probeAdmin = staticmethod(probe_admin)


def detach_system(asys: ActorSystem) -> None:
    """Close this process's endpoint of a system joined with :func:`attach_system`."""
    base = getattr(asys, "_systemBase", None)
    transport = getattr(base, "transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()
    asys._systemBase = None


def shutdown_system(asys: ActorSystem) -> None:
    """Stop every actor of ``asys`` (each gets ``ActorExitRequest``) and the system itself.

    The simple base's own ``shutdown`` does not stop actors, so they are asked to exit first.
    """
    if getattr(asys, "_systemBase", None) is None:
        return
    if getattr(asys, "cei_attached", False):
        detach_system(asys)
        return
    if getattr(asys, "cei_base", None) == SIMPLE_BASE:
        for address in simple_actor_addresses(asys):
            with contextlib.suppress(Exception):
                asys.tell(address, ActorExitRequest())
    asys.shutdown()


def simple_actor_addresses(asys: ActorSystem) -> list[ActorAddress]:
    """Addresses of the live user actors of a ``simpleSystemBase`` system."""
    base = asys._systemBase
    internal = set(getattr(base, "_internalAddresses", ()))
    out = []
    for key, ref in list(getattr(base, "actorRegistry", {}).items()):
        if key in internal or key.startswith("System:") or ref is None or not ref.instance:
            continue
        out.append(ref.address)
    return out


def start_actor(
    asys: ActorSystem,
    actor_class: type | str,
    start: Any,
    *,
    global_name: str | None = None,
    wait: bool = True,
    timeout: float = 30.0,
) -> ActorAddress:
    """Create an actor (registered as ``global_name`` if given) and send it ``start``.

    With ``wait`` this returns once the actor answered ``Started`` (it leads and has
    recovered) and raises the client's ``RequestFailed`` errors (``OutcomeUnknown`` on a timeout)
    otherwise; without, it only
    sends ``start`` (a standby that waits for leadership answers nobody).
    """
    from .client import ServiceClient

    address = asys.createActor(actor_class, globalName=global_name)
    with ServiceClient(asys, address, timeout=timeout) as client:
        if wait:
            client.call(start)
        else:
            client.tell(start)
    return address


def admin_address(host_port: str) -> ActorAddress:
    """The actor address of the TCP admin at ``HOST:PORT`` (another host's, say)."""
    from thespian.system.transport.IPBase import TCPv4ActorAddress

    host, port = split_host_port(host_port)
    return ActorAddress(TCPv4ActorAddress(host, port, external=True))


def _admin_status(asys: ActorSystem, timeout: float, admin: ActorAddress | None) -> Any:
    """The admin's ``Thespian_SystemStatus`` (None on the simple base, which has no admin)."""
    base = asys._systemBase
    if hasattr(base, "_globalNames") or not hasattr(base, "adminAddr"):  # the simple base
        return None
    from thespian.actors import Thespian_StatusReq, Thespian_SystemStatus

    with asys.private() as ctx:
        reply = ctx.ask(admin or base.adminAddr, Thespian_StatusReq(), timeout)
    if not isinstance(reply, Thespian_SystemStatus):
        raise SystemNotRunning(f"the actor system admin did not answer a status request in {timeout}s")
    return reply


def global_actors(asys: ActorSystem, timeout: float = 5.0,
                  admin: ActorAddress | None = None) -> dict[str, ActorAddress]:
    """Every registered global name and its address, asking the admin once (``admin``: another
    system's admin, see :func:`admin_address`; default the one ``asys`` belongs to). Creates
    nothing."""
    reply = _admin_status(asys, timeout, admin)
    if reply is None:
        base = asys._systemBase
        return {n: a for n, a in dict(getattr(base, "_globalNames", {})).items() if a is not None}
    return {n: a for n, a in (reply.globalActors or {}).items() if a is not None}


def convention_admins(asys: ActorSystem, timeout: float = 5.0) -> list[ActorAddress]:
    """The admins of the other actor systems in this one's convention: the leader's if it
    joined one, the members' if it leads one (asking its admin once; none on the simple
    base)."""
    reply = _admin_status(asys, timeout, None)
    if reply is None:
        return []
    found = [reply.conventionLeader, *(member for member, _ in reply.conventionAttendees or ())]
    out: list[ActorAddress] = []
    for admin in found:
        if admin is not None and admin != reply.adminAddress and admin not in out:
            out.append(admin)
    return out


def lookup(asys: ActorSystem, global_name: str, timeout: float = 5.0) -> ActorAddress | None:
    """The address of the actor registered under ``global_name``, or None. Creates nothing."""
    return global_actors(asys, timeout).get(global_name)


def replica_names(base: str, names: Iterable[str]) -> list[str]:
    """``base`` and ``base.N`` (the names of a component's replicas) among ``names``, in
    replica order."""
    out = []
    prefix = base + "."
    for name in names:
        if name == base:
            out.append((0, name))
        elif name.startswith(prefix) and name[len(prefix):].isdigit():
            out.append((int(name[len(prefix):]), name))
    return [name for _, name in sorted(out)]


__all__ = [
    "BASES",
    "LOOPBACK",
    "SIMPLE_BASE",
    "TCP_BASE",
    "SystemNotRunning",
    "admin_address",
    "attach_system",
    "convention_admins",
    "detach_system",
    "free_port",
    "global_actors",
    "lookup",
    "replica_names",
    "shutdown_system",
    "simple_actor_addresses",
    "start_actor",
    "start_system",
]
