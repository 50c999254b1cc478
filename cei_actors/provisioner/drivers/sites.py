"""Turn a site description plus credentials into a libcloud ``NodeDriver``.

Site types (every site may also carry ``name`` and ``description``; other keys are refused,
so a misspelt key is an error rather than silently ignored):

- ``ec2``: ``region`` (default ``us-east-1``; one of :data:`EC2_REGIONS`), ``secure``, and
  optionally ``host`` and ``port``: an EC2-compatible endpoint instead of the region's own
  (e.g. moto's server in the tests; see :mod:`.ec2`).
- ``nimbus``: Nimbus's EC2-compatible API at ``host``/``port`` (required), ``path``, ``secure``.
- ``openstack``: OpenStack's EC2-compatible API at ``host``/``port`` (required), ``path``,
  ``secure`` (libcloud's Eucalyptus driver, as in the original CEI).
- ``sim``: a :class:`SimulatedCloudDriver`; keys are its options plus ``seed``.
- ``local``: a :class:`LocalProcessDriver`; ``state_dir`` and ``command`` required.

Real clouds need credentials ``access_key`` and ``secret_key`` (``key_name`` is used per
create, not by the driver). ``secure`` defaults to true. Building a driver never touches
the network.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from libcloud.compute.base import NodeDriver
from libcloud.compute.providers import get_driver
from libcloud.compute.types import Provider

from .ec2 import ec2_driver
from .local import LocalProcessDriver
from .simcloud import Clock, SimulatedCloudDriver

__all__ = [
    "EC2_REGIONS",
    "REAL_SITE_TYPES",
    "SITE_TYPES",
    "InvalidCredentials",
    "InvalidSite",
    "driver_for_site",
    "validate_credentials",
    "validate_site",
]

#: EC2 regions the original CEI accepted.
EC2_REGIONS: tuple[str, ...] = (
    "us-east-1",
    "us-west-1",
    "us-west-2",
    "eu-west-1",
    "ap-southeast-1",
    "ap-northeast-1",
    "sa-east-1",
)
REAL_SITE_TYPES: tuple[str, ...] = ("ec2", "nimbus", "openstack")
SITE_TYPES: tuple[str, ...] = (*REAL_SITE_TYPES, "sim", "local")

_COMMON_KEYS = frozenset({"type", "name", "description"})
_SIM_RATES = ("create_failure_rate", "lose_reply_rate", "timeout_rate")
_SIM_HAZARDS = ("vanish_rate", "kill_rate")
_SIM_DURATIONS = ("api_latency", "terminated_linger", "shutdown_delay")
_SIM_BOOLS = ("auth_failure", "strict_catalog")
_LOCAL_DURATIONS = ("grace_period", "terminated_linger", "forget_after")
_ALLOWED_KEYS: dict[str, frozenset[str]] = {
    "ec2": frozenset({"region", "secure", "host", "port"}),
    "nimbus": frozenset({"host", "port", "path", "secure"}),
    "openstack": frozenset({"host", "port", "path", "secure"}),
    "sim": frozenset(
        {"seed", "boot_delay", "max_instances", "region", "id_prefix"}
        | set(_SIM_RATES)
        | set(_SIM_HAZARDS)
        | set(_SIM_DURATIONS)
        | set(_SIM_BOOLS)
    ),
    "local": frozenset({"state_dir", "command", "vars", "env", *_LOCAL_DURATIONS}),
}


class InvalidSite(ValueError):
    """A site description (or its credentials) is unusable; ``key`` names the culprit."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class InvalidCredentials(InvalidSite):
    """Credentials for a real cloud are missing or malformed; ``key`` names the culprit."""


def validate_site(site: Mapping[str, Any]) -> dict[str, Any]:
    """Check a site description; return a copy with defaults filled in.

    Raises :class:`InvalidSite` naming the offending key.
    """
    if not isinstance(site, Mapping):
        raise InvalidSite(f"site description must be a mapping, not {type(site).__name__}")
    if "type" not in site:
        raise InvalidSite("site description is missing key 'type'", "type")
    kind = site["type"]
    if kind not in SITE_TYPES:
        raise InvalidSite(
            f"unknown site type {kind!r} (expected one of {', '.join(SITE_TYPES)})", "type"
        )
    allowed = _COMMON_KEYS | _ALLOWED_KEYS[kind]
    for key in site:
        if key not in allowed:
            raise InvalidSite(f"{kind} site has unknown key {key!r}", key)
    out = dict(site)
    if kind in REAL_SITE_TYPES:
        out["secure"] = _bool(site, "secure", True)
    if kind == "ec2":
        region = out.setdefault("region", "us-east-1")
        if region not in EC2_REGIONS:
            raise InvalidSite(
                f"EC2 region {region!r} is not supported (expected one of "
                f"{', '.join(EC2_REGIONS)})",
                "region",
            )
        if site.get("host") is not None:
            _host(kind, site["host"])
        elif site.get("port") is not None:
            raise InvalidSite("ec2 site has a port but no host", "port")
        if site.get("port") is not None:
            out["port"] = _port(site["port"])
    elif kind in ("nimbus", "openstack"):
        for key in ("host", "port"):
            if site.get(key) in (None, ""):
                raise InvalidSite(f"{kind} site is missing key {key!r}", key)
        _host(kind, site["host"])
        out["port"] = _port(site["port"])
        if "path" in site and site["path"] is not None:
            path = site["path"]
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidSite(f"{kind} site path {path!r} must start with '/'", "path")
    elif kind == "sim":
        _validate_sim(site)
    elif kind == "local":
        _validate_local(site)
    return out


def validate_credentials(site: Mapping[str, Any], credentials: Mapping[str, Any] | None) -> None:
    """Check that a real cloud's credentials carry ``access_key`` and ``secret_key``.

    Sim and local sites need none. Raises :class:`InvalidCredentials`.
    """
    if site.get("type") not in REAL_SITE_TYPES:
        return
    if credentials is None:
        raise InvalidCredentials(
            f"{site['type']} site needs credentials (access_key, secret_key)", "access_key"
        )
    if not isinstance(credentials, Mapping):
        raise InvalidCredentials("credentials must be a mapping")
    for key in ("access_key", "secret_key"):
        value = credentials.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidCredentials(f"credentials are missing key {key!r}", key)
    key_name = credentials.get("key_name")
    if key_name is not None and not isinstance(key_name, str):
        raise InvalidCredentials("credentials key_name must be a string", "key_name")


def driver_for_site(
    site: Mapping[str, Any],
    credentials: Mapping[str, Any] | None = None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    timeout: float | None = None,
) -> NodeDriver:
    """Build the driver for a site. No network traffic happens here.

    ``clock`` and ``rng`` are used by the simulated cloud (``rng`` defaults to
    ``random.Random(site["seed"])``) and ``clock`` by the local driver; ``timeout`` is the
    per-request timeout (seconds) of real cloud drivers. Sim and local sites hold state in
    the returned object: build one per site and keep it.
    """
    spec = validate_site(site)
    validate_credentials(spec, credentials)
    kind = spec["type"]
    if kind == "sim":
        return _sim_driver(spec, clock, rng)
    if kind == "local":
        return LocalProcessDriver(
            spec["state_dir"],
            spec["command"],
            vars=spec.get("vars"),
            env=spec.get("env"),
            clock=clock,
            **{k: float(spec[k]) for k in _LOCAL_DURATIONS if k in spec},
        )
    assert credentials is not None  # checked by validate_credentials
    key, secret = credentials["access_key"], credentials["secret_key"]
    driver: NodeDriver
    if kind == "ec2":
        driver = ec2_driver(spec, key, secret)
    elif kind == "nimbus":
        cls = get_driver(Provider.NIMBUS)
        driver = cls(key, secret, secure=spec["secure"], host=spec["host"], port=spec["port"])
        if spec.get("path"):
            driver.path = spec["path"]
    else:  # openstack, through its EC2-compatible API
        cls = get_driver(Provider.EUCALYPTUS)
        kwargs: dict[str, Any] = {
            "secure": spec["secure"],
            "host": spec["host"],
            "port": spec["port"],
        }
        if spec.get("path"):
            kwargs["path"] = spec["path"]
        driver = cls(key, secret, **kwargs)
    if timeout is not None:
        # The HTTP connection object takes its timeout when built; rebuild it (offline).
        driver.connection.timeout = timeout
        driver.connection.connect()
    return driver


# ---------------------------------------------------------------------- helpers


def _bool(site: Mapping[str, Any], key: str, default: bool) -> bool:
    value = site.get(key, default)
    if not isinstance(value, bool):
        raise InvalidSite(f"{key} value {value!r} is not a boolean", key)
    return value


def _host(kind: str, host: Any) -> None:
    if not isinstance(host, str) or not host.strip() or any(c in host for c in "/: "):
        raise InvalidSite(f"{kind} site host {host!r} is not a host name", "host")


def _port(value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidSite(f"port value {value!r} is not a valid port number", "port")
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InvalidSite(f"port value {value!r} is not a valid port number", "port") from None
    if isinstance(value, float) and value != port:
        raise InvalidSite(f"port value {value!r} is not a valid port number", "port")
    if not 1 <= port <= 65535:
        raise InvalidSite(f"port value {value!r} is not a valid port number", "port")
    return port


def _number(site: Mapping[str, Any], key: str, lo: float, hi: float | None = None) -> None:
    value = site[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSite(f"{key} value {value!r} is not a number", key)
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidSite(f"{key} value {value!r} must be {bound}", key)


def _validate_sim(site: Mapping[str, Any]) -> None:
    for key in _SIM_RATES:
        if key in site:
            _number(site, key, 0.0, 1.0)
    for key in (*_SIM_HAZARDS, *_SIM_DURATIONS):
        if key in site:
            _number(site, key, 0.0)
    for key in _SIM_BOOLS:
        if key in site:
            _bool(site, key, False)
    if "boot_delay" in site:
        value = site["boot_delay"]
        pair = value if isinstance(value, list | tuple) else [value]
        if (
            len(pair) not in (1, 2)
            or any(isinstance(v, bool) or not isinstance(v, int | float) or v < 0 for v in pair)
            or pair[0] > pair[-1]
        ):
            raise InvalidSite(
                f"boot_delay {value!r} must be seconds or [min, max] with 0 <= min <= max",
                "boot_delay",
            )
    if site.get("max_instances") is not None:
        value = site["max_instances"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidSite(f"max_instances {value!r} must be an integer >= 0", "max_instances")
    if "seed" in site and (
        isinstance(site["seed"], bool) or not isinstance(site["seed"], int | str)
    ):
        raise InvalidSite(f"seed {site['seed']!r} must be an integer or string", "seed")
    for key in ("region", "id_prefix"):
        if key in site and not isinstance(site[key], str):
            raise InvalidSite(f"{key} must be a string", key)


def _validate_local(site: Mapping[str, Any]) -> None:
    state_dir = site.get("state_dir")
    if not state_dir or not isinstance(state_dir, str):
        raise InvalidSite("local site is missing key 'state_dir'", "state_dir")
    command = site.get("command")
    if command is None:
        raise InvalidSite("local site is missing key 'command'", "command")
    ok = (
        callable(command)
        or (isinstance(command, str) and command.strip())
        or (
            isinstance(command, list | tuple)
            and command
            and all(isinstance(c, str) for c in command)
        )
    )
    if not ok:
        raise InvalidSite(
            "local site command must be a string, a non-empty list of strings or a callable",
            "command",
        )
    for key in ("vars", "env"):
        if key in site and not isinstance(site[key], Mapping):
            raise InvalidSite(f"local site {key} must be a mapping", key)
    if "env" in site and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in site["env"].items()
    ):
        raise InvalidSite("local site env must map strings to strings", "env")
    for key in _LOCAL_DURATIONS:
        if key in site:
            _number(site, key, 0.0)


def _sim_driver(
    spec: Mapping[str, Any], clock: Clock | None, rng: random.Random | None
) -> SimulatedCloudDriver:
    options: dict[str, Any] = {
        k: spec[k]
        for k in (
            *_SIM_RATES,
            *_SIM_HAZARDS,
            *_SIM_DURATIONS,
            *_SIM_BOOLS,
            "boot_delay",
            "max_instances",
            "region",
            "id_prefix",
        )
        if k in spec
    }
    if "boot_delay" in options:
        delay = options["boot_delay"]
        pair = list(delay) if isinstance(delay, list | tuple) else [delay]
        options["boot_delay"] = (float(pair[0]), float(pair[-1]))
    if rng is None:
        rng = random.Random(spec.get("seed", 0))
    return SimulatedCloudDriver(clock=clock, rng=rng, **options)
