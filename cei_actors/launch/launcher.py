"""The lightweight launcher: `up` a whole CEI system in the background, `connect` to it, `down`.

``up(plan, home)`` starts a thespian ``multiprocTCPBase`` system on 127.0.0.1 (or the plan's
``network`` addresses; its admin and
one process per actor outlive the caller), creates every component replica under a global
name (``pd``, ``epum``, ``provisioner`` for replica 0; ``pd.1``, ... for standbys), starts
them on the plan's log with each other as peers, loads the registry into the Provisioner,
starts the static nodes, writes ``HOME/system.json`` and returns. The actors' output goes to
``HOME/system.log``. ``connect(home)`` joins the running system as an external endpoint and
finds each component's leader; ``down(home)`` terminates every node, stops the components and
the actor system and checks that nothing is left running. The log stays: the next ``up``
recovers everything by replay.

Replicas: every replica contends for its stream's leadership (file lock next to a SQLite
log, ZooKeeper election for ``zk://``); the others are warm standbys. Clients find the
leader by asking each replica's ``Status``; ``connect`` also points the other components at
a new leader (``SetPeers``), which a new leader's own ``Hello`` to its peers and the EEAgents'
probes of the PD replicas make unnecessary after a failover. See docs/decisions.md L1-L6, F1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thespian.actors import ActorAddress, ActorSystem

from ..eeagent.supervisor import SupervisorError, read_table
from ..epum.client import EPUMClient
from ..ha.client import HAClient
from ..pd.client import PDClient
from ..plaindata import count
from ..private_files import private_dir, private_file, write_secret_file
from ..provisioner.client import ProvisionerClient
from ..provisioner.sealing import CredentialsKey
from ..runtime import procfs
from ..runtime.client import NotFound, OutcomeUnknown, RequestFailed, ServiceClient
from ..runtime.control import SetPeers, Start, Started, Status, Stop
from ..runtime.metrics import COLLECTOR_CLASS, COLLECTOR_NAME, ReportMetrics, ServeMetrics
from ..runtime.network import Network, NetworkError, current_network, split_host_port, use_network
from ..runtime.secure import (
    SECRET_FILE,
    ensure_secret_file,
    new_secret_file,
    read_secret,
    resolve_secret_file,
    use_secret_file,
)
from ..runtime.system import (
    SIMPLE_BASE,
    TCP_BASE,
    SystemNotRunning,
    admin_address,
    attach_system,
    convention_admins,
    detach_system,
    global_actors,
    lookup,
    replica_names,
    shutdown_system,
    start_system,
)
from ..subscribe import Watcher
from .plan import (
    COMPONENTS,
    CREDENTIALS_KEY_FILE,
    DEFAULT_SOURCE,
    REQUIRED,
    Plan,
    load_plan,
    shown_log_url,
)

__all__ = [
    "ACTOR_CLASSES",
    "Connection",
    "LaunchError",
    "NotRunning",
    "Progress",
    "announce_replicas",
    "connect",
    "down",
    "read_info",
    "remembered_log_url",
    "replica_name",
    "replicas_everywhere",
    "secure_home",
    "start_components",
    "start_replica",
    "stop_components",
    "sweep_leftovers",
    "up",
]

#: Actor class of each component.
ACTOR_CLASSES = {
    "provisioner": "cei_actors.provisioner.actor.ProvisionerActor",
    "epum": "cei_actors.epum.actor.EPUMActor",
    "pd": "cei_actors.pd.actor.ProcessDispatcherActor",
    "ha": "cei_actors.ha.actor.HAActor",
}
AGENT_CLASS = "cei_actors.eeagent.actor.EEAgentActor"
INFO_FILE = "system.json"
#: The log URL of the last system started in the home (kept after ``down``).
LOG_URL_FILE = "log.url"
LOG_FILE = "system.log"
START_TIMEOUT = 60.0
#: Errors of a failed recovery that retrying cannot cure (the stored data is bad): ``up`` and
#: the embedding API report them as soon as the component reports them (``Status.last_error``).
FATAL_RECOVERY_ERRORS = ("CorruptLog", "UnknownEventType", "NewerEventVersion")

#: A progress callback: one human-readable line per step.
Progress = Callable[[str], None]


class LaunchError(RuntimeError):
    """The system could not be started (or is already up)."""


class NotRunning(RuntimeError):  # noqa: N818 - the name the CLI and embedders catch
    """No system is up in this home (no system.json, or its admin does not answer)."""


def replica_name(component: str, index: int) -> str:
    """Global actor name of a replica: ``pd`` for the first, ``pd.1``, ``pd.2`` ... after."""
    return component if index == 0 else f"{component}.{index}"


def agent_name(node_id: str) -> str:
    """Global actor name of a static node's EEAgent."""
    return f"eeagent.{node_id}"


# ---------------------------------------------------------------------------------------- up


def up(plan: Plan, home: Path, progress: Progress | None = None, *,
       join: int | str | None = None, secret_file: str | Path | None = None,
       network: Network | None = None, admin_port: int | None = None,
       peers: list[str] | None = None) -> dict[str, Any]:
    """Start ``plan`` in the background; return the contents of ``HOME/system.json``.

    ``network`` (default the plan's ``network``; loopback) is where this host's system listens,
    what it advertises and which peer networks it accepts (:mod:`..runtime.network`);
    ``admin_port`` (default the plan's, else a free one) its admin's port.
    ``join`` (``PORT`` or ``HOST:PORT``; default the plan's ``network.join``): make this
    actor system a member of the convention led by that admin (another host's system);
    ``peers`` (default the plan's ``network.peers``): other hosts' admins (``HOST:PORT``).
    The components of every one of them that answers are found by their global names: the
    ones this plan does not run become its components' peers, and every replica learns every
    other's (see docs/multi-host.md). The secret: ``secret_file`` (else the plan's
    ``network.secret_file``; with ``join`` and neither, ``$CEI_SECRET_FILE``) becomes this
    home's ``secret``; else the home keeps its own (created at the first ``up``). Every
    message of the system is authenticated with it (docs/decisions.md TA1).

    Raises :class:`LaunchError` if a system is already up in ``home`` or a component does
    not become ready (whatever was started is shut down again).
    """
    home = Path(home).expanduser().resolve()
    say = progress or (lambda _line: None)
    net = use_network(network or plan.network)
    join = join if join is not None else plan.join
    peers = list(plan.peers if peers is None else peers)
    admin_port = admin_port or plan.admin_port
    secure_home(home, say)

    given = secret_file or plan.secret_file
    shared_secret = read_secret(resolve_secret_file(given)) if given or join is not None else None
    # this home's secret: the previous system here (probed below) holds it
    secret = use_secret_file(ensure_secret_file(home / SECRET_FILE))
    old = read_info(home)
    if old is not None:
        if not _admin_gone(old) and _port_answers(old["admin_port"]):
            raise LaunchError(f"a system is already up in {home} (admin port {old['admin_port']}); "
                              "run `cei down` first")
        say("the previous system is gone without `down`; cleaning up what it left")
        sweep_leftovers([Path(d) for d in old.get("node_dirs", [])] + [home / "static"],
                        _recorded_pids(old), settle=0.0)
        (home / INFO_FILE).unlink(missing_ok=True)
    log_path = home / LOG_FILE
    say(f"starting the actor system ({TCP_BASE}, {net.listen}"
        f"{'' if net.advertise == net.listen else ' advertised as ' + net.advertise}), output in {log_path}")
    remote = None
    if shared_secret is not None:  # one system, one key
        use_secret_file(new_secret_file(secret, shared_secret))
    if join is not None:
        join = _address_of(join)
        try:
            remote = attach_system(join)
        except SystemNotRunning as exc:
            raise LaunchError(f"cannot join {join}: {exc}") from None
    try:
        with _stdio_to(log_path):
            asys = start_system(TCP_BASE, admin_port=admin_port, convention=join, log_defs=log_defs(log_path))
        try:
            info = start_components(asys, plan, home, say, remote=remote,
                                    peer_admins=[_address_of(p) for p in peers])
            info["admin_pid"] = _listener_pid(info["admin_port"])
            # the admin's children: the actors and thespian's logger, which outlives a killed admin
            info["helper_pids"] = [p for p in _children(info["admin_pid"]) if p not in _system_pids(info)]
            info["pid_starts"] = {str(pid): _start_ticks(pid) for pid in _system_pids(info)}
            write_info(home, info)
            remember_log_url(home, plan.log_url)
        except BaseException:  # a failure or an interrupt: nothing of this start is left
            with contextlib.suppress(Exception):
                shutdown_system(asys)
            sweep_leftovers(_node_dirs(plan, home))
            (home / INFO_FILE).unlink(missing_ok=True)
            raise
        detach_system(asys)  # the system runs on without this process
    finally:
        if remote is not None:
            detach_system(remote)
    say(f"up: admin on {info['admin_host']}:{info['admin_port']}, log {shown_log_url(plan.log_url)}")
    return info


def start_components(asys: ActorSystem, plan: Plan, home: Path, say: Progress,
                     remote: ActorSystem | None = None, peer_admins: list[str] = ()) -> dict[str, Any]:
    """Create and start every replica, load the registry, start static nodes (shared with embed).

    ``remote``: a handle on the admin of the convention this system joined; ``peer_admins``:
    other hosts' admins (``HOST:PORT``). Their replicas are looked up by name (an admin that
    does not answer is skipped, with a note): components the plan does not run become peers,
    every replica here learns every replica there and the reverse. A component that also runs
    elsewhere is started here as standbys (its leader is over there).
    """
    secure_home(home, say)
    ensure_credentials_key(plan, home, say)
    port = getattr(asys, "cei_admin_port", None)
    addresses: dict[str, list[ActorAddress]] = {}
    for comp in COMPONENTS:
        if comp in plan.components:
            n = plan.components[comp].replicas
            addresses[comp] = [asys.createActor(ACTOR_CLASSES[comp], globalName=replica_name(comp, i))
                               for i in range(n)]
    peers = {comp: addrs[0] for comp, addrs in addresses.items()}
    admins: list[tuple[str, ActorAddress | None]] = []
    if remote is not None:
        admins.append((f"{remote.cei_admin_host}:{remote.cei_admin_port}", None))
    admins += [(p, admin_address(p)) for p in peer_admins]
    elsewhere: list[tuple[str, dict[str, list[ActorAddress]]]] = []
    remote_replicas: dict[str, list[ActorAddress]] = {}
    for label, admin in admins:
        try:
            registered = global_actors(remote if admin is None else asys, timeout=5.0, admin=admin)
        except SystemNotRunning:
            if admin is None:
                raise LaunchError(f"the joined system at {label} does not answer") from None
            say(f"the admin at {label} does not answer: skipped")
            continue
        found = {c: [registered[n] for n in replica_names(c, registered)] for c in COMPONENTS}
        found = {c: v for c, v in found.items() if v}
        elsewhere.append((label, found))
        for comp, replicas in found.items():
            known = remote_replicas.setdefault(comp, [])
            known += [r for r in replicas if r not in known]
    remote_peers = {comp: found[0] for comp, found in remote_replicas.items() if comp not in peers}
    every = {c: [*addresses.get(c, []), *remote_replicas.get(c, [])] for c in COMPONENTS}
    every = {c: v for c, v in every.items() if v}
    # Every replica over there learns every replica here (the whole list: SetPeers replaces
    # it), and the components it lacks that this system runs, so whichever leads there, now or
    # after a failover, greets the ones here (and the reverse, through Start).
    for label, found in elsewhere:
        tell = SetPeers({c: a for c, a in peers.items() if c not in found},
                        replicas={c: list(every[c]) for c in addresses})
        for comp, replicas in found.items():
            answered = 0
            for address in replicas:
                try:
                    with ServiceClient(asys, address, timeout=10.0) as client:
                        client.call(tell)
                    answered += 1
                except (RequestFailed, OutcomeUnknown) as exc:
                    say(f"{comp} replica at {address} did not take this system's peers: {exc}")
            if not answered and comp in remote_peers:
                raise LaunchError(f"no replica of {comp} in the system at {label} answers")
    metrics = start_metrics(asys, plan, say)
    if metrics is not None:  # before any Start, in one go: no time added between the Starts
        _tell_each(asys, [(address, ReportMetrics(metrics[0], replica_name(comp, i), plan.metrics["interval"]))
                          for comp, addrs in addresses.items() for i, address in enumerate(addrs)])
    needed = {"pd"} if plan.static_nodes else set(REQUIRED)
    missing = sorted(needed - set(peers) - set(remote_peers))
    if missing and admins:
        raise LaunchError(f"no {', '.join(missing)}: neither in this plan's components nor in "
                          f"the system(s) at {', '.join(label for label, _ in admins)}")
    if missing:
        say(f"this system runs no {', '.join(missing)}: another system must join it (multi-host)")
    peers.update(remote_peers)
    heads: dict[str, int] = {}
    for comp, addrs in addresses.items():
        start = Start(plan.log_url, config=plan.start_config(comp),
                      peers={k: v for k, v in peers.items() if k != comp},
                      replicas={k: list(v) for k, v in every.items() if k != comp and len(v) > 1})
        say(f"starting {comp} ({count(len(addrs), 'replica')})")
        if comp in remote_replicas:  # it leads elsewhere: these are standbys
            for replica in addrs:
                with ServiceClient(asys, replica) as other:
                    other.tell(start)
            _wait_started(asys, comp, addrs)
            say(f"{comp} started here as standby: another host's replica leads")
            continue
        started = _start_first(asys, comp, addrs[0], start)
        for standby in addrs[1:]:
            with ServiceClient(asys, standby) as other:
                other.tell(start)
        heads[comp] = started.head
        say(f"{comp} ready: leads stream {started.stream!r} at epoch {started.epoch}, "
            f"replayed {count(started.head, 'event')}")
    own = None if port is None else f"{current_network().advertise}:{port}"
    # EEAgents join the system whose admin knows the PD by name
    if "provisioner" in addresses:
        agent_admin = own if "pd" in addresses or remote is None else \
            f"{remote.cei_admin_host}:{remote.cei_admin_port}"
        load_registry(ProvisionerClient(ServiceClient(asys, _serving(asys, every["provisioner"]))),
                      plan, agent_admin, say)
    elif "provisioner" in peers and "pd" in addresses:
        point_agents_at(ProvisionerClient(ServiceClient(asys, _serving(asys, every["provisioner"]))),
                        own, say)
    agents: list[str] = []
    if "pd" in addresses:
        pd_leader = _serving(asys, every["pd"])
        pd = PDClient(ServiceClient(asys, pd_leader, timeout=30.0))
        if heads.get("pd", 0) > 0:
            # The previous run's nodes are gone (down terminated them): evacuate and requeue.
            pd.set_system_boot(True)
            pd.set_system_boot(False)
        agents = start_static_nodes(asys, plan, home, every["pd"], pd, say, leader=pd_leader,
                                    metrics=metrics[0] if metrics is not None else None)
    pids = {}
    for comp, addrs in addresses.items():
        for i, addr in enumerate(addrs):
            with ServiceClient(asys, addr, timeout=10.0) as client:
                pids[replica_name(comp, i)] = client.call(Status())["pid"]
    if metrics is not None:
        pids[COLLECTOR_NAME] = metrics[1]["pid"]
    net = current_network()
    return {
        "admin_port": port,
        "admin_host": net.advertise,
        "network": net.as_dict(),
        "base": getattr(asys, "cei_base", TCP_BASE),
        "log_url": plan.log_url,
        "plan": plan.source,
        "home": str(home),
        "components": {comp: [replica_name(comp, i) for i in range(len(addrs))]
                       for comp, addrs in addresses.items()},
        "remote": ({"admin_port": remote.cei_admin_port, "admin_host": remote.cei_admin_host,
                    "components": sorted(remote_peers)}
                   if remote is not None else None),
        "peer_admins": list(peer_admins),
        "static_nodes": agents,
        "node_dirs": [str(d) for d in _node_dirs(plan, home)],
        "pids": pids,
        "metrics": ({k: metrics[1][k] for k in ("address", "port", "url")} if metrics is not None
                    else None),
        "started_at": time.time(),
    }


def replicas_everywhere(asys: ActorSystem, info: dict[str, Any],
                        timeout: float = 5.0) -> dict[str, list[ActorAddress]]:
    """Every replica of each component registered now, on this system and on the systems it
    is joined with: the other admins of its convention (the one it joined, or those that
    joined it) and its peer admins (``network.peers``). An admin that does not answer is
    skipped. In replica order, this system's first."""
    admins: list[ActorAddress | None] = [None, *convention_admins(asys, timeout)]
    admins += [a for a in (admin_address(p) for p in info.get("peer_admins") or ()) if a not in admins]
    out: dict[str, list[ActorAddress]] = {}
    for admin in admins:
        try:
            registered = global_actors(asys, timeout, admin=admin)
        except SystemNotRunning:
            if admin is None:
                raise
            continue
        for comp in COMPONENTS:
            known = out.setdefault(comp, [])
            known += [registered[n] for n in replica_names(comp, registered) if registered[n] not in known]
    return {c: v for c, v in out.items() if v}


def announce_replicas(asys: ActorSystem, component: str,
                      every: dict[str, list[ActorAddress]]) -> list[ActorAddress]:
    """Tell every replica of the other components in ``every`` (here and on the joined
    systems) the whole list of ``component``'s replicas (``SetPeers.replicas`` replaces it;
    a leader among them greets the new ones at once), so a replica started after the join is
    known everywhere. Returns the replicas that did not answer."""
    tell = SetPeers({}, replicas={component: list(every.get(component, []))})
    missed = []
    for other, addresses in every.items():
        if other == component:
            continue
        for address in addresses:
            try:
                with ServiceClient(asys, address, timeout=10.0) as client:
                    client.call(tell)
            except (RequestFailed, OutcomeUnknown):
                missed.append(address)
    return missed


def start_replica(conn: Connection, component: str, index: int,
                  config: dict[str, Any] | None = None) -> ActorAddress:
    """(Re)start replica ``index`` of ``component`` on the system of ``conn`` under its name,
    e.g. after it died (it gets a new address): a standby while another replica leads. Its
    ``Start`` names every replica of the other components, here and on the joined systems
    (:func:`replicas_everywhere`), their leaders as its peers; then it is announced to all of
    them (:func:`announce_replicas`), so their lists follow across systems (decision OP10).
    ``config``: the component's start config (default: the plan's, as ``up`` gave it). Its
    pid is recorded in ``system.json`` (``down`` sweeps it)."""
    asys, info = conn.asys, conn.info
    name = replica_name(component, index)
    if component not in info["components"] or name not in info["components"][component]:
        raise LaunchError(f"{name} is not a replica of this system (its plan runs "
                          f"{', '.join(info['components'].get(component, [])) or f'no {component}'})")
    if lookup(asys, name) is not None:
        raise LaunchError(f"{name} runs already")
    home = Path(info["home"])
    source = info.get("plan")
    plan = load_plan(None if source in (None, DEFAULT_SOURCE) else Path(source), home=home, log_url=info["log_url"])
    every = replicas_everywhere(asys, info)
    peers = {}
    for other, addresses in every.items():
        if other != component:
            try:  # asked once, not waited for
                peers[other] = _serving(asys, addresses, timeout=0.0)
            except LaunchError:  # none leads now: the first; a leader's Hello corrects it
                peers[other] = addresses[0]
    new = asys.createActor(ACTOR_CLASSES[component], globalName=name)
    collector = lookup(asys, COLLECTOR_NAME) if plan.metrics is not None else None
    with ServiceClient(asys, new, timeout=30.0) as client:
        if collector is not None:
            client.tell(ReportMetrics(collector, name, plan.metrics["interval"]))
        client.tell(Start(plan.log_url, config=plan.start_config(component) if config is None else config,
                          peers=peers, replicas={c: list(v) for c, v in every.items() if c != component}))
        pid = client.call(Status())["pid"]
    announce_replicas(asys, component, replicas_everywhere(asys, info))
    info.setdefault("pids", {})[name] = pid
    info.setdefault("pid_starts", {})[str(pid)] = _start_ticks(pid)
    write_info(home, info)
    return new


def _wait_started(asys: ActorSystem, comp: str, addrs: list[ActorAddress]) -> None:
    """Wait (``START_TIMEOUT``) until every replica answers ``Status`` past its start."""
    deadline = time.monotonic() + START_TIMEOUT
    for address in addrs:
        while True:
            try:
                with ServiceClient(asys, address, timeout=2.0) as client:
                    mode = client.call(Status()).get("mode")
            except (RequestFailed, OutcomeUnknown):
                mode = None
            if mode not in (None, "idle"):
                break
            if time.monotonic() > deadline:
                raise LaunchError(f"{comp} replica at {address} did not start (mode {mode})")
            time.sleep(0.2)


def _serving(asys: ActorSystem, replicas: list[ActorAddress], timeout: float = START_TIMEOUT) -> ActorAddress:
    """The replica among ``replicas`` that leads and is ready (waiting up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        for address in replicas:
            try:
                with ServiceClient(asys, address, timeout=2.0) as client:
                    status = client.call(Status())
            except (RequestFailed, OutcomeUnknown):
                continue
            if status.get("ready") and status.get("leader"):
                return address
        if time.monotonic() > deadline:
            raise LaunchError(f"no replica of {len(replicas)} leads and is ready")
        time.sleep(0.2)


def start_metrics(asys: ActorSystem, plan: Plan,
                  say: Progress) -> tuple[ActorAddress, dict[str, Any]] | None:
    """Start the host's metrics collector (global name ``metrics``) serving on the plan's
    ``metrics`` address and port; returns its address and where it serves (None: off)."""
    if plan.metrics is None:
        return None
    address = asys.createActor(COLLECTOR_CLASS, globalName=COLLECTOR_NAME)
    try:
        with ServiceClient(asys, address, timeout=15.0) as client:
            where = client.call(ServeMetrics(plan.metrics["address"], plan.metrics["port"]))
    except (RequestFailed, OutcomeUnknown) as exc:
        raise LaunchError(f"{exc.message} (the plan's metrics: port, address)") from None
    say(f"metrics on {where['url']}")
    return address, where


def _start_first(asys: ActorSystem, comp: str, address: ActorAddress, start: Start) -> Started:
    """Send ``start`` to a component's first replica and wait (``START_TIMEOUT``) for ``Started``.

    While it waits it asks the replica's ``Status`` every half second: a recovery that failed
    for a reason waiting does not cure (``FATAL_RECOVERY_ERRORS``) ends the wait at once with
    the replica's own reason; a timeout names the last error the replica reported.
    """
    last: dict[str, str] = {}
    with ServiceClient(asys, address, timeout=START_TIMEOUT) as client, \
            ServiceClient(asys, address, timeout=2.0) as probe:

        def waiting() -> None:
            try:
                error = probe.call(Status()).get("last_error")
            except (RequestFailed, OutcomeUnknown):
                return
            if error:
                last.update(error)
                if error.get("type") in FATAL_RECOVERY_ERRORS:
                    raise LaunchError(f"{comp} cannot recover from its log: "
                                      f"{error['type']}: {error.get('message')}")

        try:
            started = client.call(start, waiting=waiting, every=0.5)
        except (RequestFailed, OutcomeUnknown) as exc:
            why = f" (last error: {last['type']}: {last.get('message')})" if last else ""
            raise LaunchError(f"{comp} did not start: {exc.message}{why}") from None
    if not isinstance(started, Started):
        raise LaunchError(f"{comp} did not start: {started!r}")
    return started


def load_registry(prov: ProvisionerClient, plan: Plan, admin: str | None, say: Progress) -> None:
    """Add or update the plan's sites, deployable types and credentials; enable provisioning."""
    reg = plan.registry
    for name, site in reg["sites"].items():
        site = dict(site)
        if site.get("type") == "local":
            if admin is None:
                raise LaunchError(f"site {name!r}: the local cloud needs the TCP base "
                                  "(its EEAgent processes join the system by its admin port)")
            site["vars"] = {**(site.get("vars") or {}), **_admin_vars(admin)}
        _put(prov.describe_site, prov.add_site, prov.update_site, name, site)
    for name, dt in reg["deployable_types"].items():
        _put(prov.describe_dt, prov.add_dt, prov.update_dt, name, dict(dt))
    for site, creds in reg["credentials"].items():
        _put(prov.describe_credentials, prov.add_credentials, prov.update_credentials, site, dict(creds))
    prov.enable()  # `down` disabled it; does nothing when already enabled
    say(f"registry: {count(len(reg['sites']), 'site')}, {count(len(reg['deployable_types']), 'deployable type')}, "
        f"{count(len(reg['credentials']), 'credential set')}")


def point_agents_at(prov: ProvisionerClient, admin: str, say: Progress) -> None:
    """Make the local sites of a (remote) Provisioner start EEAgents that join ``admin``
    (``HOST:PORT``)."""
    for name in prov.list_sites():
        site = prov.describe_site(name)
        wanted = _admin_vars(admin)
        have = site.get("vars") or {}
        if site.get("type") == "local" and any(have.get(k) != v for k, v in wanted.items()):
            prov.update_site(name, {**site, "vars": {**have, **wanted}})
            say(f"site {name}: new nodes join {admin}")


def _admin_vars(admin: str) -> dict[str, Any]:
    """A local site's command variables for the admin its EEAgents join: ``{admin}``
    (``HOST:PORT``) and ``{admin_port}``."""
    return {"admin": admin, "admin_port": int(admin.rpartition(":")[2])}


def _put(describe: Callable, add: Callable, update: Callable, name: str, value: dict) -> None:
    try:
        current = describe(name)
    except NotFound:
        add(name, value)
        return
    if current != value:
        update(name, value)


def start_static_nodes(asys: ActorSystem, plan: Plan, home: Path, pd_replicas: list[ActorAddress],
                       pd: PDClient, say: Progress, leader: ActorAddress | None = None,
                       metrics: ActorAddress | None = None) -> list[str]:
    """Start an in-system EEAgent per static node and announce it to the PD (and tell it to
    report to the ``metrics`` collector, if any).

    Every PD replica (this host's and the others') holds the agent as a peer, so the one that
    leads after a failover says ``Hello`` to it and the agent follows (``leader``, default
    ``pd_replicas[0]``, leads at first)."""
    if not plan.static_nodes:
        return []
    from ..eeagent.actor import AgentConfig
    from ..pd.logic import parse_config

    cfg = parse_config(plan.start_config("pd"))
    names = []
    for node in plan.static_nodes:
        engine = plan.engine_of(node)
        name = agent_name(node.node_id)
        addr = asys.createActor(AGENT_CLASS, globalName=name)
        conf = AgentConfig(node.node_id, node.node_id, node.slots,
                           str(home / "static" / node.node_id), leader or pd_replicas[0],
                           heartbeat_interval=float(engine.get("heartbeat_period", 30.0)), grace=2.0)
        _ask_bare(asys, addr, conf)
        if metrics is not None:
            _ask_bare(asys, addr, ReportMetrics(metrics, f"eeagent:{node.node_id}",
                                                plan.metrics["interval"]))
        for replica in pd_replicas:
            with ServiceClient(asys, replica, timeout=10.0) as client:
                client.call(SetPeers({f"eeagent:{node.node_id}": addr}))
        pd.node_state(node.node_id, cfg.domain_id(node.engine), "RUNNING")
        names.append(name)
    say(f"static nodes: {', '.join(n.node_id for n in plan.static_nodes)}")
    return names


def _tell_each(asys: ActorSystem, messages: list[tuple[ActorAddress, Any]]) -> None:
    """Tell each address its message (as a ``Request`` wanting no reply) from one endpoint."""
    from ..runtime.control import Request

    if getattr(asys, "cei_base", None) == SIMPLE_BASE:
        for address, message in messages:
            asys.tell(address, Request("", message))
        return
    with asys.private() as ctx:
        for address, message in messages:
            ctx.tell(address, Request("", message))


def _ask_bare(asys: ActorSystem, address: ActorAddress, message: Any, timeout: float = 20.0) -> Any:
    from ..runtime.client import unwrap

    if getattr(asys, "cei_base", None) == SIMPLE_BASE:
        return unwrap(asys.ask(address, message, timeout))
    with asys.private() as ctx:
        return unwrap(ctx.ask(address, message, timeout))


# ------------------------------------------------------------------------------------ connect


@dataclass
class _Member:
    name: str
    address: ActorAddress | None
    status: dict[str, Any] | None


class Connection:
    """Clients for a running system: ``.pd``, ``.epum``, ``.provisioner`` talk to the leaders.

    Each component's leader is found once (on first use) and kept: after a failover, connect
    again (or call :meth:`close` and use a new connection).
    """

    def __init__(self, asys: ActorSystem, info: dict[str, Any], timeout: float = 10.0,
                 owned: bool = False, watch: bool = True) -> None:
        """``watch``: the ``pd`` and ``ha`` clients wait by following the logs (a
        :class:`~cei_actors.subscribe.Watcher` started on first use, stopped by :meth:`close`)
        instead of asking again and again; not for a ``memory://`` log."""
        self.asys = asys
        self.info = info
        self.timeout = timeout
        self._owned = owned  # embed: closing does not detach, the owner stops the system
        self._services: dict[str, ServiceClient] = {}
        self._remote: ActorSystem | None = None
        self._watch = watch and not str(info.get("log_url") or "").startswith("memory://")
        self._watcher: Watcher | None = None
        self._watch_lock = threading.Lock()

    def watcher_args(self) -> dict[str, Any]:
        """What a :class:`~cei_actors.subscribe.Watcher` of this system's logs is made with."""
        running = set(self.info["components"]) | set((self.info.get("remote") or {}).get("components", []))
        return {"log": self.info["log_url"], "epum": "epum" if "epum" in running else None,
                "ha": "ha" if "ha" in running else None}

    def watcher(self) -> Watcher:
        """The connection's shared log watcher, started on first use."""
        with self._watch_lock:
            if self._watcher is None or not self._watcher.running:
                self._watcher = Watcher(**self.watcher_args()).start()
            return self._watcher

    def _where(self, component: str) -> tuple[list[str], ActorSystem | None]:
        """The replica names of ``component`` and a handle on the admin that knows them."""
        if component in self.info["components"]:
            return self.info["components"][component], self.asys
        remote = self.info.get("remote") or {}
        if component in remote.get("components", []):
            if self._remote is None:
                try:
                    self._remote = attach_system(
                        f"{remote.get('admin_host') or current_network().advertise}:{remote['admin_port']}")
                except SystemNotRunning:
                    return [component], None
            return [component], self._remote
        raise NotRunning(f"this system runs no {component}")

    def members(self, component: str) -> list[_Member]:
        """Every replica of ``component`` with its status (None if it does not answer)."""
        out = []
        names, admin = self._where(component)
        for name in names:
            address = lookup(admin, name) if admin is not None else None
            status = None
            if address is not None:
                try:
                    with ServiceClient(self.asys, address, timeout=min(self.timeout, 5.0)) as c:
                        status = c.call(Status())
                except (RequestFailed, OutcomeUnknown):
                    status = None
            out.append(_Member(name, address, status))
        return out

    def leader(self, component: str) -> ActorAddress:
        """The address of ``component``'s serving replica (else its first live one)."""
        members = self.members(component)
        for i, member in enumerate(members):
            if member.status and member.status.get("ready"):
                if i > 0:
                    self._repoint(component, member.address)
                return member.address  # type: ignore[return-value]
        for member in members:
            if member.address is not None:
                return member.address
        raise NotRunning(f"no replica of {component} answers")

    def _repoint(self, component: str, address: ActorAddress | None) -> None:
        """Point the other components at ``component``'s new leader."""
        for other, names in self.info["components"].items():
            if other == component:
                continue
            for name in names:
                target = lookup(self.asys, name)
                if target is not None:
                    with contextlib.suppress(RequestFailed, OutcomeUnknown), \
                            ServiceClient(self.asys, target, timeout=5.0) as c:
                        c.call(SetPeers({component: address}))

    def service(self, component: str) -> ServiceClient:
        """The request/response client of ``component``'s leader (found once, then kept)."""
        svc = self._services.get(component)
        if svc is None:
            svc = self._services[component] = ServiceClient(self.asys, self.leader(component),
                                                            timeout=self.timeout)
        return svc

    @property
    def pd(self) -> PDClient:
        return PDClient(self.service("pd"), changes=self.watcher if self._watch else None)

    @property
    def epum(self) -> EPUMClient:
        return EPUMClient(self.service("epum"))

    @property
    def provisioner(self) -> ProvisionerClient:
        return ProvisionerClient(self.service("provisioner"))

    @property
    def ha(self) -> HAClient:
        return HAClient(self.service("ha"), changes=self.watcher if self._watch else None)

    def status(self) -> dict[str, Any]:
        """Per component its replicas (leader, ready, epoch, head, pid) and what it holds."""
        out: dict[str, Any] = {"admin_port": self.info.get("admin_port"),
                               "log_url": self.info.get("log_url"), "components": {},
                               "metrics_url": (self.info.get("metrics") or {}).get("url")}
        keys = ("mode", "ready", "leader", "epoch", "head", "pid", "since", "last_error")
        remote = (self.info.get("remote") or {}).get("components", [])
        for comp in [*self.info["components"], *remote]:
            out["components"][comp] = [
                {"name": m.name, "running": m.status is not None,
                 **{k: (m.status or {}).get(k) for k in keys}}
                for m in self.members(comp)
            ]
        # only components that serve are asked (one that does not would cost a timeout)
        serving = {c for c, replicas in out["components"].items() if any(r["ready"] for r in replicas)}
        if "pd" in serving:
            with contextlib.suppress(RequestFailed, OutcomeUnknown, NotRunning):
                out["processes"] = self.pd.process_counts()
        if "epum" in serving:
            with contextlib.suppress(RequestFailed, OutcomeUnknown, NotRunning):
                out["domains"] = self.epum.list_domains()
        if "provisioner" in serving:
            with contextlib.suppress(RequestFailed, OutcomeUnknown, NotRunning):
                nodes: dict[str, int] = {}
                for node in self.provisioner.describe_nodes():
                    nodes[node["state"]] = nodes.get(node["state"], 0) + 1
                out["nodes"] = nodes
        return out

    def close(self) -> None:
        """Release the clients, the watcher and this process's endpoint (the system keeps
        running)."""
        with self._watch_lock:
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
        for svc in self._services.values():
            svc.close()
        self._services.clear()
        if self._remote is not None:
            detach_system(self._remote)
            self._remote = None
        if not self._owned:
            detach_system(self.asys)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _adopt_network(info: dict[str, Any]) -> None:
    """A process still on the default (loopback) settings takes the system's own (a CLI on
    that host); one configured otherwise keeps its own (a test on the hosts' bridge)."""
    recorded = info.get("network")
    if recorded and current_network() == Network() and not Network(**{
            **recorded, "allow": tuple(recorded.get("allow", ()))}).is_loopback:
        use_network(Network(recorded["listen"], recorded["advertise"], tuple(recorded.get("allow", ()))))


def connect(home: Path, timeout: float = 10.0) -> Connection:
    """A :class:`Connection` to the system up in ``home``; :class:`NotRunning` if there is none."""
    home = Path(home).expanduser().resolve()
    info = read_info(home)
    if info is None:
        raise NotRunning(f"system not up in {home} (no {INFO_FILE}): run `cei up`")
    if _admin_gone(info):
        raise NotRunning(f"system not up in {home}: its admin (pid {info['admin_pid']}) is gone")
    if not (home / SECRET_FILE).exists():
        raise NotRunning(f"system not up in {home}: no {SECRET_FILE} file to talk to it with "
                         f"(stale {INFO_FILE}?)")
    use_secret_file(home / SECRET_FILE)
    _adopt_network(info)
    admin = f"{info.get('admin_host') or current_network().advertise}:{info['admin_port']}"
    try:
        asys = attach_system(admin)
    except SystemNotRunning:
        raise NotRunning(f"system not up in {home}: nothing answers on {admin} "
                         f"(stale {INFO_FILE}?)") from None
    return Connection(asys, info, timeout)


# --------------------------------------------------------------------------------------- down


def down(home: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Terminate every node, stop the components and the actor system; the log stays.

    Returns what was done; after it returns no EEAgent, node process or actor process of
    this system is left (anything that resisted is SIGKILLed and reported in ``killed``).
    """
    home = Path(home).expanduser().resolve()
    say = progress or (lambda _line: None)
    info = read_info(home)
    if info is None:
        raise NotRunning(f"system not up in {home} (no {INFO_FILE})")
    result: dict[str, Any] = {"home": str(home), "stopped": [], "nodes_terminated": None, "killed": []}
    try:
        conn = connect(home)
    except NotRunning:
        conn = None
        say("the actor system does not answer; cleaning up what it left")
    if conn is not None:
        try:
            stop_components(conn, say, result)
        finally:
            conn.close()
        with contextlib.suppress(SystemNotRunning):
            asys = attach_system(f"{info.get('admin_host') or current_network().advertise}:{info['admin_port']}")
            asys.shutdown()
        say("actor system shut down")
    node_dirs = [Path(d) for d in info.get("node_dirs", [])] + [home / "static"]
    result["killed"] = sweep_leftovers(node_dirs, _recorded_pids(info))
    (home / INFO_FILE).unlink(missing_ok=True)
    say("down" + (f" (killed leftovers: {result['killed']})" if result["killed"] else ""))
    return result


def stop_components(conn: Connection, say: Progress, result: dict[str, Any]) -> None:
    """Terminate the nodes (while EPUM and the PD still listen), stop agents, then replicas."""
    asys = conn.asys
    if "provisioner" in conn.info["components"]:
        say("terminating every node")
        try:
            result["nodes_terminated"] = conn.provisioner.terminate_all(wait=True, timeout=60.0)
        except (RequestFailed, OutcomeUnknown, NotRunning) as exc:
            say(f"terminate-all failed ({exc}); the local nodes are cleaned up directly")
    from ..eeagent.actor import AgentStop

    for name in conn.info.get("static_nodes", []):
        address = lookup(asys, name)
        if address is not None:
            with contextlib.suppress(Exception):
                _ask_bare(asys, address, AgentStop(kill=True), timeout=15.0)
    for comp in reversed(COMPONENTS):
        for name in conn.info["components"].get(comp, []):
            address = lookup(asys, name)
            if address is None:
                continue
            with contextlib.suppress(RequestFailed, OutcomeUnknown), \
                    ServiceClient(asys, address, timeout=10.0) as c:
                c.call(Stop())
            result["stopped"].append(name)
    say(f"stopped {', '.join(result['stopped']) or 'nothing'}")


# ------------------------------------------------------------------------- files and processes


def read_info(home: Path) -> dict[str, Any] | None:
    """The contents of ``HOME/system.json``, or None."""
    try:
        return json.loads((Path(home) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def remember_log_url(home: Path, url: str) -> None:
    """Keep ``url`` as the log of ``home`` (``HOME/log.url``): it outlives ``down``, so the
    commands that read the log after it (``cei log ...``) read the one the system wrote."""
    path = Path(home) / LOG_URL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    write_secret_file(tmp, (url + "\n").encode())
    os.replace(tmp, path)


def remembered_log_url(home: Path) -> str | None:
    """The log URL of the last system started in ``home`` (running or not), or None."""
    info = read_info(home)
    if info and info.get("log_url"):
        return str(info["log_url"])
    try:
        return (Path(home) / LOG_URL_FILE).read_text().strip() or None
    except OSError:
        return None


def write_info(home: Path, info: dict[str, Any]) -> None:
    path = Path(home) / INFO_FILE
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    write_secret_file(tmp, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    os.replace(tmp, path)


def ensure_credentials_key(plan: Plan, home: Path, say: Progress) -> None:
    """Create the default credentials key ``HOME/credentials.key`` (0600) if the plan's
    Provisioner uses it and it is missing. A key file named elsewhere must exist already."""
    if "provisioner" not in plan.components:
        return
    path = plan.components["provisioner"].config.get("credentials_key_file")
    default = home / CREDENTIALS_KEY_FILE
    if path is None or Path(path) != default or default.exists():
        return
    CredentialsKey.create(default)
    say(f"created the credentials key {default} (mode 0600); every host that runs a "
        "Provisioner replica needs a copy of it")


def secure_home(home: Path, say: Progress) -> None:
    """Make ``home`` 0700 and its system log 0600 (created so, or tightened with a note)."""
    if private_dir(home):
        say(f"{home} was open to other users: its mode is now 0700")
    log = home / LOG_FILE
    if log.exists() and private_file(log):
        say(f"{log} was open to other users: its mode is now 0600")


def log_defs(path: Path) -> dict[str, Any]:
    """thespian logging definitions: everything at INFO and above into ``path``."""
    return {
        "version": 1,
        "formatters": {"plain": {"format": "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path),
                              "formatter": "plain"}},
        "root": {"handlers": ["file"], "level": "INFO"},
    }


#: the caller's stdio, saved by ``_stdio_to``; a process forked meanwhile must not keep them
_SAVED_STDIO: list[int] = []


def _close_saved_stdio() -> None:
    for fd in _SAVED_STDIO:
        with contextlib.suppress(OSError):
            os.close(fd)
    _SAVED_STDIO.clear()


os.register_at_fork(after_in_child=_close_saved_stdio)


@contextlib.contextmanager
def _stdio_to(path: Path) -> Iterator[None]:
    """Point fds 0-2 at /dev/null and ``path`` while the admin is forked, so the background
    system never holds the caller's terminal or pipes (nor the saved copies of them)."""
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    _SAVED_STDIO[:] = saved
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        yield
    finally:
        _SAVED_STDIO.clear()
        for fd, copy_ in zip((0, 1, 2), saved, strict=True):
            os.dup2(copy_, fd)
            os.close(copy_)
        os.close(null)
        os.close(out)


def _address_of(address: int | str) -> str:
    """``HOST:PORT`` of another admin given as ``PORT`` (this host) or ``HOST:PORT``."""
    try:
        host, port = split_host_port(address)
    except NetworkError as exc:
        raise LaunchError(f"admin {address!r}: {exc}") from None
    return f"{host}:{port}"


def _port_answers(port: int) -> bool:
    try:
        asys = attach_system(int(port))
    except SystemNotRunning:
        return False
    detach_system(asys)
    return True


def _node_dirs(plan: Plan, home: Path) -> list[Path]:
    """Where this system's nodes live: its local sites (if it runs the Provisioner), static nodes."""
    sites = plan.registry["sites"].values() if "provisioner" in plan.components else ()
    return [Path(s["state_dir"]) for s in sites if s.get("type") == "local"] + [home / "static"]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a live process, or None."""
    s = procfs.stat(pid)
    return None if s is None or s.dead else (s.state, s.pgrp)


def _listener_pid(port: int) -> int | None:
    """The pid of the process listening on ``port`` in this network namespace (from /proc), or None."""
    inodes = set()
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                link = os.readlink(fd.path)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(entry.name)
    return None


def _system_pids(info: dict[str, Any]) -> list[int]:
    pids = [int(p) for p in (info.get("pids") or {}).values() if p]
    pids += [int(p) for p in info.get("helper_pids") or []]
    return pids + ([int(info["admin_pid"])] if info.get("admin_pid") else [])


def _children(pid: int | None) -> list[int]:
    """Pids whose parent is ``pid`` (a /proc scan)."""
    if pid is None:
        return []
    return [child for child, _ in procfs.children().get(pid, [])]


def _recorded_pids(info: dict[str, Any]) -> list[int]:
    """The system's actor and admin pids that still run and belong to it (same start time)."""
    starts = info.get("pid_starts") or {}
    return [p for p in _system_pids(info)
            if starts.get(str(p)) is not None and _start_ticks(p) == starts[str(p)]]


def _admin_gone(info: dict[str, Any]) -> bool:
    """True when the recorded admin process is known to be dead (killed, or a zombie). thespian's
    logger inherits the admin's listening socket and outlives a killed admin for a few
    seconds, so the port answering does not prove the system up."""
    admin = info.get("admin_pid")
    return "pid_starts" in info and admin is not None and int(admin) not in _recorded_pids(info)


def _start_ticks(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a running process; None if gone or a zombie."""
    s = procfs.stat(pid)
    return None if s is None or s.dead else s.start_ticks


def _node_pids(node_dirs: list[Path]) -> list[tuple[int, bool]]:
    """(pid, kill as a group) of every process the EEAgents' tables name that still runs
    (same pid and start time; whatever state the table gives it), and of each table's reaper
    (the parent of those processes, in its own session: on SIGTERM it terminates what it
    still runs and exits)."""
    out: list[tuple[int, bool]] = []
    for base in node_dirs:
        for procs in list(base.glob("nodes/*/eeagent/processes.json")) + list(base.glob("*/processes.json")):
            with contextlib.suppress(OSError, ValueError, TypeError, SupervisorError):
                table = read_table(procs.parent) or {}
                for p in [*table.get("processes", []), table.get("reaper") or {}]:
                    pid, ticks = p.get("pid"), p.get("start_ticks")
                    if pid and (ticks is None or _start_ticks(int(pid)) == ticks):
                        out.append((int(pid), True))
    return out


def sweep_leftovers(node_dirs: list[Path], pids: list[int] | None = None,
                    grace: float = 3.0, settle: float = 3.0) -> list[int]:
    """Destroy what is still running of the local nodes, their processes and ``pids``.

    Node processes first get SIGTERM (an EEAgent then stops its own processes), then
    SIGKILL after ``grace`` seconds; ``pids`` get ``settle`` seconds to exit by themselves
    first. Returns the pids that had to be signalled.
    """
    from ..provisioner.drivers import LocalProcessDriver

    killed: list[int] = []
    for base in node_dirs:
        if (base / "nodes.json").exists():
            driver = LocalProcessDriver(base, grace_period=grace)
            killed += driver.kill_unrecorded()
            for node in driver.list_nodes():
                if node.extra.get("status") == "running":
                    killed.append(int(node.extra["pid"]))
                    with contextlib.suppress(Exception):
                        driver.destroy_node(node)
    targets = _node_pids(node_dirs) + [(p, False) for p in pids or []]
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and any(_stat(p) is not None for p, _ in targets):
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [(p, g) for p, g in targets if _stat(p) is not None]
        if not alive:
            break
        deadline = time.monotonic() + 5.0
        for pid, group in alive:
            if pid not in killed:
                killed.append(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group and (st := _stat(pid)) is not None and st[1] == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
        while time.monotonic() < deadline and any(_stat(p) is not None for p, _ in alive):
            time.sleep(0.05)
    return killed
