"""The deployable type registry (the original's DTRS) as pure rules over plain data.

What it holds (the Provisioner's state keeps a :class:`Registry`; events change it):

- **sites** at two levels: common (added with ``caller=None``) and per caller. A caller's
  lookup sees its own sites first, then the common ones; ``common::NAME`` names the common
  site explicitly, so no site may be *added* under a name starting with ``common::``.
- **deployable types** (DTs): per caller, with common DTs (``caller=None``) as the fallback.
  A definition::

      {"mappings": {"SITE": {"iaas_image": "ami-1", "iaas_allocation": "m1.small"}},
       "contextualization": {"method": "userdata", "userdata": "#!/bin/sh\\necho ${name}"},
       "description": "optional"}

  ``contextualization`` is optional (method ``none``). The userdata is a ``${var}`` template
  rendered at lookup with the request's vars (dicts and lists JSON-encoded); a missing var
  is a validation failure. Method ``cei-agent`` sends what a VM's EEAgent needs to start
  instead (see :mod:`.contextualization`). Chef and the Nimbus context broker are not supported.
- **credentials** per caller and site (``access_key``, ``secret_key``, ``key_name``). Only
  the caller's own credentials are ever used; real cloud sites need them, sim/local do not.
  They are held as entries of :mod:`.sealing` (sealed, masked for display), never in clear
  except in legacy entries replayed from logs written before sealing.

Site descriptions are checked by an injected validator (the actor passes the drivers'
``validate_site``; this module never imports libcloud).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .contextualization import AGENT_METHOD, InvalidUserdata, render_agent, validate_agent_context
from .sealing import entry_view, upgrade_entry
from .states import Reason

__all__ = [
    "COMMON",
    "COMMON_PREFIX",
    "CREDENTIAL_SITE_TYPES",
    "LookupFailed",
    "Registry",
    "RegistryError",
    "lookup",
    "owner_key",
    "render",
    "resolve_dt",
    "resolve_site",
    "validate_credentials",
    "validate_dt",
    "validate_site",
]

#: Owner key of common entries (added with ``caller=None``).
COMMON = ""
COMMON_PREFIX = "common::"
#: Site types that talk to a real cloud and so need the caller's credentials (must match
#: ``drivers.sites.REAL_SITE_TYPES``; a test checks).
CREDENTIAL_SITE_TYPES = frozenset({"ec2", "nimbus", "openstack"})
CREDENTIAL_TYPES = ("site",)
#: Largest rendered userdata (bytes); EC2 takes 16 KB, so this only guards the log.
MAX_USERDATA = 64 * 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_DT_KEYS = frozenset({"mappings", "contextualization", "description", "name"})
_MAPPING_KEYS = frozenset({"iaas_image", "iaas_allocation"})
_CTX_METHODS = ("none", "userdata", AGENT_METHOD)

SiteValidator = Callable[[Mapping[str, Any]], dict[str, Any]]
CredentialsValidator = Callable[[Mapping[str, Any], Mapping[str, Any] | None], None]


class RegistryError(ValueError):
    """A registry definition or request is invalid (nothing is written)."""


class LookupFailed(Exception):  # noqa: N818 - an outcome: the node becomes FAILED
    """A lookup could not produce a node description; ``reason`` is a :class:`Reason` code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    @property
    def state_desc(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class Registry:
    """Sites, DTs and credentials by owner key (``""`` = common)."""

    sites: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    dts: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: owner -> "<type>:<site>" -> a credentials entry of :mod:`.sealing`
    credentials: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        return {"sites": self.sites, "dts": self.dts, "credentials": self.credentials}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Registry:
        def copy(d: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
            return {o: {n: dict(v) for n, v in items.items()} for o, items in d.items()}

        creds = {o: {n: upgrade_entry(v) for n, v in items.items()}
                 for o, items in data["credentials"].items()}
        return cls(copy(data["sites"]), copy(data["dts"]), creds)


def owner_key(caller: str | None) -> str:
    return COMMON if caller is None else caller


def credential_key(site: str, credential_type: str = "site") -> str:
    return f"{credential_type}:{site}"


# ---------------------------------------------------------------------- validation


def check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(
            f"{what} name {name!r} is invalid: 1-128 of letters, digits, _ . : @ -, "
            "starting with a letter or digit"
        )


def _plain(value: Any, path: str) -> None:
    """Registry data must be msgpack-native plain data."""
    if value is None or isinstance(value, str | int | float | bool):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _plain(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RegistryError(f"{path}: keys must be strings, got {k!r}")
            _plain(v, f"{path}.{k}")
        return
    raise RegistryError(f"{path}: {type(value).__name__} is not plain data")


def _default_site_validator(definition: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(definition.get("type"), str) or not definition["type"]:
        raise RegistryError("site definition needs a string 'type'")
    return dict(definition)


def validate_site(
    name: str, definition: Any, validator: SiteValidator | None = None
) -> dict[str, Any]:
    """Check a site name and definition; return the definition with defaults filled in."""
    check_name("site", name)
    if name.startswith(COMMON_PREFIX):
        raise RegistryError(f"site name {name!r}: the prefix {COMMON_PREFIX!r} is reserved")
    if not isinstance(definition, dict):
        raise RegistryError(f"site {name!r}: definition must be a mapping")
    _plain(definition, f"site {name}")
    try:
        out = (validator or _default_site_validator)(definition)
    except RegistryError:
        raise
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"site {name!r}: {exc}") from None
    _plain(out, f"site {name}")
    return dict(out)


def validate_dt(name: str, definition: Any) -> dict[str, Any]:
    """Check a deployable type definition (see the module docstring); return a copy."""
    check_name("deployable type", name)
    if not isinstance(definition, dict):
        raise RegistryError(f"deployable type {name!r}: definition must be a mapping")
    _plain(definition, f"deployable type {name}")
    for key in definition:
        if key not in _DT_KEYS:
            raise RegistryError(f"deployable type {name!r}: unknown key {key!r}")
    mappings = definition.get("mappings")
    if not isinstance(mappings, dict) or not mappings:
        raise RegistryError(f"deployable type {name!r}: 'mappings' must map sites to images")
    for site, mapping in mappings.items():
        if not isinstance(mapping, dict):
            raise RegistryError(f"deployable type {name!r}: mapping for {site!r} must be a mapping")
        for key, value in mapping.items():
            if key not in _MAPPING_KEYS:
                raise RegistryError(
                    f"deployable type {name!r}: mapping for {site!r} has unknown key {key!r}"
                )
            if not isinstance(value, str) or not value:
                raise RegistryError(
                    f"deployable type {name!r}: {site}.{key} must be a non-empty string"
                )
        if "iaas_image" not in mapping:
            raise RegistryError(f"deployable type {name!r}: mapping for {site!r} needs iaas_image")
    ctx = definition.get("contextualization")
    if ctx is not None:
        if not isinstance(ctx, dict):
            raise RegistryError(f"deployable type {name!r}: contextualization must be a mapping")
        method = ctx.get("method", "none")
        if method not in _CTX_METHODS:
            raise RegistryError(
                f"deployable type {name!r}: contextualization method {method!r} is not "
                f"supported (use {' or '.join(_CTX_METHODS)})"
            )
        if method == AGENT_METHOD:
            try:
                validate_agent_context(ctx)
            except InvalidUserdata as exc:
                raise RegistryError(f"deployable type {name!r}: {exc}") from None
            return dict(definition)
        extra = set(ctx) - {"method", "userdata"}
        if extra:
            raise RegistryError(
                f"deployable type {name!r}: contextualization has unknown key {sorted(extra)[0]!r}"
            )
        if method == "userdata":
            template = ctx.get("userdata")
            if not isinstance(template, str):
                raise RegistryError(
                    f"deployable type {name!r}: userdata contextualization needs a 'userdata' string"
                )
            if not string.Template(template).is_valid():
                raise RegistryError(
                    f"deployable type {name!r}: userdata template has an invalid placeholder "
                    "(write $$ for a literal $)"
                )
        elif "userdata" in ctx:
            raise RegistryError(f"deployable type {name!r}: userdata needs method 'userdata'")
    return dict(definition)


def validate_credentials(
    site: str,
    site_definition: Mapping[str, Any],
    credentials: Any,
    credential_type: str = "site",
    validator: CredentialsValidator | None = None,
) -> dict[str, Any]:
    """Check credentials for ``site``; return a copy."""
    if credential_type not in CREDENTIAL_TYPES:
        raise RegistryError(
            f"credential type {credential_type!r} is not supported (use {', '.join(CREDENTIAL_TYPES)})"
        )
    if not isinstance(credentials, dict):
        raise RegistryError(f"credentials for {site!r} must be a mapping")
    _plain(credentials, f"credentials {site}")
    for key, value in credentials.items():
        if not isinstance(value, str):
            raise RegistryError(f"credentials for {site!r}: {key} must be a string")
    if validator is not None:
        try:
            validator(site_definition, credentials)
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"credentials for {site!r}: {exc}") from None
    return dict(credentials)


# ---------------------------------------------------------------------- lookup


def resolve_site(reg: Registry, caller: str | None, name: str) -> tuple[str, dict[str, Any]] | None:
    """``(owner key, definition)`` of the site ``name`` as seen by ``caller``, or None."""
    if name.startswith(COMMON_PREFIX):
        found = reg.sites.get(COMMON, {}).get(name[len(COMMON_PREFIX) :])
        return (COMMON, found) if found is not None else None
    if caller is not None:
        found = reg.sites.get(caller, {}).get(name)
        if found is not None:
            return caller, found
    found = reg.sites.get(COMMON, {}).get(name)
    return (COMMON, found) if found is not None else None


def resolve_dt(reg: Registry, caller: str | None, name: str) -> tuple[str, dict[str, Any]] | None:
    """``(owner key, definition)`` of the DT ``name`` as seen by ``caller``, or None."""
    if caller is not None:
        found = reg.dts.get(caller, {}).get(name)
        if found is not None:
            return caller, found
    found = reg.dts.get(COMMON, {}).get(name)
    return (COMMON, found) if found is not None else None


def needs_credentials(site_definition: Mapping[str, Any]) -> bool:
    return site_definition.get("type") in CREDENTIAL_SITE_TYPES


def _var_text(value: Any) -> str:
    if isinstance(value, dict | list | tuple | bool) or value is None:
        return json.dumps(value, sort_keys=True)
    return str(value)


def render(template: str, vars: Mapping[str, Any]) -> str:
    """Fill ``${var}`` placeholders; raises :class:`LookupFailed` (validation) on a missing var."""
    try:
        return string.Template(template).substitute({k: _var_text(v) for k, v in vars.items()})
    except KeyError as exc:
        raise LookupFailed(
            Reason.DTRS_VALIDATION_FAILED, f"userdata template variable {exc.args[0]!r} is missing"
        ) from None
    except ValueError as exc:
        raise LookupFailed(Reason.DTRS_VALIDATION_FAILED, f"userdata template: {exc}") from None


def render_agent_userdata(ctx: Mapping[str, Any], vars: Mapping[str, Any]) -> str:
    """A ``cei-agent`` userdata; raises :class:`LookupFailed` (validation) when it cannot."""
    try:
        return render_agent(ctx, vars, _var_text)
    except KeyError as exc:
        raise LookupFailed(
            Reason.DTRS_VALIDATION_FAILED, f"cei-agent template variable {exc.args[0]!r} is missing"
        ) from None
    except (InvalidUserdata, ValueError) as exc:
        raise LookupFailed(Reason.DTRS_VALIDATION_FAILED, str(exc)) from None


def lookup(
    reg: Registry,
    caller: str | None,
    dt_name: str,
    site: str,
    allocation: str | None = None,
    vars: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The node description for one launch of ``dt_name`` at ``site`` on behalf of ``caller``.

    Returns ``iaas_image``, ``iaas_allocation``, ``iaas_sshkeyname``, ``ctx_method``,
    ``needs_nimbus_ctx`` (always False), ``userdata``, ``site_owner``, ``site_type`` and
    ``credentials_owner`` (None when the site needs none). Raises :class:`LookupFailed` with
    ``DTRS_LOOKUP_FAILED`` (unknown DT or site, no mapping, no credentials) or
    ``DTRS_VALIDATION_FAILED`` (a template variable is missing).
    """
    dt = resolve_dt(reg, caller, dt_name)
    if dt is None:
        raise LookupFailed(Reason.DTRS_LOOKUP_FAILED, f"unknown deployable type {dt_name!r}")
    found = resolve_site(reg, caller, site)
    if found is None:
        raise LookupFailed(Reason.DTRS_LOOKUP_FAILED, f"unknown site {site!r}")
    site_owner, site_def = found
    definition = dt[1]
    mapping = definition["mappings"].get(site)
    if mapping is None and site.startswith(COMMON_PREFIX):
        mapping = definition["mappings"].get(site[len(COMMON_PREFIX) :])
    if mapping is None:
        raise LookupFailed(
            Reason.DTRS_LOOKUP_FAILED,
            f"deployable type {dt_name!r} has no mapping for site {site!r}",
        )
    size = allocation or mapping.get("iaas_allocation")
    if not size:
        raise LookupFailed(
            Reason.DTRS_LOOKUP_FAILED,
            f"no allocation: deployable type {dt_name!r} maps none for site {site!r} "
            "and the request gives none",
        )
    creds_owner: str | None = None
    keyname = None
    if needs_credentials(site_def):
        creds_owner = owner_key(caller)
        creds = reg.credentials.get(creds_owner, {}).get(credential_key(_bare(site)))
        if creds is None:
            who = "the common user" if caller is None else f"caller {caller!r}"
            raise LookupFailed(
                Reason.DTRS_LOOKUP_FAILED, f"{who} has no credentials for site {site!r}"
            )
        keyname = entry_view(creds).get("key_name")
    ctx = definition.get("contextualization") or {}
    method = ctx.get("method", "none")
    userdata = render(ctx["userdata"], vars or {}) if method == "userdata" else None
    if method == AGENT_METHOD:
        userdata = render_agent_userdata(ctx, vars or {})
    if userdata is not None and len(userdata.encode()) > MAX_USERDATA:
        raise LookupFailed(
            Reason.DTRS_VALIDATION_FAILED,
            f"rendered userdata is {len(userdata.encode())} bytes (at most {MAX_USERDATA})",
        )
    return {
        "iaas_image": mapping["iaas_image"],
        "iaas_allocation": size,
        "iaas_sshkeyname": keyname,
        "ctx_method": method,
        "needs_nimbus_ctx": False,
        "userdata": userdata,
        "site_owner": site_owner,
        "site_type": site_def.get("type"),
        "credentials_owner": creds_owner,
    }


def _bare(site: str) -> str:
    return site[len(COMMON_PREFIX) :] if site.startswith(COMMON_PREFIX) else site
