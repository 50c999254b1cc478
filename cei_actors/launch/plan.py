"""Launch plans: which components run, how many replicas, their configuration, the registry.

A plan is a YAML file (the built-in one is ``cei_actors/launch/default.yaml``; copy and edit
it). Top-level keys, all optional except where noted::

    log: URL                      # sqlite:///PATH, zk://HOSTS/CHROOT or memory://NAME; a
                                  # ZooKeeper chroot protected by digest credentials:
                                  # zk://HOSTS/CHROOT?auth_file=${home}/zk.auth (0600, USER:PASSWORD)
    session_timeout: SECONDS      # zk:// logs only: the ZooKeeper session timeout of every
                                  # component's log client and leader election (default 10). A
                                  # leader killed outright leads until its session expires, so
                                  # this bounds failover; the server clamps it to [2, 20] x its
                                  # tickTime (cei_actors.testing.zkserver: tickTime 500 ms, so
                                  # 1 to 10 s). Set into the log URL as ?session_timeout=.
    log_history:                  # the bounded log (docs/decisions.md LT1)
      archive: sqlite:///${home}/archive.sqlite   # or an absolute directory; none: never truncate
      keep_snapshots: 2           # snapshots kept per stream; the log is truncated below the oldest
    components:                   # provisioner, epum, pd, ha: {replicas: N, config: {...}}
    registry:                     # loaded into the Provisioner at every `up` (idempotent)
      sites: {NAME: {type: ..., ...}}
      deployable_types: {NAME: {mappings: ..., contextualization: ...}}
      credentials: {SITE: {access_key: ..., secret_key: ...}}
    pd:
      engines: {ID: {slots: N, maximum_vms: N, heartbeat_period: S, ...}}   # required
      domain_definition: {...}    # the EPUM definition the PD's domains use
      domain_definition_id: pd_default
    epum:
      definitions: {ID: {...}}    # more EPUM domain definitions
      domains: {ID: {definition: ID, config: {...}}}
    static_nodes:                 # EEAgents announced directly to the PD (no EPUM, no
      - {node_id: n1, engine: default, slots: 4}   # Provisioner): the original's harness
    network:                      # this host's transport (docs/multi-host.md; default loopback)
      listen: 198.18.0.1          # the address every socket binds (0.0.0.0 only with
      allow_wildcard: false       #   allow_wildcard: true, and then advertise is required)
      advertise: 198.18.0.1       # the address peers connect to (default: listen)
      allow: [198.18.0.0/24]      # peer networks accepted (CIDR); required off loopback
      admin_port: 1900            # the admin's port (default: a free one); other hosts join it
      join: 198.18.0.2:1900       # another host's admin: this system joins its convention
      peers: [198.18.0.2:1900, 198.18.0.3:1900]   # other hosts' admins: their components are
                                  # found there (those that answer at `up`)
      secret_file: /etc/cei/secret  # the system's secret (32 bytes, 0600), the same file on
                                  # every host; copied to HOME/secret at every `up`
    metrics:                      # the host's Prometheus endpoint (default: on, 127.0.0.1, a
      port: 0                     # free port recorded in HOME/system.json); `metrics: off`:
      address: 127.0.0.1          # none. interval: seconds between two reports of a replica
      interval: 1.0               # (docs/decisions.md MT1)

``log_history`` becomes the log URL's ``archive`` and ``keep_snapshots`` options (unless the URL
sets them itself; not for ``memory://``), so every process that opens the log, ``cei log``
included, reaches the archived history. ``${home}`` anywhere in a string is replaced by the
home directory. The Provisioner's
``credentials_key_file`` (the key that seals credentials at rest, mode 0600) defaults to
``${home}/credentials.key``, which ``up`` creates if it is missing; every host running a
Provisioner replica needs the same key (name a copy of it in each host's plan). Every error raises
:class:`PlanError` naming the file, the dotted key and what was expected; unknown keys are
refused.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import yaml

from ..runtime.network import Network, NetworkError, split_host_port

__all__ = [
    "COMPONENTS",
    "CREDENTIALS_KEY_FILE",
    "ComponentPlan",
    "Plan",
    "PlanError",
    "REQUIRED",
    "StaticNode",
    "default_plan_text",
    "load_plan",
]

#: Components in start order (each may reach the ones before it).
COMPONENTS = ("provisioner", "epum", "pd", "ha")
#: Components a system needs somewhere (HA is optional).
REQUIRED = ("provisioner", "epum", "pd")
DEFAULT_SOURCE = "<built-in plan cei_actors/launch/default.yaml>"
#: The default credentials key file under the home.
CREDENTIALS_KEY_FILE = "credentials.key"

_TOP = {"log", "session_timeout", "log_history", "components", "registry", "pd", "epum", "static_nodes",
        "network",
        "metrics"}
_NETWORK_KEYS = {"listen", "advertise", "allow", "allow_wildcard", "admin_port", "join", "peers", "secret_file"}
_HISTORY_KEYS = {"archive", "keep_snapshots"}
_COMPONENT_KEYS = {"replicas", "config"}
_REGISTRY_KEYS = {"sites", "deployable_types", "credentials"}
_PD_KEYS = {"engines", "domain_definition", "domain_definition_id"}
_EPUM_KEYS = {"definitions", "domains"}
_DOMAIN_KEYS = {"definition", "config"}
_STATIC_KEYS = {"node_id", "engine", "slots"}
_METRICS_KEYS = {"port", "address", "interval"}
#: The metrics endpoint when the plan does not say (``Plan.metrics``).
DEFAULT_METRICS = {"port": 0, "address": "127.0.0.1", "interval": 1.0}


class PlanError(ValueError):
    """A launch plan is invalid; the message names the file, the key and what was expected."""

    def __init__(self, source: str, key: str, expected: str) -> None:
        super().__init__(f"{source}: {key or '(top level)'}: {expected}")
        self.source = source
        self.key = key
        self.expected = expected


@dataclass(frozen=True)
class ComponentPlan:
    """How one component runs: ``replicas`` actors (one leads) started with ``config``."""

    replicas: int = 1
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StaticNode:
    """An EEAgent announced directly to the PD on ``engine``'s domain."""

    node_id: str
    engine: str
    slots: int


@dataclass(frozen=True)
class Plan:
    """A validated launch plan (see the module docstring)."""

    log_url: str
    components: dict[str, ComponentPlan]
    registry: dict[str, dict[str, Any]]
    pd: dict[str, Any]
    epum: dict[str, Any]
    static_nodes: tuple[StaticNode, ...] = ()
    source: str = DEFAULT_SOURCE
    #: this host's transport settings (:class:`~cei_actors.runtime.network.Network`)
    network: Network = field(default_factory=Network)
    #: the admin's port (None: a free one), the admin to join (``HOST:PORT``), the secret file
    admin_port: int | None = None
    join: str | None = None
    peers: tuple[str, ...] = ()
    secret_file: str | None = None
    #: the metrics endpoint: ``{port, address, interval}``, or None (off)
    metrics: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_METRICS))

    def start_config(self, component: str) -> dict[str, Any]:
        """The ``Start.config`` of ``component``: its own config plus what the plan implies."""
        conf = copy.deepcopy(self.components[component].config)
        if component == "pd":
            conf["engines"] = copy.deepcopy(self.pd["engines"])
            conf.setdefault("domain_definition_id", self.pd["domain_definition_id"])
            if self.static_nodes:
                conf["static_resources"] = True
        elif component == "epum":
            defs = dict(conf.get("initial_definitions") or {})
            defs.update(copy.deepcopy(self.epum["definitions"]))
            if not self.static_nodes:
                defs.setdefault(self.pd["domain_definition_id"],
                                copy.deepcopy(self.pd["domain_definition"]))
            conf["initial_definitions"] = defs
            conf["provisioner_vars"] = {**self.default_node_vars(), **(conf.get("provisioner_vars") or {})}
            doms = dict(conf.get("initial_domains") or {})
            doms.update(copy.deepcopy(self.epum["domains"]))
            conf["initial_domains"] = doms
        return conf

    def default_node_vars(self) -> dict[str, Any]:
        """The userdata variables a node of any EPUM domain gets unless its domain gives its
        own (``provisioner_vars``): those of the PD's ``default`` engine (else its first), so
        the default deployable type boots an EEAgent with no extra keys (decision OP1)."""
        engines = self.pd["engines"]
        spec = engines.get("default") or next(iter(engines.values()))
        out = {"slots": spec["slots"], "replicas": spec.get("replicas", 1),
               "heartbeat": spec.get("heartbeat_period", 30.0)}
        pd = self.components.get("pd")
        if pd is not None and "fence_time" in pd.config:
            out["fence"] = pd.config["fence_time"]
        return out

    def engine_of(self, node: StaticNode) -> dict[str, Any]:
        return dict(self.pd["engines"][node.engine])


def default_plan_text() -> str:
    """The text of the built-in plan (``cei_actors/launch/default.yaml``)."""
    return resources.files(__package__).joinpath("default.yaml").read_text()


def load_plan(path: Path | None, *, home: Path, log_url: str | None = None) -> Plan:
    """Load and validate a plan (``None``: the built-in default); ``log_url`` overrides ``log``.

    A plan file is merged over the built-in plan (:func:`merge_with_defaults`); a relative
    ``sqlite:///PATH`` log is relative to the working directory (:func:`absolute_log_url`).
    """
    home = Path(home).expanduser().resolve()
    data = yaml.safe_load(default_plan_text())
    source = DEFAULT_SOURCE
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PlanError(source, "", f"cannot read the plan: {exc.strerror or exc}") from None
        try:
            given = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlanError(source, "", f"expected YAML: {yaml_error_text(exc)}") from None
        if given is not None:
            _Validator(source).mapping(given, "", _TOP)
            data = merge_with_defaults(data, given)
    data = _substitute(data, str(home))
    if log_url is not None:
        log_url = absolute_log_url(log_url)
    elif isinstance(data.get("log"), str):
        data["log"] = absolute_log_url(data["log"])
    plan = _Validator(source).plan(data, log_url)
    if "provisioner" in plan.components:
        plan.components["provisioner"].config.setdefault(
            "credentials_key_file", str(home / CREDENTIALS_KEY_FILE))
    return plan


def merge_with_defaults(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (a plan file's top-level mapping) over the built-in plan ``defaults``: each
    section the file gives replaces the default section, except ``components``: the file's
    components are the ones that run (a subset may join another host's system), each with the
    default ``replicas`` and ``config`` under its own (``config`` merged key by key)."""
    out = {**defaults, **given}
    comps = given.get("components")
    if isinstance(comps, dict):
        merged: dict[str, Any] = {}
        for name, entry in comps.items():
            base = (defaults.get("components") or {}).get(name)
            if isinstance(entry, dict | None) and isinstance(base, dict):
                entry = dict(entry or {})
                config = entry.get("config")
                if isinstance(config, dict | None):
                    entry["config"] = {**(base.get("config") or {}), **(config or {})}
                entry = {**base, **entry}
            merged[name] = entry
        out["components"] = merged
    return out


def absolute_log_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute against the working directory.

    As SQLAlchemy writes them: ``sqlite:///log.sqlite`` is ``./log.sqlite`` and
    ``sqlite:////var/cei/log.sqlite`` is ``/var/cei/log.sqlite``. Other URLs are unchanged."""
    if not isinstance(url, str) or not url.startswith("sqlite:///"):
        return url
    path, q, query = url[len("sqlite:///"):].partition("?")
    if path.startswith("/"):
        path = "/" + path.lstrip("/")
    elif path:
        path = os.path.abspath(path)
    else:
        return url
    return f"sqlite:///{path}{q}{query}"


def shown_log_url(url: str) -> str:
    """``url`` as messages show it: a SQLite log by its file path (no ``////``), others as they
    are, options (``?archive=...``) left out."""
    base = url.partition("?")[0]
    if base.startswith("sqlite:///"):
        return "/" + base[len("sqlite:///"):].lstrip("/")
    return base


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: ``line L, column C: PROBLEM``."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    problem = " ".join(str(problem).split())
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _substitute(value: Any, home: str) -> Any:
    if isinstance(value, str):
        return value.replace("${home}", home)
    if isinstance(value, dict):
        return {k: _substitute(v, home) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, home) for v in value]
    return value


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str) -> PlanError:
        return PlanError(self.source, key, expected)

    def mapping(self, value: Any, key: str, allowed: set[str] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        for k in value:
            if not isinstance(k, str) or not k:
                raise self.fail(key, f"expected string keys, got {k!r}")
            if allowed is not None and k not in allowed:
                where = f"{key}.{k}" if key else k
                close = difflib.get_close_matches(k, sorted(allowed), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.fail(where, f"unknown key {k!r} ({hint}expected one of {', '.join(sorted(allowed))})")
        return dict(value)

    def count(self, value: Any, key: str, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(key, f"expected an integer >= {low}, got {value!r}")
        return value

    def plan(self, data: Any, log_url: str | None) -> Plan:
        top = self.mapping(data, "", _TOP)
        log = log_url if log_url is not None else top.get("log")
        if not isinstance(log, str) or "://" not in log:
            raise self.fail("log", f"expected a log URL (sqlite:///PATH, zk://HOSTS/PATH), got {log!r}")
        if not log.startswith(("sqlite://", "zk://", "memory://")):
            raise self.fail("log", f"expected sqlite://, zk:// or memory://, got {log!r}")
        log = self.log_history(top.get("log_history"), log)
        if log.startswith("zk://"):
            from ..eventlog import BadLogUrl
            from ..eventlog.zookeeper import zk_auth

            try:  # a credentials file that is missing or open to others fails here, not at up
                zk_auth(dict(parse_qsl(urlsplit(log).query)).get("auth_file"))
            except BadLogUrl as exc:
                raise self.fail("log", str(exc)) from None
        log = self.session_timeout(top.get("session_timeout"), log)
        static = self.static_nodes(top.get("static_nodes"))
        components = self.components(top.get("components"), bool(static))
        pd = self.pd(top.get("pd"))
        epum = self.epum(top.get("epum"))
        registry = self.registry(top.get("registry"))
        net = self.network(top.get("network"))
        for i, node in enumerate(static):
            engine = node.get("engine") or next(iter(pd["engines"]))
            if engine not in pd["engines"]:
                raise self.fail(f"static_nodes.{i}.engine",
                                f"expected one of the pd.engines ({', '.join(pd['engines'])}), got {engine!r}")
            node["engine"] = engine
            node.setdefault("slots", pd["engines"][engine]["slots"])
        plan = Plan(
            log_url=log,
            components=components,
            registry=registry,
            pd=pd,
            epum=epum,
            static_nodes=tuple(StaticNode(**n) for n in static),
            source=self.source,
            **net,
            metrics=self.metrics(top.get("metrics", {})),
        )
        self.component_configs(plan)
        return plan

    def network(self, value: Any) -> dict[str, Any]:
        """The ``network`` keys as :class:`Plan` fields."""
        raw = self.mapping(value, "network", _NETWORK_KEYS)
        wildcard = raw.get("allow_wildcard", False)
        if not isinstance(wildcard, bool):
            raise self.fail("network.allow_wildcard", f"expected true or false, got {wildcard!r}")
        allow = raw.get("allow") or []
        if isinstance(allow, str):
            allow = [allow]
        if not isinstance(allow, list):
            raise self.fail("network.allow", f"expected a list of networks (CIDR), got {allow!r}")
        try:
            net = Network.build(raw.get("listen"), raw.get("advertise"), [str(a) for a in allow], wildcard)
        except NetworkError as exc:
            raise self.fail("network", str(exc)) from None
        port = raw.get("admin_port")
        if port is not None:
            port = self.count(port, "network.admin_port", 1)
            if port > 65535:
                raise self.fail("network.admin_port", f"expected a TCP port, got {port}")
        join = raw.get("join")
        if join is not None:
            join = self.admin(join, net, "network.join")
        peers = raw.get("peers") or []
        if not isinstance(peers, list):
            raise self.fail("network.peers", f"expected a list of HOST:PORT, got {peers!r}")
        peers = tuple(self.admin(p, net, f"network.peers.{i}") for i, p in enumerate(peers))
        secret = raw.get("secret_file")
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise self.fail("network.secret_file", f"expected a file path, got {secret!r}")
        if secret is not None:
            from ..runtime.secure import SecretError, read_secret

            try:  # a missing or open secret fails here, not at up
                read_secret(secret)
            except SecretError as exc:
                raise self.fail("network.secret_file", str(exc)) from None
        return {"network": net, "admin_port": port, "join": join, "peers": peers, "secret_file": secret}

    def admin(self, value: Any, net: Network, key: str) -> str:
        try:
            host, port = split_host_port(str(value), net.advertise)
        except NetworkError as exc:
            raise self.fail(key, str(exc)) from None
        return f"{host}:{port}"
    def metrics(self, value: Any) -> dict[str, Any] | None:
        """``{port, address, interval}`` with the defaults filled in; None for ``off``."""
        if value is False or value == "off":
            return None
        raw = self.mapping(value, "metrics", _METRICS_KEYS)
        out = {**DEFAULT_METRICS, **raw}
        port = out["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise self.fail("metrics.port", f"expected a port 0..65535 (0: a free one), got {port!r}")
        import ipaddress

        try:
            ipaddress.ip_address(out["address"])
        except ValueError:
            raise self.fail("metrics.address", f"expected an IP address such as 127.0.0.1, "
                                               f"got {out['address']!r}") from None
        interval = out["interval"]
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0 < interval <= 3600:
            raise self.fail("metrics.interval", f"expected seconds in (0, 3600], got {interval!r}")
        out["interval"] = float(interval)
        return out

    def session_timeout(self, value: Any, log: str) -> str:
        """``log`` with ``session_timeout=value`` in its query (zk:// only; others unchanged)."""
        if value is None:
            return log
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.fail("session_timeout", f"expected a number of seconds > 0, got {value!r}")
        if not log.startswith("zk://"):
            return log  # SQLite: the kernel releases a dead leader's lock at once
        query = dict(parse_qsl(urlsplit(log).query))
        given = query.get("session_timeout")
        if given is not None:
            try:
                same = float(given) == float(value)
            except ValueError:
                same = False
            if not same:
                raise self.fail("session_timeout", f"{value!r}, but the log URL sets session_timeout={given}")
            return log
        return f"{log}{'&' if urlsplit(log).query else '?'}session_timeout={float(value):g}"

    def log_history(self, value: Any, log: str) -> str:
        """The log URL with ``log_history``'s archive and keep_snapshots as its options."""
        raw = self.mapping(value, "log_history", _HISTORY_KEYS)
        options: dict[str, Any] = {}
        archive = raw.get("archive")
        if archive not in (None, "none"):
            from ..eventlog import BadLogUrl
            from ..eventlog.archive import check_archive_spec

            if not isinstance(archive, str):
                raise self.fail("log_history.archive", f"expected sqlite:///PATH or a directory, got {archive!r}")
            try:
                options["archive"] = check_archive_spec(archive, log)
            except BadLogUrl as exc:
                raise self.fail("log_history.archive", str(exc)) from None
        if "keep_snapshots" in raw:
            options["keep_snapshots"] = self.count(raw["keep_snapshots"], "log_history.keep_snapshots", 1)
        given = dict(parse_qsl(urlsplit(log).query))
        options = {k: v for k, v in options.items() if k not in given}
        if not options or log.startswith("memory://"):
            return log
        return log + ("&" if "?" in log else "?") + urlencode(options)

    def components(self, value: Any, static: bool) -> dict[str, ComponentPlan]:
        # A plan may run a subset: the others are found in the system it joins (multi-host);
        # `up` checks that every component it needs is reachable.
        raw = self.mapping(value, "components", set(COMPONENTS))
        if value is None:
            raw = {name: {} for name in COMPONENTS}
        if not raw:
            raise self.fail("components", f"expected at least one of {', '.join(COMPONENTS)}")
        if static and "pd" not in raw:
            raise self.fail("components.pd", "expected the pd component: static_nodes are announced to it")
        out = {}
        for name in COMPONENTS:
            if name not in raw:
                continue
            key = f"components.{name}"
            entry = self.mapping(raw[name], key, _COMPONENT_KEYS)
            replicas = self.count(entry.get("replicas", 1), f"{key}.replicas", 1)
            config = self.mapping(entry.get("config"), f"{key}.config")
            out[name] = ComponentPlan(replicas, config)
        return out

    def pd(self, value: Any) -> dict[str, Any]:
        raw = self.mapping(value, "pd", _PD_KEYS)
        engines = self.mapping(raw.get("engines"), "pd.engines")
        if not engines:
            raise self.fail("pd.engines", "expected at least one engine: {ID: {slots: N, ...}}")
        from ..pd.needs import EngineSpec

        for eid, conf in engines.items():
            key = f"pd.engines.{eid}"
            self.mapping(conf, key)
            try:
                EngineSpec.from_config(eid, conf)
            except (ValueError, TypeError) as exc:
                raise self.fail(key, str(exc)) from None
        definition = self.mapping(raw.get("domain_definition", {"general": {"engine_class": "needy"}}),
                                  "pd.domain_definition")
        def_id = raw.get("domain_definition_id", "pd_default")
        if not isinstance(def_id, str) or not def_id:
            raise self.fail("pd.domain_definition_id", f"expected a definition id, got {def_id!r}")
        return {"engines": engines, "domain_definition": definition, "domain_definition_id": def_id}

    def epum(self, value: Any) -> dict[str, Any]:
        raw = self.mapping(value, "epum", _EPUM_KEYS)
        definitions = self.mapping(raw.get("definitions"), "epum.definitions")
        for did, definition in definitions.items():
            self.mapping(definition, f"epum.definitions.{did}")
        domains = self.mapping(raw.get("domains"), "epum.domains")
        for dom, spec in domains.items():
            key = f"epum.domains.{dom}"
            spec = self.mapping(spec, key, _DOMAIN_KEYS)
            if not isinstance(spec.get("definition"), str):
                raise self.fail(f"{key}.definition", "expected the id of a domain definition")
            self.mapping(spec.get("config"), f"{key}.config")
        return {"definitions": definitions, "domains": domains}

    def registry(self, value: Any) -> dict[str, dict[str, Any]]:
        from ..provisioner import registry as reg
        from ..provisioner.drivers import validate_credentials, validate_site

        raw = self.mapping(value, "registry", _REGISTRY_KEYS)
        sites = self.mapping(raw.get("sites"), "registry.sites")
        for name, definition in sites.items():
            key = f"registry.sites.{name}"
            self.mapping(definition, key)
            try:
                validate_site(definition)
            except ValueError as exc:
                sub = getattr(exc, "key", None)
                raise self.fail(f"{key}.{sub}" if sub else key, str(exc)) from None
            try:
                reg.validate_site(name, definition, validate_site)
            except ValueError as exc:
                raise self.fail(key, str(exc)) from None
        dts = self.mapping(raw.get("deployable_types"), "registry.deployable_types")
        for name, definition in dts.items():
            try:
                reg.validate_dt(name, definition)
            except ValueError as exc:
                raise self.fail(f"registry.deployable_types.{name}", str(exc)) from None
        creds = self.mapping(raw.get("credentials"), "registry.credentials")
        for site, cred in creds.items():
            key = f"registry.credentials.{site}"
            if site not in sites:
                raise self.fail(key, f"expected credentials for a site of registry.sites, got {site!r}")
            try:
                reg.validate_credentials(site, sites[site], cred, validator=validate_credentials)
            except ValueError as exc:
                raise self.fail(key, str(exc)) from None
        return {"sites": sites, "deployable_types": dts, "credentials": creds}

    def static_nodes(self, value: Any) -> list[dict[str, Any]]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail("static_nodes", f"expected a list of nodes, got {type(value).__name__}")
        out, seen = [], set()
        for i, entry in enumerate(value):
            key = f"static_nodes.{i}"
            node = self.mapping(entry, key, _STATIC_KEYS)
            nid = node.get("node_id")
            if not isinstance(nid, str) or not nid:
                raise self.fail(f"{key}.node_id", f"expected a node id, got {nid!r}")
            if nid in seen:
                raise self.fail(f"{key}.node_id", f"expected a unique node id, {nid!r} is repeated")
            seen.add(nid)
            if "slots" in node:
                self.count(node["slots"], f"{key}.slots", 1)
            out.append(node)
        return out

    def component_configs(self, plan: Plan) -> None:
        """Check each component's Start config with the component's own validation."""
        from ..epum.logic import EPUMConfig
        from ..ha.logic import HAConfig
        from ..pd.logic import parse_config
        from ..provisioner.actor import check_config_keys
        from ..runtime.tombstones import DEFAULT_LIMIT, DEFAULT_MAX_AGE, parse_tombstone_bounds

        for name in plan.components:
            key = f"components.{name}.config"
            conf = plan.start_config(name)
            try:
                if name == "pd":
                    parse_config(conf)
                elif name == "epum":
                    EPUMConfig.from_dict(conf)
                elif name == "ha":
                    HAConfig.from_dict(conf)
                else:
                    check_config_keys(conf)
                    parse_tombstone_bounds(  # the core's other values are checked at start
                        "provisioner", conf.get("tombstone_limit", DEFAULT_LIMIT),
                        conf.get("tombstone_max_age", DEFAULT_MAX_AGE))
            except (ValueError, TypeError) as exc:
                raise self.fail(key, str(exc)) from None
