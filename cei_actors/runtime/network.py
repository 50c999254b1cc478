"""Where a host's actor system listens, what address it advertises, and which peers it accepts.

A :class:`Network` is one host's transport settings (plan key ``network``, ``cei up --listen
--advertise --allow``, the EEAgent's ``--listen``/``--allow``):

- ``listen``: the IPv4 address every listening socket of the system binds (thespian binds
  ``''``, all interfaces; :func:`use_network` turns that into ``listen``). Default 127.0.0.1.
  A wildcard (``0.0.0.0``) is refused unless ``allow_wildcard`` is set, and then
  ``advertise`` must name a real address. IPv6 is refused: thespian's TCP transport is IPv4.
- ``advertise``: the address the system's actor addresses carry, which peers connect to
  (thespian's ``THESPIAN_BASE_IPADDR``). Default: ``listen``.
- ``allow``: the networks (CIDR) peers may connect from. Checked when a connection is
  accepted, before a byte of it is read (so before anything is unpickled; the HMAC check of
  :mod:`.secure` comes after, on every frame). Required when ``listen`` is not a loopback
  address; the host's own ``advertise``/``listen`` addresses are always allowed. A refused
  peer is logged once per address and process (then only counted).

The settings are process-wide (thespian's transport is): :func:`use_network` applies them to
this process and names them in the environment (``CEI_LISTEN``, ``CEI_ALLOW``,
``THESPIAN_BASE_IPADDR``), so the admin and actors forked from it and the processes it starts
(EEAgent "VMs") hold the same ones. See docs/decisions.md NH1-NH3.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADMIN_HOST_CAPABILITY",
    "ALLOW_ENV",
    "ADVERTISE_ENV",
    "LISTEN_ENV",
    "LOOPBACK",
    "Network",
    "NetworkError",
    "current_network",
    "peer_refusals",
    "split_host_port",
    "use_network",
]

LOOPBACK = "127.0.0.1"
LISTEN_ENV = "CEI_LISTEN"
ALLOW_ENV = "CEI_ALLOW"
#: thespian's own variable: the address its actor addresses carry.
ADVERTISE_ENV = "THESPIAN_BASE_IPADDR"
#: Capability naming the host of an admin that an external endpoint attaches to (ours, read by
#: the patched ``TCPTransport.getAdminAddr``; thespian assumes the admin is on this host).
ADMIN_HOST_CAPABILITY = "CEI Admin Host"
_WILDCARDS = ("", "0.0.0.0", None)


class NetworkError(ValueError):
    """Bad network settings (an address, a CIDR, a wildcard not allowed)."""


def _ipv4(value: Any, what: str) -> str:
    text = str(value).strip()
    if text == "localhost":
        return LOOPBACK
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise NetworkError(f"{what} {value!r}: expected an IPv4 address") from None
    if addr.version != 4:
        raise NetworkError(f"{what} {value!r}: IPv6 is not supported (thespian's TCP transport is IPv4)")
    return str(addr)


@dataclass(frozen=True)
class Network:
    """One host's transport settings (see the module docstring); build with :meth:`build`."""

    listen: str = LOOPBACK
    advertise: str = LOOPBACK
    allow: tuple[str, ...] = ()

    @classmethod
    def build(cls, listen: str | None = None, advertise: str | None = None,
              allow: Iterable[str] | str | None = (), allow_wildcard: bool = False) -> Network:
        """Validated settings; :class:`NetworkError` (one line) for anything wrong."""
        listen = _ipv4(listen or LOOPBACK, "listen")
        if isinstance(allow, str):
            allow = [a for a in allow.split(",") if a.strip()]
        nets: list[str] = []
        for entry in allow or ():
            try:
                net = ipaddress.ip_network(str(entry).strip(), strict=False)
            except ValueError:
                raise NetworkError(f"allow {entry!r}: expected a network in CIDR form, e.g. 198.18.0.0/24") from None
            if net.version != 4:
                raise NetworkError(f"allow {entry!r}: IPv6 is not supported")
            nets.append(str(net))
        if listen == "0.0.0.0":
            if not allow_wildcard:
                raise NetworkError("listen 0.0.0.0 binds every interface: refused unless allowed "
                                   "explicitly (plan network.allow_wildcard: true, or --allow-wildcard)")
            if advertise is None:
                raise NetworkError("listen 0.0.0.0 needs an advertise address (the one peers connect to)")
        advertise = _ipv4(advertise or listen, "advertise")
        if advertise == "0.0.0.0":
            raise NetworkError("advertise 0.0.0.0: peers cannot connect to it; name this host's address")
        if not ipaddress.ip_address(listen).is_loopback and not nets:
            raise NetworkError(f"listen {listen} is reachable from other hosts: name the peer networks "
                               "allowed to connect (plan network.allow, or --allow CIDR)")
        return cls(listen, advertise, tuple(nets))

    @classmethod
    def from_env(cls) -> Network:
        """The settings named in this process's environment (default: loopback)."""
        listen = os.environ.get(LISTEN_ENV) or LOOPBACK
        advertise = os.environ.get(ADVERTISE_ENV) or None
        return cls.build(listen, advertise, os.environ.get(ALLOW_ENV, ""),
                         allow_wildcard=listen == "0.0.0.0")

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.listen).is_loopback and ipaddress.ip_address(self.advertise).is_loopback

    def env(self) -> dict[str, str]:
        """The environment variables that carry these settings to other processes."""
        return {LISTEN_ENV: self.listen, ADVERTISE_ENV: self.advertise, ALLOW_ENV: ",".join(self.allow)}

    def permits(self, peer: str) -> bool:
        """Whether a connection from ``peer`` (an IP address) is accepted."""
        if not self.allow:
            return True  # loopback only: nothing else reaches the socket
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if getattr(addr, "ipv4_mapped", None) is not None:
            addr = addr.ipv4_mapped
        if str(addr) in (self.advertise, self.listen):
            return True
        return any(addr in ipaddress.ip_network(net) for net in self.allow)

    def as_dict(self) -> dict[str, Any]:
        return {"listen": self.listen, "advertise": self.advertise, "allow": list(self.allow)}


def split_host_port(value: str | int, default_host: str | None = None) -> tuple[str, int]:
    """``PORT`` or ``HOST:PORT`` (IPv4 host) as (host, port); ``default_host`` (else this
    process's advertised address) when only a port is given. :class:`NetworkError` if bad."""
    text = str(value).strip()
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise NetworkError(f"{value!r}: expected PORT or HOST:PORT")
    host = _ipv4(host, "host") if host else (default_host or current_network().advertise)
    return host, int(port)


# ------------------------------------------------------------------------ process-wide state

_state: dict[str, Any] = {"net": None, "patched": False}


def current_network() -> Network:
    """The settings this process uses (those of :func:`use_network`, else the environment's)."""
    net = _state["net"]
    if net is None:
        net = _state["net"] = Network.from_env()
    return net


def use_network(net: Network | None = None) -> Network:
    """Apply ``net`` (default: :func:`current_network`) to this process's thespian transport
    and environment; idempotent. Call it before a system starts or is attached to."""
    net = net or current_network()
    _state["net"] = net
    os.environ.update(net.env())
    from thespian.system.transport import IPBase

    IPBase.thisSystem.add_local_addr(net.advertise)
    if not _state["patched"]:
        _patch()
        _state["patched"] = True
    return net


def _patch() -> None:
    from thespian.actors import ActorAddress
    from thespian.system.transport import IPBase, TCPTransport

    def bind_args(self: Any) -> tuple[tuple[Any, ...]]:
        name = tuple(self.bindname)
        if name and name[0] in _WILDCARDS:
            name = (current_network().listen, *name[1:])
        return (name,)

    IPBase.IPActorAddress.bindArgs = property(bind_args, doc="Bind address: wildcards become CEI_LISTEN (cei_actors).")
    original_admin = TCPTransport.TCPTransport.getAdminAddr

    def get_admin_addr(capabilities: dict[str, Any]) -> Any:
        host = capabilities.get(ADMIN_HOST_CAPABILITY)
        if host:
            return ActorAddress(IPBase.TCPv4ActorAddress(host, capabilities.get("Admin Port"), external=True))
        return original_admin(capabilities)

    TCPTransport.TCPTransport.getAdminAddr = staticmethod(get_admin_addr)
    TCPTransport.TCPTransport._acceptNewIncoming = _accept_new_incoming


def _accept_new_incoming(self: Any) -> None:
    """thespian's ``TCPTransport._acceptNewIncoming`` with the allowlist check: a peer outside
    it is closed at once, before anything is read from it."""
    from thespian.actors import ActorAddress
    from thespian.system.transport import TCPTransport as tcp

    accepted = False
    try:
        lsock, peer = self.new_socket(self.socket.accept)
        accepted = True
    except OSError as ex:
        tcp.thesplog("Error accepting incoming: %s", ex)
    self._check_indicators()
    if not accepted or peer == self.myAddress:
        self._incomingEnvelopes.append(tcp.Thespian__UpdateWork())
    if not accepted:
        return
    if not current_network().permits(peer[0]):
        with contextlib.suppress(OSError):
            lsock.close()
        _refused_peer(peer[0])
        return
    lsock.setblocking(0)
    with contextlib.suppress(OSError):
        lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    incoming = tcp.TCPIncomingPersistent if hasattr(self, "_openSockets") else tcp.TCPIncoming
    self._incomingSockets[lsock.fileno()] = incoming(ActorAddress(None), lsock)


# ------------------------------------------------------------------------------ refusals

_log = logging.Logger("cei_actors.network")  # not in any manager: thespian replaces the root
_log.propagate = False
_lock = threading.Lock()
_refused: dict[str, int] = {}
#: Distinct peers remembered for "logged once" (past it, every new peer is still logged once
#: per this many refusals).
MAX_REMEMBERED = 1024


def _setup_log() -> None:
    from .secure import _handler

    _log.addHandler(_handler)


_setup_log()


def _refused_peer(peer: str) -> None:
    with _lock:
        first = peer not in _refused
        if first and len(_refused) >= MAX_REMEMBERED:
            _refused.clear()
        _refused[peer] = _refused.get(peer, 0) + 1
    if first:
        with contextlib.suppress(Exception):
            _log.warning("refused a connection from %s: not in the allowed networks %s (logged once "
                         "per peer)", peer, ",".join(current_network().allow))


def peer_refusals() -> dict[str, int]:
    """Connections this process refused by the allowlist, per peer address."""
    with _lock:
        return dict(_refused)
